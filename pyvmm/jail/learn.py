"""``python -m pyvmm.jail.learn [--enforce] OUT -- COMMAND...``: syscalls per thread role.

How pyvmm's default filters were measured. COMMAND (a pytest run of the
probe-guest suite, say) runs under ``strace -f -ff`` (one trace file per
thread), with a ``sitecustomize`` that makes every Python process it starts
record each thread's id and role as the thread starts. Afterwards the
traces are summed up per role in ``OUT/learned.json``: syscall names, and
for ``ioctl``, ``fcntl``, ``socket`` and friends the first arguments as
strace decodes them (``KVM_RUN``, ``F_GETFL``, ``AF_UNIX``), which is where
the argument checks of the filters come from.

(A first version used ``log`` filters and the kernel's audit lines, which
name the thread; the kernel rate-limits those lines - 270,000 of them were
suppressed in one probe-suite run - so they cannot be summed.)

Roles come from thread names, because the measurement has to work on code
that does not start its threads through ``spawn`` yet: ``vcpuN`` -> vcpu,
``api-*`` -> api, ``pyvmm-io``/``pyvmm-events``/``pyvmm-metrics`` -> io,
anything else -> vmm; in a pytest process (library mode) the main
thread and threads not named ``pyvmm-*`` are the caller's (``caller``).

With ``--enforce``, COMMAND runs with the default filters installed on
every pyvmm thread instead (the main thread of a VMM process is left
alone: only the front end knows when it is done with trusted set-up), which
is how the filters were checked against the whole suite; ``OUT/faults.txt``
gets one line per confined process (``PID faults=N``, or ``PID fault`` just
before a 148 exit).

Tooling only: the VMM never imports this module.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

# The site directory is on PYTHONPATH only while learning or enforcing, so the hook
# needs no environment variable (the nested host passes PYTHONPATH on, not the rest).
_LEARN_SITE = "from pyvmm.jail.learn import activate\nactivate({tid_file!r})\n"
_ENFORCE_SITE = "from pyvmm.jail.learn import enforce\nenforce({fault_log!r})\n"
_CALL = re.compile(r"^(?:\d+\.\d+ )?([a-z0-9_]+)\((.*)")
#: Syscalls whose first decoded arguments matter for the filters.
_ARGUMENTS = {"ioctl": 1, "fcntl": 1, "socket": 0, "prctl": 0, "madvise": 2, "mmap": 2}


def _is_pytest() -> bool:
    """True in a pytest process (``sys.argv`` is not final while ``sitecustomize`` runs)."""
    return any("pytest" in arg for arg in sys.orig_argv[:3])


def _is_pyvmm_front_end() -> bool:
    """``python -m pyvmm run/serve`` or ``pyvmm-firecracker`` (``-c`` ... firecracker_cli)."""
    argv = " ".join(sys.orig_argv[1:4])
    return "pyvmm" in argv and any(word in argv for word in ("run", "serve", "firecracker"))


def role_for_name(name: str, library: bool = False) -> str:
    """The role of a thread called ``name``; in a library caller's process, others are its own."""
    if re.fullmatch(r"vcpu\d+", name):
        return "vcpu"
    if name.startswith("api"):
        return "api"
    if name in ("pyvmm-io", "pyvmm-events", "pyvmm-metrics"):
        return "io"
    if library and not name.startswith("pyvmm"):
        return "caller"
    return "vmm"


def activate(tid_file: str) -> None:
    """Record this process's threads (called from ``sitecustomize``)."""
    library = _is_pytest()
    _record(tid_file, threading.get_native_id(), "caller" if library else "vmm")
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap(self: threading.Thread) -> None:
        _record(tid_file, threading.get_native_id(), role_for_name(self.name, library))
        original(self)

    threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]


def enforce(fault_log: str) -> None:
    """Confine this process's pyvmm threads with the default filters, by thread name.

    The check that the filters are wide enough: COMMAND runs as usual, and
    a denied call ends a VMM process with status 148 (a pytest process:
    fails that VM). Used by ``main`` with ``--enforce``.
    """
    from pyvmm.jail import faults
    from pyvmm.jail.default_filters import DEFAULT_FILTERS
    from pyvmm.jail.filter_file import parse_filters
    from pyvmm.jail.thread_setup import SeccompSetup
    from pyvmm.vmm.threads import ThreadRole

    library = _is_pytest()
    if not library and not _is_pyvmm_front_end():
        return  # helper processes (the nested host's agent, test helpers) stay as they are
    faults.install_handler(faults.FaultPolicy.STOP_VM if library else faults.FaultPolicy.EXIT)
    faults.add_flush_hook(lambda: _record(fault_log, os.getpid(), "fault"))  # before exit 148
    atexit.register(lambda: _record(fault_log, os.getpid(), f"faults={faults.num_faults()}"))
    setup = SeccompSetup.compile(parse_filters(DEFAULT_FILTERS, "default filters"))
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        role = role_for_name(self.name, library)
        if role != "caller":
            setup.enter(ThreadRole(role))
        original(self)

    threading.Thread.run = run  # type: ignore[method-assign]


def _record(tid_file: str, tid: int, role: str) -> None:
    try:  # a process that dropped privileges (a test as 'nobody') cannot; nothing to say then
        fd = os.open(tid_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except PermissionError:
        return
    try:
        os.write(fd, f"{tid} {role}\n".encode())
    finally:
        os.close(fd)


def _argument(text: str, index: int) -> str:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) <= index:
        return "?"
    value = parts[index].split("|")[0] if parts[index].startswith("MAP_") else parts[index]
    return value.rstrip(")")


def summarize(out: Path) -> dict[str, dict[str, list[str]]]:
    roles = {}
    for line in (out / "tids.txt").read_text().splitlines():
        tid, role = line.split()
        roles[int(tid)] = role
    seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for trace in out.glob("trace.*"):
        role = roles.get(int(trace.suffix[1:]))
        if role is None:
            continue  # not a Python thread of ours (a child process, the guest build)
        with trace.open(errors="replace") as lines:
            for line in lines:
                match = _CALL.match(line)
                if not match or "tids.txt" in line:
                    continue
                name, rest = match.groups()
                index = _ARGUMENTS.get(name)
                seen[role][name].add("" if index is None else _argument(rest, index))
    return {
        role: {name: sorted(a for a in args if a) for name, args in sorted(calls.items())}
        for role, calls in sorted(seen.items())
    }


def main(argv: list[str]) -> int:
    enforcing = bool(argv) and argv[0] == "--enforce"
    argv = argv[1:] if enforcing else argv
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    site = out / "site"
    site.mkdir(parents=True, exist_ok=True)
    if enforcing:
        fault_log = str(out / "faults.txt")
        (site / "sitecustomize.py").write_text(_ENFORCE_SITE.format(fault_log=fault_log))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        return subprocess.run(argv[2:], env=env, check=False).returncode
    (site / "sitecustomize.py").write_text(_LEARN_SITE.format(tid_file=str(out / "tids.txt")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    strace = ["strace", "-f", "-ff", "-qq", "-e", "signal=none", "-o", str(out / "trace")]
    status = subprocess.run([*strace, *argv[2:]], env=env, check=False).returncode
    learned = summarize(out)
    (out / "learned.json").write_text(json.dumps(learned, indent=1) + "\n")
    for role, calls in learned.items():
        print(role, len(calls), " ".join(calls))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
