"""pyvmm: a KVM virtual machine monitor in Python.

``from pyvmm import MicroVM`` (a VM, :mod:`pyvmm.microvm`) and ``from pyvmm
import Sandbox`` (a command in a throw-away VM, :mod:`pyvmm.sandbox`) are
the library's entry points. Each is imported on first use, so ``pyvmm``'s
CLI does not pay for it.
"""

from __future__ import annotations

# Not ``typing.TYPE_CHECKING``: every pyvmm process imports this package first,
# pyvmm-firecracker before it binds its API socket, and typing costs a few ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from pyvmm.microvm import ConsoleTimeout, MicroVM, SerialConsole
    from pyvmm.sandbox import ExecResult, Sandbox, SandboxConfig, SandboxError, SandboxPool

#: Where each public name lives (imported on first use).
_HOMES = {
    "ConsoleTimeout": "pyvmm.microvm",
    "MicroVM": "pyvmm.microvm",
    "SerialConsole": "pyvmm.microvm",
    "ExecResult": "pyvmm.sandbox",
    "Sandbox": "pyvmm.sandbox",
    "SandboxConfig": "pyvmm.sandbox",
    "SandboxError": "pyvmm.sandbox",
    "SandboxPool": "pyvmm.sandbox",
}
__all__ = [
    "ConsoleTimeout",
    "ExecResult",
    "MicroVM",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxPool",
    "SerialConsole",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
