"""Where a VM runs: on this host's KVM, or inside a nested host.

Why the question exists: on a host whose KVM is PVM (no VMX/SVM; what
``pyvmm doctor`` reports as ``pvm``) guest kernel code is emulated about
3,000 times slower, so a Linux kernel needs minutes to reach its console and
dies on instructions PVM cannot emulate (XRSTOR64 in its FPU set-up). Guest
*user* code runs at full speed there, so the probe guest and other guests
that live in user mode still run directly. Linux runs in the nested host
instead (:mod:`pyvmm.nested.host`), where kvm-amd under QEMU-TCG runs guest
kernel code at TCG speed.

:func:`choose` is the one place that decides, for every command that boots a
guest (``pyvmm run`` today, ``pyvmm exec`` later): ``--nested auto`` (the
default), ``always`` or ``never``. A command already running inside a nested
host (``PYVMM_NESTED=1``) always runs directly: one level of emulation is
enough.

A Linux kernel is recognised by its format, without trusting its name: a
bzImage (``HdrS`` at 0x202 behind the 0xAA55 boot signature) or an ELF with a
note whose owner is ``Linux`` (every vmlinux has them; the probe guest, a PVH
ELF, has only a ``Xen`` note).
"""

from __future__ import annotations

import enum
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

#: ``--nested`` values.
MODES: tuple[str, ...] = ("auto", "always", "never")
#: Set in the environment of every command run in a nested host.
NESTED_ENV = "PYVMM_NESTED"
#: Virtualization kinds (``pyvmm.doctor.virtualization_kind``) that run guest
#: kernel code at hardware speed.
HARDWARE_KINDS: tuple[str, ...] = ("vmx", "svm")

_HEAD_SIZE = 0x240
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_PT_NOTE = 4
_MAX_PHDRS = 256
_MAX_NOTE_BYTES = 1 << 20  # a vmlinux's notes are a few hundred bytes


class Where(enum.Enum):
    DIRECT = "direct"
    NESTED = "nested"


class Placement(NamedTuple):
    """The decision, and the one line to print on stderr about it (or None)."""

    where: Where
    notice: str | None = None


def inside_nested_host() -> bool:
    return os.environ.get(NESTED_ENV) == "1"


def choose(mode: str, linux: bool, kind: str, *, inside_nested: bool = False) -> Placement:
    """Decide where a VM runs.

    ``linux``: the kernel is Linux (:func:`is_linux_kernel`); ``kind``: this
    host's virtualization kind (``vmx``, ``svm``, ``pvm`` or ``none``).
    """
    if mode not in MODES:
        raise ValueError(f"--nested must be one of {', '.join(MODES)}, not {mode!r}")
    if inside_nested:
        return Placement(Where.DIRECT)
    slow_here = kind not in HARDWARE_KINDS
    if mode == "always":
        return Placement(
            Where.NESTED, "pyvmm: --nested always: running the VM in a nested KVM host"
        )
    if mode == "never" or not linux or not slow_here:
        notice = None
        if mode == "never" and linux and slow_here:
            notice = (
                f"pyvmm: warning: this host's KVM ({kind}) emulates guest kernel code about "
                "3,000x slower than hardware: this Linux guest will take minutes to boot, if it "
                "boots (--nested auto runs it in a nested KVM host instead)"
            )
        return Placement(Where.DIRECT, notice)
    return Placement(
        Where.NESTED,
        f"pyvmm: this host's KVM ({kind}) cannot run guest kernel code at hardware speed: "
        "running the VM in a nested KVM host (QEMU-TCG with kvm-amd); --nested never runs it here",
    )


def describe_default(kind: str) -> str:
    """What ``pyvmm run`` does on a host of this kind (for ``pyvmm doctor``)."""
    if kind in HARDWARE_KINDS:
        return "every guest runs directly on this host's KVM"
    return (
        "Linux guests run in a nested KVM host (QEMU-TCG with kvm-amd), since guest kernel "
        "code is emulated here; user-mode guests (the probe) run directly; --nested never "
        "overrides"
    )


def is_linux_kernel(path: Path | str) -> bool:
    """Whether ``path`` is a Linux kernel (bzImage, or an ELF with a ``Linux`` note).

    Anything unreadable or malformed is simply "not Linux": the loader that
    runs later gives the real error for a bad file.
    """
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            head = f.read(_HEAD_SIZE)
            if _is_bzimage(head):
                return True
            if head[:4] != b"\x7fELF":
                return False
            return any(name == b"Linux" for name in _elf_note_names(f, head))
    except (OSError, struct.error, ValueError):
        return False


def _is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS"


def _elf_note_names(f, head: bytes) -> list[bytes]:
    """The owner names of the notes in a 64-bit little-endian ELF's PT_NOTE segments."""
    from pyvmm.boot.elf import iter_notes

    if len(head) < _ELF64_HEADER.size or head[4] != 2 or head[5] != 1:
        return []
    fields = _ELF64_HEADER.unpack_from(head)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    if phentsize < _ELF64_PHDR.size or not 0 < phnum <= _MAX_PHDRS:
        return []
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    names: list[bytes] = []
    for index in range(len(table) // phentsize):
        p_type, _, offset, _, _, filesz, _, align = _ELF64_PHDR.unpack_from(
            table, index * phentsize
        )
        if p_type != _PT_NOTE or not 0 < filesz <= _MAX_NOTE_BYTES:
            continue
        f.seek(offset)
        data = f.read(filesz)
        names += [name for name, _, _ in iter_notes(data, 8 if align == 8 else 4)]
    return names
