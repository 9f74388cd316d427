"""The state file: header, format version, flags, size cap, and the checks of MemoryState."""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from pathlib import Path

import pytest

from pyvmm.snapshot import state as state_module
from pyvmm.snapshot.codec import encode
from pyvmm.snapshot.state import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_STATE_SIZE,
    MemoryState,
    SnapshotError,
    pack_state,
    read_state,
    unpack_state,
)
from tests.unit.snapshot.sample import ID_A, ID_B, MiB, make_state, pack_json


def test_the_whole_state_round_trips(tmp_path: Path) -> None:
    state = make_state()
    assert unpack_state(pack_state(state)) == state
    (tmp_path / "s").write_bytes(pack_state(state))
    assert read_state(tmp_path / "s") == state


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


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_are_refused(version: int) -> None:
    """Format 1 had no snapshot ids (its memory files cannot be tied to their state
    files); format 2 saved devices by position and rate limits as text."""
    payload = encode(make_state())
    with pytest.raises(
        SnapshotError, match=rf"f: snapshot format {version} is older .* \(formats 3-3\)"
    ):
        unpack_state(pack_json(payload, version=version), "f")


@pytest.mark.parametrize("flags", [1, 0x80000000])
def test_unknown_header_flags_are_refused(flags: int) -> None:
    packed = bytearray(pack_state(make_state()))
    struct.pack_into("<I", packed, 12, flags)
    with pytest.raises(SnapshotError, match=f"f has header flags {flags:#x} this pyvmm"):
        unpack_state(bytes(packed), "f")


def test_pack_state_writes_flags_zero() -> None:
    assert struct.unpack_from("<I", pack_state(make_state()), 12) == (0,)


def memory_payload(**changes: object) -> bytes:
    payload = encode(make_state())
    payload["memory"].update(changes)
    return pack_json(payload)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"snapshot_id": "A" * 32}, "snapshot_id 'AAAA.* is not 32 hex digits"),
        ({"snapshot_id": "a" * 31}, "is not 32 hex digits"),
        ({"diff": True}, "base_id must be 32 hex digits in a diff"),
        ({"base_id": ID_B}, "base_id must be 32 hex digits in a diff snapshot, else empty"),
        ({"diff": True, "base_id": ID_A}, "a diff cannot be its own base"),
        ({"dirty": [[0, 4096]]}, "a full snapshot has no dirty ranges"),
        ({"regions": [[0, MiB // 2]]}, "regions do not add up"),
        ({"regions": [[0, MiB - 1], [1 << 32, 1]]}, "is not page-aligned"),
        ({"diff": True, "base_id": ID_B, "dirty": [[4096, 4096], [0, 4096]]}, "out of order"),
        ({"diff": True, "base_id": ID_B, "dirty": [[0, 4096], [0, 8192]]}, "out of order"),
        ({"diff": True, "base_id": ID_B, "dirty": [[100, 4096]]}, "unaligned"),
        ({"diff": True, "base_id": ID_B, "dirty": [[4096, 0]]}, "unaligned"),
        ({"diff": True, "base_id": ID_B, "dirty": [[MiB - 4096, 8192]]}, "past the 0x100000"),
    ],
)
def test_memory_values_no_pyvmm_writes_are_refused(changes: dict, message: str) -> None:
    """The dirty ranges become file offsets that merge_diff writes at: checked once, here."""
    with pytest.raises(SnapshotError, match=f"f does not hold a valid snapshot: .*{message}"):
        unpack_state(memory_payload(**changes), "f")


def test_a_diff_state_round_trips() -> None:
    memory = MemoryState(
        size=MiB,
        regions=((0, MiB),),
        snapshot_id=ID_B,
        diff=True,
        dirty=((0, 8192), (MiB - 4096, 4096)),
        base_id=ID_A,
    )
    assert unpack_state(pack_state(make_state(memory))).memory == memory


# --- what read_state opens and how much it reads -------------------------------------
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    errors: list[Exception] = []
    reader = threading.Thread(target=lambda: errors.append(_refusal(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck reader go
        pytest.fail("read_state waited on the FIFO")
    assert str(errors[0]) == f"snapshot state file {fifo} is not a regular file (it is a FIFO)"


def _refusal(path: Path) -> Exception:
    try:
        read_state(path)
    except SnapshotError as exc:
        return exc
    raise AssertionError("read_state accepted a FIFO")


@pytest.mark.parametrize(
    ("path", "kind"), [("/dev/zero", "a character device"), ("/", "a directory")]
)
def test_what_is_not_a_regular_file_is_refused_before_reading(path: str, kind: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        read_state(path)
    assert str(caught.value) == f"snapshot state file {path} is not a regular file (it is {kind})"


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "disk.img"
    with open(big, "wb") as file:  # sparse: a disk image given as the state file
        file.write(pack_state(make_state()))
        file.truncate(MAX_STATE_SIZE + 1)
    with pytest.raises(SnapshotError, match=r"disk.img is 67108865 bytes, over the 64 MiB"):
        read_state(big)


def test_pyvmm_never_writes_a_state_file_it_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = MemoryState(
        size=MiB,
        regions=((0, MiB),),
        snapshot_id=ID_B,
        diff=True,
        dirty=tuple((offset, 4096) for offset in range(0, MiB, 8192)),
        base_id=ID_A,
    )
    state = make_state(memory)
    monkeypatch.setattr(state_module, "MAX_STATE_SIZE", len(pack_state(state)) - 1)
    with pytest.raises(SnapshotError, match="a diff of 128 scattered ranges: take a full"):
        pack_state(state)
    assert pack_state(dataclasses.replace(state, memory=dataclasses.replace(memory, dirty=())))


def test_a_missing_file_is_one_line() -> None:
    with pytest.raises(SnapshotError) as caught:
        read_state("/nonexistent/vm.state")
    assert str(caught.value) == (
        "cannot open snapshot state file /nonexistent/vm.state: No such file or directory"
    )
