"""The first sandbox of a configuration: boot it, wait for its agent, snapshot it.

What a cache entry (:mod:`pyvmm.sandbox.cache`) is made from. The
template VM boots with:

- the guest (:func:`~pyvmm.sandbox.guest.resolve_guest`), the config's
  vCPUs, memory, CPU template and rng;
- each drive: a read-only one as it is; a writable one as a copy written
  straight into the entry (``disks/<id>.img``), so the entry keeps the disk
  exactly as the guest's page cache in the snapshot knows it;
- each interface on a TAP of its own with the MAC the config names, or a
  random one (clones rename the TAPs and change the guest's MACs);
- a vsock device (CID 3) whose socket is in a temporary directory.

Once the agent answers a PING, the connection is closed, the VM paused and
snapshotted into the entry, and the template VM thrown away: every sandbox,
the first one included, is then a restore of that snapshot, so all of them
start from the same state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvmm.config import MachineConfig, NetConfig, VsockConfig
from pyvmm.sandbox.cache import (
    DISK_DIR,
    MEM_FILE,
    STATE_FILE,
    EntryMeta,
    file_identity,
    host_identity,
    record_extents,
    template_key,
)
from pyvmm.sandbox.config import SandboxConfig
from pyvmm.sandbox.disks import clone_file
from pyvmm.sandbox.identity import Identity, new_identity, random_mac
from pyvmm.sandbox.vm import SandboxVm
from pyvmm.sandbox.workdir import Workdir

#: The guest CID of a template (clones get their own).
TEMPLATE_CID = 3


@dataclass(frozen=True)
class GuestSpec:
    """A sandbox config with its guest resolved: what to boot, exactly."""

    config: SandboxConfig
    kernel: Path
    initrd: Path | None
    cmdline: str

    def key_inputs(self, runner_kind: str) -> dict[str, object]:
        """Everything that shapes the guest at its snapshot (see :mod:`pyvmm.sandbox.cache`)."""
        config = self.config
        return {
            "kernel": file_identity(self.kernel),
            "initrd": file_identity(self.initrd) if self.initrd is not None else None,
            "cmdline": self.cmdline,
            "vcpus": config.vcpus,
            "mem_size": config.mem_size,
            "cpu_template": config.cpu_template,
            "rng": config.rng,
            "drives": [
                {
                    **file_identity(d.path),
                    "ro": d.read_only,
                    "root": d.root,
                    "id": drive_id,
                    "limit": str(d.rate_limit),
                }
                for drive_id, d in zip(config.drive_ids, config.drives, strict=True)
            ],
            "nets": [
                None if n is None else [str(n.rx_rate_limit), str(n.tx_rate_limit)]
                for n in config.nets
            ],
            "runner": runner_kind,
            "host": host_identity(),
        }

    def key(self, runner_kind: str) -> str:
        return template_key(self.key_inputs(runner_kind))


def machine_config(
    spec: GuestSpec,
    drive_paths: dict[str, Path],
    identity: Identity,
    vsock_uds: Path,
    cid: int,
    macs: tuple[str, ...],
) -> MachineConfig:
    """The machine a sandbox (or a template) boots: drives at ``drive_paths``, TAPs and
    MACs from ``identity``/``macs``, the vsock device on ``vsock_uds``."""
    config = spec.config
    drives = tuple(
        dataclasses.replace(d, path=drive_paths[drive_id], drive_id=drive_id)
        for drive_id, d in zip(config.drive_ids, config.drives, strict=True)
    )
    nets = tuple(
        NetConfig(
            tap=tap,
            mac=mac,
            rx_rate_limit=n.rx_rate_limit if n is not None else None,
            tx_rate_limit=n.tx_rate_limit if n is not None else None,
            iface_id=f"net{index}",
        )
        for index, (n, tap, mac) in enumerate(zip(config.nets, identity.taps, macs, strict=True))
    )
    return MachineConfig(
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        vcpus=config.vcpus,
        mem_size=config.mem_size,
        cpu_template=config.cpu_template,
        rng=config.rng,
        drives=drives,
        nets=nets,
        vsock=VsockConfig(cid, vsock_uds),
    )


def boot_macs(config: SandboxConfig) -> tuple[str, ...]:
    """The MAC each interface boots with: the config's, or a random one."""
    return tuple(n.mac if n is not None and n.mac else random_mac() for n in config.nets)


def copy_writable_drives(config: SandboxConfig, target: Callable[[str], Path]) -> dict[str, Path]:
    """Every drive's path for a VM: a copy at ``target(id)`` for a writable one."""
    paths: dict[str, Path] = {}
    for drive_id, drive in zip(config.drive_ids, config.drives, strict=True):
        if drive.read_only:
            paths[drive_id] = drive.path
        else:
            clone_file(drive.path, target(drive_id))
            paths[drive_id] = target(drive_id)
    return paths


BootAndWait = Callable[[MachineConfig, Workdir, Identity], SandboxVm]


def build_template(
    spec: GuestSpec,
    runner_kind: str,
    staging: Path,
    boot_and_wait: BootAndWait,
) -> EntryMeta:
    """Boot the template, snapshot it into ``staging`` and return the entry's meta.

    ``boot_and_wait`` boots a machine config and returns once the guest's
    agent answered (raising, with the console tail, when it does not).
    """
    drives = list(zip(spec.config.drive_ids, spec.config.drives, strict=True))
    identity = new_identity([None] * len(spec.config.nets))
    macs = boot_macs(spec.config)
    workdir = Workdir(f"tpl-{identity.name}")
    try:
        drive_paths = copy_writable_drives(
            spec.config, lambda drive_id: staging / DISK_DIR / f"{drive_id}.img"
        )
        config = machine_config(spec, drive_paths, identity, workdir.vsock_uds, TEMPLATE_CID, macs)
        started = time.monotonic()
        vm = boot_and_wait(config, workdir, identity)
        try:
            booted = time.monotonic() - started
            started = time.monotonic()
            vm.pause()
            vm.snapshot(staging / STATE_FILE, staging / MEM_FILE)
            record_extents(staging)
            snapshotted = time.monotonic() - started
        finally:
            vm.close()
    finally:
        workdir.remove()
    return EntryMeta(
        key=spec.key(runner_kind),
        runner=runner_kind,
        disks={d: f"{d}.img" for d, drive in drives if not drive.read_only},
        shared={d: str(drive.path) for d, drive in drives if drive.read_only},
        macs=macs,
        taps=identity.taps,
        boot_seconds=round(booted, 3),
        snapshot_seconds=round(snapshotted, 3),
    )
