"""The C waiter on its own, over a socketpair: the replies it acts on, the signals it
forwards, and the files a client agrees to run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.forkserver.protocol import MAX_CONTROL_BYTES, FrameReader, frame
from pyvmm.forkserver.waiter import SOURCE, build_waiter, usable_waiter, waiter_path

requires_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this host"
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def waiter(cache: Path) -> str:
    return build_waiter()


class Waiting:
    """The waiter running on one end of a socketpair; the test is the server."""

    def __init__(self, waiter: str) -> None:
        self.server, client = socket.socketpair()
        # As the Python client execs it: the forwarded signals blocked until its handlers
        # are in place (the mask survives fork and exec).
        forwarded = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
        try:
            self.process = subprocess.Popen(
                [waiter, str(client.fileno()), "/run/fs.sock"],
                pass_fds=(client.fileno(),),
                stderr=subprocess.PIPE,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        client.close()

    def end(self) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=30)
        self.server.close()
        return self.process.returncode, err.decode()


@pytest.fixture
def waiting(waiter: str) -> Iterator[Waiting]:
    running = Waiting(waiter)
    yield running
    running.process.kill()
    running.process.wait(30)


@requires_cc
def test_the_source_compiles_without_a_warning(tmp_path: Path) -> None:
    source = tmp_path / "wait.c"
    source.write_text(SOURCE)
    compiler = shutil.which("cc") or shutil.which("gcc")
    result = subprocess.run(
        [str(compiler), "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "w"),
         str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@requires_cc
@pytest.mark.parametrize("status", [0, 1, 2, 143])
def test_it_exits_with_the_vm_process_status(waiting: Waiting, status: int) -> None:
    waiting.server.sendall(frame({"exit": status}))
    assert waiting.end() == (status, "")


@requires_cc
def test_a_pid_reply_is_passed_over_and_frames_split_anywhere_are_read(waiting: Waiting) -> None:
    data = frame({"pid": 1234}) + frame({"exit": 5})
    for byte in data:
        waiting.server.sendall(bytes([byte]))
    assert waiting.end() == (5, "")


@requires_cc
def test_it_ends_by_the_signal_that_ended_the_vm_process(waiting: Waiting) -> None:
    waiting.server.sendall(frame({"killed": int(signal.SIGTERM)}))
    assert waiting.end() == (-signal.SIGTERM, "")


@requires_cc
def test_a_closed_connection_is_the_python_client_s_line(waiting: Waiting) -> None:
    waiting.server.shutdown(socket.SHUT_WR)
    assert waiting.end() == (
        1, "pyvmm: error: fork server /run/fs.sock: the connection closed before the VM ended\n"
    )  # fmt: skip


@requires_cc
def test_an_error_reply_is_one_line_and_status_2(waiting: Waiting) -> None:
    waiting.server.sendall(frame({"error": "the fork server is stopping"}))
    assert waiting.end() == (
        2,
        "pyvmm: error: fork server /run/fs.sock: the fork server is stopping\n",
    )


@requires_cc
@pytest.mark.parametrize("body", [b"x" * 300, b'{"bye":1}'])
def test_a_frame_it_does_not_know_ends_it_with_one_line(waiting: Waiting, body: bytes) -> None:
    waiting.server.sendall(len(body).to_bytes(4, "big") + body)
    code, err = waiting.end()
    assert code == 1 and err.count("\n") == 1 and err.startswith("pyvmm: error: fork server")


@requires_cc
def test_signals_are_forwarded_as_frames(waiting: Waiting) -> None:
    reader = FrameReader(MAX_CONTROL_BYTES)
    waiting.server.settimeout(10)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        waiting.process.send_signal(signum)  # at once: pending until its handlers are in
        while (message := reader.next_frame()) is None:
            data = waiting.server.recv(64)
            assert data, waiting.end()
            reader.feed(data)
        assert message == {"signal": int(signum)}
    waiting.server.sendall(frame({"exit": 0}))
    assert waiting.end() == (0, "")


def test_only_a_file_of_ours_that_nobody_else_may_write_is_run(cache: Path) -> None:
    path = Path(waiter_path())
    assert path.parent == cache / "pyvmm"
    assert usable_waiter() is None  # not built
    path.parent.mkdir()
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(0o755)
    assert usable_waiter() == str(path)
    path.chmod(0o775)  # group-writable
    assert usable_waiter() is None
    path.chmod(0o755)
    if os.geteuid() == 0:  # someone else's file (only root can make one here)
        os.chown(path, 65534, -1)
        assert usable_waiter() is None
    path.unlink()
    path.mkdir()  # not a regular file
    assert usable_waiter() is None
