"""A scripted fake guest agent on the other end of a socketpair (or a Unix socket).

A test writes the agent's side as a function of a :class:`FakeAgent`; it
runs on a thread and may break the protocol in any way it likes. Its
messages are encoded with pyvmm's own protocol module, its raw bytes with
:meth:`FakeAgent.send_raw`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from pyvmm.sandbox import messages as m
from pyvmm.sandbox import protocol as p

HELLO = m.Hello(1, 1, p.Cap.EXEC | p.Cap.PUT | p.Cap.GET | p.Cap.SIGNAL, 4 << 20, "fake agent")


class FakeAgent:
    def __init__(
        self, script: Callable[[FakeAgent], object], sock: socket.socket | None = None
    ) -> None:
        if sock is None:
            self.host_sock, sock = socket.socketpair()
        self.sock = sock
        self.sock.settimeout(20)
        self._decoder = p.FrameDecoder(p.HOST_LIMITS)
        self._script = script
        self.host_closed = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="fake-agent")
        self.thread.start()

    def _run(self) -> None:
        try:
            self._script(self)
        except (BrokenPipeError, ConnectionResetError):
            self.host_closed.set()
        except BaseException as exc:  # reported by join()
            self.failure = exc
        finally:
            self.sock.close()

    def join(self, timeout: float = 20) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the fake agent is stuck"
        if self.failure is not None:
            raise self.failure

    def send(self, *messages) -> None:
        self.sock.sendall(b"".join(m.encode_message(msg) for msg in messages))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self):
        """The host's next message, or None once the host closed the connection."""
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return m.decode_host_message(*frame)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.host_closed.set()
                return None
            self._decoder.feed(data)

    def expect(self, kind: type):
        message = self.recv()
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    def handshake(self, hello: m.Hello = HELLO) -> None:
        self.send(hello)
        self.expect(m.HostHello)

    def wait_for_close(self) -> None:
        """Read (and drop) whatever the host sends until it closes."""
        while self.recv() is not None:
            pass
