"""The ACPI tables, decoded by ACPICA's own tools (``iasl -d``, ``acpiexec``).

These tests need the ``acpica-tools`` package (``apt-get install -y
acpica-tools``); without ``iasl`` they fail rather than skip, so CI must
install it. The data tables are also recompiled from their disassembly and
compared byte for byte with ours, which checks every field's offset and
width against ACPICA's idea of the layout, not just the ones asserted on.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.boot import mptable
from pyvmm.boot.acpi import build_acpi_tables, write_acpi_tables
from pyvmm.boot.acpi.aml import Buffer, Device, Name, Package, Scope
from pyvmm.boot.acpi.dsdt import build_dsdt
from pyvmm.boot.acpi.tables import (
    FADT_BODY,
    GAS,
    HEADER,
    MADT_INTERRUPT_OVERRIDE,
    MADT_IO_APIC,
    RSDP,
    build_madt,
    build_table,
)
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

VIRTIO_3 = (
    (layout.VIRTIO_MMIO_START, 0x1000, 5),
    (layout.VIRTIO_MMIO_START + 0x1000, 0x1000, 6),
    (layout.VIRTIO_MMIO_START + 0x2000, 0x1000, 7),
)
CPU_COUNTS = (1, 2, 32)
_TOOL_TIMEOUT_S = 60


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install acpica-tools (apt-get install -y acpica-tools)")
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def _assert_clean(output: str) -> None:
    for word in ("Error", "Warning", "Incorrect", "Invalid"):
        assert word not in output, output


def iasl_disassemble(tmp_path: Path, name: str, table: bytes) -> str:
    """Disassemble one table with ``iasl -d``; the .dsl text, checked for complaints."""
    (tmp_path / f"{name}.dat").write_bytes(table)
    output = _run([_tool("iasl"), "-d", f"{name}.dat"], tmp_path)
    _assert_clean(output)
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in dsl
    return dsl


def iasl_compile(tmp_path: Path, name: str, source: str, *options: str) -> bytes:
    """Compile ASL or data-table source with ``iasl``; must give 0 errors and 0 warnings."""
    (tmp_path / f"{name}.src").write_text(source)
    output = _run([_tool("iasl"), *options, "-p", f"{name}-out", f"{name}.src"], tmp_path)
    assert "0 Errors, 0 Warnings" in output, output
    return (tmp_path / f"{name}-out.aml").read_bytes()


# --- parsing iasl's data-table output --------------------------------------------------

_FIELD = re.compile(
    r"^\s*(?:\[[0-9A-F]+h \d+ +\d+\])?\s*(?P<name>[^:\[]+?)\s*:\s*(?P<value>.*?)\s*$"
)


def data_fields(dsl: str) -> list[tuple[str, str]]:
    """``(field name, value text)`` in table order, decoded flag bits included."""
    fields = []
    for line in dsl.splitlines():
        if line.startswith("Raw Table Data"):
            break
        if line.startswith(("/*", " *")) or not line.strip():
            continue
        match = _FIELD.match(line)
        if match:
            fields.append((match["name"], match["value"]))
    return fields


def hex_value(text: str) -> int:
    return int(text.split()[0], 16)


def first(fields: list[tuple[str, str]], name: str, nth: int = 0) -> str:
    values = [value for field_name, value in fields if field_name == name]
    assert len(values) > nth, f"{name!r} not decoded: {fields}"
    return values[nth]


def gas(fields: list[tuple[str, str]], name: str) -> dict[str, str]:
    """The five decoded members of the Generic Address Structure called ``name``."""
    index = [field_name for field_name, _ in fields].index(name)
    return dict(fields[index + 1 : index + 6])


def subtables(fields: list[tuple[str, str]]) -> list[dict[str, str]]:
    groups: list[dict[str, str]] = []
    for name, value in fields:
        if name == "Subtable Type":
            groups.append({})
        if groups:
            groups[-1][name] = value
    return groups


# --- parsing iasl's ASL output (the DSDT) ---------------------------------------------


@dataclass
class AslDevice:
    name: str
    text: str
    hid: str | None = None
    uid: int | None = None
    io: list[tuple[int, int, int, int]] = field(default_factory=list)
    irqs: list[int] = field(default_factory=list)
    memory: list[tuple[str, int, int]] = field(default_factory=list)
    interrupts: list[tuple[str, str, str, str, list[int]]] = field(default_factory=list)


_HEX = r"0x([0-9A-F]+)"
_IO = re.compile(
    rf"IO \(Decode16,\s*{_HEX},\s*// Range Minimum\s*{_HEX},\s*// Range Maximum\s*"
    rf"{_HEX},\s*// Alignment\s*{_HEX},\s*// Length"
)
_IRQ = re.compile(r"IRQNoFlags \(\)\s*\{([\d,]+)\}")
_MEMORY = re.compile(
    rf"Memory32Fixed \((ReadWrite|ReadOnly),\s*{_HEX},\s*// Address Base\s*{_HEX},"
    r"\s*// Address Length"
)
_INTERRUPT = re.compile(
    r"Interrupt \((ResourceConsumer|ResourceProducer), (Edge|Level), (ActiveHigh|ActiveLow), "
    r"(Exclusive|Shared)[^)]*\)\s*\{([^}]*)\}"
)
_INTEGER = r"(Zero|One|0x[0-9A-F]+)"


def _asl_int(text: str) -> int:
    named = {"Zero": 0, "One": 1}
    return named[text] if text in named else int(text, 16)


def asl_devices(dsl: str) -> dict[str, AslDevice]:
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"Device \((\w{1,4})\)", dsl)]
    devices = {}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(dsl)
        text = dsl[start:end]
        device = AslDevice(name, text)
        hid = re.search(r'Name \(_HID, (?:EisaId \()?"(\w+)"', text)
        device.hid = hid.group(1) if hid else None
        uid = re.search(rf"Name \(_UID, {_INTEGER}\)", text)
        device.uid = _asl_int(uid.group(1)) if uid else None
        device.io = [tuple(int(g, 16) for g in m.groups()) for m in _IO.finditer(text)]  # type: ignore[misc]
        device.irqs = [int(n) for m in _IRQ.finditer(text) for n in m.group(1).split(",")]
        device.memory = [(m[1], int(m[2], 16), int(m[3], 16)) for m in _MEMORY.finditer(text)]
        device.interrupts = [
            (m[1], m[2], m[3], m[4], [int(n, 16) for n in re.findall(_HEX, m[5])])
            for m in _INTERRUPT.finditer(text)
        ]
        devices[name] = device
    return devices


# --- checksums and layout in plain Python -----------------------------------------------


@pytest.mark.parametrize("num_cpus", CPU_COUNTS)
@pytest.mark.parametrize("virtio", [(), VIRTIO_3])
def test_every_table_sums_to_zero(num_cpus: int, virtio: tuple) -> None:
    tables = build_acpi_tables(num_cpus, virtio)
    for table in (tables.xsdt, tables.fadt, tables.madt, tables.dsdt):
        assert HEADER.unpack(table)["length"] == len(table)
        assert HEADER.unpack(table)["oem_id"] == b"PYVMM "
        assert sum(table) % 256 == 0
    assert len(tables.rsdp) == 36
    assert sum(tables.rsdp[:20]) % 256 == 0
    assert sum(tables.rsdp) % 256 == 0


def test_rsdp_fields() -> None:
    tables = build_acpi_tables(2)
    rsdp = RSDP.unpack(tables.rsdp)
    assert rsdp["signature"] == b"RSD PTR "
    assert rsdp["revision"] == 2
    assert rsdp["rsdt_address"] == 0
    assert rsdp["length"] == 36
    assert rsdp["xsdt_address"] == tables.xsdt_addr


def test_layout_is_aligned_in_order_and_below_1mib() -> None:
    tables = build_acpi_tables(layout.MAX_VCPUS, VIRTIO_3)
    chunks = tables.chunks()
    assert chunks[0][0] == layout.RSDP_ADDR
    for (addr, data), (next_addr, _) in itertools.pairwise(chunks):
        assert next_addr % 16 == 0
        assert addr + len(data) <= next_addr
    assert tables.end <= layout.ACPI_TABLES_END


def test_madt_matches_the_mp_table() -> None:
    """An OS reads one or the other; both must describe the same IOAPIC and IRQ 0."""
    for num_cpus in CPU_COUNTS:
        madt = build_madt(num_cpus)
        mp = mptable.build_mptable(num_cpus)
        ioapic_entries = [
            mptable.IOAPIC_ENTRY.unpack_from(mp, i)
            for i in range(len(mp))
            if mp[i] == mptable.ENTRY_IOAPIC and mp[i + 4 : i + 8] == b"\x00\x00\xc0\xfe"
        ]
        assert len(ioapic_entries) == 1
        _, mp_ioapic_id, _, _, mp_ioapic_addr = ioapic_entries[0]
        offset = HEADER.size + 8 + 8 * num_cpus
        ioapic = MADT_IO_APIC.unpack(madt, offset)
        assert (ioapic["io_apic_id"], ioapic["address"]) == (mp_ioapic_id, mp_ioapic_addr)
        iso = MADT_INTERRUPT_OVERRIDE.unpack(madt, offset + MADT_IO_APIC.size)
        assert (iso["source"], iso["gsi"]) == (layout.PIT_IRQ, layout.PIT_IOAPIC_PIN)


def test_fadt_registers_point_at_the_pm_device_ports() -> None:
    fadt = FADT_BODY.unpack(build_acpi_tables(1).fadt, HEADER.size)
    assert GAS.unpack(fadt["reset_reg"])["address"] == layout.ACPI_RESET_PORT
    assert GAS.unpack(fadt["sleep_control_reg"])["address"] == layout.ACPI_SLEEP_CONTROL_PORT
    assert GAS.unpack(fadt["sleep_status_reg"])["address"] == layout.ACPI_SLEEP_STATUS_PORT
    assert fadt["reset_value"] == layout.ACPI_RESET_VALUE


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_cpus", [0, layout.MAX_VCPUS + 1])
def test_vcpu_count_is_checked(num_cpus: int) -> None:
    with pytest.raises(ConfigError):
        build_acpi_tables(num_cpus)


@pytest.mark.parametrize(
    "device",
    [
        (layout.VIRTIO_MMIO_START, 0x1000, layout.IOAPIC_NUM_PINS),
        (layout.VIRTIO_MMIO_START, 0x1000, -1),
        (0xFFFF_F000, 0x2000, 5),
        (layout.VIRTIO_MMIO_START, 0, 5),
    ],
)
def test_bad_virtio_devices_are_config_errors(device: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError):
        build_acpi_tables(1, [device])


def test_tables_that_do_not_fit_below_1mib_are_refused() -> None:
    many = [(layout.VIRTIO_MMIO_START + i * 0x1000, 0x1000, 5 + i % 19) for i in range(2000)]
    with pytest.raises(ConfigError, match="past 0x100000"):
        build_acpi_tables(1, many)


def test_write_refuses_memory_that_does_not_cover_the_tables() -> None:
    with GuestMemory([(0, 0x80000)]) as mem, pytest.raises(ConfigError, match="guest RAM"):
        write_acpi_tables(mem, 1)


# --- in guest memory -------------------------------------------------------------------


def test_write_acpi_tables_can_be_walked_from_the_rsdp() -> None:
    with GuestMemory.with_size(64 << 20) as mem:
        mem.fill(layout.RSDP_ADDR, layout.ACPI_TABLES_END - layout.RSDP_ADDR, 0xAA)
        rsdp_addr = write_acpi_tables(mem, 2, VIRTIO_3)
        assert rsdp_addr == layout.RSDP_ADDR
        rsdp = RSDP.unpack(mem.read(rsdp_addr, RSDP.size))
        assert rsdp["signature"] == b"RSD PTR "

        def table_at(addr: int) -> bytes:
            length = HEADER.unpack(mem.read(addr, HEADER.size))["length"]
            table = mem.read(addr, length)
            assert sum(table) % 256 == 0
            return table

        xsdt = table_at(rsdp["xsdt_address"])
        entries = struct.unpack_from(f"<{(len(xsdt) - HEADER.size) // 8}Q", xsdt, HEADER.size)
        signatures = [table_at(addr)[:4] for addr in entries]
        assert signatures == [b"FACP", b"APIC"]
        fadt = FADT_BODY.unpack(table_at(entries[0]), HEADER.size)
        assert fadt["dsdt"] == 0
        dsdt = table_at(fadt["x_dsdt"])
        assert dsdt == build_dsdt(VIRTIO_3)
        # The gaps between tables are zeroed, not left as they were.
        tables = build_acpi_tables(2, VIRTIO_3)
        gap = tables.xsdt_addr - (tables.rsdp_addr + len(tables.rsdp))
        assert mem.read(tables.rsdp_addr + len(tables.rsdp), gap) == bytes(gap)


# --- decoded by iasl ---------------------------------------------------------------------


def test_rsdp_matches_what_iasl_compiles(tmp_path: Path) -> None:
    """iasl cannot disassemble a bare RSDP, but it compiles one: checksums included."""
    tables = build_acpi_tables(2)
    source = (
        '[0008] Signature : "RSD PTR "\n'
        "[0001] Checksum : 00\n"
        '[0006] Oem ID : "PYVMM "\n'
        "[0001] Revision : 02\n"
        "[0004] RSDT Address : 00000000\n"
        "[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {tables.xsdt_addr:016X}\n"
        "[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n"
    )
    assert iasl_compile(tmp_path, "rsdp", source) == tables.rsdp


@pytest.mark.parametrize("num_cpus", CPU_COUNTS)
def test_data_tables_survive_an_iasl_round_trip(tmp_path: Path, num_cpus: int) -> None:
    """Disassemble, recompile: the same bytes, up to iasl's own creator id and checksum."""
    tables = build_acpi_tables(num_cpus, VIRTIO_3)
    creator = slice(HEADER.offset("creator_id"), HEADER.size)
    for name, table in (("xsdt", tables.xsdt), ("fadt", tables.fadt), ("madt", tables.madt)):
        dsl = iasl_disassemble(tmp_path, name, table)
        again = bytearray(iasl_compile(tmp_path, name, dsl))
        again[creator] = table[creator]
        again[HEADER.offset("checksum")] = table[HEADER.offset("checksum")]
        assert bytes(again) == table, name


