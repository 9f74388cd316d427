"""An encoder for ACPI Machine Language (AML), the bytecode of the DSDT.

Why we encode AML ourselves instead of shipping a compiled DSDT: the table
depends on the VM (how many virtio-mmio devices, where, on which GSI), and
running ``iasl`` at VM start would add a host dependency and a process
start to every boot. AML is a small prefix-coded format (ACPI 6.x,
chapter 20, "ACPI Machine Language Specification"); the part a microVM
needs fits in this module.

Every class below *is* its encoding: a :class:`bytes` subclass built once in
``__new__``. Terms nest by passing one into another, and each class is named
after the ASL operator it encodes, so the Python that builds a table reads
like the ASL ``iasl -d`` prints back::

    Device("COM1", [
        Name("_HID", EisaId("PNP0501")),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate([IO(0x3F8, 0x3F8, 1, 8), IRQNoFlags(4)])),
    ])

Values that AML data objects can hold are passed as plain Python values:
``int`` becomes an Integer, ``str`` a String, and an :class:`Aml` instance
(a Package, Buffer, EisaId, ...) goes in as it is. Raw :class:`bytes` are
refused, because it cannot be told whether they are meant as a Buffer or as
already-encoded AML; wrap them in :class:`Buffer`.

Resource descriptors (:class:`IO`, :class:`Memory32Fixed`, ...) are not AML
but the byte format of ACPI 6.x section 6.4 that a ``_CRS`` buffer holds;
they are a separate type so that only a :class:`ResourceTemplate` takes them.

Bad arguments raise :class:`AmlError`: they are bugs in a table builder (or
a config the caller should have rejected), never guest input.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

# --- opcodes (ACPI 6.x, 20.3 "AML Byte Stream Byte Values") ------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
NULL_NAME = 0x00
RETURN_OP = 0xA4
ARG0_OP = 0x68  # Arg0..Arg6 are 0x68..0x6E
NOTIFY_OP = 0x86
LEQUAL_OP = 0x93
IF_OP = 0xA0

# --- PkgLength (20.2.4): bits 7-6 of the lead byte count the bytes that follow
PKG_LENGTH_MAX = (1 << 28) - 1
_PKG_LENGTH_ONE_BYTE_MAX = 0x3F  # 6 bits in the lead byte alone

NAME_SEG_SIZE = 4
MAX_METHOD_ARGS = 7
MAX_SYNC_LEVEL = 15
NOTIFY_VALUE_MAX = 0xFF  # a notification code is a byte (ACPI 6.x, 5.6.6)

# --- resource descriptors (ACPI 6.x, 6.4) -----------------------------------------
# Small items: tag byte = (item name << 3) | length of the data that follows.
SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
# Large items: tag byte = 0x80 | item name, then a 16-bit data length.
LARGE_ITEM = 0x80
LARGE_MEMORY32_FIXED = 0x06
LARGE_EXTENDED_IRQ = 0x09

IO_DECODE16 = 0x01  # the device decodes all 16 address bits (Decode16)
MEMORY_READ_WRITE = 0x01
INTERRUPT_CONSUMER = 0x01
INTERRUPT_EDGE = 0x02
INTERRUPT_ACTIVE_LOW = 0x04
INTERRUPT_SHARED = 0x08
INTERRUPT_WAKE_CAPABLE = 0x10
ISA_IRQ_COUNT = 16  # an IRQ descriptor has a 16-bit IRQ mask

_IO_BODY = struct.Struct("<BHHBB")
_IRQ_MASK = struct.Struct("<H")
_LARGE_HEADER = struct.Struct("<BH")
_MEMORY32_FIXED_BODY = struct.Struct("<BII")
_EXTENDED_IRQ_HEAD = struct.Struct("<BB")

_NAME_SEG_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID_RE = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


class AmlError(ValueError):
    """An argument cannot be encoded as AML (a bug in the table builder)."""


class Aml(bytes):
    """Encoded AML. Subclasses build their bytes in ``__new__``."""

    __slots__ = ()


class ResourceDescriptor(bytes):
    """One encoded resource descriptor, for a :class:`ResourceTemplate`."""

    __slots__ = ()


AmlData = int | str | Aml  # what Name, Package and Return accept
TermArg = int | Aml  # an operand: a constant, an Arg, or an expression


# --- building blocks -------------------------------------------------------------


def pkg_length(payload_len: int) -> bytes:
    """The PkgLength for ``payload_len`` bytes following it.

    The encoded length counts the PkgLength bytes themselves. One byte holds
    up to 63 in its low 6 bits. Longer encodings put the number of bytes
    that follow (1-3) in bits 7-6 of the lead byte, the low 4 bits of the
    length in its bits 3-0, and the rest in the following bytes: up to
    2**12-1, 2**20-1 and 2**28-1 for 2, 3 and 4 bytes in all.
    """
    if payload_len < 0:
        raise AmlError(f"negative package length {payload_len}")
    if payload_len + 1 <= _PKG_LENGTH_ONE_BYTE_MAX:
        return bytes((payload_len + 1,))
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes((lead,)) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {payload_len} bytes exceeds the PkgLength limit {PKG_LENGTH_MAX}")


def _with_pkg_length(opcode: bytes, payload: bytes) -> bytes:
    return opcode + pkg_length(len(payload)) + payload


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with ``_`` (as ASL does)."""
    if not _NAME_SEG_RE.fullmatch(seg):
        raise AmlError(f"invalid AML name segment {seg!r}: 1-4 of A-Z 0-9 _, not starting 0-9")
    return seg.ljust(NAME_SEG_SIZE, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional ``\`` (root) or ``^``s (parents), then dotted segments.

    ``"\\"`` alone is the root (root char + NullName); ``"_SB.COM1"`` is a
    DualNamePath; three or more segments make a MultiNamePath.
    """
    if path.startswith("\\"):
        prefix, rest = bytes((ROOT_CHAR,)), path[1:]
    else:
        rest = path.lstrip("^")
        prefix = bytes((PARENT_PREFIX_CHAR,)) * (len(path) - len(rest))
    segments = rest.split(".") if rest else []
    encoded = b"".join(name_seg(seg) for seg in segments)
    if not segments:
        if not prefix:
            raise AmlError("empty AML name")
        return prefix + bytes((NULL_NAME,))
    if len(segments) == 1:
        return prefix + encoded
    if len(segments) == 2:
        return prefix + bytes((DUAL_NAME_PREFIX,)) + encoded
    if len(segments) > 0xFF:
        raise AmlError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes((MULTI_NAME_PREFIX, len(segments))) + encoded


def encode_integer(value: int) -> bytes:
    """The shortest Integer encoding: ZeroOp, OneOp or a Byte..QWord constant."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmlError(f"AML integer expected, got {value!r}")
    if value == 0:
        return bytes((ZERO_OP,))
    if value == 1:
        return bytes((ONE_OP,))
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if 0 <= value < 1 << (8 * size):
            return bytes((prefix,)) + value.to_bytes(size, "little")
    raise AmlError(f"AML integer {value} is outside 0..2**64-1")


def encode_string(value: str) -> bytes:
    """A String constant: ASCII 0x01-0x7F, NUL-terminated."""
    if not all(0 < ord(ch) < 0x80 for ch in value):
        raise AmlError(f"AML string {value!r} must be ASCII without NUL")
    return bytes((STRING_PREFIX,)) + value.encode("ascii") + b"\0"


def encode_data(value: AmlData) -> bytes:
    """A DataRefObject from a Python value (see the module docstring)."""
    if isinstance(value, Aml):
        return bytes(value)
    if isinstance(value, str):
        return encode_string(value)
    if isinstance(value, int):
        return encode_integer(value)
    raise AmlError(f"cannot encode {type(value).__name__} as AML data; wrap raw bytes in Buffer()")


def _terms(terms: Iterable[Aml]) -> bytes:
    items = list(terms)
    for term in items:
        if not isinstance(term, Aml):
            raise AmlError(f"AML term expected, got {type(term).__name__}")
    return b"".join(items)


def eisa_id_value(eisa_id: str) -> int:
    """The 32-bit compressed EISA id: ``"PNP0501"`` -> ``0x0105D041``.

    Three letters of 5 bits each (``A`` = 1) and four hex digits make a
    big-endian 32-bit value; AML stores it as a little-endian DWord, hence
    the byte swap.
    """
    if not _EISA_ID_RE.fullmatch(eisa_id):
        raise AmlError(f"invalid EISA id {eisa_id!r}: 3 letters A-Z, then 4 hex digits 0-9 A-F")
    vendor = 0
    for letter in eisa_id[:3]:
        vendor = (vendor << 5) | (ord(letter) - ord("A") + 1)
    big_endian = (vendor << 16) | int(eisa_id[3:], 16)
    return int.from_bytes(big_endian.to_bytes(4, "big"), "little")


# --- data objects ----------------------------------------------------------------


class Integer(Aml):
    """An Integer constant (plain ``int`` arguments are encoded the same way)."""

    __slots__ = ()

    def __new__(cls, value: int) -> Integer:
        return super().__new__(cls, encode_integer(value))


class String(Aml):
    """A String constant (plain ``str`` arguments are encoded the same way)."""

    __slots__ = ()

    def __new__(cls, value: str) -> String:
        return super().__new__(cls, encode_string(value))


class EisaId(Aml):
    """``EisaId("PNP0501")``: the id compressed into a DWord Integer.

    Always a DWord (never shortened), as ``iasl`` emits it, so that
    disassemblers recognise it and print ``EisaId (...)`` back.
    """

    __slots__ = ()

    def __new__(cls, eisa_id: str) -> EisaId:
        value = eisa_id_value(eisa_id)
        return super().__new__(cls, bytes((DWORD_PREFIX,)) + value.to_bytes(4, "little"))


class NamePath(Aml):
    r"""A reference to a named object, e.g. ``NamePath("\\_SB.COM1")`` in a Package."""

    __slots__ = ()

    def __new__(cls, path: str) -> NamePath:
        return super().__new__(cls, name_string(path))


class Buffer(Aml):
    """``Buffer () {bytes}``: BufferOp PkgLength BufferSize ByteList."""

    __slots__ = ()

    def __new__(cls, data: bytes) -> Buffer:
        payload = encode_integer(len(data)) + bytes(data)
        return super().__new__(cls, _with_pkg_length(bytes((BUFFER_OP,)), payload))


class Package(Aml):
    """``Package () {elements}``: at most 255 elements (NumElements is a byte)."""

    __slots__ = ()

    def __new__(cls, elements: Iterable[AmlData]) -> Package:
        items = list(elements)
        if len(items) > 0xFF:
            raise AmlError(f"Package of {len(items)} elements; at most 255")
        payload = bytes((len(items),)) + b"".join(encode_data(item) for item in items)
        return super().__new__(cls, _with_pkg_length(bytes((PACKAGE_OP,)), payload))


# --- named objects and code --------------------------------------------------------


class Name(Aml):
    """``Name (name, value)``: declare a named data object."""

    __slots__ = ()

    def __new__(cls, name: str, value: AmlData) -> Name:
        return super().__new__(cls, bytes((NAME_OP,)) + name_string(name) + encode_data(value))


class Scope(Aml):
    r"""``Scope (path) {terms}``: open an existing namespace node, e.g. ``\_SB``."""

    __slots__ = ()

    def __new__(cls, path: str, terms: Iterable[Aml]) -> Scope:
        payload = name_string(path) + _terms(terms)
        return super().__new__(cls, _with_pkg_length(bytes((SCOPE_OP,)), payload))


class Device(Aml):
    """``Device (name) {terms}``: a device node the OS enumerates by its ``_HID``."""

    __slots__ = ()

    def __new__(cls, name: str, terms: Iterable[Aml]) -> Device:
        payload = name_string(name) + _terms(terms)
        opcode = bytes((EXT_OP_PREFIX, DEVICE_OP))
        return super().__new__(cls, _with_pkg_length(opcode, payload))


class Method(Aml):
    """``Method (name, args, Serialized/NotSerialized, sync level) {terms}``."""

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        terms: Iterable[Aml],
        *,
        args: int = 0,
        serialized: bool = False,
        sync_level: int = 0,
    ) -> Method:
        if not 0 <= args <= MAX_METHOD_ARGS:
            raise AmlError(f"method {name!r}: {args} arguments; AML allows 0-{MAX_METHOD_ARGS}")
        if not 0 <= sync_level <= MAX_SYNC_LEVEL:
            raise AmlError(f"method {name!r}: sync level {sync_level} is outside 0-15")
        flags = args | (int(serialized) << 3) | (sync_level << 4)
        payload = name_string(name) + bytes((flags,)) + _terms(terms)
        return super().__new__(cls, _with_pkg_length(bytes((METHOD_OP,)), payload))


