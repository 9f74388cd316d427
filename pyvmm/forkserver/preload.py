"""What the fork server imports before it serves: everything any ``pyvmm run`` may import.

A VM process forked from the server must import nothing: that is the whole
gain (importing pyvmm is most of a ``pyvmm run``'s start-up, and a module
imported once in the server is memory every child shares). "Everything"
is every pyvmm module but the sandbox library, the filter-learning tool and
the entry points, plus the third-party modules pyvmm imports inside
functions (the jailer's list, :data:`pyvmm.jail.preload.LAZY_THIRD_PARTY`),
and pyvmm's default seccomp filters, compiled (with libseccomp; a direct
``pyvmm run`` compiles them at every start). The guest kit and
the nested host are included: ``pyvmm run`` with no ``--kernel`` builds the
default guest, and on a PVM host runs Linux in a nested host.

Then ``gc.freeze()``: the imported objects move to a generation the
collector never scans again, so a child's collections do not write to
(and so copy) the pages it shares with the server.
"""

from __future__ import annotations

import gc
import importlib
import pkgutil

import pyvmm
from pyvmm.jail.preload import LAZY_THIRD_PARTY

#: Never part of a ``pyvmm run``.
_NOT_RUN = ("pyvmm.sandbox", "pyvmm.jail.learn", "pyvmm.__main__", "pyvmm.entry")


def run_modules() -> list[str]:
    """Names of the pyvmm modules a ``pyvmm run`` of some config may import."""
    return sorted(
        info.name
        for info in pkgutil.walk_packages(pyvmm.__path__, "pyvmm.")
        if not info.name.startswith(_NOT_RUN) and not info.name.rpartition(".")[2].startswith("_")
    )


def preload() -> int:
    """Import every module a run may need, load libseccomp, freeze; the number of modules."""
    names = run_modules()
    for name in (*names, *LAZY_THIRD_PARTY):
        importlib.import_module(name)
    from pyvmm.jail.seccomp import precompile_defaults

    precompile_defaults()  # dlopens libseccomp; each VM process skips the ~10 ms compile
    gc.collect()
    gc.freeze()
    return len(names)
