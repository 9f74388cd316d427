"""The :class:`~pyvmm.vmm.threads.ThreadSetup` that confines each pyvmm thread.

``SeccompSetup.enter(role)`` runs on a new thread before its target (and on
the main thread, called by the front end before it reads untrusted input):
it names the thread for the kernel, remembers its role for the fault line
and installs the role's filter on that thread alone.

Filters are compiled once, when the setup is made (a few ms for all roles,
see ``default_filters``), so entering a role costs one ``seccomp()`` call.

Which filter a role gets: the file's filter of that name; a role the file
does not name (Firecracker's files know ``vmm``, ``api`` and ``vcpu``, not
pyvmm's ``io``) takes the ``vmm`` filter. A file with neither is refused
before anything runs.
"""

from __future__ import annotations

import linecache
import threading
from collections.abc import Mapping

from pyvmm.errors import ConfigError
from pyvmm.jail import faults
from pyvmm.jail.filter_file import Filter
from pyvmm.jail.install import install_on_this_thread, set_thread_name
from pyvmm.jail.libseccomp import compile_filter
from pyvmm.vmm.threads import ThreadRole

#: The role whose filter stands in for roles a filter file does not name.
FALLBACK_ROLE = "vmm"


def filters_for_roles(filters: Mapping[str, Filter], where: str) -> dict[str, Filter]:
    """One filter per pyvmm role, taken from ``filters`` (see the module docstring)."""
    known = {role.value for role in ThreadRole}
    unknown = sorted(set(filters) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise ConfigError(f"{where}: unknown thread role {unknown[0]!r} (pyvmm has {names})")
    missing = [role.value for role in ThreadRole if role.value not in filters]
    if missing and FALLBACK_ROLE not in filters:
        raise ConfigError(
            f"{where}: no filter for thread role(s) {', '.join(missing)} "
            f"(a {FALLBACK_ROLE!r} filter stands in for roles a file does not name)"
        )
    chosen = {
        role.value: filters.get(role.value, filters.get(FALLBACK_ROLE)) for role in ThreadRole
    }
    return chosen


def _tracebacks_without_source() -> None:
    """Confined threads format tracebacks from file names and line numbers alone.

    ``traceback`` reads each frame's source line through ``linecache``
    (``stat`` and ``open`` of the ``.py`` file). A vCPU or I/O thread may do
    neither, so logging an exception there would turn a device bug into a
    seccomp fault that ends the VMM with 148 and hides the real error.
    Unconfined threads (a library caller's) keep their source lines.
    """
    if getattr(linecache.updatecache, "_pyvmm_confined", False):
        return
    update, check = linecache.updatecache, linecache.checkcache

    def updatecache(filename: str, module_globals: object = None) -> list[str]:
        return [] if faults.is_confined() else update(filename, module_globals)

    def checkcache(filename: str | None = None) -> None:
        if not faults.is_confined():
            check(filename)

    updatecache._pyvmm_confined = True  # type: ignore[attr-defined]
    linecache.updatecache = updatecache
    linecache.checkcache = checkcache


class SeccompSetup:
    """Installs each role's seccomp filter on the thread that enters the role."""

    def __init__(self, programs: Mapping[str, bytes]) -> None:
        missing = [role.value for role in ThreadRole if role.value not in programs]
        if missing:
            raise ValueError(f"no BPF program for thread role(s) {', '.join(missing)}")
        self._programs = dict(programs)
        _tracebacks_without_source()

    @classmethod
    def compile(cls, filters: Mapping[str, Filter], where: str = "seccomp filters") -> SeccompSetup:
        chosen = filters_for_roles(filters, where)
        return cls({role: compile_filter(f, f"{where}: {role}") for role, f in chosen.items()})

    def program(self, role: ThreadRole) -> bytes:
        return self._programs[role.value]

    def programs(self) -> dict[str, bytes]:
        """Every role's BPF program (a copy: to build another setup from)."""
        return dict(self._programs)

    def failure_note(self) -> str | None:
        """The call this thread's filter denied, if any (library mode: the call failed)."""
        return faults.fault_note()

    def enter(self, role: ThreadRole) -> None:
        thread = threading.current_thread()
        if thread is not threading.main_thread():  # the main thread's name is the process's
            set_thread_name(thread.name)
        faults.register_thread(role.value)
        install_on_this_thread(self._programs[role.value], f"{role.value} filter")
