"""pyvmm: a KVM virtual machine monitor in Python.

``from pyvmm import MicroVM`` is the library entry point (see
:mod:`pyvmm.microvm`). It is imported on first use, so ``pyvmm``'s CLI does
not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyvmm.microvm import ConsoleTimeout, MicroVM, SerialConsole

__all__ = ["ConsoleTimeout", "MicroVM", "SerialConsole"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pyvmm import microvm

        return getattr(microvm, name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
