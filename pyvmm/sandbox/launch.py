"""Making a sandbox's VM ready: restore (or boot), connect to the agent, give it an identity.

Three ways in, one way out (a :class:`Launched`):

- :func:`launch_cached`: the usual one. The configuration's cache entry is
  found or built (:mod:`pyvmm.sandbox.template`), then restored as a
  clone: its own work directory, copies of the writable disks, TAPs, vsock
  socket and CID;
- :func:`launch_fresh`: ``fresh_boot``, a guest booted for this sandbox
  alone (no snapshot taken or used);
- :func:`restore_entry`: a clone of any entry (a :meth:`Sandbox.snapshot`
  directory, a fork's snapshot), which :func:`launch_cached` uses too.

Then :func:`attach` waits for the agent (bounded; the wait ends at once if
the VM stops) and runs ``pyvmm-agent --identity`` in the guest. Whatever
fails on the way, the VM is closed and the work directory removed, and the
error is a :class:`~pyvmm.sandbox.errors.SandboxVmError` that quotes the
guest's console.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.sandbox.cache import CacheEntry, SnapshotCache, local_entry
from pyvmm.sandbox.client import AgentClient
from pyvmm.sandbox.config import SandboxConfig
from pyvmm.sandbox.disks import clone_file
from pyvmm.sandbox.errors import AgentUnavailable, SandboxError, SandboxVmError
from pyvmm.sandbox.guest import resolve_guest
from pyvmm.sandbox.identity import Identity, identity_command, new_identity, seed
from pyvmm.sandbox.runners import Runner
from pyvmm.sandbox.template import (
    GuestSpec,
    build_template,
    copy_writable_drives,
    machine_config,
)
from pyvmm.sandbox.vm import SandboxVm
from pyvmm.sandbox.workdir import Workdir
from pyvmm.snapshot.files import SnapshotError

#: Seconds an identity command may take in the guest.
IDENTITY_TIMEOUT = 30.0
#: Seconds the first connection to a restored guest's agent may take (then twice
#: that, and so on): see :meth:`AgentClient.wait_ready`. Measured in a nested
#: host: a connection takes 30-90 ms; one that comes before the guest handled
#: the restore's transport reset is lost (and only dropped by the VMM after 5 s).
FIRST_ATTEMPT = 0.1


@dataclass
class Launched:
    """A running (or paused) sandbox VM with its agent connection."""

    vm: SandboxVm
    identity: Identity
    workdir: Workdir
    agent: AgentClient | None
    #: Drive ids with a copy in the work directory; read-only drives' host paths.
    disk_ids: tuple[str, ...] = ()
    shared: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool | None = None  # restored from the cache; None: not from the cache


def resolve_spec(config: SandboxConfig) -> GuestSpec:
    kernel, initrd, cmdline = resolve_guest(config)
    return GuestSpec(config, kernel, initrd, cmdline)


def launch_cached(config: SandboxConfig, runner: Runner, *, paused: bool = False) -> Launched:
    """A clone of the configuration's cached snapshot (built first if there is none).

    ``paused``: attach and give it its identity, then pause it (the pool).
    An entry that cannot be restored is discarded and built again, once.
    """
    spec = resolve_spec(config)
    cache = SnapshotCache.default(config.cache_dir)
    key = spec.key(runner.kind)
    for attempt in (1, 2):
        started = time.monotonic()
        entry, built = cache.get_or_create(
            key, lambda staging: build_template(spec, runner.kind, staging, _booter(runner, config))
        )
        lookup = time.monotonic() - started
        try:
            launched = restore_entry(local_entry(entry), config, runner, paused=paused)
        except SnapshotError:
            if attempt == 2:
                raise
            cache.discard(key)
            continue
        launched.cached = not built
        launched.timings["template"] = lookup
        return launched
    raise AssertionError("unreachable")


def launch_fresh(config: SandboxConfig, runner: Runner) -> Launched:
    """A guest booted for this sandbox alone (``fresh_boot``)."""
    spec = resolve_spec(config)
    identity = new_identity([n.tap if n is not None else None for n in config.nets])
    workdir = Workdir(identity.name)
    vm: SandboxVm | None = None
    try:
        started = time.monotonic()
        drives = copy_writable_drives(config, workdir.disk)
        machine = machine_config(
            spec, drives, identity, workdir.vsock_uds, identity.cid, identity.macs
        )
        vm = runner.boot(machine, workdir, identity)
        agent = attach(vm, identity, config.boot_timeout, set_clock=False)
        pairs = list(zip(config.drive_ids, config.drives, strict=True))
        return Launched(
            vm, identity, workdir, agent,
            disk_ids=tuple(d for d, drive in pairs if not drive.read_only),
            shared={d: str(drive.path) for d, drive in pairs if drive.read_only},
            timings={"boot": time.monotonic() - started},
        )  # fmt: skip
    except BaseException:
        if vm is not None:
            vm.close()
        workdir.remove()
        raise


def restore_entry(
    entry: CacheEntry, config: SandboxConfig, runner: Runner, *, paused: bool = False
) -> Launched:
    """A clone of ``entry``, attached and with its own identity (paused with ``paused``)."""
    if entry.meta.runner != runner.kind:
        raise SnapshotError(
            f"{entry.path} was made by a {entry.meta.runner} VMM, this sandbox runs {runner.kind}"
        )
    identity = new_identity(
        [n.tap if n is not None else None for n in config.nets] or [None] * len(entry.meta.taps)
    )
    workdir = Workdir(identity.name)
    vm: SandboxVm | None = None
    try:
        started = time.monotonic()
        drives = clone_drives(entry, workdir)
        copied = time.monotonic()
        vm = runner.restore(entry, workdir, identity, drives, resume=True)
        restored = time.monotonic()
        agent = attach(vm, identity, config.ready_timeout, old_macs=entry.meta.macs)
        timings = {
            "disks": copied - started,
            "restore": restored - copied,
            "agent": time.monotonic() - restored,
        }
        if paused:
            vm.pause()
        return Launched(
            vm, identity, workdir, agent,
            disk_ids=tuple(entry.meta.disks), shared=dict(entry.meta.shared), timings=timings,
        )  # fmt: skip
    except BaseException:
        if vm is not None:
            vm.close()
        workdir.remove()
        raise


def clone_drives(entry: CacheEntry, workdir: Workdir) -> dict[str, Path]:
    """Every drive's path for a clone: its own copy of each writable one, the shared others."""
    drives = {drive_id: Path(path) for drive_id, path in entry.meta.shared.items()}
    for drive_id in entry.meta.disks:
        clone_file(entry.disk(drive_id), workdir.disk(drive_id))
        drives[drive_id] = workdir.disk(drive_id)
    return drives


