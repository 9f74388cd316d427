"""Error types, named by whose fault the problem is.

Like h11's Local/RemoteProtocolError: the CLI turns a :class:`ConfigError`
into one line and exit code 2; a :class:`GuestError` is the guest's
mistake and costs the guest only what it broke (a virtio device that met one
reports DEVICE_NEEDS_RESET; the VMM carries on); a :class:`HostError` is
something the host refused us.
"""

from __future__ import annotations


class PyvmmError(Exception):
    """Base class of every error pyvmm raises on purpose."""


class ConfigError(PyvmmError):
    """The user's input (flags, files, config) is wrong: fix it and retry."""


class KernelImageError(ConfigError):
    """The kernel or initrd file cannot be booted."""


class VmStateError(ConfigError):
    """The request does not fit the VM's state (pause a VM that is not running, ...)."""


class HostError(PyvmmError):
    """The host refused something we need (permissions, missing features)."""


class GuestError(PyvmmError):
    """The guest did something invalid; what it broke stops working, never the VMM."""


class GuestMemoryError(GuestError):
    """A guest-physical access falls outside guest RAM."""
