"""The AML encoder: PkgLength, integers, names, EISA ids, terms, resource descriptors.

Byte-exact expectations come from ACPI 6.x chapter 20 (AML) and section 6.4
(resource descriptors). Whether a real decoder agrees is checked in
test_acpi_tables.py, which feeds whole tables to ``iasl -d``.
"""

from __future__ import annotations

import pytest

from pyvmm.boot.acpi import aml
from pyvmm.boot.acpi.aml import (
    IO,
    AmlError,
    Arg,
    Buffer,
    Device,
    EisaId,
    If,
    Integer,
    Interrupt,
    IRQNoFlags,
    LEqual,
    Memory32Fixed,
    Method,
    Name,
    NamePath,
    Notify,
    Package,
    ResourceTemplate,
    Return,
    Scope,
    String,
)


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded length, bytes the PkgLength itself took), as a decoder reads it."""
    lead = data[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5-4 of a multi-byte lead byte must be zero"
    value = lead & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


# --- PkgLength -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        (0, 1),
        (62, 1),  # total 63: the largest one-byte length
        (63, 2),  # total would be 64: needs a second byte (and becomes 65)
        (4093, 2),  # total 4095: the largest two-byte length
        (4094, 3),  # total 4096 does not fit 12 bits: 4097 in three bytes
        ((1 << 20) - 4, 3),  # total 2**20 - 1
        ((1 << 20) - 3, 4),
        ((1 << 28) - 5, 4),  # total 2**28 - 1: the largest PkgLength
    ],
)
def test_pkg_length_boundaries(payload: int, size: int) -> None:
    encoded = aml.pkg_length(payload)
    assert len(encoded) == size
    assert decode_pkg_length(encoded) == (payload + size, size)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),
        (63, b"\x41\x04"),  # 65 = 0x41: low nibble 1 in the lead, 0x4 after
        (4093, b"\x4f\xff"),  # 4095 = 0xFFF
        (4094, b"\x81\x00\x01"),  # 4097 = 0x1001
    ],
)
def test_pkg_length_exact_bytes(payload: int, expected: bytes) -> None:
    assert aml.pkg_length(payload) == expected


def test_pkg_length_limits() -> None:
    with pytest.raises(AmlError):
        aml.pkg_length((1 << 28) - 4)
    with pytest.raises(AmlError):
        aml.pkg_length(-1)


# --- integers and strings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, b"\x00"),  # ZeroOp
        (1, b"\x01"),  # OneOp
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
        (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integer_uses_the_shortest_encoding(value: int, expected: bytes) -> None:
    assert aml.encode_integer(value) == expected
    assert Integer(value) == expected
    assert Name("X", value) == b"\x08X___" + expected


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, "1", 1.0])
def test_integer_rejects_what_aml_cannot_hold(bad: object) -> None:
    with pytest.raises(AmlError):
        aml.encode_integer(bad)  # type: ignore[arg-type]


def test_string_is_nul_terminated_ascii() -> None:
    assert String("LNRO0005") == b"\x0dLNRO0005\x00"
    assert Name("_HID", "QEMU0001") == b"\x08_HID\x0dQEMU0001\x00"
    with pytest.raises(AmlError):
        String("caf\u00e9")
    with pytest.raises(AmlError):
        String("a\0b")


# --- EISA ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eisa_id", "value"),
    [
        ("PNP0501", 0x0105D041),
        ("PNP0303", 0x0303D041),
        ("PNP0A03", 0x030AD041),
        ("PNP0C0C", 0x0C0CD041),
        ("AAA0000", 0x00002104),  # letters 1,1,1 -> 0x0421; bytes 04 21 00 00
    ],
)
def test_eisa_id_compression(eisa_id: str, value: int) -> None:
    assert aml.eisa_id_value(eisa_id) == value
    # Always a DWord constant, never shortened, so decoders print EisaId() back.
    assert EisaId(eisa_id) == b"\x0c" + value.to_bytes(4, "little")


@pytest.mark.parametrize("bad", ["pnp0501", "PNP050", "PNP05011", "PNP05G1", "P1P0501"])
def test_eisa_id_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(AmlError):
        EisaId(bad)


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seg", "expected"), [("_SB", b"_SB_"), ("COM1", b"COM1"), ("V", b"V___"), ("_S5", b"_S5_")]
)
def test_name_seg_pads_with_underscores(seg: str, expected: bytes) -> None:
    assert aml.name_seg(seg) == expected


@pytest.mark.parametrize("bad", ["", "1ABC", "ABCDE", "com1", "A-B", "A.B"])
def test_name_seg_rejects_invalid_names(bad: str) -> None:
    with pytest.raises(AmlError):
        aml.name_seg(bad)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("\\", b"\\\x00"),  # the root itself: RootChar NullName
        ("\\_SB", b"\\_SB_"),
        ("COM1", b"COM1"),
        ("^^FOO", b"^^FOO_"),
        ("_SB.COM1", b"\x2e_SB_COM1"),  # DualNamePath
        ("\\_SB.COM1", b"\\\x2e_SB_COM1"),
        ("\\_SB.PCI0.S08", b"\\\x2f\x03_SB_PCI0S08_"),  # MultiNamePath
        ("^_SB.A.B.C", b"^\x2f\x04_SB_A___B___C___"),
    ],
)
def test_name_string_prefixes_and_paths(path: str, expected: bytes) -> None:
    assert aml.name_string(path) == expected
    assert NamePath(path) == expected


@pytest.mark.parametrize("bad", ["", "_SB..COM1", "_SB.", "\\\\_SB", "^\\_SB"])
def test_name_string_rejects_invalid_paths(bad: str) -> None:
    with pytest.raises(AmlError):
        aml.name_string(bad)


# --- data objects and terms ---------------------------------------------------------


def test_buffer_and_package_encodings() -> None:
    assert Buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert Buffer(b"") == b"\x11\x02\x00"
    assert Package([5, 0]) == b"\x12\x05\x02\x0a\x05\x00"
    assert Package([]) == b"\x12\x02\x00"
    assert Package(["A", NamePath("\\_SB")]) == b"\x12\x0a\x02\x0dA\x00\\_SB_"
    with pytest.raises(AmlError):
        Package([0] * 256)


def test_name_scope_device_method_return() -> None:
    assert Name("_UID", 0) == b"\x08_UID\x00"
    assert Name("\\_S5", Package([5, 0])) == b"\x08\\_S5_\x12\x05\x02\x0a\x05\x00"
    assert Scope("\\_SB", []) == b"\x10\x06\\_SB_"
    assert Device("COM1", [Name("_UID", 0)]) == b"\x5b\x82\x0bCOM1\x08_UID\x00"
    assert Return(0x0F) == b"\xa4\x0a\x0f"
    assert Method("_STA", [Return(0x0F)]) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    # Flags: argument count in bits 0-2, Serialized in bit 3, sync level in 4-7.
    assert Method("FOO", [], args=2, serialized=True, sync_level=3)[6] == 0x3A
    with pytest.raises(AmlError):
        Method("FOO", [], args=8)


def test_method_code_opcodes() -> None:
    """ACPI 6.x 20.2.6.1 (ArgObj 0x68-0x6E), 20.2.5.4 (LEqualOp 0x93),
    20.2.5.3 (IfOp 0xA0 PkgLength Predicate TermList), 20.2.5.3 (NotifyOp 0x86
    NotifyObject NotifyValue)."""
    assert Arg(0) == b"\x68"
    assert Arg(6) == b"\x6e"
    assert LEqual(Arg(0), 0x17) == b"\x93\x68\x0a\x17"
    assert LEqual(1, Arg(1)) == b"\x93\x01\x69"
    notify = Notify("\\_SB.VGEN", 0x80)
    assert notify == b"\x86\\\x2e_SB_VGEN\x0a\x80"
    branch = If(LEqual(Arg(0), 0x17), [notify])
    assert branch == b"\xa0" + bytes((1 + 4 + len(notify),)) + LEqual(Arg(0), 0x17) + notify
    assert If(0, []) == b"\xa0\x02\x00"


@pytest.mark.parametrize(
    "bad",
    [lambda: Arg(7), lambda: Arg(-1), lambda: Arg(True), lambda: Notify("\\_SB.VGEN", 0x100)],
    ids=["arg7", "arg-1", "arg-bool", "notify-0x100"],
)
def test_method_code_rejects_what_aml_cannot_encode(bad) -> None:
    with pytest.raises(AmlError):
        bad()


def test_raw_bytes_are_refused_as_if_terms() -> None:
    with pytest.raises(AmlError):
        If(Arg(0), [b"\x86"])  # type: ignore[list-item]


def test_nested_terms_get_multi_byte_pkg_lengths() -> None:
    inner = Name("DATA", Buffer(bytes(100)))
    device = Device("BIG0", [inner])
    assert device[:2] == b"\x5b\x82"
    length, size = decode_pkg_length(device[2:])
    assert size == 2
    assert length == len(device) - 2  # the PkgLength covers everything after the opcode
    assert device.endswith(inner)


def test_raw_bytes_are_refused_where_aml_is_expected() -> None:
    with pytest.raises(AmlError):
        Name("_CRS", b"\x79\x00")  # type: ignore[arg-type]
    with pytest.raises(AmlError):
        Device("DEV0", [b"\x08_UID\x00"])  # type: ignore[list-item]
    with pytest.raises(AmlError):
        ResourceTemplate([Name("_UID", 0)])  # type: ignore[list-item]


def test_classes_are_their_bytes() -> None:
    uid = Name("_UID", 0)
    assert isinstance(uid, bytes)
    assert isinstance(uid, aml.Aml)
    assert bytes(Device("D", [uid])).endswith(bytes(uid))


# --- resource descriptors --------------------------------------------------------


def test_io_descriptor() -> None:
    assert IO(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert IO(0x60, 0x60, 1, 1, decode16=False) == b"\x47\x00\x60\x00\x60\x00\x01\x01"
    with pytest.raises(AmlError):
        IO(0x10000, 0x10000, 1, 1)
    with pytest.raises(AmlError):
        IO(0x64, 0x60, 1, 1)


def test_irq_no_flags_descriptor() -> None:
    assert IRQNoFlags(4) == b"\x22\x10\x00"
    assert IRQNoFlags(1) == b"\x22\x02\x00"
    assert IRQNoFlags(3, 15) == b"\x22\x08\x80"
    with pytest.raises(AmlError):
        IRQNoFlags(16)
    with pytest.raises(AmlError):
        IRQNoFlags()


def test_memory32_fixed_descriptor() -> None:
    assert Memory32Fixed(0xD000_1000, 0x1000) == bytes.fromhex("860900010010 00d000100000")
    assert Memory32Fixed(0xFEC0_0000, 0x1000, read_write=False)[3] == 0x00
    with pytest.raises(AmlError):
        Memory32Fixed(0xFFFF_F000, 0x2000)


def test_extended_interrupt_descriptor() -> None:
    # Consumer | edge = 0x03; one interrupt number, 32 bits.
    assert Interrupt(5) == bytes.fromhex("890600030105000000")
    level_low_shared = Interrupt(33, edge=False, active_low=True, shared=True)
    assert level_low_shared[3] == 0x01 | 0x04 | 0x08
    assert Interrupt(5, 6)[1:5] == b"\x0a\x00\x03\x02"
    with pytest.raises(AmlError):
        Interrupt()


def test_resource_template_ends_with_a_checksummed_end_tag() -> None:
    descriptors = [IO(0x3F8, 0x3F8, 1, 8), IRQNoFlags(4)]
    template = ResourceTemplate(descriptors)
    body = b"".join(descriptors)
    size = len(body) + 2
    assert template[:4] == bytes((aml.BUFFER_OP, size + 3, aml.BYTE_PREFIX, size))
    resources = template[4:]
    assert resources[:-2] == body
    assert resources[-2] == 0x79  # End Tag, length 1
    assert sum(resources) % 256 == 0


def test_module_docstring_example_builds() -> None:
    com1 = Device(
        "COM1",
        [
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate([IO(0x3F8, 0x3F8, 1, 8), IRQNoFlags(4)])),
        ],
    )
    assert com1.startswith(b"\x5b\x82")
    assert b"COM1\x08_HID\x0c\x41\xd0\x05\x01" in com1
