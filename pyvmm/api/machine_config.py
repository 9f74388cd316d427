"""The one mapping from the API's :class:`VmResources` to :class:`pyvmm.config.MachineConfig`.

Kept apart so that it grows in one place as ``MachineConfig`` gains fields.

Mapped:

- ``boot-source``: ``kernel_image_path`` -> ``kernel``, ``initrd_path`` ->
  ``initrd``, ``boot_args`` -> ``cmdline``. When ``boot_args`` is absent the
  command line is :data:`pyvmm.config.DEFAULT_LINUX_CMDLINE` (pyvmm's
  default: serial console on ttyS0), not Firecracker's default, which
  silences the 8250 UART that pyvmm's users read the guest on.
- ``machine-config``: ``vcpu_count`` -> ``vcpus``, ``mem_size_mib`` ->
  ``mem_size`` (MiB to bytes); ``cpu_template`` is always "auto" (pyvmm
  picks the filtering its host needs); ``track_dirty_pages`` ->
  ``track_dirty_pages`` (diff snapshots). ``smt`` and ``huge_pages`` have
  no counterpart and change nothing.
- ``drives`` -> ``drives``, root drive first (so it is ``/dev/vda``):
  ``path_on_host``, ``is_read_only``, ``is_root_device``, and
  ``rate_limiter`` as the ``bw=SIZE/TIMEms,ops=N/TIMEms`` shorthand. A root
  drive with a ``partuuid`` is not flagged ``root``; instead
  ``root=PARTUUID=<uuid> ro|rw`` goes on the command line, as Firecracker
  does. ``cache_type`` changes nothing: pyvmm always honours guest flushes
  (which is "Writeback"; "Unsafe" would only allow skipping them).
- ``network-interfaces`` -> ``nets``: ``host_dev_name`` -> ``tap``,
  ``guest_mac`` -> ``mac``, ``iface_id`` -> ``iface_id``, and
  ``rx_rate_limiter``/``tx_rate_limiter`` in the same shorthand.
- ``vsock`` -> ``vsock`` (``guest_cid``, ``uds_path``).
- ``entropy`` -> ``rng=True``, its ``rate_limiter`` -> ``rng_rate_limit``.

Refused with a :class:`~pyvmm.errors.ConfigError`, because ``MachineConfig``
cannot express it and silently dropping it would run a different VM than
the one configured: a rate limiter with a ``one_time_burst``.

Not part of the machine (the controller handles them): ``logger``,
``metrics``, ``mmds-config`` and the MMDS data.
"""

from __future__ import annotations

from pathlib import Path

from pyvmm.api.fields import show
from pyvmm.api.models import RateLimiterConfig
from pyvmm.api.vm_config import VmResources
from pyvmm.config import (
    DEFAULT_LINUX_CMDLINE,
    DriveConfig,
    MachineConfig,
    NetConfig,
    VsockConfig,
)
from pyvmm.errors import ConfigError


def to_machine_config(resources: VmResources) -> MachineConfig:
    """The :class:`MachineConfig` that boots ``resources`` (not yet validated)."""
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
                rate_limit=_rate_limit_shorthand(
                    drive.rate_limiter, f"drive {show(drive.drive_id)}"
                ),
                drive_id=drive.drive_id,
            )
        )
    nets = []
    for net in resources.nets.values():
        where = f"network interface {show(net.iface_id)}"
        nets.append(
            NetConfig(
                tap=net.host_dev_name,
                mac=net.guest_mac,
                rx_rate_limit=_rate_limit_shorthand(net.rx_rate_limiter, f"{where} rx"),
                tx_rate_limit=_rate_limit_shorthand(net.tx_rate_limiter, f"{where} tx"),
                iface_id=net.iface_id,
            )
        )
    vsock = None
    if resources.vsock is not None:
        vsock = VsockConfig(resources.vsock.guest_cid, Path(resources.vsock.uds_path))
    entropy = resources.entropy
    return MachineConfig(
        kernel=Path(boot.kernel_image_path),
        initrd=Path(boot.initrd_path) if boot.initrd_path is not None else None,
        cmdline=cmdline,
        vcpus=resources.machine_config.vcpu_count,
        mem_size=resources.machine_config.mem_size_mib << 20,
        cpu_template="auto",
        rng=entropy is not None,
        rng_rate_limit=(
            _rate_limit_shorthand(entropy.rate_limiter, "entropy") if entropy is not None else None
        ),
        drives=tuple(drives),
        nets=tuple(nets),
        vsock=vsock,
        track_dirty_pages=resources.machine_config.track_dirty_pages,
    )


def _rate_limit_shorthand(limiter: RateLimiterConfig | None, where: str) -> str | None:
    """``bw=SIZE/TIMEms,ops=N/TIMEms`` (:func:`pyvmm.devices.rate_limiter.parse_rate_limit`)."""
    if limiter is None:
        return None
    items = []
    for key, bucket in (("bw", limiter.bandwidth), ("ops", limiter.ops)):
        if bucket is None or not bucket.enabled:
            continue
        if bucket.one_time_burst:
            raise ConfigError(f"{where}: pyvmm rate limiters cannot have a one_time_burst yet")
        items.append(f"{key}={bucket.size}/{bucket.refill_time}ms")
    return ",".join(items) or None