class Return(Aml):
    """``Return (value)`` of a constant (enough for ``_STA`` and friends)."""

    __slots__ = ()

    def __new__(cls, value: AmlData) -> Return:
        return super().__new__(cls, bytes((RETURN_OP,)) + encode_data(value))


# --- method code: arguments, a comparison, a branch, a notification -------------------


def _operand(value: TermArg) -> bytes:
    """A TermArg: an Integer for ``int``, else already-encoded AML (an Arg, an expression)."""
    if isinstance(value, Aml):
        return bytes(value)
    return encode_integer(value)


class Arg(Aml):
    """``Arg0`` .. ``Arg6``: the method's arguments (ArgObj, 20.2.6.1)."""

    __slots__ = ()

    def __new__(cls, index: int) -> Arg:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 7:
            raise AmlError(f"Arg{index!r}: AML methods have arguments Arg0-Arg6")
        return super().__new__(cls, bytes((ARG0_OP + index,)))


class LEqual(Aml):
    """``LEqual (left, right)``, ASL+ ``(left == right)``: True (Ones) if the integers are equal."""

    __slots__ = ()

    def __new__(cls, left: TermArg, right: TermArg) -> LEqual:
        return super().__new__(cls, bytes((LEQUAL_OP,)) + _operand(left) + _operand(right))


