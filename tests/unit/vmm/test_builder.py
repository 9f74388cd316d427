"""The builder's on-demand imports: what pyvmm-firecracker imports while it waits."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyvmm.vmm.builder as builder

#: In a new interpreter: the machine, then the on-demand modules; print sys.modules.
AFTER_PRELOAD = """
import json, sys
import pyvmm.vmm.machine
from pyvmm.vmm.builder import import_on_demand_modules
import_on_demand_modules()
print(json.dumps(sorted(sys.modules)))
"""


def imports_inside_functions(path: Path) -> set[str]:
    """The pyvmm modules ``path`` imports in function bodies (its lazy imports)."""
    names: set[str] = set()
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyvmm"):
                    names.add(node.module)
    return names


def test_every_lazy_import_of_a_build_is_imported_ahead() -> None:
    """InstanceStart and snapshot load then import nothing (a module added to a build
    path but not to ON_DEMAND_MODULES fails here)."""
    lazy = imports_inside_functions(Path(builder.__file__))
    assert "pyvmm.devices.virtio.block" in lazy  # the walk finds the device imports
    result = subprocess.run(
        [sys.executable, "-c", AFTER_PRELOAD], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert lazy - loaded == set()
