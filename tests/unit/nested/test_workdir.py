"""Work directories record their owner; those of dead owners are removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pyvmm.nested import workdir


def test_a_new_directory_names_this_process(tmp_path: Path) -> None:
    path = workdir.create(tmp_path)
    assert path.name.startswith(workdir.PREFIX)
    record = (path / workdir.OWNER_FILE).read_text()
    assert record.split()[0] == str(os.getpid())
    assert workdir.owner_alive(record)


def test_directories_of_dead_owners_go_and_live_ones_stay(tmp_path: Path) -> None:
    mine = workdir.create(tmp_path)
    dead = tmp_path / f"{workdir.PREFIX}dead"
    dead.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (dead / workdir.OWNER_FILE).write_text(f"{child.stdout.strip()} 12345\n")
    reused = tmp_path / f"{workdir.PREFIX}reused"  # our pid, another start time
    reused.mkdir()
    (reused / workdir.OWNER_FILE).write_text(f"{os.getpid()} 1\n")
    assert sorted(workdir.remove_stale(tmp_path)) == sorted([dead, reused])
    assert mine.exists()


def test_ownerless_directories_go_only_when_old_and_unused(tmp_path: Path) -> None:
    young = tmp_path / f"{workdir.PREFIX}young"
    young.mkdir()
    old = tmp_path / f"{workdir.PREFIX}old"
    old.mkdir()
    in_use = tmp_path / f"{workdir.PREFIX}inuse"
    in_use.mkdir()
    past = time.time() - 2 * workdir.ORPHAN_AGE_S
    for path in (old, in_use):
        os.utime(path, (past, past))
    # A process whose command line names it (as QEMU's names its work directory).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(in_use)])
    cmdline = Path(f"/proc/{holder.pid}/cmdline")
    deadline = time.monotonic() + 10
    while str(in_use).encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    try:
        assert workdir.remove_stale(tmp_path) == [old]
    finally:
        holder.kill()
        holder.wait()
    assert young.exists() and in_use.exists()
    other = tmp_path / "unrelated"
    other.mkdir()
    assert workdir.remove_stale(tmp_path) == [in_use]  # its holder is gone now
    assert other.exists()


def test_an_owner_file_that_is_not_a_small_file_is_left_alone(tmp_path: Path) -> None:
    fifo_dir = tmp_path / f"{workdir.PREFIX}fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / workdir.OWNER_FILE)  # reading it would block forever
    big_dir = tmp_path / f"{workdir.PREFIX}big"
    big_dir.mkdir()
    (big_dir / workdir.OWNER_FILE).write_bytes(b"1 2 " * 1000)
    assert workdir.remove_stale(tmp_path) == []