class If(Aml):
    """``If (predicate) {terms}``: IfOp PkgLength Predicate TermList (no Else)."""

    __slots__ = ()

    def __new__(cls, predicate: TermArg, terms: Iterable[Aml]) -> If:
        payload = _operand(predicate) + _terms(terms)
        return super().__new__(cls, _with_pkg_length(bytes((IF_OP,)), payload))


class Notify(Aml):
    r"""``Notify (\path, value)``: tell the OS driver of the device at ``path`` about ``value``.

    Values 0x80 and up are device-specific (the VM generation counter uses
    0x80, "the id changed").
    """

    __slots__ = ()

    def __new__(cls, path: str, value: int) -> Notify:
        _check_range("Notify value", value, NOTIFY_VALUE_MAX + 1)
        return super().__new__(cls, bytes((NOTIFY_OP,)) + name_string(path) + encode_integer(value))


# --- resource templates --------------------------------------------------------------


def _small_item(name: int, body: bytes) -> bytes:
    return bytes(((name << 3) | len(body),)) + body


def _large_item(name: int, body: bytes) -> bytes:
    return _LARGE_HEADER.pack(LARGE_ITEM | name, len(body)) + body


def _check_range(what: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise AmlError(f"{what} {value!r} is outside 0..{limit - 1:#x}")


class IO(ResourceDescriptor):
    """``IO (Decode16, minimum, maximum, alignment, length)``: an I/O port range.

    For a fixed device ``minimum == maximum`` (the range cannot move) and the
    alignment does not matter.
    """

    __slots__ = ()

    def __new__(
        cls, minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True
    ) -> IO:
        _check_range("IO minimum", minimum, 1 << 16)
        _check_range("IO maximum", maximum, 1 << 16)
        _check_range("IO alignment", alignment, 1 << 8)
        _check_range("IO length", length, 1 << 8)
        if minimum > maximum:
            raise AmlError(f"IO minimum {minimum:#x} is above maximum {maximum:#x}")
        info = IO_DECODE16 if decode16 else 0
        body = _IO_BODY.pack(info, minimum, maximum, alignment, length)
        return super().__new__(cls, _small_item(SMALL_IO, body))


class IRQNoFlags(ResourceDescriptor):
    """``IRQNoFlags () {irqs}``: ISA IRQs, edge-triggered, active-high, exclusive."""

    __slots__ = ()

    def __new__(cls, *irqs: int) -> IRQNoFlags:
        if not irqs:
            raise AmlError("IRQNoFlags needs at least one IRQ")
        mask = 0
        for irq in irqs:
            _check_range("ISA IRQ", irq, ISA_IRQ_COUNT)
            mask |= 1 << irq
        return super().__new__(cls, _small_item(SMALL_IRQ, _IRQ_MASK.pack(mask)))


class Memory32Fixed(ResourceDescriptor):
    """``Memory32Fixed (ReadWrite/ReadOnly, base, length)``: a fixed MMIO window."""

    __slots__ = ()

    def __new__(cls, base: int, length: int, *, read_write: bool = True) -> Memory32Fixed:
        _check_range("Memory32Fixed base", base, 1 << 32)
        _check_range("Memory32Fixed length", length, 1 << 32)
        if base + length > 1 << 32:
            raise AmlError(f"Memory32Fixed {base:#x}+{length:#x} crosses 4 GiB")
        info = MEMORY_READ_WRITE if read_write else 0
        return super().__new__(
            cls, _large_item(LARGE_MEMORY32_FIXED, _MEMORY32_FIXED_BODY.pack(info, base, length))
        )


class Interrupt(ResourceDescriptor):
    """``Interrupt (ResourceConsumer, Edge/Level, ActiveHigh/Low, Exclusive/Shared) {gsis}``.

    The Extended Interrupt descriptor: unlike :class:`IRQNoFlags` it names
    global system interrupts (any GSI, not just ISA IRQ 0-15) and says how
    they are triggered.
    """

    __slots__ = ()

    def __new__(
        cls,
        *gsis: int,
        edge: bool = True,
        active_low: bool = False,
        shared: bool = False,
        wake_capable: bool = False,
        consumer: bool = True,
    ) -> Interrupt:
        if not 1 <= len(gsis) <= 0xFF:
            raise AmlError(f"Interrupt needs 1-255 interrupt numbers, got {len(gsis)}")
        for gsi in gsis:
            _check_range("Interrupt number", gsi, 1 << 32)
        flags = (
            (INTERRUPT_CONSUMER if consumer else 0)
            | (INTERRUPT_EDGE if edge else 0)
            | (INTERRUPT_ACTIVE_LOW if active_low else 0)
            | (INTERRUPT_SHARED if shared else 0)
            | (INTERRUPT_WAKE_CAPABLE if wake_capable else 0)
        )
        body = _EXTENDED_IRQ_HEAD.pack(flags, len(gsis)) + struct.pack(f"<{len(gsis)}I", *gsis)
        return super().__new__(cls, _large_item(LARGE_EXTENDED_IRQ, body))


class ResourceTemplate(Aml):
    """``ResourceTemplate () {descriptors}``: a Buffer ending in an End Tag.

    The End Tag's checksum byte makes the descriptors plus the End Tag sum
    to zero (ACPI also allows 0 for "not checksummed"; we compute it, so a
    strict reader finds a valid sum).
    """

    __slots__ = ()

    def __new__(cls, descriptors: Iterable[ResourceDescriptor]) -> ResourceTemplate:
        items = list(descriptors)
        for item in items:
            if not isinstance(item, ResourceDescriptor):
                raise AmlError(f"resource descriptor expected, got {type(item).__name__}")
        body = b"".join(items) + bytes(((SMALL_END_TAG << 3) | 1,))
        body += bytes((-sum(body) & 0xFF,))
        return super().__new__(cls, Buffer(body))
