"""One agent connection, host side, as a state machine (sans-IO, in h11's style).

Bytes from the agent go in with :meth:`AgentConnection.receive_data`; events
come out of :meth:`~AgentConnection.next_event`; requests go in through the
``send_*`` methods, and the bytes to write come out of
:meth:`~AgentConnection.data_to_send`. Every rule about which frame may come
when lives here, in one transition table per direction, so a client cannot
drift from the protocol and a hostile agent cannot steer it anywhere the
table does not allow.

Errors say whose fault they are: a frame the agent should not have sent is an
:class:`~pyvmm.sandbox.errors.AgentProtocolError` (and the connection is
dead); a request the host should not have made now is a
:class:`~pyvmm.sandbox.errors.LocalProtocolError`; the agent going away in
the middle of an operation is :class:`~pyvmm.sandbox.errors.AgentDisconnected`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyvmm.sandbox.errors import AgentDisconnected, AgentProtocolError, LocalProtocolError
from pyvmm.sandbox.messages import (
    AgentMessage,
    Data,
    Done,
    Exec,
    Exit,
    Failure,
    Get,
    Hello,
    HostHello,
    HostMessage,
    Output,
    Ping,
    Pong,
    Put,
    Signal,
    Started,
    Stdin,
    decode_agent_message,
    encode_message,
)
from pyvmm.sandbox.protocol import (
    AGENT_LIMITS,
    HEADER_SIZE,
    MAX_CHUNK,
    MAX_PING,
    SUPPORTED_VERSIONS,
    AgentType,
    FrameDecoder,
)


class State(enum.Enum):
    HANDSHAKE = "waiting for the agent's HELLO"
    IDLE = "idle"
    PINGING = "waiting for PONG"
    EXEC_STARTING = "starting a command"
    EXEC_RUNNING = "running a command"
    PUT_SENDING = "sending a PUT stream"
    PUT_REFUSED = "sending a PUT stream the agent refused"
    PUT_FINISHING = "waiting for the result of a PUT"
    GET_RECEIVING = "receiving a GET stream"
    CLOSED = "closed"


@dataclass(frozen=True)
class Closed:
    """The agent closed the connection while nothing was in progress."""


Event = AgentMessage | Closed

#: Which agent message moves the connection from which state to which.
_AGENT_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.HANDSHAKE, Hello): State.IDLE,
    (State.PINGING, Pong): State.IDLE,
    (State.EXEC_STARTING, Started): State.EXEC_RUNNING,
    (State.EXEC_STARTING, Failure): State.IDLE,
    (State.EXEC_RUNNING, Output): State.EXEC_RUNNING,
    (State.EXEC_RUNNING, Exit): State.IDLE,
    (State.EXEC_RUNNING, Failure): State.CLOSED,  # only for a host protocol error
    (State.PUT_SENDING, Failure): State.PUT_REFUSED,
    (State.PUT_FINISHING, Done): State.IDLE,
    (State.PUT_FINISHING, Failure): State.IDLE,
    (State.GET_RECEIVING, Data): State.GET_RECEIVING,
    (State.GET_RECEIVING, Done): State.IDLE,
    (State.GET_RECEIVING, Failure): State.IDLE,
}

#: Which host message may be sent in which state, and the state it leads to.
_HOST_TRANSITIONS: dict[tuple[State, type], State] = {
    (State.IDLE, Ping): State.PINGING,
    (State.IDLE, Exec): State.EXEC_STARTING,
    (State.IDLE, Put): State.PUT_SENDING,
    (State.IDLE, Get): State.GET_RECEIVING,
    # stdin may be pipelined behind EXEC; the agent drops what comes after the end
    (State.EXEC_STARTING, Stdin): State.EXEC_STARTING,
    (State.EXEC_RUNNING, Stdin): State.EXEC_RUNNING,
    (State.IDLE, Stdin): State.IDLE,
    (State.EXEC_RUNNING, Signal): State.EXEC_RUNNING,
    (State.PUT_SENDING, Data): State.PUT_SENDING,
}


class AgentConnection:
    """The host's end of one connection to a guest agent."""

    def __init__(self, versions: range = SUPPORTED_VERSIONS) -> None:
        self._versions = versions
        self._decoder = FrameDecoder(AGENT_LIMITS)
        self._outgoing = bytearray()
        self._eof = False
        self._ping: bytes | None = None
        self.state = State.HANDSHAKE
        self.hello: Hello | None = None
        self.version: int | None = None

    # --- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the socket; ``b""`` when the agent closed it."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after the end of the stream")
        self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes are received."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("the connection is closed")
        try:
            frame = self._decoder.next_frame()
        except ValueError as exc:
            raise self._broken(f"the agent sent a bad frame: {exc}") from None
        if frame is None:
            return self._at_end() if self._eof else None
        kind, payload = frame
        try:
            message = decode_agent_message(kind, payload)
        except (ValueError, struct.error) as exc:
            raise self._broken(
                f"the agent sent a bad {AgentType(kind).name} frame: {exc}"
            ) from None
        target = _AGENT_TRANSITIONS.get((self.state, type(message)))
        if target is None:
            raise self._broken(f"the agent sent {AgentType(kind).name} while {self.state.value}")
        self._check(message)
        self.state = target
        return message

    def _check(self, message: AgentMessage) -> None:
        """The rules a frame must follow beyond its type and size."""
        if isinstance(message, Hello):
            usable = [v for v in self._versions if message.version_min <= v <= message.version_max]
            if not usable:
                raise self._broken(
                    f"the agent speaks protocol versions {message.version_min}.."
                    f"{message.version_max}; this pyvmm speaks "
                    f"{self._versions.start}..{self._versions.stop - 1}"
                )
            self.hello = message
            self.version = max(usable)
            self._outgoing += encode_message(HostHello(self.version))
        elif isinstance(message, Pong) and message.payload != self._ping:
            raise self._broken("the agent's PONG does not echo the PING")

    def _at_end(self) -> Event:
        buffered = self._decoder.buffered
        state = self.state
        self.state = State.CLOSED
        if buffered:
            raise AgentDisconnected(
                f"the agent closed the connection in the middle of a frame "
                f"({buffered} bytes of it received, {HEADER_SIZE} of them the header)"
            )
        if state is State.IDLE:
            return Closed()
        raise AgentDisconnected(f"the agent closed the connection while {state.value}")

    def _broken(self, message: str) -> AgentProtocolError:
        self.state = State.CLOSED
        return AgentProtocolError(message)

    # --- sending ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """What to write to the socket now (then forgotten here)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _send(self, message: HostMessage) -> None:
        target = _HOST_TRANSITIONS.get((self.state, type(message)))
        if target is None:
            name = type(message).__name__.upper()
            raise LocalProtocolError(f"cannot send {name} while {self.state.value}")
        self._outgoing += encode_message(message)
        self.state = target

    def send_ping(self, payload: bytes = b"") -> None:
        if len(payload) > MAX_PING:
            raise LocalProtocolError(f"a PING carries at most {MAX_PING} bytes")
        self._send(Ping(payload))
        self._ping = payload

    def send_exec(self, request: Exec) -> None:
        encoded = encode_message(request)
        limit = self.hello.max_request if self.hello else 0
        if len(encoded) - HEADER_SIZE > limit:
            from pyvmm.errors import ConfigError

            raise ConfigError(
                f"the command's arguments and environment take {len(encoded)} bytes; "
                f"the agent accepts at most {limit}"
            )
        self._send(request)

    def send_stdin(self, data: bytes) -> None:
        """Stdin bytes for the command, split into frames; ``b""`` ends its input."""
        if not data:
            self._send(Stdin(b""))
            return
        for start in range(0, len(data), MAX_CHUNK):
            self._send(Stdin(data[start : start + MAX_CHUNK]))

    def send_signal(self, signo: int) -> None:
        if not 0 < signo < 128:
            raise LocalProtocolError(f"signal {signo} is not 1..127")
        self._send(Signal(signo))

    def send_put(self, request: Put) -> None:
        self._send(request)

    def send_put_data(self, data: bytes) -> None:
        """A piece of the PUT's tar stream (split into frames)."""
        for start in range(0, len(data), MAX_CHUNK):
            self._send(Data(data[start : start + MAX_CHUNK], from_host=True))

    def send_put_end(self) -> None:
        """End the PUT stream (also after the agent refused it)."""
        if self.state not in (State.PUT_SENDING, State.PUT_REFUSED):
            raise LocalProtocolError(f"cannot end a PUT stream while {self.state.value}")
        self._outgoing += encode_message(Data(b"", from_host=True))
        self.state = State.PUT_FINISHING if self.state is State.PUT_SENDING else State.IDLE

    def send_get(self, request: Get) -> None:
        self._send(request)
