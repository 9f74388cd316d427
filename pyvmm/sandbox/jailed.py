"""A sandbox VMM in a jail of its own: ``pyvmm-jailer`` + ``pyvmm-firecracker``, over the API.

What root gets by default (see :mod:`pyvmm.sandbox.runners` for why). Each
sandbox's VMM is a fork of this process (:mod:`pyvmm.sandbox.jail_start`)
that bind-mounts the sandbox's files into the jail and runs the jailer:
the jail is
``<work dir>/j/sandbox-firecracker/<sandbox name>/root``; the VMM runs there as a
uid and gid of its own (:func:`sandbox_uid`, one per sandbox, so two
sandboxes' VMMs cannot signal or trace each other), with no capabilities,
``no_new_privs``, its role's seccomp filters on every thread (a denied call
ends that VMM with status 148), and a cgroup
``sandbox-firecracker/<sandbox name>`` (v2 where the controllers are available,
else v1) limited to:

- CPU: its vCPUs' worth plus a quarter CPU for the VMM's own threads
  (``cpu.max`` / ``cpu.cfs_quota_us``);
- memory: guest RAM plus :data:`VMM_OVERHEAD` (``memory.max`` /
  ``memory.limit_in_bytes``; the snapshot's pages the guest reads are
  charged to it too);
- pids: :data:`PIDS_MAX` (threads count).

Inside the jail, every sandbox sees the same paths: ``/vm.state``,
``/vm.mem``, ``/kernel``, ``/initrd``, ``/drives/<id>.img``, its vsock
socket at ``/run/v.sock``, the API at ``/run/api.sock``. So a snapshot
taken in one jail restores in another without renames: only TAP names
are overridden. (Firecracker's API has no way to give a loaded snapshot a
new vsock CID, so jailed clones keep the template's CID, 3; each one's
vsock device and socket are its own all the same.)

Files the VMM reads must be readable by its uid: snapshot files are made
0644; a sandbox's drives are copies owned by the uid (read-only drives too:
a user's image may not be readable by an unknown uid).

The guest's console (the VMM's stdout) goes to ``console.log`` in the work
directory and the VMM's own messages to ``vmm.log``; both are read only
from their end. Closing kills the process group, waits for it and removes
its cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pyvmm.config import MachineConfig
from pyvmm.errors import HostError
from pyvmm.jail.cgroups import CgroupMounts
from pyvmm.sandbox.api_client import ApiClient
from pyvmm.sandbox.cache import CacheEntry
from pyvmm.sandbox.config import SandboxConfig
from pyvmm.sandbox.disks import clone_file
from pyvmm.sandbox.errors import SandboxVmError
from pyvmm.sandbox.identity import Identity
from pyvmm.sandbox.vm import CONSOLE_TAIL_CHARS
from pyvmm.sandbox.workdir import Workdir

#: Named as the jailer demands (it must contain "firecracker"); names the parent cgroup.
EXEC_NAME = "sandbox-firecracker"
#: Memory the VMM process needs besides guest RAM (Python, pyvmm, buffers).
VMM_OVERHEAD = 192 << 20
PIDS_MAX = 64
CPU_PERIOD_US = 100_000
#: Sandbox uids and gids are drawn from [UID_BASE, UID_BASE + UID_SPAN).
UID_BASE = 1_500_000_000
UID_SPAN = 100_000_000
START_TIMEOUT = 120.0
_LOG_TAIL_BYTES = 16 * 1024

#: The exec file the jailer is given: a ``pyvmm-firecracker`` console script,
#: which the jailer recognises and runs in its own process after pivoting.
_VMM_SCRIPT = "import sys\nfrom pyvmm.firecracker_cli import main\nsys.exit(main())\n"
API_SOCKET = "/run/api.sock"
VSOCK_SOCKET = "/run/v.sock"
SNAPSHOT_DIR = "/snapshot"


def sandbox_uid() -> int:
    """A uid (and gid) for one sandbox's VMM, unlikely to be anyone else's."""
    return UID_BASE + secrets.randbelow(UID_SPAN)


def cgroup_flags(config: SandboxConfig, mounts: CgroupMounts | None = None) -> list[str]:
    """The jailer's ``--cgroup-version`` and ``--cgroup`` flags for ``config``'s limits
    (none where this host has no usable cgroup controllers)."""
    from pyvmm.jail.cgroups import read_mounts

    quota = int((config.vcpus + 0.25) * CPU_PERIOD_US)
    memory = config.mem_size + VMM_OVERHEAD
    mounts = mounts if mounts is not None else read_mounts()
    if mounts.v2 is not None and _v2_controllers(mounts.v2) >= {"cpu", "memory", "pids"}:
        values = [
            f"cpu.max={quota} {CPU_PERIOD_US}",
            f"memory.max={memory}",
            f"pids.max={PIDS_MAX}",
        ]
        version = "2"
    elif {"cpu", "memory", "pids"} <= set(mounts.v1):
        values = [f"cpu.cfs_quota_us={quota}", f"memory.limit_in_bytes={memory}",
                  f"pids.max={PIDS_MAX}"]  # fmt: skip
        version = "1"
    else:
        return []
    flags = ["--cgroup-version", version]
    for value in values:
        flags += ["--cgroup", value]
    return flags


def _v2_controllers(root: Path) -> set[str]:
    try:
        return set((root / "cgroup.controllers").read_text()[:4096].split())
    except OSError:
        return set()


class JailedRunner:
    """Makes jailed sandbox VMs (see the module docstring)."""

    kind = "jailed"

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config

    def boot(self, config: MachineConfig, workdir: Workdir, identity: Identity) -> JailedVm:
        from pyvmm.api.machine_config import to_vm_resources
        from pyvmm.api.vm_config import VmResources

        jail = _Jail(workdir, identity, self.config)
        config = jail.place_boot_files(config)
        resources = VmResources()
        to_vm_resources(config, resources)
        jail.write("vm.json", json.dumps(resources.to_json()))
        return jail.start(["--config-file", "/vm.json"], boot=True)

    def restore(
        self,
        entry: CacheEntry,
        workdir: Workdir,
        identity: Identity,
        drives: Mapping[str, Path],
        *,
        resume: bool,
    ) -> JailedVm:
        jail = _Jail(workdir, identity, self.config)
        jail.bind(entry.state_file, "vm.state")
        jail.bind(entry.mem_file, "vm.mem")
        for drive_id, path in drives.items():
            jail.place_drive(drive_id, path, read_only=drive_id in entry.meta.shared)
        vm = jail.start([], boot=False)
        try:
            overrides = [
                {"iface_id": f"net{n}", "host_dev_name": tap} for n, tap in enumerate(identity.taps)
            ]
            vm.api.request("PUT", "/snapshot/load", {
                "snapshot_path": "/vm.state",
                "mem_backend": {"backend_type": "File", "backend_path": "/vm.mem"},
                "resume_vm": resume, "network_overrides": overrides,
            })  # fmt: skip
        except BaseException:
            vm.close()
            raise
        return vm


class _Jail:
    """One sandbox's jail directory being prepared, then its process started."""

    def __init__(self, workdir: Workdir, identity: Identity, config: SandboxConfig) -> None:
        self.workdir = workdir
        self.identity = identity
        self.config = config
        self.uid = sandbox_uid()
        self.base = workdir.path / "j"
        self.root = self.base / EXEC_NAME / identity.name / "root"
        self.binds: list[tuple[str, str, bool]] = []
        try:
            for sub in ("run", "drives", SNAPSHOT_DIR.strip("/")):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chown(self.root / SNAPSHOT_DIR.strip("/"), self.uid, self.uid)
        except OSError as exc:
            raise HostError(f"cannot prepare the jail {self.root}: {exc.strerror}") from None

    def bind(self, source: Path, name: str, read_only: bool = True) -> str:
        """``source`` at ``/name`` in the jail (bound when the process starts)."""
        target = self.root / name
        target.touch(mode=0o600)
        self.binds.append((str(source), str(target), read_only))
        return f"/{name}"

    def write(self, name: str, text: str) -> None:
        path = self.root / name
        path.write_text(text)
        os.chown(path, self.uid, self.uid)

    def place_drive(self, drive_id: str, path: Path, *, read_only: bool) -> str:
        """The sandbox's own copy of a drive (owned by the VMM's uid), bound at /drives."""
        copy = self.workdir.disk(drive_id)
        if read_only or not copy.exists() or copy != path:
            copy = self.workdir.disk(f"{drive_id}-jail")
            clone_file(path, copy)
        os.chown(copy, self.uid, self.uid)
        return self.bind(copy, f"drives/{drive_id}.img", read_only=read_only)

    def place_boot_files(self, config: MachineConfig) -> MachineConfig:
        """``config`` with its files bound into the jail and named by their jail paths."""
        import dataclasses

        kernel = self.bind(config.kernel, "kernel")
        initrd = self.bind(config.initrd, "initrd") if config.initrd is not None else None
        drives = tuple(
            dataclasses.replace(
                d,
                path=Path(
                    self.place_drive(d.drive_id or f"drive{n}", d.path, read_only=d.read_only)
                ),
            )
            for n, d in enumerate(config.drives)
        )
        assert config.vsock is not None
        vsock = dataclasses.replace(config.vsock, uds_path=Path(VSOCK_SOCKET))
        return dataclasses.replace(
            config, kernel=Path(kernel), initrd=Path(initrd) if initrd else None, drives=drives,
            vsock=vsock,
        )  # fmt: skip

    def start(self, vmm_args: list[str], *, boot: bool) -> JailedVm:
        """Fork the jailed VMM (:mod:`pyvmm.sandbox.jail_start`) and wait for its API."""
        from pyvmm.sandbox.jail_start import fork_jailed

        exec_file = self.workdir.path / EXEC_NAME
        exec_file.write_text(f"#!{sys.executable}\n{_VMM_SCRIPT}")
        jailer = [
            "--id", self.identity.name, "--exec-file", str(exec_file),
            "--uid", str(self.uid), "--gid", str(self.uid), "--chroot-base-dir", str(self.base),
            *cgroup_flags(self.config), "--", "--api-sock", API_SOCKET, *vmm_args,
        ]  # fmt: skip
        console = self.workdir.path / "console.log"
        log = self.workdir.path / "vmm.log"
        with open(console, "wb") as out, open(log, "wb") as err:
            pid = fork_jailed(self.root, self.binds, jailer, out.fileno(), err.fileno())
        vm = JailedVm(pid, self.root, console, log, self.identity.name, jailer)
        try:
            vm.api.wait_listening(time.monotonic() + START_TIMEOUT, vm.alive)
        except SandboxVmError as exc:
            failure = vm.failure()
            vm.close()
            raise SandboxVmError(f"{exc}; {failure}" if failure else str(exc)) from None
        except BaseException:
            vm.close()
            raise
        return vm


