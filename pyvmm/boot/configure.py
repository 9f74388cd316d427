"""``setup_boot``: everything guest memory must hold before the first KVM_RUN.

Two phases, so a bad input never leaves guest memory half-written:

1. check: open both files, parse the kernel, encode the command line, check
   the kernel fits in RAM, place the initrd, build the MP table and memory
   map. Any problem raises :class:`~pyvmm.errors.ConfigError` (or its
   :class:`~pyvmm.errors.KernelImageError`) with one line naming it.
2. write: kernel, initrd, command line, zero page or PVH start info, GDT and
   IDT, page tables (64-bit only), MP table.

The result says how to start the boot vCPU; registers are not touched here.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import BinaryIO, NamedTuple

from pyvmm import layout
from pyvmm.boot import bootparams, gdt, mptable, paging, pvh
from pyvmm.boot.cmdline import encode_cmdline, write_cmdline
from pyvmm.boot.cpu_state import BootCpuState, BootMode
from pyvmm.boot.e820 import E820Entry, memory_map_of
from pyvmm.boot.files import file_size, open_input
from pyvmm.boot.image import KernelImage, check_fits, load_segments
from pyvmm.boot.initrd import check_initrd_format, load_initrd, place_initrd
from pyvmm.boot.kernel import inspect_kernel
from pyvmm.boot.regs import boot_cpu_state
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory


class BootSetup(NamedTuple):
    """What boot setup wrote, and how to start the boot vCPU."""

    mode: BootMode
    cpu: BootCpuState
    kernel: KernelImage
    initrd_addr: int | None  # None: no initrd
    initrd_size: int
    cmdline_addr: int
    cmdline_len: int  # bytes, without the NUL
    boot_info_addr: int  # zero page (LINUX_64) or hvm_start_info (PVH_32)
    memory_map: tuple[E820Entry, ...]
    mptable_addr: int
    num_cpus: int


def setup_boot(
    mem: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    num_cpus: int,
    *,
    rsdp_addr: int = 0,
) -> BootSetup:
    """Load the kernel (and initrd) and write every boot structure into ``mem``.

    ``rsdp_addr`` is the ACPI RSDP's address once ACPI tables exist (0: the
    kernel scans for one).
    """
    if not mem.is_valid(0, layout.LOW_RAM_END):
        raise ConfigError("guest RAM must cover 0-640 KiB, where the boot structures live")
    kernel_name = os.fspath(kernel_path)
    with ExitStack() as files:
        # --- check: nothing is written until all of this passed -----------
        kernel_file = files.enter_context(open_input(kernel_name, "kernel image"))
        initrd = None
        if initrd_path is not None:
            initrd_name = os.fspath(initrd_path)
            initrd = _Initrd(files.enter_context(open_input(initrd_name, "initrd")), initrd_name)
        kernel = inspect_kernel(kernel_file, kernel_name)
        cmdline_bytes = encode_cmdline(cmdline, kernel.cmdline_limit)
        check_fits(mem, kernel)
        initrd_addr, initrd_size = None, 0
        if initrd is not None:
            initrd_size = file_size(initrd.file)
            initrd_addr = place_initrd(mem, initrd_size, kernel, initrd.path)
            check_initrd_format(initrd.file, initrd.path)
        mp_table = mptable.build_mptable(num_cpus)
        memory_map = memory_map_of(mem)
        boot_info_addr, boot_info = _boot_info(
            kernel, initrd_addr, initrd_size, memory_map, rsdp_addr
        )

        # --- write ---------------------------------------------------------
        load_segments(mem, kernel_file, kernel)
        if initrd is not None and initrd_addr is not None:
            load_initrd(mem, initrd.file, initrd_addr, initrd_size, initrd.path)
    write_cmdline(mem, cmdline_bytes)
    for addr, data in boot_info:
        mem.write(addr, data)
    gdt.write_gdt(mem, gdt.boot_gdt(kernel.mode))
    if kernel.mode is BootMode.LINUX_64:
        paging.write_identity_page_tables(mem)
    mptable.write_mptable(mem, mp_table)
    return BootSetup(
        mode=kernel.mode,
        cpu=boot_cpu_state(kernel.mode, kernel.entry, boot_info_addr),
        kernel=kernel,
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        cmdline_addr=layout.CMDLINE_START,
        cmdline_len=len(cmdline_bytes) - 1,
        boot_info_addr=boot_info_addr,
        memory_map=memory_map,
        mptable_addr=layout.MPTABLE_START,
        num_cpus=num_cpus,
    )


class _Initrd(NamedTuple):
    file: BinaryIO
    path: str


def _boot_info(
    kernel: KernelImage,
    initrd_addr: int | None,
    initrd_size: int,
    memory_map: tuple[E820Entry, ...],
    rsdp_addr: int,
) -> tuple[int, list[tuple[int, bytes]]]:
    """The zero page or the PVH start info: its address and the bytes to write."""
    if kernel.mode is BootMode.LINUX_64:
        page = bootparams.build_zero_page(
            kernel,
            cmdline_addr=layout.CMDLINE_START,
            initrd_addr=initrd_addr or 0,
            initrd_size=initrd_size,
            memory_map=memory_map,
            rsdp_addr=rsdp_addr,
        )
        return layout.ZERO_PAGE_START, [(layout.ZERO_PAGE_START, page)]
    modules = [(initrd_addr, initrd_size)] if initrd_addr is not None else []
    chunks = pvh.build_pvh_info(
        cmdline_addr=layout.CMDLINE_START,
        modules=modules,
        memory_map=memory_map,
        rsdp_addr=rsdp_addr,
    )
    return layout.PVH_INFO_START, chunks
