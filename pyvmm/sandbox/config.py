"""What a sandbox is made of: :class:`SandboxConfig`, parsed and checked once.

A sandbox is a microVM with a guest agent (``guest/agent``) whose only job
is to run commands and move files for the host. Its config is a machine
config minus what pyvmm chooses for each sandbox (the vsock device, its
socket and CID, TAP names, copies of writable disks), plus how the sandbox
is run:

- ``kernel`` None means the default guest (:mod:`pyvmm.sandbox.guest`):
  Debian's cloud kernel and a busybox initramfs that starts the agent;
- ``drives`` are never written: a writable drive is given to each sandbox
  as its own copy-on-write copy (:mod:`pyvmm.sandbox.disks`), a read-only
  one is shared;
- ``nets``: none unless asked for (a sandbox's network is off by default);
  ``auto`` gives each sandbox a TAP of its own, ``tap=NAME`` names one
  (one sandbox at a time); every sandbox gets its own MAC;
- ``confine`` (default True): seccomp filters on every VMM thread, and, as
  root, a jail with a non-root uid and cgroup limits
  (:mod:`pyvmm.sandbox.confinement`);
- ``fresh_boot``: boot instead of restoring the cached snapshot;
- ``cache_dir``: where snapshots are cached (default: ``sandbox/`` in the
  guest kit's cache, ``$PYVMM_CACHE`` or ``~/.cache/pyvmm``).

:func:`sandbox_config` is the one constructor for the CLI's strings and the
library's keyword arguments; every mistake is one
:class:`~pyvmm.errors.ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyvmm.config import (
    CPU_TEMPLATES,
    DriveConfig,
    NetConfig,
    finite_timeout,
    parse_count,
    parse_drive,
    parse_memory_size,
    parse_net,
)
from pyvmm.errors import ConfigError

DEFAULT_MEMORY = 256 << 20
#: Seconds a first (cold) boot may take until its agent answers. Generous: on a
#: nested host under QEMU-TCG a Linux guest needs 10-60 s.
DEFAULT_BOOT_TIMEOUT = 600.0
#: Seconds a restored sandbox's agent may take to answer.
DEFAULT_READY_TIMEOUT = 120.0
#: The value of ``nets`` entries that asks pyvmm for a TAP per sandbox.
AUTO_NET = "auto"
MAX_NETS = 4
MAX_DRIVES = 8


@dataclass(frozen=True)
class SandboxConfig:
    """See the module docstring. Paths are absolute once made by :func:`sandbox_config`."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    vcpus: int = 1
    mem_size: int = DEFAULT_MEMORY
    drives: tuple[DriveConfig, ...] = ()
    nets: tuple[NetConfig | None, ...] = ()  # None: a TAP pyvmm names for each sandbox
    rng: bool = False
    cpu_template: str = "auto"
    confine: bool = True
    fresh_boot: bool = False
    cache_dir: Path | None = None
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    ready_timeout: float = DEFAULT_READY_TIMEOUT

    def __post_init__(self) -> None:
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("an initrd needs a kernel (--kernel); the default guest has its own")
        if self.cpu_template not in CPU_TEMPLATES:
            raise ConfigError(
                f"unknown CPU template {self.cpu_template!r}; choose one of "
                + ", ".join(CPU_TEMPLATES)
            )
        if len(self.drives) > MAX_DRIVES:
            raise ConfigError(f"a sandbox takes at most {MAX_DRIVES} drives")
        if len(self.nets) > MAX_NETS:
            raise ConfigError(f"a sandbox takes at most {MAX_NETS} network interfaces")
        ids = [d.drive_id or f"drive{n}" for n, d in enumerate(self.drives)]
        if len(set(ids)) != len(ids):
            raise ConfigError("two drives have the same id")

    @property
    def drive_ids(self) -> tuple[str, ...]:
        return tuple(d.drive_id or f"drive{n}" for n, d in enumerate(self.drives))

    def replace(self, **changes: object) -> SandboxConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def sandbox_config(
    *,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str | None = None,
    cpus: int | str = 1,
    memory: int | str = DEFAULT_MEMORY >> 20,
    drives: Iterable[DriveConfig | str] = (),
    nets: Iterable[NetConfig | str] = (),
    rng: bool = False,
    cpu_template: str = "auto",
    confine: bool = True,
    fresh_boot: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    boot_timeout: float | None = DEFAULT_BOOT_TIMEOUT,
    ready_timeout: float | None = DEFAULT_READY_TIMEOUT,
) -> SandboxConfig:
    """A :class:`SandboxConfig` from strings (the CLI's grammar) or typed values.

    ``memory`` is MiB as an int or a size (``512M``); ``drives`` as
    ``pyvmm run --drive`` (``path=IMG[,ro][,root]``); ``nets`` entries are
    ``auto`` or ``tap=NAME[,mac=MAC]`` as ``pyvmm run --net``.
    """
    for name, value in (("kernel", kernel), ("initrd", initrd)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name} {str(value)[:200]!r} is not a file")
    parsed_drives = tuple(parse_drive(d) if isinstance(d, str) else d for d in drives)
    for drive in parsed_drives:
        if not isinstance(drive, DriveConfig):
            raise ConfigError(f"a drive must be a DriveConfig or a string, not {drive!r}")
        if not drive.path.is_file():
            raise ConfigError(f"drive {str(drive.path)[:200]!r} is not a file")
    return SandboxConfig(
        kernel=Path(kernel).resolve() if kernel is not None else None,
        initrd=Path(initrd).resolve() if initrd is not None else None,
        cmdline=cmdline,
        vcpus=_cpus(cpus),
        mem_size=parse_memory_size(memory),
        drives=tuple(dataclasses.replace(d, path=d.path.resolve()) for d in parsed_drives),
        nets=tuple(_net(n) for n in nets),
        rng=bool(rng),
        cpu_template=cpu_template,
        confine=bool(confine),
        fresh_boot=bool(fresh_boot),
        cache_dir=Path(cache_dir).resolve() if cache_dir is not None else None,
        boot_timeout=finite_timeout(boot_timeout, "boot timeout") or DEFAULT_BOOT_TIMEOUT,
        ready_timeout=finite_timeout(ready_timeout, "ready timeout") or DEFAULT_READY_TIMEOUT,
    )


def config_from_options(options: Mapping[str, object]) -> SandboxConfig:
    """:func:`sandbox_config` from a mapping (a pytest marker's or ini options), names checked."""
    allowed = set(sandbox_config.__kwdefaults__ or {})
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown sandbox option {unknown[0]!r}; known: {', '.join(sorted(allowed))}"
        )
    return sandbox_config(**options)  # type: ignore[arg-type]


def _cpus(value: int | str) -> int:
    count = parse_count(value, "cpus")
    if not 1 <= count <= 32:
        raise ConfigError(f"cpus must be between 1 and 32, not {count}")
    return count


def _net(value: NetConfig | str | None) -> NetConfig | None:
    if value is None or value == AUTO_NET:
        return None
    if isinstance(value, NetConfig):
        return value
    if isinstance(value, str):
        return parse_net(value)
    raise ConfigError(f"a network interface must be 'auto', 'tap=NAME' or a NetConfig: {value!r}")
