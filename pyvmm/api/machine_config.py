"""The one mapping from the API's :class:`VmResources` to :class:`pyvmm.config.MachineConfig`.

Kept apart so that it grows in one place as ``MachineConfig`` gains fields.

Mapped:

- ``boot-source``: ``kernel_image_path`` -> ``kernel``, ``initrd_path`` ->
  ``initrd``, ``boot_args`` -> ``cmdline``. When ``boot_args`` is absent the
  command line is :data:`pyvmm.config.DEFAULT_LINUX_CMDLINE` (pyvmm's
  default: serial console on ttyS0), not Firecracker's default, which
  silences the 8250 UART that pyvmm's users read the guest on.
- ``machine-config``: ``vcpu_count`` -> ``vcpus``, ``mem_size_mib`` ->
  ``mem_size`` (MiB to bytes); ``cpu_template`` "None" -> "auto" (pyvmm
  picks the filtering its host needs), C3/T2/T2S/T2CL/T2A -> pyvmm's
  templates of those names (:mod:`pyvmm.vmm.cpuid`); ``huge_pages`` "2M"
  -> ``huge_pages`` (hugetlb); ``track_dirty_pages`` -> ``track_dirty_pages``
  (diff snapshots). ``smt`` has no counterpart and changes nothing.
- ``drives`` -> ``drives``, root drive first (so it is ``/dev/vda``):
  ``path_on_host``, ``is_read_only``, ``is_root_device``, and
  ``rate_limiter`` as a :class:`~pyvmm.config.RateLimitSpec` (one-time
  bursts included). A root
  drive with a ``partuuid`` is not flagged ``root``; instead
  ``root=PARTUUID=<uuid> ro|rw`` goes on the command line, as Firecracker
  does. ``cache_type`` changes nothing: pyvmm always honours guest flushes
  (which is "Writeback"; "Unsafe" would only allow skipping them).
- ``network-interfaces`` -> ``nets``: ``host_dev_name`` -> ``tap``,
  ``guest_mac`` -> ``mac``, ``iface_id`` -> ``iface_id``, and
  ``rx_rate_limiter``/``tx_rate_limiter`` as specs.
- ``vsock`` -> ``vsock`` (``guest_cid``, ``uds_path``).
- ``entropy`` -> ``rng=True``, its ``rate_limiter`` -> ``rng_rate_limit``.
- ``balloon`` -> ``balloon`` (:class:`~pyvmm.config.BalloonConfig`).
- ``PUT /serial``'s ``serial_out_path`` -> ``serial_out``.
- Recorded for ``GET /vm/config`` only: a drive's ``io_engine`` (pyvmm has
  one I/O model, which serves "Async" too) and a net ``mtu``.

The way back, :func:`to_vm_resources`, describes a running or restored
machine's config in the API's terms (``GET /vm/config`` after a snapshot
load or a PATCH).

Not part of the machine (the controller handles them): ``logger``,
``metrics``, ``mmds-config`` and the MMDS data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pyvmm.api.balloon import BalloonResource
from pyvmm.api.models import (
    STATIC_CPU_TEMPLATES,
    BootSource,
    Drive,
    Entropy,
    NetworkInterface,
    RateLimiterConfig,
    Vsock,
)
from pyvmm.api.vm_config import VmResources
from pyvmm.config import (
    DEFAULT_LINUX_CMDLINE,
    DriveConfig,
    MachineConfig,
    NetConfig,
    VsockConfig,
)
from pyvmm.errors import ConfigError

_STATIC = {name.lower() for name in STATIC_CPU_TEMPLATES if name != "None"}


def to_machine_config(resources: VmResources) -> MachineConfig:
    """The :class:`MachineConfig` that boots ``resources`` (checked as it is made)."""
    boot = resources.boot_source
    if boot is None:
        raise ConfigError("Cannot start microvm without kernel configuration (PUT /boot-source)")
    cmdline = DEFAULT_LINUX_CMDLINE if boot.boot_args is None else boot.boot_args
    drives = []
    for drive in resources.drive_order():
        root = drive.is_root_device
        if root and drive.partuuid is not None:
            mode = "ro" if drive.is_read_only else "rw"
            cmdline = f"{cmdline} root=PARTUUID={drive.partuuid} {mode}".strip()
            root = False
        drives.append(
            DriveConfig(
                path=Path(drive.path_on_host),
                read_only=drive.is_read_only,
                root=root,
                rate_limit=drive.rate_limiter.to_spec() if drive.rate_limiter else None,
                drive_id=drive.drive_id,
            )
        )
    nets = [
        NetConfig(
            tap=net.host_dev_name,
            mac=net.guest_mac,
            rx_rate_limit=net.rx_rate_limiter.to_spec() if net.rx_rate_limiter else None,
            tx_rate_limit=net.tx_rate_limiter.to_spec() if net.tx_rate_limiter else None,
            iface_id=net.iface_id,
        )
        for net in resources.nets.values()
    ]
    vsock = None
    if resources.vsock is not None:
        vsock = VsockConfig(resources.vsock.guest_cid, Path(resources.vsock.uds_path))
    entropy = resources.entropy
    limiter = entropy.rate_limiter if entropy is not None else None
    return MachineConfig(
        kernel=Path(boot.kernel_image_path),
        initrd=Path(boot.initrd_path) if boot.initrd_path is not None else None,
        cmdline=cmdline,
        vcpus=resources.machine_config.vcpu_count,
        mem_size=resources.machine_config.mem_size_mib << 20,
        cpu_template=_cpu_template(resources.machine_config.cpu_template),
        huge_pages=resources.machine_config.huge_pages == "2M",
        balloon=resources.balloon.to_config() if resources.balloon is not None else None,
        rng=entropy is not None,
        rng_rate_limit=limiter.to_spec() if limiter is not None else None,
        drives=tuple(drives),
        nets=tuple(nets),
        vsock=vsock,
        track_dirty_pages=resources.machine_config.track_dirty_pages,
        serial_out=Path(resources.serial_out_path) if resources.serial_out_path else None,
    )


def _cpu_template(name: str) -> str:
    return "auto" if name == "None" else name.lower()


def to_vm_resources(config: MachineConfig, resources: VmResources) -> None:
    """Describe ``config`` (a running or restored machine's) in ``resources``, in place.

    What only the API knew (a drive's ``partuuid``, cache type or I/O
    engine) is kept where the drive is still there; logger, metrics and
    MMDS are not part of the machine and stay as they are.
    """
    resources.boot_source = BootSource(
        kernel_image_path=str(config.kernel),
        boot_args=config.cmdline,
        initrd_path=str(config.initrd) if config.initrd is not None else None,
    )
    resources.machine_config = dataclasses.replace(
        resources.machine_config,
        vcpu_count=config.vcpus,
        mem_size_mib=config.mem_size >> 20,
        track_dirty_pages=config.track_dirty_pages,
        huge_pages="2M" if config.huge_pages else "None",
        cpu_template=config.cpu_template.upper() if config.cpu_template in _STATIC else "None",
    )
    resources.balloon = BalloonResource.from_config(config.balloon) if config.balloon else None
    ids = config.device_ids
    drives = {}
    for drive_id, drive in zip(ids, config.drives, strict=False):
        old = resources.drives.get(drive_id)
        drives[drive_id] = Drive(
            drive_id=drive_id,
            path_on_host=str(drive.path),
            is_root_device=drive.root or (old is not None and old.is_root_device),
            is_read_only=drive.read_only,
            partuuid=old.partuuid if old is not None else None,
            cache_type=old.cache_type if old is not None else "Unsafe",
            rate_limiter=RateLimiterConfig.from_spec(drive.rate_limit),
            io_engine=old.io_engine if old is not None else "Sync",
        )
    resources.drives = drives
    net_ids = ids[len(config.drives) : len(config.drives) + len(config.nets)]
    old_nets = resources.nets
    resources.nets = {
        iface_id: NetworkInterface(
            iface_id=iface_id,
            host_dev_name=net.tap,
            guest_mac=(net.mac or net.mac_bytes().hex(":")).lower(),
            rx_rate_limiter=RateLimiterConfig.from_spec(net.rx_rate_limit),
            tx_rate_limiter=RateLimiterConfig.from_spec(net.tx_rate_limit),
            mtu=old_nets[iface_id].mtu if iface_id in old_nets else None,
        )
        for iface_id, net in zip(net_ids, config.nets, strict=True)
    }
    vsock = config.vsock
    resources.vsock = Vsock(vsock.guest_cid, str(vsock.uds_path)) if vsock is not None else None
    resources.entropy = (
        Entropy(rate_limiter=RateLimiterConfig.from_spec(config.rng_rate_limit))
        if config.rng
        else None
    )
