"""Reading and writing a descriptor chain's buffers as one byte range.

A chain's buffers were checked to lie in guest RAM when it was popped, so
these only split a byte range across them: zero-copy views for I/O,
copies for small headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import Descriptor
    from pyvmm.memory import GuestMemory


def chain_views(
    mem: GuestMemory, descs: list[Descriptor], skip: int, limit: int
) -> list[memoryview]:
    """Views of up to ``limit`` bytes of the buffers ``descs``, after the first ``skip`` bytes."""
    views = []
    for desc in descs:
        if limit <= 0:
            break
        length = desc.length
        if skip >= length:
            skip -= length
            continue
        n = min(length - skip, limit)
        views.append(mem.view(desc.addr + skip, n))
        limit -= n
        skip = 0
    return views


def gather(mem: GuestMemory, descs: list[Descriptor], length: int) -> bytes:
    """The first ``length`` bytes of the buffers ``descs`` (the caller checked there are)."""
    out = bytearray()
    for desc in descs:
        n = min(desc.length, length - len(out))
        out += mem.read(desc.addr, n)
        if len(out) == length:
            break
    return bytes(out)


def scatter(mem: GuestMemory, descs: list[Descriptor], data: bytes) -> None:
    """Write ``data`` across the buffers ``descs`` (the caller checked they can hold it)."""
    offset = 0
    for desc in descs:
        if offset == len(data):
            break
        n = min(desc.length, len(data) - offset)
        mem.write(desc.addr, data[offset : offset + n])
        offset += n
