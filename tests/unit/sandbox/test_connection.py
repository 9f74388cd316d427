"""The host's state machine for one agent connection: every frame checked against the state."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox import messages as m
from pyvmm.sandbox import protocol as p
from pyvmm.sandbox.connection import AgentConnection, Closed, State
from pyvmm.sandbox.errors import AgentDisconnected, AgentProtocolError, LocalProtocolError

HELLO = m.Hello(1, 1, p.Cap.EXEC | p.Cap.PUT | p.Cap.GET, 4 << 20, "fake")


def sent(conn: AgentConnection) -> list:
    decoder = p.FrameDecoder(p.HOST_LIMITS)
    decoder.feed(conn.data_to_send())
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(m.decode_host_message(*frame))
    return out


def receive(conn: AgentConnection, *messages) -> list:
    for message in messages:
        conn.receive_data(m.encode_message(message))
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


@pytest.fixture
def conn() -> AgentConnection:
    c = AgentConnection()
    assert receive(c, HELLO) == [HELLO]
    assert sent(c) == [m.HostHello(1)]
    assert c.state is State.IDLE
    return c


def test_version_is_the_highest_both_speak() -> None:
    c = AgentConnection(versions=range(1, 4))
    receive(c, m.Hello(2, 9, p.Cap(0), 10, "new"))
    assert c.version == 3
    assert sent(c) == [m.HostHello(3)]


def test_no_common_version() -> None:
    c = AgentConnection()
    with pytest.raises(AgentProtocolError) as exc:
        receive(c, m.Hello(7, 9, p.Cap(0), 10, "future"))
    assert str(exc.value) == "the agent speaks protocol versions 7..9; this pyvmm speaks 1..1"
    assert c.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        c.next_event()


def test_anything_but_hello_first_is_refused() -> None:
    c = AgentConnection()
    with pytest.raises(
        AgentProtocolError, match="sent STARTED while waiting for the agent's HELLO"
    ):
        receive(c, m.Started(1))


def test_a_whole_exec(conn: AgentConnection) -> None:
    conn.send_exec(m.Exec((b"cat",), stdin_piped=True))
    conn.send_stdin(b"x" * (p.MAX_CHUNK + 1))  # pipelined behind EXEC, split in frames
    conn.send_stdin(b"")
    assert [type(m).__name__ for m in sent(conn)] == ["Exec", "Stdin", "Stdin", "Stdin"]
    events = receive(conn, m.Started(9), m.Output(1, b"a"), m.Output(2, b"b"))
    assert events == [m.Started(9), m.Output(1, b"a"), m.Output(2, b"b")]
    conn.send_signal(15)
    assert sent(conn) == [m.Signal(15)]
    assert receive(conn, m.Exit(0, None, False, 1)) == [m.Exit(0, None, False, 1)]
    assert conn.state is State.IDLE


def test_exec_that_cannot_start(conn: AgentConnection) -> None:
    conn.send_exec(m.Exec((b"nope",)))
    failure = m.Failure(p.ErrorKind.NOT_FOUND, 2, "nope: No such file")
    assert receive(conn, failure) == [failure]
    assert conn.state is State.IDLE


@pytest.mark.parametrize(
    ("setup", "message", "reason"),
    [
        (None, m.Output(1, b"x"), "sent STDOUT while idle"),
        (None, m.Exit(0, None, False, 0), "sent EXIT while idle"),
        ("exec", m.Exit(0, None, False, 0), "sent EXIT while starting a command"),
        ("exec", m.Output(2, b"x"), "sent STDERR while starting a command"),
        ("running", m.Data(b"x"), "sent DATA while running a command"),
        ("running", m.Started(2), "sent STARTED while running a command"),
        ("put", m.Done(0, 0, 0), "sent DONE while sending a PUT stream"),
        ("get", m.Output(1, b"x"), "sent STDOUT while receiving a GET stream"),
        ("ping", m.Pong(b"other"), "does not echo the PING"),
        (None, HELLO, "sent HELLO while idle"),
    ],
)
def test_frames_out_of_place(conn: AgentConnection, setup, message, reason: str) -> None:
    if setup in ("exec", "running"):
        conn.send_exec(m.Exec((b"x",)))
    if setup == "running":
        receive(conn, m.Started(1))
    if setup == "put":
        conn.send_put(m.Put(b"/x"))
    if setup == "get":
        conn.send_get(m.Get(b"/x"))
    if setup == "ping":
        conn.send_ping(b"mine")
    with pytest.raises(AgentProtocolError, match=reason) as exc:
        receive(conn, message)
    assert "\n" not in str(exc.value)
    assert conn.state is State.CLOSED


def test_a_put_refused_early_still_ends_its_stream(conn: AgentConnection) -> None:
    conn.send_put(m.Put(b"/x"))
    conn.send_put_data(b"y" * 70000)
    refusal = m.Failure(p.ErrorKind.FAILED, 28, "no space")
    assert receive(conn, refusal) == [refusal]
    assert conn.state is State.PUT_REFUSED
    with pytest.raises(LocalProtocolError):
        conn.send_put_data(b"more")
    conn.send_put_end()
    assert conn.state is State.IDLE
    assert [type(m).__name__ for m in sent(conn)] == ["Put", "Data", "Data", "Data"]


def test_put_and_get(conn: AgentConnection) -> None:
    conn.send_put(m.Put(b"/x"))
    conn.send_put_data(b"t")
    conn.send_put_end()
    assert receive(conn, m.Done(1, 1, 0)) == [m.Done(1, 1, 0)]
    conn.send_get(m.Get(b"/x"))
    assert receive(conn, m.Data(b"1"), m.Data(b"2"), m.Done(1, 1, 0))[-1] == m.Done(1, 1, 0)
    assert conn.state is State.IDLE


def test_host_misuse_is_local(conn: AgentConnection) -> None:
    conn.send_exec(m.Exec((b"x",)))
    with pytest.raises(LocalProtocolError, match="cannot send GET while starting a command"):
        conn.send_get(m.Get(b"/"))
    with pytest.raises(LocalProtocolError, match="cannot end a PUT stream"):
        conn.send_put_end()
    with pytest.raises(LocalProtocolError, match=r"1\.\.127"):
        conn.send_signal(0)


def test_request_over_the_agents_limit(conn: AgentConnection) -> None:
    small = AgentConnection()
    receive(small, m.Hello(1, 1, p.Cap.EXEC, 100, "tiny"))
    with pytest.raises(ConfigError, match="accepts at most 100"):
        small.send_exec(m.Exec((b"x" * 200,)))
    assert small.state is State.IDLE


def test_end_of_stream(conn: AgentConnection) -> None:
    conn.receive_data(b"")
    assert conn.next_event() == Closed()
    busy = AgentConnection()
    receive(busy, HELLO)
    busy.send_get(m.Get(b"/x"))
    busy.receive_data(b"")
    with pytest.raises(
        AgentDisconnected, match="closed the connection while receiving a GET stream"
    ):
        busy.next_event()


def test_end_in_the_middle_of_a_frame(conn: AgentConnection) -> None:
    conn.send_exec(m.Exec((b"x",)))
    conn.receive_data(m.encode_message(m.Started(3))[:5])
    assert conn.next_event() is None
    conn.receive_data(b"")
    with pytest.raises(AgentDisconnected, match=r"in the middle of a frame \(5 bytes"):
        conn.next_event()