def attach(
    vm: SandboxVm,
    identity: Identity,
    timeout: float,
    *,
    old_macs: tuple[str, ...] = (),
    set_clock: bool = True,
) -> AgentClient:
    """Connect to the guest's agent and run ``pyvmm-agent --identity`` (see the module doc)."""
    try:
        agent = AgentClient.wait_ready(
            vm.vsock_uds, timeout=timeout, alive=vm.alive, interval=0.01,
            first_attempt=FIRST_ATTEMPT,
        )  # fmt: skip
    except AgentUnavailable as exc:
        raise vm_error(vm, f"the sandbox's agent did not answer: {exc}") from None
    try:
        argv = identity_command(identity, old_macs, set_clock=set_clock)
        result = agent.exec(argv, stdin=seed(), timeout=IDENTITY_TIMEOUT)
    except SandboxError as exc:
        agent.close()
        raise vm_error(vm, f"giving the sandbox its identity failed: {exc}") from None
    if result.exit_code != 0:
        agent.close()
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
        raise SandboxVmError(
            f"giving the sandbox its identity failed (`{' '.join(argv[:2])}` exit status "
            f"{result.exit_code}{': ' + result.error if result.error else ''}): {detail}"
        )
    return agent


def vm_error(vm: SandboxVm, message: str) -> SandboxVmError:
    """``message`` with why the VM stopped (if it did) and the end of its console."""
    failure = vm.failure()
    if failure is not None:
        message += f"; the VM stopped: {failure}"
    tail = vm.console_tail().strip()
    return SandboxVmError(message + (f"\n--- guest console (end) ---\n{tail}" if tail else ""))


def _booter(runner: Runner, config: SandboxConfig):  # -> BootAndWait
    """Boot a template and wait for its agent (closed again: only readiness matters)."""

    def boot_and_wait(machine, workdir, identity):  # type: ignore[no-untyped-def]
        vm = runner.boot(machine, workdir, identity)
        try:
            agent = _wait_agent(vm, config.boot_timeout)
            agent.ping()
            agent.close()
        except BaseException:
            vm.close()
            raise
        return vm

    return boot_and_wait


def _wait_agent(vm: SandboxVm, timeout: float) -> AgentClient:
    try:
        return AgentClient.wait_ready(vm.vsock_uds, timeout=timeout, alive=vm.alive)
    except AgentUnavailable as exc:
        raise vm_error(vm, f"the guest's agent did not answer after boot: {exc}") from None
    except PyvmmError as exc:
        raise vm_error(vm, f"the guest's agent failed after boot: {exc}") from None
