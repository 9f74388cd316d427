"""Snapshot files: regular files only, written all or nothing, no temporaries left to pile up."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.snapshot.files import (
    TEMP_SUFFIX,
    SnapshotError,
    atomic_files,
    open_regular,
    remove_stale_temps,
)

ROOT = Path(__file__).resolve().parents[3]

# Starts writing two snapshot files in argv[1], then dies or waits, as argv[2] says.
WRITER = r"""
import os, signal, sys
from pathlib import Path
from pyvmm.snapshot.files import atomic_files
directory, how = Path(sys.argv[1]), sys.argv[2]
with atomic_files(directory / "vm.mem", directory / "vm.state") as fds:
    for fd in fds:
        os.write(fd, b"new")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.readline()
"""


def temps(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX))


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
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o600, "guest memory is private"


def test_a_directory_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    with (
        pytest.raises(SnapshotError) as caught,
        atomic_files(tmp_path / "a", tmp_path / "no" / "b"),
    ):
        pass
    assert str(caught.value) == (
        f"cannot write snapshot file {tmp_path / 'no' / 'b'}: No such file or directory"
    )
    assert os.listdir(tmp_path) == []


def test_two_files_at_one_path_are_refused(tmp_path: Path) -> None:
    """The memory file would be replaced by the state file written after it."""
    os.symlink(".", tmp_path / "here")
    for second in (tmp_path / "vm", tmp_path / "here" / "vm", tmp_path / "sub" / ".." / "vm"):
        with pytest.raises(SnapshotError) as caught, atomic_files(tmp_path / "vm", second):
            pass
        assert str(caught.value) == (
            f"snapshot files {tmp_path / 'vm'} and {second} are one file: give each its own path"
        )
    assert os.listdir(tmp_path) == ["here"]
    os.symlink("vm", tmp_path / "link")  # renaming onto a link replaces the link, not "vm"
    with atomic_files(tmp_path / "vm", tmp_path / "link") as (first, second):
        os.write(first, b"1")
        os.write(second, b"2")
    assert (tmp_path / "vm").read_bytes() == b"1" and (tmp_path / "link").read_bytes() == b"2"


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path: Path) -> None:
    (tmp_path / "vm.mem").write_bytes(b"old")
    for _ in range(3):  # killed three times: the left-overs must not pile up
        child = subprocess.run(
            [sys.executable, "-c", WRITER, str(tmp_path), "kill"], cwd=ROOT, timeout=60
        )
        assert child.returncode == -9
        assert len(temps(tmp_path)) == 2, "two temporaries of the killed writer"
        with atomic_files(tmp_path / "other") as (fd,):
            assert temps(tmp_path) == [f for f in temps(tmp_path) if f.startswith(".other.")]
            os.write(fd, b"x")
        assert temps(tmp_path) == []
    assert (tmp_path / "vm.mem").read_bytes() == b"old", "the old file was never touched"
    assert sorted(os.listdir(tmp_path)) == ["other", "vm.mem"]


def test_a_live_writers_temporaries_are_left_alone(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "wait"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
        writing = temps(tmp_path)
        assert len(writing) == 2
        with atomic_files(tmp_path / "other") as (fd,):
            os.write(fd, b"x")
        assert remove_stale_temps(tmp_path) == []
        assert temps(tmp_path) == writing
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(60) == 0
    assert (tmp_path / "vm.mem").read_bytes() == b"new"
    assert (tmp_path / "vm.state").read_bytes() == b"new"
    assert temps(tmp_path) == []


def test_only_pyvmm_temporaries_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".vm.mem.abcd1234.tmp").write_bytes(b"someone else's")
    (tmp_path / f"vm{TEMP_SUFFIX}").write_bytes(b"no leading dot: not ours")
    (tmp_path / f".dir{TEMP_SUFFIX}").mkdir()
    os.symlink(tmp_path / "target", tmp_path / f".link{TEMP_SUFFIX}")
    (tmp_path / "target").write_bytes(b"t")
    os.mkfifo(tmp_path / f".fifo{TEMP_SUFFIX}")
    (tmp_path / f".dead{TEMP_SUFFIX}").write_bytes(b"nobody holds it")
    before = sorted(os.listdir(tmp_path))
    assert remove_stale_temps(tmp_path) == [f".dead{TEMP_SUFFIX}"]
    assert sorted(os.listdir(tmp_path)) == [n for n in before if n != f".dead{TEMP_SUFFIX}"]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_temporary_removed_before_its_writer_locked_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner can get between a writer's open and its flock: the writer takes a new name."""
    real_flock, removed, cleaned = fcntl.flock, [], []

    def flock(fd: int, operation: int) -> None:
        if not cleaned:  # another process's cleaner, just before our lock
            cleaned.append(True)
            removed.extend(remove_stale_temps(tmp_path))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with atomic_files(tmp_path / "a") as (fd,):
        os.write(fd, b"data")
    assert len(removed) == 1
    assert (tmp_path / "a").read_bytes() == b"data"


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "a FIFO"),
        (os.mkdir, "a directory"),
        (lambda path: os.symlink("/dev/zero", path), "a character device"),
    ],
)
def test_open_regular_refuses_anything_else_without_blocking(tmp_path: Path, make, kind) -> None:
    path = tmp_path / "f"
    make(path)
    with pytest.raises(SnapshotError) as caught:
        open_regular(path, "snapshot file")
    assert str(caught.value) == f"snapshot file {path} is not a regular file (it is {kind})"
