"""The layout's rules, checked on the code's own imports (every import, function-level too).

ARCHITECTURE.md: data flows down; device models are sans-IO; only the KVM
package touches the C extension; the runtime never imports the tooling.
A rule broken here is a design change: say why in the commit, or move the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pyvmm"


def modules(package: str = "") -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports at any depth (``from a import b``: ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def breaks(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in imported(path)
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    )


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT.parent))


@pytest.mark.parametrize("path", modules("devices"), ids=rel)
def test_device_models_are_sans_io(path: Path) -> None:
    """Devices get memory, interrupts and back ends injected; they open nothing themselves."""
    forbidden = ("pyvmm.host", "pyvmm.vmm", "pyvmm.kvm", "os", "socket", "select", "fcntl")
    assert breaks(path, forbidden) == []


def test_only_the_kvm_package_touches_the_c_extension() -> None:
    users = [rel(p) for p in modules() if "pyvmm.kvm._kvm_cffi" in imported(p)]
    assert users and all(user.startswith("pyvmm/kvm/") for user in users), users


@pytest.mark.parametrize(
    "package", ["vmm", "devices", "host", "boot", "kvm", "snapshot", "api", "sandbox", "jail"]
)
def test_the_runtime_never_imports_the_tooling(package: str) -> None:
    """guestkit (builds guest images) and nested (the test host) are tools, not the VMM."""
    offenders = {
        rel(p): breaks(p, ("pyvmm.guestkit", "pyvmm.nested"))
        for p in modules(package)
        if breaks(p, ("pyvmm.guestkit", "pyvmm.nested"))
    }
    assert offenders == {}


#: Thread roles are everyone's vocabulary: every pyvmm thread, a back end's included,
#: starts through them.
SHARED = ("pyvmm.vmm.threads",)


@pytest.mark.parametrize("package", ["kvm", "devices", "boot", "snapshot", "host"])
def test_lower_layers_never_reach_up_into_the_core_or_front_ends(package: str) -> None:
    up = ("pyvmm.vmm", "pyvmm.api", "pyvmm.cli", "pyvmm.serve", "pyvmm.microvm")
    offenders = {
        rel(p): [name for name in breaks(p, up) if not name.startswith(SHARED)]
        for p in modules(package)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("path", modules(), ids=rel)
def test_no_module_grows_past_the_size_a_reader_can_hold(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 650
