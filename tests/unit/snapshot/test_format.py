"""The snapshot file format, codec, memory files and atomic writes, without KVM."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest

from pyvmm.config import DriveConfig, MachineConfig, NetConfig, VsockConfig
from pyvmm.devices.base import NoIrq
from pyvmm.devices.legacy.acpi_pm import AcpiPm, PvPanic
from pyvmm.devices.legacy.boot_timer import BootTimer
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.virtio.block import VirtioBlockState
from pyvmm.devices.virtio.mmio import MmioTransport
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import DirtyTrackingMemory, GuestMemory
from pyvmm.snapshot import FORMAT_VERSION, SnapshotError, merge_diff
from pyvmm.snapshot.codec import CodecError, decode, encode
from pyvmm.snapshot.files import atomic_files
from pyvmm.snapshot.memory_file import bitmap_pages, page_runs, write_diff, write_full
from pyvmm.snapshot.state import (
    HEADER_SIZE,
    DevicesState,
    MemoryState,
    MicrovmState,
    VcpuState,
    VmKvmState,
    pack_state,
    read_state,
    unpack_state,
)

MiB = 1 << 20


def make_state(memory: MemoryState | None = None) -> MicrovmState:
    mem = GuestMemory([(0, MiB)])
    serial = Serial(NoIrq(), lambda data: None)
    serial.enqueue_input(b"typed")
    transport = MmioTransport(VirtioRng(), NoIrq(), mem)
    return MicrovmState(
        pyvmm_version="0.1.0",
        config=MachineConfig(
            kernel=Path("/k"),
            vcpus=2,
            drives=(DriveConfig(Path("/d.img"), read_only=True, rate_limit="bw=1M/1s"),),
            nets=(NetConfig("tap0", mac="02:00:00:00:00:01"),),
            vsock=VsockConfig(3, Path("/tmp/v.sock")),
        ),
        memory=memory or MemoryState(size=MiB, regions=((0, MiB),)),
        vcpus=(
            VcpuState(
                id=0,
                cpuid=((0, 0, 0, 0xD, 1, 2, 3),),
                tsc_khz=2_000_000,
                mp_state=0,
                regs=b"\x01" * 144,
                sregs=b"\x02" * 312,
                fpu=b"\x03" * 416,
                xsave=None,
                xcrs=b"x",
                debugregs=None,
                lapic=bytes(1024),
                msrs={0x10: 12345, 0xC0000080: 0x500},
                vcpu_events=bytes(64),
            ),
        ),
        vm=VmKvmState(b"pm", b"ps", b"io", b"pit", b"clock"),
        devices=DevicesState(
            serial=serial.save(),
            i8042=I8042(NoIrq(), lambda: None).save(),
            acpi_pm=AcpiPm(lambda: None, lambda: None).save(),
            pvpanic=PvPanic(lambda: None).save(),
            boot_timer=BootTimer(0).save(),
            virtio=(transport.save(),),
        ),
    )


def test_the_whole_state_round_trips() -> None:
    state = make_state()
    assert unpack_state(pack_state(state)) == state


def test_a_device_state_behind_object_carries_its_type() -> None:
    state = make_state()
    block = dataclasses.replace(
        state.devices.virtio[0], device=VirtioBlockState(4096, True, {"reads": 2})
    )
    state = dataclasses.replace(state, devices=dataclasses.replace(state.devices, virtio=(block,)))
    encoded = encode(state)
    assert encoded["devices"]["virtio"][0]["device"]["type"] == "VirtioBlockState"
    assert unpack_state(pack_state(state)).devices.virtio[0].device == block.device


def test_decode_names_the_field_that_does_not_fit() -> None:
    data = encode(make_state())
    data["vcpus"][0]["msrs"]["16"] = "lots"
    with pytest.raises(CodecError, match=r"state.vcpus\[0\].msrs\[16\]: expected an integer"):
        decode(data, MicrovmState, {})
    data = encode(make_state())
    data["devices"]["virtio"][0]["device"] = {"type": "os.system", "state": {}}
    with pytest.raises(CodecError, match="unknown state type"):
        decode(data, MicrovmState, {})
    data = encode(make_state())
    data["config"]["surprise"] = 1
    with pytest.raises(CodecError, match="unknown field 'surprise'"):
        decode(data, MicrovmState, {})


def test_header_errors_say_what_is_wrong() -> None:
    packed = bytearray(pack_state(make_state()))
    with pytest.raises(SnapshotError, match="not a pyvmm snapshot"):
        unpack_state(b"PYVMM", "f")
    older = packed.copy()
    struct.pack_into("<I", older, 8, 0)
    with pytest.raises(
        SnapshotError, match=r"snapshot format 0 is older .* written by pyvmm 0.1.0"
    ):
        unpack_state(bytes(older), "f")
    newer = packed.copy()
    struct.pack_into("<I", newer, 8, FORMAT_VERSION + 1)
    with pytest.raises(SnapshotError, match=f"format {FORMAT_VERSION + 1} is newer"):
        unpack_state(bytes(newer), "f")
    flipped = packed.copy()
    flipped[HEADER_SIZE + 5] ^= 0x20
    with pytest.raises(SnapshotError, match="f is corrupt: its SHA-256"):
        unpack_state(bytes(flipped), "f")
    with pytest.raises(SnapshotError, match=r"f is corrupt: .*\(truncated"):
        unpack_state(bytes(packed[:-1]), "f")


def test_bitmaps_and_page_runs() -> None:
    assert bitmap_pages(bytes([0b101, 0, 0, 0, 0, 0, 0, 0x80]), 16) == [16, 18, 16 + 63]
    assert bitmap_pages(bytes(8), 0) == []
    mem = GuestMemory([(0, 4 * 4096), (1 << 32, 4 * 4096)])
    high = (1 << 32) >> 12
    runs = page_runs(mem, [0, 1, 3, high, high + 1, 99])
    assert runs == ((0, 8192), (3 * 4096, 3 * 4096))  # page 3, then the high region


def test_dirty_tracking_memory_records_every_access() -> None:
    mem = DirtyTrackingMemory([(0, 16 * 4096)])
    mem.write(4095, b"ab")
    mem.read_u32(8 * 4096)
    mem.view(10 * 4096, 1)
    assert mem.take_dirty() == {0, 1, 8, 10}
    assert mem.take_dirty() == set()


def test_full_and_diff_files_merge_to_the_same_bytes(tmp_path: Path) -> None:
    mem = DirtyTrackingMemory([(0, 4 * MiB)])
    mem.write(5 * 4096, b"base")
    with atomic_files(tmp_path / "base.mem") as (fd,):
        write_full(mem, fd)
    assert os.stat(tmp_path / "base.mem").st_size == 4 * MiB
    mem.take_dirty()
    mem.write(5 * 4096, bytes(4))  # a page written back to zeros must still be copied
    mem.write(3 * MiB, b"later")
    with atomic_files(tmp_path / "diff.mem", tmp_path / "diff.state") as (mem_fd, state_fd):
        runs = write_diff(mem, mem.take_dirty(), mem_fd)
        memory = MemoryState(size=4 * MiB, regions=((0, 4 * MiB),), diff=True, dirty=runs)
        os.write(state_fd, pack_state(make_state(memory)))
    with atomic_files(tmp_path / "full.mem") as (fd,):
        write_full(mem, fd)
    merge_diff(tmp_path / "base.mem", tmp_path / "diff.state", tmp_path / "diff.mem")
    assert (tmp_path / "base.mem").read_bytes() == (tmp_path / "full.mem").read_bytes()
    assert read_state(tmp_path / "diff.state").memory.dirty == runs


def test_merge_refuses_a_full_snapshot(tmp_path: Path) -> None:
    (tmp_path / "full.state").write_bytes(pack_state(make_state()))
    with pytest.raises(SnapshotError, match="is a full snapshot, not a diff"):
        merge_diff(tmp_path / "a", tmp_path / "full.state", tmp_path / "b")


def test_memory_maps_a_file_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.write_bytes(b"\x07" * 8192 + b"\x09" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        mem = GuestMemory([(0, 8192), (1 << 20, 4096)], file=fd)
    finally:
        os.close(fd)
    assert mem.read(8190, 2) == b"\x07\x07" and mem.read(1 << 20, 1) == b"\x09"
    mem.write(0, b"guest")
    assert mem.read(0, 5) == b"guest"
    assert path.read_bytes()[:5] == b"\x07" * 5, "the file is never written"
    mem.close()


def test_atomic_files_leave_nothing_behind_on_error(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_files(tmp_path / "a", tmp_path / "b") as (fd, _):
        os.write(fd, b"new")
        raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"old"
    with atomic_files(tmp_path / "a", tmp_path / "b") as (fa, fb):
        os.write(fa, b"new")
        os.write(fb, b"bee")
    assert (tmp_path / "a").read_bytes() == b"new" and (tmp_path / "b").read_bytes() == b"bee"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