class JailedVm:
    """A jailed VMM process and its API (the :class:`~pyvmm.sandbox.vm.SandboxVm` protocol)."""

    def __init__(
        self,
        pid: int,
        root: Path,
        console: Path,
        log: Path,
        vm_id: str,
        jailer_args: list[str],
    ) -> None:
        self.pid = pid
        self._status: int | None = None
        self.root = root
        self.console = console
        self.log = log
        self.vm_id = vm_id
        self.jailer_args = jailer_args
        self.api = ApiClient(root / API_SOCKET.lstrip("/"))
        self.vsock_uds = root / VSOCK_SOCKET.lstrip("/")
        self._closed = False

    def _poll(self, block: bool = False) -> int | None:
        """The VMM's exit status once it ended (reaping it), else None."""
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self._status = -1
            else:
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def alive(self) -> bool:
        return self._poll() is None

    def failure(self) -> str | None:
        code = self._poll()
        if code is None:
            return None
        detail = _tail(self.log, 600).strip().splitlines()
        return f"the jailed VMM exited with status {code}" + (f": {detail[-1]}" if detail else "")

    def console_tail(self, chars: int = CONSOLE_TAIL_CHARS) -> str:
        return _tail(self.console, chars)

    def pause(self) -> None:
        self.api.request("PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.api.request("PATCH", "/vm", {"state": "Resumed"})

    def snapshot(self, state_path: Path, mem_path: Path) -> None:
        self.api.request("PUT", "/snapshot/create", {
            "snapshot_type": "Full", "snapshot_path": f"{SNAPSHOT_DIR}/vm.state",
            "mem_file_path": f"{SNAPSHOT_DIR}/vm.mem",
        })  # fmt: skip
        inside = self.root / SNAPSHOT_DIR.strip("/")
        for name, target in (("vm.state", state_path), ("vm.mem", mem_path)):
            _move(inside / name, target)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self._poll(block=True)
        _remove_cgroups(self.jailer_args, self.vm_id)


def _move(source: Path, target: Path) -> None:
    """Move a file the VMM wrote out of the jail (0644: a jailed restore reads it)."""
    try:
        try:
            os.rename(source, target)
        except OSError:
            clone_file(source, target)
            source.unlink()
        os.chown(target, 0, 0)
        os.chmod(target, 0o644)
    except OSError as exc:
        raise SandboxVmError(f"cannot move {source} to {target}: {exc.strerror}") from None


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max(chars, _LOG_TAIL_BYTES)))
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def _remove_cgroups(jailer_args: list[str], vm_id: str) -> None:
    """rmdir the VM's cgroups (the process is gone; the shared parent stays)."""
    from pyvmm.jail import cgroups
    from pyvmm.jail.spec import parse_jail_spec

    flags = jailer_args[: jailer_args.index("--")]
    settings = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--cgroup"]
    if not settings:
        return
    version = flags[flags.index("--cgroup-version") + 1]
    spec = parse_jail_spec(
        id=vm_id, exec_file=EXEC_NAME, uid="0", gid="0", cgroup_version=version,
        cgroups=tuple(settings),
    )  # fmt: skip
    plan = cgroups.plan(spec, cgroups.read_mounts())
    for path in plan.cgroups if plan is not None else ():
        for _ in range(50):  # the kernel frees a cgroup a moment after its last task
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
