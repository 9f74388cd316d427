"""The snapshot cache: keys, meta files read as hostile, one build per key, nothing half-made."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pyvmm.errors import HostError
from pyvmm.sandbox import cache as c
from pyvmm.snapshot.files import SnapshotError


def meta(key: str = "k1", **changes: object) -> c.EntryMeta:
    fields = dict(
        key=key,
        runner="in-process",
        disks={"drive0": "drive0.img"},
        shared={"drive1": "/img/ro.img"},
        macs=("02:00:00:00:00:01",),
        taps=("pvs1",),
    )
    fields.update(changes)
    return c.EntryMeta(**fields)  # type: ignore[arg-type]


def fill(staging: Path, key: str = "k1") -> c.EntryMeta:
    (staging / c.STATE_FILE).write_bytes(b"state")
    (staging / c.MEM_FILE).write_bytes(b"mem")
    (staging / c.DISK_DIR / "drive0.img").write_bytes(b"disk")
    return meta(key)


def test_meta_round_trips_through_json() -> None:
    original = meta()
    assert c.EntryMeta.from_json(original.to_json(), "m") == original


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "not a pyvmm sandbox cache entry"),
        ('{"format": 99}', "not a pyvmm sandbox cache entry"),
        ('{"format": 1, "key": 5}', "field 'key'"),
        (
            '{"format": 1, "key": "k", "runner": "x", "disks": [], "shared": {}, "macs": [],'
            ' "taps": [], "boot_seconds": 1, "snapshot_seconds": 1}',
            "field 'disks'",
        ),
    ],
)
def test_a_bad_meta_file_is_one_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(SnapshotError, match=message) as info:
        c.EntryMeta.from_json(text, "/cache/meta.json")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"disks": {"d": "../../etc/passwd"}},
        {"disks": {"..": "x.img"}},
        {"taps": ("a/b",)},
        {"shared": {"d": "relative.img"}},
    ],
)
def test_meta_naming_paths_outside_the_entry_is_refused(changes: dict) -> None:
    text = meta(**changes).to_json()
    with pytest.raises(SnapshotError):
        c.EntryMeta.from_json(text, "m")


def test_a_huge_or_special_meta_file_is_refused_before_reading(tmp_path: Path) -> None:
    entry = tmp_path / "k1"
    entry.mkdir()
    (entry / c.META_FILE).write_bytes(b" " * (c.MAX_META_BYTES + 1))
    with pytest.raises(SnapshotError, match="not a small regular file"):
        c.read_entry(entry)
    (entry / c.META_FILE).unlink()
    os.mkfifo(entry / c.META_FILE)  # reading a FIFO would hang
    with pytest.raises(SnapshotError):
        c.read_entry(entry)


def test_key_changes_with_every_input_and_only_then() -> None:
    base = {"kernel": {"path": "/k", "size": 1}, "cmdline": "x", "mem_size": 1}
    assert c.template_key(base) == c.template_key(dict(base))
    for name, value in [("cmdline", "y"), ("mem_size", 2), ("kernel", {"path": "/k", "size": 2})]:
        assert c.template_key({**base, name: value}) != c.template_key(base)


def test_file_identity_follows_an_edit_in_place(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"a" * 10)
    before = c.file_identity(image)
    os.utime(image, ns=(1, 1))
    assert c.file_identity(image) != before
    with pytest.raises(HostError, match="cannot read"):
        c.file_identity(tmp_path / "missing")


def test_get_or_create_builds_once_and_then_finds(tmp_path: Path) -> None:
    cache = c.SnapshotCache(tmp_path / "cache")
    calls = []

    def build(staging: Path) -> c.EntryMeta:
        calls.append(staging)
        return fill(staging)

    entry, built = cache.get_or_create("k1", build)
    assert built and len(calls) == 1
    assert entry.state_file.read_bytes() == b"state"
    assert entry.disk("drive0").read_bytes() == b"disk"
    again, built = cache.get_or_create("k1", build)
    assert not built and again.path == entry.path and len(calls) == 1


def test_two_threads_wanting_one_entry_boot_once(tmp_path: Path) -> None:
    cache = c.SnapshotCache(tmp_path / "cache")
    calls = []

    def build(staging: Path) -> c.EntryMeta:
        calls.append(1)
        time.sleep(0.3)  # a boot: the other one waits on the lock
        return fill(staging)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_create("k1", build)))
               for _ in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False, True]


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = c.SnapshotCache(tmp_path / "cache")

    def build(staging: Path) -> c.EntryMeta:
        fill(staging)
        raise RuntimeError("the guest did not boot")

    with pytest.raises(RuntimeError):
        cache.get_or_create("k1", build)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.lock"]


def test_a_damaged_entry_is_discarded_and_built_again(tmp_path: Path) -> None:
    cache = c.SnapshotCache(tmp_path / "cache")
    cache.get_or_create("k1", fill)
    (tmp_path / "cache" / "k1" / c.META_FILE).write_text("{broken")
    entry, built = cache.get_or_create("k1", fill)
    assert built and entry.meta.key == "k1"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_an_entry_of_another_key_is_not_taken(tmp_path: Path) -> None:
    cache = c.SnapshotCache(tmp_path / "cache")
    cache.get_or_create("k1", fill)
    os.rename(tmp_path / "cache" / "k1", tmp_path / "cache" / "k2")
    with pytest.raises(SnapshotError, match="holds key 'k1', not k2"):
        cache.lookup("k2")


def test_extents_are_checked(tmp_path: Path) -> None:
    entry = c.CacheEntry(tmp_path, meta())
    assert entry.mem_extents() is None
    (tmp_path / c.EXTENTS_FILE).write_text(json.dumps([[0, 4096], [65536, 131072]]))
    assert entry.mem_extents() == [(0, 4096), (65536, 131072)]
    for bad in ("[[5, 1]]", "[[65536, 131072], [0, 4096]]", '"x"', "[[1]]"):
        (tmp_path / c.EXTENTS_FILE).write_text(bad)
        with pytest.raises(SnapshotError):
            entry.mem_extents()


def test_filesystem_type_finds_the_innermost_mount() -> None:
    assert c.filesystem_type(Path("/proc/self/status")) == "proc"
    assert c.filesystem_type(Path("/")) != ""


def test_local_entry_keeps_entries_on_local_filesystems(tmp_path: Path) -> None:
    entry = c.CacheEntry(tmp_path, meta())
    assert c.local_entry(entry) is entry
