"""Guest RAM: anonymous mappings plus bounds-checked guest-physical access.

Every consumer (loaders, devices, virtqueues) reaches guest memory only
through :class:`GuestMemory`; it never sees a host pointer. An access that is
not entirely inside one RAM region raises :class:`GuestMemoryError`, so a
guest-controlled address can never reach host memory outside guest RAM.
This module knows nothing about KVM: the KVM layer asks each region for its
buffer when it registers memory slots, and tests use it without KVM.

Every accessor finds its region through :meth:`GuestMemory._locate`; the
dirty-page tracking of :class:`DirtyTrackingMemory` relies on that, so a new
accessor must use it too.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pyvmm import layout
from pyvmm.errors import GuestMemoryError, HostError

# Python 3.11 lacks the constant; the value is fixed by the Linux ABI.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_HUGETLB = 0x40000
_MAP_HUGE_2MB = 21 << 26  # log2(2 MiB) in the MAP_HUGE_SHIFT field
HUGE_PAGE_SIZE = 2 << 20

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous guest-physical RAM range backed by one host mapping."""

    guest_addr: int
    size: int
    mapping: mmap.mmap
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)

    @property
    def end(self) -> int:
        """First guest-physical address after this region."""
        return self.guest_addr + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.guest_addr <= addr and addr + length <= self.end


