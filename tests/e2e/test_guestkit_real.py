"""The real guest kit: Debian's cloud kernel and busybox, and the /init contract in QEMU.

These download from the Debian archive on first use (about 27 MB for the
kernel, 1 MB for busybox) into the default cache (``$PYVMM_CACHE`` or
``~/.cache/pyvmm``), so later runs only read it. The boot test runs the
kernel under QEMU's TCG with ``-M pc``: no KVM needed, about 3 s here.
(``-M microvm`` under TCG sometimes stalls in early boot on a loaded host,
before any console output, so it is not used here.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.elf import XEN_ELFNOTE_PHYS32_ENTRY, XEN_NOTE_NAME, iter_notes, parse
from pyvmm.guestkit.cache import default_cache_dir
from pyvmm.guestkit.debian import KernelPackage, fetch_busybox, fetch_kernel
from pyvmm.guestkit.initramfs import (
    COMMAND_FILE,
    MARKER_CMD_BEGIN,
    MARKER_CMD_EXIT,
    MARKER_INIT_OK,
    build_initramfs,
    command_arg,
)
from pyvmm.guestkit.vmlinux import kernel_vmlinux

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="needs apt-get and dpkg-deb (a Debian host)",
)

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT_S = 120
PT_NOTE = 4
_ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")


@pytest.fixture(scope="module")
def cloud_kernel() -> KernelPackage:
    return fetch_kernel("cloud", default_cache_dir())


def test_real_cloud_kernel_has_a_pvh_vmlinux(cloud_kernel: KernelPackage) -> None:
    pkg = cloud_kernel
    assert pkg.package.startswith("linux-image-") and pkg.package.endswith("-cloud-amd64-unsigned")
    assert pkg.vmlinuz.name == f"vmlinuz-{pkg.version}"
    assert (pkg.modules_dir / "kernel" / "drivers" / "virtio" / "virtio_mmio.ko").is_file()
    assert "virtio_mmio.ko:" in (pkg.modules_dir / "modules.dep").read_text()

    vmlinux = kernel_vmlinux(pkg)
    data = vmlinux.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1  # ELF64, little-endian
    assert int.from_bytes(data[18:20], "little") == 62  # EM_X86_64

    notes = _pt_notes(data)
    assert any(
        name == XEN_NOTE_NAME and kind == XEN_ELFNOTE_PHYS32_ENTRY for name, kind, _ in notes
    ), "no XEN_ELFNOTE_PHYS32_ENTRY note"
    with vmlinux.open("rb") as f:
        image = parse(f, str(vmlinux), len(data))
    assert image.mode == BootMode.PVH_32


def test_real_vmlinux_load_plan_matches_pyelftools(cloud_kernel: KernelPackage) -> None:
    """pyvmm's own header parser reads Debian's vmlinux as a general ELF library does."""
    from elftools.elf.elffile import ELFFile

    vmlinux = kernel_vmlinux(cloud_kernel)
    with vmlinux.open("rb") as f:
        image = parse(f, str(vmlinux), vmlinux.stat().st_size)
        reference = ELFFile(f)
        loads = [
            (h["p_offset"], h["p_filesz"], h["p_paddr"], h["p_memsz"])
            for h in (reference.get_segment(i).header for i in range(reference.num_segments()))
            if h["p_type"] == "PT_LOAD" and h["p_memsz"] > 0
        ]
    planned = [(s.file_offset, s.file_size, s.guest_addr, s.mem_size) for s in image.segments]
    assert planned == loads and len(loads) >= 3


def _pt_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    notes = []
    for i in range(phnum):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") == PT_NOTE:
            offset = int.from_bytes(ph[8:16], "little")
            size = int.from_bytes(ph[32:40], "little")
            notes += iter_notes(elf[offset : offset + size])
    return notes


def test_real_busybox_is_static() -> None:
    busybox = fetch_busybox(default_cache_dir())
    data = busybox.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 62
    assert b"/lib64/ld-linux-x86-64.so" not in data[:4096]  # no interpreter


def _boot(kernel: Path, initrd: Path, append: str) -> str:
    cmd = [
        str(QEMU),
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console=ttyS0 reboot=t panic=-1 quiet {append}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, timeout=BOOT_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL
    )
    # SeaBIOS clears the screen with escape sequences that share a line with /init's first.
    text = proc.stdout.decode(errors="replace").replace("\r", "")
    return _ANSI_ESCAPE.sub("", text)


@pytest.mark.qemu
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_init_contract_in_qemu(cloud_kernel: KernelPackage) -> None:
    initrd = build_initramfs(cloud_kernel, ["virtio_blk", "virtio_mmio"])
    script = "uname -r\nlsmod | sort\necho out-of-$((40 + 2))\nexit 3\n"
    lines = _boot(cloud_kernel.vmlinuz, initrd, command_arg(script)).splitlines()
    assert MARKER_INIT_OK in lines, lines
    assert not any("PYVMM-INIT-MODULE-FAILED" in line for line in lines), lines
    begin, end = lines.index(MARKER_CMD_BEGIN), lines.index(f"{MARKER_CMD_EXIT}3")
    output = lines[begin + 1 : end]
    assert cloud_kernel.version in output
    assert "out-of-42" in output
    loaded = {line.split()[0] for line in output if line.startswith(("virtio", "Module"))}
    assert {"virtio", "virtio_ring", "virtio_blk", "virtio_mmio"} <= loaded


@pytest.mark.qemu
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_command_file_and_sysrq_poweroff_in_qemu(cloud_kernel: KernelPackage) -> None:
    script = b"echo from-the-file\necho o > /proc/sysrq-trigger\nsleep 30\n"
    initrd = build_initramfs(None, extra_files={COMMAND_FILE: script})
    lines = _boot(cloud_kernel.vmlinuz, initrd, "").splitlines()
    assert MARKER_INIT_OK in lines, lines
    assert lines[lines.index(MARKER_CMD_BEGIN) + 1] == "from-the-file"
    assert not any(line.startswith(MARKER_CMD_EXIT) for line in lines)  # powered off inside
