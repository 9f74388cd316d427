"""The VM generation id: 16 random bytes a guest rereads when it may have been cloned.

Why it exists: a snapshot restored twice gives two VMs with the same
memory, so the same kernel RNG state, the same TLS session keys, the same
UUIDs to come. Microsoft's "Virtual Machine Generation ID" specification
(also in QEMU and Firecracker) gives the guest a 128-bit value that changes
whenever the VM is restored from a snapshot; Linux's ``vmgenid`` driver
(``CONFIG_VMGENID``) mixes it into the RNG at boot and, on a change,
reseeds the RNG at once (``add_vmfork_randomness``: "crng reseeded due to
virtual machine fork").

How the guest finds it: the DSDT's ``VGEN`` device
(:func:`pyvmm.boot.acpi.dsdt.vm_generation_id`) returns the guest-physical
address from its ``ADDR`` method; the 16 bytes are there, in guest memory
(``layout.VMGENID_ADDR``, outside the e820 RAM map). A change is announced
by an edge on the Generic Event Device's GSI, which makes the guest run
``Notify (VGEN, 0x80)``; the driver then reads the bytes again.

The model owns the current id and writes it through an injected memory
interface (anything with ``write(addr, data)``); randomness comes from an
injected ``entropy(n) -> bytes`` and the notification goes out through an
:class:`~pyvmm.devices.base.IrqTrigger`. It has no registers: nothing on a
bus, no guest value ever reaches it.

Lifecycle: a booted machine writes its first id with :meth:`publish`; a
restored one takes the saved id with :meth:`restore` (guest memory already
holds it) and then, for a clone, calls :meth:`new_generation`: the new id
written, then the interrupt raised. The VMM calls it while the vCPUs are
parked, after their LAPIC state is restored, so the guest takes the
interrupt as it resumes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.base import IrqTrigger

GUID_SIZE = 16
GUID_ALIGNMENT = 8  # the spec asks for an 8-byte aligned id


class GuestWriter(Protocol):
    """Where the id goes: guest memory (:class:`pyvmm.memory.GuestMemory`) or a test fake."""

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``addr``."""


@dataclass(frozen=True)
class VmGenIdState:
    """The id the guest was last given, and where it is (the guest's DSDT says so too)."""

    generation: bytes
    address: int


class VmGenId:
    """The VM generation id device; see the module docstring."""

    def __init__(
        self,
        memory: GuestWriter,
        address: int,
        irq: IrqTrigger,
        entropy: Callable[[int], bytes],
    ) -> None:
        """Draw a first id (not yet in guest memory: see :meth:`publish`)."""
        if address < 0 or address % GUID_ALIGNMENT:
            raise ValueError(f"VM generation id address {address:#x} must be 8-byte aligned")
        self.address = address
        self._memory = memory
        self._irq = irq
        self._entropy = entropy
        self._lock = threading.Lock()
        self._generation = self._draw(b"")
        #: Generations given since this process built the device (boot or restore).
        self.changes = 0

    @property
    def generation(self) -> bytes:
        """The 16 bytes the guest reads now."""
        with self._lock:
            return self._generation

    def _draw(self, old: bytes) -> bytes:
        """16 new bytes; a source that returns a wrong size or the old id is a host bug."""
        guid = bytes(self._entropy(GUID_SIZE))
        if len(guid) != GUID_SIZE:
            raise RuntimeError(f"the entropy source gave {len(guid)} bytes, not {GUID_SIZE}")
        if guid == old:
            raise RuntimeError("the entropy source repeated the VM generation id")
        return guid

    def publish(self) -> None:
        """Write the current id into guest memory (a freshly booted machine)."""
        with self._lock:
            self._memory.write(self.address, self._generation)

    def new_generation(self) -> bytes:
        """A new id, written into guest memory, then one edge on the GED's GSI (the guest
        runs ``Notify (VGEN, 0x80)`` and rereads the id). Returns the new id."""
        with self._lock:
            guid = self._draw(self._generation)
            self._memory.write(self.address, guid)
            self._generation = guid
            self.changes += 1
        self._irq.trigger()
        return guid

    def save(self) -> VmGenIdState:
        with self._lock:
            return VmGenIdState(generation=self._generation, address=self.address)

    def restore(self, state: VmGenIdState) -> None:
        """Take the saved id (guest memory holds it already); ValueError if it cannot be ours."""
        generation, address = state.generation, state.address
        if not isinstance(generation, bytes) or len(generation) != GUID_SIZE:
            raise ValueError(f"VM generation id state: generation is not {GUID_SIZE} bytes")
        if isinstance(address, bool) or address != self.address:
            plain_int = isinstance(address, int) and not isinstance(address, bool)
            where = f"{address:#x}" if plain_int else repr(address)
            raise ValueError(
                f"VM generation id state: the id is at {where}, this pyvmm puts it at "
                f"{self.address:#x}"
            )
        with self._lock:
            self._generation = generation
