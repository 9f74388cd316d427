"""The DSDT's VM generation id (``VGEN``) and Generic Event Device (``GED_``).

What a guest needs from them, checked with ACPICA's own tools: ``iasl -d``
decodes both devices as ASL, ``iasl`` re-encodes that ASL to our bytes, and
``acpiexec`` evaluates ``ADDR`` (the address Linux's vmgenid driver maps),
``_CID`` (the id it binds to) and ``_EVT`` (what the GED's interrupt runs).
The layout checks (where the 16 bytes live, which GSI) need no tool.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.boot.acpi import VmGenIdAcpi, build_acpi_tables, write_acpi_tables
from pyvmm.boot.acpi.dsdt import build_dsdt, generic_event_device, vm_generation_id
from pyvmm.boot.acpi.tables import HEADER
from pyvmm.boot.e820 import E820Type, build_memory_map
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from tests.unit.boot.acpi.test_tables import (
    VIRTIO_3,
    _assert_clean,
    _run,
    _tool,
    asl_devices,
    iasl_compile,
    iasl_disassemble,
)

VMGENID = VmGenIdAcpi(layout.VMGENID_ADDR, layout.GED_GSI)
# iasl refuses a _HID whose last four characters are not hex digits (error
# 6035), but "QEMUVGID" is the id QEMU gives the device and guests accept it
# (they bind through the _CID). Only that one message is waived.
IASL_ALLOW_VENDOR_HID = ("-vw", "6035")


def test_layout_puts_the_generation_id_in_the_hole_below_1_mib() -> None:
    """Backed by RAM region 0, absent from the e820 map, clear of the ACPI tables."""
    start, end = layout.VMGENID_ADDR, layout.VMGENID_ADDR + layout.VMGENID_SIZE
    assert start % 8 == 0
    assert layout.ram_regions(layout.MIN_MEMORY_SIZE)[0][0] == 0  # RAM from 0 covers it
    for entry in build_memory_map(layout.ram_regions(layout.MIN_MEMORY_SIZE)):
        assert end <= entry.addr or start >= entry.end, f"the e820 map lists it: {entry}"
    tables = build_acpi_tables(32, VIRTIO_3, vmgenid=VMGENID)
    assert end <= tables.rsdp_addr
    assert start > layout.EBDA_START  # clear of the MP table too
    assert layout.VIRTIO_GSI_START + layout.MAX_VIRTIO_DEVICES <= layout.GED_GSI
    assert layout.GED_GSI < layout.IOAPIC_NUM_PINS
    ram = [e for e in build_memory_map([(0, 1 << 30)]) if e.type is E820Type.RAM]
    assert all(not e.addr <= start < e.end for e in ram)


def test_without_vmgenid_the_dsdt_is_unchanged() -> None:
    assert build_dsdt(VIRTIO_3) == build_dsdt(VIRTIO_3, None)
    assert b"VGEN" not in build_dsdt(VIRTIO_3)
    assert b"VGEN" in build_dsdt(VIRTIO_3, VMGENID)


def test_addr_splits_an_address_above_4_gib_into_two_dwords() -> None:
    device = vm_generation_id(0x1_2345_6788)
    # Return (Package (2) {0x23456788, One}): DWordConst, then OneOp.
    assert b"\xa4\x12\x08\x02\x0c\x88\x67\x45\x23\x01" in device


@pytest.mark.parametrize("addr", [0, 0xA0004, 1 << 64])
def test_unusable_addresses_are_refused(addr: int) -> None:
    with pytest.raises(ConfigError, match="8-byte aligned"):
        vm_generation_id(addr)


@pytest.mark.parametrize("gsi", [-1, layout.IOAPIC_NUM_PINS])
def test_ged_gsi_must_be_an_ioapic_pin(gsi: int) -> None:
    with pytest.raises(ConfigError, match="not an IOAPIC pin"):
        generic_event_device(gsi, "\\_SB.VGEN")


def test_vgen_and_ged_decoded(tmp_path: Path) -> None:
    dsl = iasl_disassemble(tmp_path, "dsdt", build_dsdt(VIRTIO_3, VMGENID))
    devices = asl_devices(dsl)
    assert sorted(devices) == sorted(
        ["COM1", "PS2K", "PEVT", "V000", "V001", "V002", "VGEN", "GED"]
    )

    vgen = devices["VGEN"].text
    assert 'Name (_HID, "QEMUVGID")' in vgen
    assert 'Name (_CID, "VM_Gen_Counter")' in vgen
    assert 'Name (_DDN, "VM_Gen_Counter")' in vgen
    addr = re.search(
        r"Method \(ADDR, 0, NotSerialized\)\s*\{\s*Return \(Package \(0x02\)\s*"
        r"\{\s*(0x[0-9A-F]+),\s*(Zero)\s*\}",
        vgen,
    )
    assert addr is not None, vgen
    assert int(addr[1], 16) == layout.VMGENID_ADDR

    ged = devices["GED"]
    assert ged.hid == "ACPI0013"
    assert ged.interrupts == [
        ("ResourceConsumer", "Edge", "ActiveHigh", "Exclusive", [layout.GED_GSI])
    ]
    event = re.search(
        r"Method \(_EVT, 1, NotSerialized\).*?If \(\(Arg0 == (0x[0-9A-F]+)\)\)\s*\{\s*"
        r"Notify \(\\_SB\.VGEN, 0x80\)",
        ged.text,
        re.S,
    )
    assert event is not None, ged.text
    assert int(event[1], 16) == layout.GED_GSI


def test_dsdt_with_vmgenid_recompiles_to_the_same_aml(tmp_path: Path) -> None:
    """iasl's encoding of the disassembly is ours, but for the End Tag checksums (see
    test_tables.py)."""
    ours = build_dsdt(VIRTIO_3, VMGENID)
    dsl = iasl_disassemble(tmp_path, "dsdt", ours)
    theirs = iasl_compile(tmp_path, "dsdt", dsl, "-oa", *IASL_ALLOW_VENDOR_HID)
    assert len(theirs) == len(ours)
    differences = [i for i in range(HEADER.size, len(ours)) if ours[i] != theirs[i]]
    for i in differences:
        assert ours[i - 1] == 0x79 and theirs[i] == 0, f"AML differs at {i:#x}"
    assert len(differences) == 3 + len(VIRTIO_3) + 1  # + the GED's _CRS


def test_acpiexec_finds_the_address_binds_the_cid_and_notifies(tmp_path: Path) -> None:
    """What Linux does: read ADDR, match _CID, and on the GED interrupt run _EVT(gsi)."""
    tables = build_acpi_tables(1, (), vmgenid=VMGENID)
    for name in ("fadt", "madt", "dsdt"):
        (tmp_path / f"{name}.dat").write_bytes(getattr(tables, name))
    commands = (
        "evaluate \\_SB.VGEN.ADDR; evaluate \\_SB.VGEN._CID; "
        f"evaluate \\_SB.GED._EVT {layout.GED_GSI}; evaluate \\_SB.GED._EVT 5"
    )
    output = _run([_tool("acpiexec"), "-b", commands, "fadt.dat", "madt.dat", "dsdt.dat"], tmp_path)
    _assert_clean(output)
    assert re.search(
        r"\[Package\] Contains 2 Elements:\s*\[Integer\] = 00000000000A0000\s*"
        r"\[Integer\] = 0000000000000000",
        output,
    ), output
    # ACPICA upper-cases _CID strings: this is the id in Linux's vmgenid driver.
    assert '[String] Length 0E = "VM_GEN_COUNTER"' in output
    notifications = re.findall(r"Received a Device Notify on \[(\w+)\].*?Value (0x\w+)", output)
    assert notifications == [("VGEN", "0x80")], output  # once: for the GED's GSI, not for 5


def test_written_tables_hold_the_generation_id_devices() -> None:
    with GuestMemory([(0, layout.MIN_MEMORY_SIZE)]) as memory:
        rsdp = write_acpi_tables(memory, 1, (), vmgenid=VMGENID)
        tables = build_acpi_tables(1, (), vmgenid=VMGENID)
        assert rsdp == tables.rsdp_addr
        assert memory.read(tables.dsdt_addr, len(tables.dsdt)) == tables.dsdt
        assert b"QEMUVGID" in tables.dsdt and b"ACPI0013" in tables.dsdt
