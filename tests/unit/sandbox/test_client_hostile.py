"""AgentClient against a hostile agent: every misbehaviour ends in one clear line.

The fake agent (a thread on a socketpair) breaks the protocol on purpose:
huge frames, endless output, wrong versions, truncated frames, frames out of
place, silence, and tar streams that try to write outside their destination.
The client must refuse each with a one-line error, keep its memory bounded,
write nothing outside the destination, and close the connection whenever it
stops in the middle of an operation (which makes a real agent kill the
command).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox import AgentClient
from pyvmm.sandbox import messages as m
from pyvmm.sandbox import protocol as p
from pyvmm.sandbox import tarformat as t
from pyvmm.sandbox.errors import (
    AgentDisconnected,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    GuestFileNotFoundError,
    GuestOperationError,
    LocalProtocolError,
    OutputLimitError,
    UnsafeArchiveError,
)
from pyvmm.sandbox.vsock_connect import connect_vsock
from tests.unit.sandbox.fake_agent import HELLO, FakeAgent
from tests.unit.sandbox.hostile_tars import HOSTILE, d, f, tar

CHUNK = b"y\n" * (p.MAX_CHUNK // 2)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def start(script, **kwargs) -> tuple[FakeAgent, AgentClient]:
    fake = FakeAgent(script)
    client = AgentClient(fake.host_sock, **{"timeout": 5, **kwargs})
    return fake, client


def exec_then(action):
    """A script: handshake, take an EXEC, then ``action(fake)``."""

    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Exec)
        action(fake)

    return script


# --- framing and versions -------------------------------------------------------------


def test_oversized_frame_is_refused_at_its_header() -> None:
    def huge(fake: FakeAgent) -> None:
        fake.send(m.Started(1))
        fake.send_raw(p.HEADER.pack(0xFFFF_FFFF, p.AgentType.STDOUT, b"\0\0\0"))
        fake.wait_for_close()

    fake, client = start(exec_then(huge))
    started = time.monotonic()
    with pytest.raises(AgentProtocolError) as exc:
        client.exec(["cat"])
    assert time.monotonic() - started < 2  # refused from the header, not after 4 GiB
    assert "STDOUT frame of 4294967295 bytes (allowed: 1..65536)" in one_line(exc)
    assert client.closed
    fake.join()
    assert fake.host_closed.is_set()


def test_endless_output_is_capped_and_the_command_abandoned() -> None:
    def endless(fake: FakeAgent) -> None:
        fake.send(m.Started(1))
        while True:
            fake.send(m.Output(1, CHUNK))

    fake, client = start(exec_then(endless))
    tracemalloc.start()
    try:
        with pytest.raises(OutputLimitError) as exc:
            client.exec(["yes"], max_output=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "stdout went over 1048576 bytes (max_output); it was killed" in one_line(exc)
    assert peak < 8 << 20, peak
    fake.join()
    assert fake.host_closed.is_set() and client.closed


def test_endless_streamed_output_ends_at_the_timeout() -> None:
    def endless(fake: FakeAgent) -> None:
        fake.send(m.Started(1))
        while True:
            fake.send(m.Output(2, CHUNK))
            time.sleep(0.001)

    fake, client = start(exec_then(endless), timeout_grace=0.3)
    seen = []
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as exc:
        client.exec(["yes"], timeout=0.2, on_stderr=lambda data: seen.append(len(data)))
    assert 0.4 < time.monotonic() - started < 3
    assert "the command to end" in one_line(exc)
    assert seen
    fake.join()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (m.Hello(7, 9, p.Cap.EXEC, 100, "future"), "the agent speaks protocol versions 7..9"),
        (m.Hello(0, 0, p.Cap.EXEC, 100, "past"), "the agent speaks protocol versions 0..0"),
    ],
)
def test_no_common_version(hello: m.Hello, reason: str) -> None:
    fake = FakeAgent(lambda fake: (fake.send(hello), fake.wait_for_close()))
    with pytest.raises(AgentProtocolError) as exc:
        AgentClient(fake.host_sock, timeout=5)
    assert one_line(exc).startswith(reason)
    fake.join()
    assert fake.host_closed.is_set()


def test_silence_instead_of_hello() -> None:
    fake = FakeAgent(lambda fake: fake.wait_for_close())
    started = time.monotonic()
    with pytest.raises(AgentUnavailable) as exc:
        AgentClient(fake.host_sock, timeout=0.3)
    assert time.monotonic() - started < 2
    assert "no agent answered" in one_line(exc)
    fake.join()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", "reserved bytes set"),
        (p.HEADER.pack(4, 0x77, b"\0\0\0") + bytes(4), "unknown frame type 0x77"),
        (
            p.encode_frame(p.AgentType.EXIT, bytes(16)),
            "sent EXIT while waiting for the agent's HELLO",
        ),
    ],
)
def test_garbage_instead_of_hello(garbage: bytes, reason: str) -> None:
    fake = FakeAgent(lambda fake: (fake.send_raw(garbage), fake.wait_for_close()))
    with pytest.raises(AgentProtocolError) as exc:
        AgentClient(fake.host_sock, timeout=5)
    assert reason in one_line(exc)
    fake.join()


def test_truncated_frame_then_close() -> None:
    fake, client = start(exec_then(lambda fake: fake.send_raw(m.encode_message(m.Started(9))[:5])))
    with pytest.raises(AgentDisconnected) as exc:
        client.exec(["true"])
    assert "in the middle of a frame (5 bytes of it received" in one_line(exc)
    fake.join()


def test_close_while_a_command_runs() -> None:
    fake, client = start(exec_then(lambda fake: fake.send(m.Started(9), m.Output(1, b"partial"))))
    with pytest.raises(AgentDisconnected) as exc:
        client.exec(["true"])
    assert "closed the connection while running a command" in one_line(exc)
    with pytest.raises(AgentDisconnected, match="connection is closed"):
        client.ping()
    fake.join()


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([m.Exit(0, None, False, 1)], "sent EXIT while starting a command"),
        ([m.Started(1), m.Data(b"tar")], "sent DATA while running a command"),
        ([m.Started(1), m.Started(2)], "sent STARTED while running a command"),
        ([m.Pong(b"")], "sent PONG while starting a command"),
    ],
)
def test_frames_out_of_place(messages, reason: str) -> None:
    fake, client = start(exec_then(lambda fake: (fake.send(*messages), fake.wait_for_close())))
    with pytest.raises(AgentProtocolError) as exc:
        client.exec(["true"])
    assert reason in one_line(exc)
    assert client.closed
    fake.join()


# --- exec outcomes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code", "signal"),
    [
        ([m.Started(5), m.Exit(7, None, False, 10)], 7, None),
        ([m.Started(5), m.Exit(None, 15, False, 10)], 143, 15),
        ([m.Started(5), m.Exit(None, 9, True, 10)], 124, 9),
        ([m.Failure(p.ErrorKind.NOT_FOUND, 2, "x: No such file or directory")], 127, None),
        ([m.Failure(p.ErrorKind.CANNOT_RUN, 13, "x: Permission denied")], 126, None),
    ],
)
def test_exit_codes_as_a_shell_gives_them(answer, code: int, signal) -> None:
    def answer_ping(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Exec)
        fake.send(*answer)
        ping = fake.expect(m.Ping)
        fake.send(m.Pong(ping.payload))

    fake, client = start(answer_ping)
    result = client.exec(["x"])
    assert (result.exit_code, result.signal) == (code, signal)
    assert result.timed_out == (code == 124)
    assert (result.error is not None) == (code in (126, 127))
    client.ping()
    fake.join()


def test_agent_failure_to_start_is_an_error() -> None:
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Exec)
        fake.send(m.Failure(p.ErrorKind.FAILED, 11, "fork: Resource temporarily unavailable"))
        fake.wait_for_close()

    fake, client = start(script)
    with pytest.raises(GuestOperationError) as exc:
        client.exec(["x"])
    assert one_line(exc) == "exec x failed in the guest: fork: Resource temporarily unavailable"
    assert exc.value.kind == "failed" and exc.value.errno == 11
    client.close()
    fake.join()


def test_a_callback_that_raises_abandons_the_command() -> None:
    fake, client = start(
        exec_then(lambda fake: (fake.send(m.Started(1), m.Output(1, b"x")), fake.wait_for_close()))
    )

    def explode(data: bytes) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        client.exec(["x"], on_stdout=explode)
    assert client.closed
    fake.join()
    assert fake.host_closed.is_set()


def test_ping_that_is_never_answered() -> None:
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Ping)
        fake.wait_for_close()

    fake, client = start(script, timeout=0.3)
    with pytest.raises(AgentTimeout) as exc:
        client.ping()
    assert "PONG" in one_line(exc)
    assert client.closed
    fake.join()


def test_one_operation_at_a_time() -> None:
    release = threading.Event()

    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Exec)
        fake.send(m.Started(1))
        release.wait(10)
        fake.send(m.Exit(0, None, False, 1))
        fake.wait_for_close()

    fake, client = start(script)
    runner = threading.Thread(target=client.exec, args=(["sleep"],))
    runner.start()
    time.sleep(0.2)
    with pytest.raises(LocalProtocolError, match="another operation runs on this connection"):
        client.ping()
    release.set()
    runner.join(10)
    client.close()
    fake.join()


# --- put ----------------------------------------------------------------------------------


def test_put_refused_in_the_middle_keeps_the_connection(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(os.urandom(2 << 20))

    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Put)
        fake.expect(m.Data)
        fake.send(m.Failure(p.ErrorKind.FAILED, 28, "write /x/big: No space left on device"))
        while fake.expect(m.Data).data:  # dropped up to the end of the stream
            pass
        ping = fake.expect(m.Ping)
        fake.send(m.Pong(ping.payload))
        fake.wait_for_close()

    fake, client = start(script)
    with pytest.raises(GuestOperationError) as exc:
        client.put(tmp_path / "big", "/x/big")
    assert one_line(exc).endswith("failed in the guest: write /x/big: No space left on device")
    client.ping()
    client.close()
    fake.join()


def test_put_abandoned_by_the_host_ends_without_the_end_marker(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / str(i)).write_bytes(b"x")
    received = bytearray()

    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Put)
        while data := fake.expect(m.Data).data:
            received.extend(data)
        fake.send(
            m.Failure(
                p.ErrorKind.FAILED, 22, "the tar stream ended before its end-of-archive blocks"
            )
        )
        fake.wait_for_close()

    fake, client = start(script)
    with pytest.raises(ConfigError, match=r"more than 5 entries \(max_files\)"):
        client.put(src, "/dst", max_files=5)
    assert not client.closed  # the host's own refusal leaves the connection usable
    client.close()
    fake.join()
    assert not received.endswith(t.END_OF_ARCHIVE)


def test_put_stored_counts_must_match(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")

    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Put)
        while fake.expect(m.Data).data:
            pass
        fake.send(m.Done(999, 1, 0))
        fake.wait_for_close()

    fake, client = start(script)
    with pytest.raises(
        AgentProtocolError, match="stored 1 entries and 999 bytes; pyvmm sent 1 and 5"
    ):
        client.put(tmp_path / "f", "/f")
    client.close()
    fake.join()


def test_put_of_nothing_is_refused_before_any_request(tmp_path: Path) -> None:
    fake, client = start(lambda fake: (fake.handshake(), fake.wait_for_close()))
    with pytest.raises(ConfigError, match="does not exist"):
        client.put(tmp_path / "missing", "/x")
    with pytest.raises(ConfigError, match="not an absolute path"):
        client.put(tmp_path, "relative")
    client.close()
    fake.join()


# --- get -----------------------------------------------------------------------------------


def serve_get(stream: bytes, done: m.Done | None = None):
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Get)
        for start_at in range(0, len(stream), p.MAX_CHUNK):
            fake.send(m.Data(stream[start_at : start_at + p.MAX_CHUNK]))
        fake.send(done or m.Done(0, 0, 0))
        fake.wait_for_close()

    return script


@pytest.fixture
def box(tmp_path: Path) -> Path:
    root = tmp_path / "box"
    root.mkdir()
    (root / "outside.txt").write_bytes(b"keep")
    return root


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_get_refuses_hostile_streams(box: Path, case: str) -> None:
    archive, reason = HOSTILE[case]
    fake, client = start(serve_get(archive))
    with pytest.raises(UnsafeArchiveError) as exc:
        client.get("/guest/path", box / "dest")
    assert reason in one_line(exc)
    assert sorted(os.listdir(box)) == ["outside.txt"]
    assert (box / "outside.txt").read_bytes() == b"keep"
    assert not os.path.lexists("/tmp/pyvmm-tarsafe-evil")
    fake.join()


def test_get_with_counts_that_do_not_match(box: Path) -> None:
    archive = tar(d("top"), f("top/a", b"abc"))
    fake, client = start(serve_get(archive, m.Done(3, 5, 0)))
    with pytest.raises(AgentProtocolError, match="reported 5 entries and 3 bytes but sent 2 and 3"):
        client.get("/g", box / "dest")
    assert sorted(os.listdir(box)) == ["outside.txt"]
    client.close()
    fake.join()


def test_get_of_endless_members_stops_at_max_files(box: Path) -> None:
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Get)
        fake.send(m.Data(t.encode_member(b"top", t.DIRECTORY, 0o755, 0, 0)))
        i = 0
        while True:
            fake.send(m.Data(t.encode_member(b"top/%d" % i, t.DIRECTORY, 0o755, 0, 0)))
            i += 1

    fake, client = start(script)
    with pytest.raises(UnsafeArchiveError, match=r"more than 100 entries \(max_files\)"):
        client.get("/g", box / "dest", max_files=100)
    assert sorted(os.listdir(box)) == ["outside.txt"]
    fake.join()


def test_get_from_a_trickling_agent_ends_at_its_timeout(box: Path) -> None:
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Get)
        fake.send(m.Data(t.encode_member(b"top", t.DIRECTORY, 0o755, 0, 0)))
        while True:  # one byte at a time: always some progress, never an end
            fake.send(m.Data(b"\0"))
            time.sleep(0.05)

    fake, client = start(script)
    started = time.monotonic()
    with pytest.raises(AgentTimeout) as exc:
        client.get("/g", box / "dest", timeout=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert "GET data" in one_line(exc)
    assert sorted(os.listdir(box)) == ["outside.txt"]
    fake.join()


def test_get_of_a_missing_path_keeps_the_connection(box: Path) -> None:
    def script(fake: FakeAgent) -> None:
        fake.handshake()
        fake.expect(m.Get)
        fake.send(m.Failure(p.ErrorKind.NOT_FOUND, 2, "stat /nope: No such file or directory"))
        fake.send(m.Pong(fake.expect(m.Ping).payload))
        fake.wait_for_close()

    fake, client = start(script)
    with pytest.raises(GuestFileNotFoundError) as exc:
        client.get("/nope", box / "dest")
    assert one_line(exc) == "get /nope failed in the guest: stat /nope: No such file or directory"
    assert sorted(os.listdir(box)) == ["outside.txt"]
    client.ping()
    client.close()
    fake.join()


def test_get_into_an_existing_directory_is_refused_first(box: Path) -> None:
    fake, client = start(lambda fake: (fake.handshake(), fake.wait_for_close()))
    with pytest.raises(ConfigError, match="it is an existing directory"):
        client.get("/g", box)
    client.close()
    fake.join()


# --- the vsock handshake -----------------------------------------------------------


class FakeVmm:
    """A VM's vsock Unix socket: answers CONNECT as told, then plays the agent."""

    def __init__(self, path: Path, behaviours: list[str]) -> None:
        self.path = path
        self.behaviours = behaviours
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.lines: list[bytes] = []
        self.agents: list[FakeAgent] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for behaviour in self.behaviours:
            conn, _ = self.server.accept()
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            self.lines.append(line)
            if behaviour == "refuse":
                conn.close()
            elif behaviour == "garbage":
                conn.sendall(b"NOPE\n")
                conn.close()
            else:  # OK and HELLO in one write: the client must keep what follows the line
                conn.sendall(b"OK 1073741824\n" + m.encode_message(HELLO))
                self.agents.append(FakeAgent(_after_hello, conn))

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()
        for agent in self.agents:
            agent.join()