class GuestMemory:
    """Guest RAM made of non-overlapping, page-aligned regions."""

    def __init__(
        self,
        regions: Iterable[tuple[int, int]],
        *,
        file: int | None = None,
        huge_pages: bool = False,
    ) -> None:
        """Map ``regions``: anonymous memory, or copy-on-write views of ``file``.

        ``huge_pages``: anonymous memory from the host's 2 MiB hugetlb pool
        (Firecracker's ``huge_pages: "2M"``): fewer TLB misses, memory
        reserved up front; a host without enough free huge pages is a
        HostError naming ``vm.nr_hugepages``.

        With ``file`` (an open fd of a memory snapshot: the regions' bytes
        back to back, lowest address first) each region is mapped
        ``MAP_PRIVATE``: pages are read from the file on first touch and
        guest writes never reach it. The fd may be closed afterwards.
        """
        self._regions: list[MemoryRegion] = []
        previous_end = 0
        file_offset = 0
        for guest_addr, size in sorted(regions):
            if size <= 0 or size % layout.PAGE_SIZE or guest_addr % layout.PAGE_SIZE:
                raise ValueError(f"region {guest_addr:#x}+{size:#x} is not page-aligned")
            if guest_addr < previous_end:
                raise ValueError(f"region at {guest_addr:#x} overlaps the one before it")
            if file is None and huge_pages:
                mapping = _huge_mapping(size)
            elif file is None:
                mapping = mmap.mmap(
                    -1,
                    size,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
            else:
                mapping = mmap.mmap(
                    file,
                    size,
                    flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=file_offset,
                )
            self._regions.append(MemoryRegion(guest_addr, size, mapping))
            previous_end = guest_addr + size
            file_offset += size

    @classmethod
    def with_size(cls, mem_size: int, *, huge_pages: bool = False) -> GuestMemory:
        """RAM of ``mem_size`` bytes laid out around the 32-bit MMIO hole."""
        return cls(layout.ram_regions(mem_size), huge_pages=huge_pages)

    @classmethod
    def from_file(cls, mem_size: int, file: int) -> GuestMemory:
        """RAM of ``mem_size`` bytes mapped copy-on-write from a memory snapshot fd."""
        return cls(layout.ram_regions(mem_size), file=file)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(region.size for region in self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def _locate(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"invalid guest access {addr:#x}+{length:#x}")
        end = addr + (length or 1)
        for region in self._regions:
            start = region.guest_addr
            if start <= addr and end <= start + region.size:
                return region, addr - start
        raise GuestMemoryError(f"guest access {addr:#x}+{length:#x} is outside guest RAM")

    def is_valid(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` lies inside one RAM region.

        Called for every descriptor of every virtqueue request: a plain loop
        over the (one or two) regions, no generator or method call per region.
        """
        if addr < 0 or length < 0:
            return False
        end = addr + (length or 1)
        for region in self._regions:
            if region.guest_addr <= addr and end <= region.guest_addr + region.size:
                return True
        return False

    def locate(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The host buffer holding ``[addr, addr+length)`` and the offset in it.

        For hot paths that ``unpack_from``/``pack_into`` the same guest
        structure over and over (the virtqueue rings): check the bounds once
        here, then index the buffer directly. The buffer is only valid until
        :meth:`close`; holding it creates no export, so close still works.
        """
        region, offset = self._locate(addr, length)
        return region.mapping, offset

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM (must not span regions)."""
        region, offset = self._locate(addr, length)
        return region.view[offset : offset + length]

    def read(self, addr: int, length: int) -> bytes:
        region, offset = self._locate(addr, length)
        return region.mapping[offset : offset + length]

    def read_into(self, addr: int, buffer: memoryview | bytearray) -> None:
        """Copy guest RAM into ``buffer`` (its length says how much)."""
        length = len(buffer)
        region, offset = self._locate(addr, length)
        buffer[:] = region.view[offset : offset + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        region, offset = self._locate(addr, length)
        region.view[offset : offset + length] = data

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        """Set ``length`` bytes at ``addr`` to ``value``."""
        region, offset = self._locate(addr, length)
        region.mapping[offset : offset + length] = bytes([value]) * length

    def discard(self, addr: int, length: int) -> None:
        """Give the pages of ``[addr, addr+length)`` back to the host (a balloon inflated them).

        ``madvise(MADV_DONTNEED)`` drops the host's backing: the process's RSS
        shrinks, and a later guest access reads zeros (anonymous RAM) or the
        memory file's bytes (RAM restored from a snapshot). Page-aligned
        ranges inside one region only: GuestMemoryError otherwise.
        """
        if addr % layout.PAGE_SIZE or length % layout.PAGE_SIZE:
            raise GuestMemoryError(f"discard {addr:#x}+{length:#x} is not page-aligned")
        region, offset = self._locate(addr, length)
        if length:
            region.mapping.madvise(mmap.MADV_DONTNEED, offset, length)

    def read_struct(self, fmt: struct.Struct, addr: int) -> tuple:
        region, offset = self._locate(addr, fmt.size)
        return fmt.unpack_from(region.mapping, offset)

    def write_struct(self, fmt: struct.Struct, addr: int, *values: object) -> None:
        region, offset = self._locate(addr, fmt.size)
        fmt.pack_into(region.mapping, offset, *values)

    def read_u8(self, addr: int) -> int:
        return self.read_struct(_U8, addr)[0]

    def read_u16(self, addr: int) -> int:
        return self.read_struct(_U16, addr)[0]

    def read_u32(self, addr: int) -> int:
        return self.read_struct(_U32, addr)[0]

    def read_u64(self, addr: int) -> int:
        return self.read_struct(_U64, addr)[0]

    def write_u8(self, addr: int, value: int) -> None:
        self.write_struct(_U8, addr, value)

    def write_u16(self, addr: int, value: int) -> None:
        self.write_struct(_U16, addr, value)

    def write_u32(self, addr: int, value: int) -> None:
        self.write_struct(_U32, addr, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.write_struct(_U64, addr, value)

    def close(self) -> None:
        """Unmap guest RAM. Views handed out earlier must be released first."""
        for region in self._regions:
            region.view.release()
            region.mapping.close()
        self._regions.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class DirtyTrackingMemory(GuestMemory):
    """Guest memory that knows every page written since the last look, for diff snapshots.

    Three writers, all seen here so that no caller has to remember them:

    * the VMM's own accesses: every range :meth:`_locate` hands out (so
      every accessor's) is recorded, reads included - over-reporting only
      makes a diff snapshot larger;
    * buffers handed out once and written through for a long time (the
      virtqueues bind their rings with :meth:`locate`): those ranges are
      *pinned* and reported dirty every time;
    * the guest itself: KVM's dirty log, read through the function
      :meth:`attach_dirty_log` is given (the VM registers its slots with
      logging on and hands over ``Vm.get_dirty_log``).
    """

    def __init__(
        self,
        regions: Iterable[tuple[int, int]],
        *,
        file: int | None = None,
        huge_pages: bool = False,
    ) -> None:
        super().__init__(regions, file=file, huge_pages=huge_pages)
        self._dirty: set[int] = set()  # guest page frame numbers (address >> 12)
        self._pinned: set[int] = set()
        self._dirty_log: DirtyLogReader | None = None

    def _locate(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        found = super()._locate(addr, length)
        self._dirty.update(_pages(addr, length))
        return found

    def locate(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        found = super().locate(addr, length)
        self._pinned.update(_pages(addr, length))
        return found

    def attach_dirty_log(self, read: DirtyLogReader) -> None:
        """``read(slot, pages)`` returns KVM's dirty bitmap of region ``slot`` (and clears it)."""
        self._dirty_log = read

    def take_dirty(self) -> set[int]:
        """Pages written since the previous call (or since mapping); recording starts afresh.

        Reading KVM's log clears it, so pages taken here must be saved or
        handed back with :meth:`put_back`.
        """
        taken, self._dirty = self._dirty | self._pinned, set()
        if self._dirty_log is not None:
            for slot, region in enumerate(self._regions):
                bitmap = self._dirty_log(slot, region.size // layout.PAGE_SIZE)
                taken.update(_bitmap_pages(bitmap, region.guest_addr // layout.PAGE_SIZE))
        return taken

    def put_back(self, pages: Iterable[int]) -> None:
        """Report ``pages`` as dirty again (a snapshot that used them failed)."""
        self._dirty.update(pages)


DirtyLogReader = Callable[[int, int], bytes]


def _huge_mapping(size: int) -> mmap.mmap:
    if size % HUGE_PAGE_SIZE:
        raise HostError(f"guest RAM region of {size:#x} bytes is not a multiple of 2 MiB")
    try:
        return mmap.mmap(
            -1,
            size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB | _MAP_HUGE_2MB,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except OSError as exc:
        raise HostError(
            f"cannot back {size >> 20} MiB of guest RAM with 2 MiB huge pages: {exc.strerror} "
            "(are enough free? see HugePages_Free in /proc/meminfo and vm.nr_hugepages)"
        ) from None


def _pages(addr: int, length: int) -> range:
    return range(addr >> 12, ((addr + (length or 1) - 1) >> 12) + 1)


def _bitmap_pages(bitmap: bytes, first_page: int) -> list[int]:
    """Page frame numbers of the set bits of a KVM dirty bitmap (bit n = ``first_page + n``)."""
    pages = []
    value = int.from_bytes(bitmap, "little")
    while value:
        low = value & -value
        pages.append(first_page + low.bit_length() - 1)
        value ^= low
    return pages