@pytest.mark.parametrize("virtio", [(), VIRTIO_3])
def test_xsdt_lists_fadt_then_madt(tmp_path: Path, virtio: tuple) -> None:
    tables = build_acpi_tables(2, virtio)
    fields = data_fields(iasl_disassemble(tmp_path, "xsdt", tables.xsdt))
    addresses = [
        hex_value(value) for name, value in fields if name.startswith("ACPI Table Address")
    ]
    assert addresses == [tables.fadt_addr, tables.madt_addr]


def test_fadt_decoded(tmp_path: Path) -> None:
    tables = build_acpi_tables(2, VIRTIO_3)
    fields = data_fields(iasl_disassemble(tmp_path, "fadt", tables.fadt))
    assert first(fields, "Signature").startswith('"FACP"')
    assert hex_value(first(fields, "Revision")) == 6
    assert hex_value(first(fields, "FADT Minor Revision")) == 3
    assert hex_value(first(fields, "Table Length")) == 276
    flags = {
        "Hardware Reduced (V5)": "1",
        "Reset Register Supported (V2)": "1",
        "Control Method Power Button (V1)": "1",
        "Control Method Sleep Button (V1)": "1",
        "WBINVD instruction is operational (V1)": "1",
        "Use APIC Physical Destination Mode (V4)": "0",
        "Low Power S0 Idle (V5)": "0",
        # IAPC boot flags
        "8042 Present on ports 60/64 (V2)": "1",
        "VGA Not Present (V4)": "1",
        "CMOS RTC Not Present (V5)": "1",
        "Legacy Devices Supported (V2)": "0",
        "MSI Not Supported (V4)": "0",
    }
    for name, value in flags.items():
        assert first(fields, name) == value, name
    # 32-bit DSDT field zero, X_DSDT set (the second "DSDT Address" iasl prints).
    assert hex_value(first(fields, "DSDT Address", 0)) == 0
    assert hex_value(first(fields, "DSDT Address", 1)) == tables.dsdt_addr
    assert hex_value(first(fields, "FACS Address", 0)) == 0
    assert hex_value(first(fields, "FACS Address", 1)) == 0
    assert hex_value(first(fields, "SCI Interrupt")) == 0
    for register, port in (
        ("Reset Register", layout.ACPI_RESET_PORT),
        ("Sleep Control Register", layout.ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register", layout.ACPI_SLEEP_STATUS_PORT),
    ):
        decoded = gas(fields, register)
        assert decoded["Space ID"] == "01 [SystemIO]", register
        assert hex_value(decoded["Bit Width"]) == 8
        assert hex_value(decoded["Bit Offset"]) == 0
        assert hex_value(decoded["Address"]) == port
    assert hex_value(first(fields, "Value to cause reset")) == layout.ACPI_RESET_VALUE
    assert gas(fields, "PM1A Control Block")["Address"] == "0000000000000000"


@pytest.mark.parametrize("num_cpus", CPU_COUNTS)
def test_madt_decoded(tmp_path: Path, num_cpus: int) -> None:
    fields = data_fields(iasl_disassemble(tmp_path, "madt", build_madt(num_cpus)))
    assert hex_value(first(fields, "Local Apic Address")) == layout.LAPIC_ADDR
    assert first(fields, "PC-AT Compatibility") == "1"
    entries = subtables(fields)
    lapics = [e for e in entries if e["Subtable Type"] == "00 [Processor Local APIC]"]
    assert [hex_value(e["Local Apic ID"]) for e in lapics] == list(range(num_cpus))
    assert [hex_value(e["Processor ID"]) for e in lapics] == list(range(num_cpus))
    assert all(e["Processor Enabled"] == "1" for e in lapics)

    (ioapic,) = [e for e in entries if e["Subtable Type"] == "01 [I/O APIC]"]
    assert hex_value(ioapic["I/O Apic ID"]) == num_cpus
    assert hex_value(ioapic["Address"]) == layout.IOAPIC_ADDR
    assert hex_value(ioapic["Interrupt"]) == 0  # GSI base

    (override,) = [e for e in entries if e["Subtable Type"] == "02 [Interrupt Source Override]"]
    assert hex_value(override["Bus"]) == 0
    assert hex_value(override["Source"]) == layout.PIT_IRQ
    assert hex_value(override["Interrupt"]) == layout.PIT_IOAPIC_PIN
    assert (override["Polarity"], override["Trigger Mode"]) == ("0", "0")  # conforming

    (nmi,) = [e for e in entries if e["Subtable Type"] == "04 [Local APIC NMI]"]
    assert hex_value(nmi["Processor ID"]) == 0xFF
    assert hex_value(nmi["Interrupt Input LINT"]) == 1
    assert len(entries) == num_cpus + 3


@pytest.mark.parametrize("virtio", [(), VIRTIO_3])
def test_dsdt_decoded(tmp_path: Path, virtio: tuple) -> None:
    dsl = iasl_disassemble(tmp_path, "dsdt", build_dsdt(virtio))
    assert 'DefinitionBlock ("", "DSDT", 2, "PYVMM ", "PYVMDSDT", 0x00000001)' in dsl
    assert "Scope (\\_SB)" in dsl
    devices = asl_devices(dsl)
    assert sorted(devices) == sorted(
        ["COM1", "PS2K", "PEVT"] + [f"V00{i}" for i in range(len(virtio))]
    )

    com1 = devices["COM1"]
    assert (com1.hid, com1.uid) == ("PNP0501", 0)
    assert com1.io == [(layout.COM1_PORT, layout.COM1_PORT, 1, 8)]
    assert com1.irqs == [layout.COM1_IRQ]

    kbd = devices["PS2K"]
    assert kbd.hid == "PNP0303"
    assert kbd.io == [(0x60, 0x60, 1, 1), (0x64, 0x64, 1, 1)]
    assert kbd.irqs == [layout.I8042_IRQ]

    panic = devices["PEVT"]
    assert panic.hid == "QEMU0001"
    assert panic.io == [(layout.PVPANIC_PORT, layout.PVPANIC_PORT, 1, 1)]
    assert re.search(r"Method \(_STA, 0, NotSerialized\).*?Return \(0x0F\)", panic.text, re.S)

    for index, (base, size, gsi) in enumerate(virtio):
        dev = devices[f"V00{index}"]
        assert (dev.hid, dev.uid) == ("LNRO0005", index)
        assert "Name (_CCA, One)" in dev.text
        assert dev.memory == [("ReadWrite", base, size)]
        assert dev.interrupts == [("ResourceConsumer", "Edge", "ActiveHigh", "Exclusive", [gsi])]

    s5 = re.search(r"Name \(_S5, Package \(0x02\).*?\{\s*(\w+),\s*(\w+)\s*\}", dsl, re.S)
    assert s5 is not None
    assert (_asl_int(s5[1]), _asl_int(s5[2])) == (layout.ACPI_S5_SLP_TYP, 0)


@pytest.mark.parametrize("virtio", [(), VIRTIO_3])
def test_dsdt_recompiles_to_the_same_aml(tmp_path: Path, virtio: tuple) -> None:
    """iasl's own encoding of our disassembled DSDT (optimisations off) is ours.

    The only differences allowed: the header's creator fields and checksum,
    and resource templates' End Tag checksums, which iasl leaves 0 ("not
    checksummed") and we compute.
    """
    ours = build_dsdt(virtio)
    dsl = iasl_disassemble(tmp_path, "dsdt", ours)
    theirs = iasl_compile(tmp_path, "dsdt", dsl, "-oa")
    assert len(theirs) == len(ours)
    differences = [i for i in range(HEADER.size, len(ours)) if ours[i] != theirs[i]]
    for i in differences:
        assert ours[i - 1] == 0x79 and theirs[i] == 0, f"AML differs at {i:#x}"
    assert len(differences) == 3 + len(virtio)  # one End Tag per _CRS


def test_multi_byte_pkg_lengths_decode(tmp_path: Path) -> None:
    """Two- and three-byte PkgLengths, as iasl reads them."""
    big = Scope(
        "\\_SB",
        [
            Device("MID0", [Name("DATA", Buffer(bytes(100)))]),
            Device(
                "BIG0", [Name("DATA", Buffer(bytes(5000))), Name("PKG0", Package(list(range(70))))]
            ),
        ],
    )
    dsl = iasl_disassemble(tmp_path, "ssdt", build_table(b"SSDT", 2, big))
    assert re.search(r"Device \(MID0\)\s*\{\s*Name \(DATA, Buffer \(0x64\)", dsl)
    assert re.search(r"Device \(BIG0\)\s*\{\s*Name \(DATA, Buffer \(0x1388\)", dsl)
    assert "Name (PKG0, Package (0x46)" in dsl
    assert "0x45\n" in dsl  # the last element


def test_acpiexec_loads_the_tables_and_evaluates_them(tmp_path: Path) -> None:
    """ACPICA's interpreter builds the namespace and runs _STA; predefined names validated."""
    tables = build_acpi_tables(2, VIRTIO_3)
    for name in ("fadt", "madt", "dsdt"):
        (tmp_path / f"{name}.dat").write_bytes(getattr(tables, name))
    commands = "evaluate \\_SB.PEVT._STA; evaluate \\_S5; evaluate \\_SB.V002._CRS"
    output = _run([_tool("acpiexec"), "-b", commands, "fadt.dat", "madt.dat", "dsdt.dat"], tmp_path)
    _assert_clean(output)
    assert "6 Devices" in output
    assert "[Integer] = 000000000000000F" in output
    assert re.search(
        r"\[Package\] Contains 2 Elements:\s*\[Integer\] = 0000000000000005\s*"
        r"\[Integer\] = 0000000000000000",
        output,
    )
    assert "86 09 00 01 00 30 00 D0 00 10 00 00 89 06 00 03" in output
