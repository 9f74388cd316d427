"""What makes each sandbox distinct, even among clones of one snapshot.

Clones wake up as copies of one guest: same kernel RNG state, host name,
MAC addresses, vsock CID, and a clock stopped at the snapshot's moment.
Each sandbox gets an :class:`Identity` of its own:

- ``name`` (``sbx-`` and 12 hex digits): the guest's host name, and the
  name of the sandbox's work directory and cgroup;
- ``cid``: its vsock CID (the device shows it after the restore's transport
  reset); distinct within a process, random across processes;
- ``taps`` / ``macs``: a TAP device and a locally administered MAC per
  network interface;
- the host then runs ``pyvmm-agent --identity`` in the guest
  (:func:`identity_command`): the CRNG is reseeded from 64 bytes of the
  host's ``getrandom`` (:func:`seed`), the host name, the clock and the
  interfaces' MACs are set. A VM Generation ID device, where the VMM has
  one, makes the kernel reseed on its own as well; the boot id cannot be
  changed from user space.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.config import GUEST_CID_LIMIT, MIN_GUEST_CID

SEED_BYTES = 64
TAP_PREFIX = "pvs"

_cid_lock = threading.Lock()
_cids = itertools.count(MIN_GUEST_CID + secrets.randbelow(1 << 30))


@dataclass(frozen=True)
class Identity:
    """One sandbox's names and numbers (see the module docstring)."""

    name: str
    cid: int
    taps: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()


def new_identity(taps: Sequence[str | None] = ()) -> Identity:
    """A fresh identity; ``taps`` gives one entry per interface (None: pyvmm names the TAP)."""
    token = secrets.token_hex(6)
    names = tuple(
        tap if tap is not None else f"{TAP_PREFIX}{token[:8]}{n}" for n, tap in enumerate(taps)
    )
    macs = tuple(random_mac() for _ in taps)
    return Identity(name=f"sbx-{token}", cid=next_cid(), taps=names, macs=macs)


def next_cid() -> int:
    """A vsock CID no other sandbox of this process has (random start, counting up)."""
    span = GUEST_CID_LIMIT - MIN_GUEST_CID
    with _cid_lock:
        return MIN_GUEST_CID + (next(_cids) - MIN_GUEST_CID) % span


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return raw.hex(":")


def seed() -> bytes:
    """Bytes for the guest's CRNG, from the host's."""
    return os.urandom(SEED_BYTES)


def identity_command(
    identity: Identity, old_macs: Sequence[str] = (), *, set_clock: bool = True
) -> list[str]:
    """The argv that gives a clone ``identity`` (run it with :func:`seed` as its stdin).

    ``old_macs`` are the MACs the guest's interfaces have now (the
    snapshot's), paired with ``identity.macs``.
    """
    argv = ["pyvmm-agent", "--identity", "--hostname", identity.name]
    if set_clock:
        argv += ["--time", f"{time.time():.6f}"]
    for old, new in zip(old_macs, identity.macs, strict=False):
        if old != new:
            argv += ["--mac", f"{old}={new}"]
    return argv


def clock_command() -> list[str]:
    """The argv that sets the guest's clock only (a pooled sandbox, after its pause)."""
    return ["pyvmm-agent", "--identity", "--time", f"{time.time():.6f}"]