def _after_hello(fake: FakeAgent) -> None:
    fake.expect(m.HostHello)
    fake.send(m.Pong(fake.expect(m.Ping).payload))
    fake.wait_for_close()


def test_connect_through_the_vsock_socket(tmp_path: Path) -> None:
    vmm = FakeVmm(tmp_path / "v.sock", ["ok"])
    with AgentClient.connect(tmp_path / "v.sock", timeout=5) as client:
        assert client.hello == HELLO
        client.ping()
    vmm.close()
    assert vmm.lines == [b"CONNECT 28793\n"]


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("refuse", "the guest refused vsock port 28793"),
        ("garbage", "answered CONNECT with b'NOPE'"),
    ],
)
def test_connect_refused(tmp_path: Path, behaviour: str, reason: str) -> None:
    vmm = FakeVmm(tmp_path / "v.sock", [behaviour])
    with pytest.raises(AgentUnavailable) as exc:
        connect_vsock(tmp_path / "v.sock", p.AGENT_PORT, 5)
    assert reason in one_line(exc)
    vmm.close()


def test_connect_without_a_vm(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="no VM listens on"):
        AgentClient.connect(tmp_path / "missing.sock", timeout=1)


def test_wait_ready_retries_while_the_guest_boots(tmp_path: Path) -> None:
    vmm = FakeVmm(tmp_path / "v.sock", ["refuse", "refuse", "refuse", "ok"])
    client = AgentClient.wait_ready(tmp_path / "v.sock", timeout=10, interval=0.01)
    client.ping()
    client.close()
    vmm.close()
    assert len(vmm.lines) == 4


def test_wait_ready_stops_when_the_vm_dies(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="the VM stopped before its agent answered"):
        AgentClient.wait_ready(tmp_path / "none.sock", timeout=30, alive=lambda: False)
    assert time.monotonic() - started < 2
