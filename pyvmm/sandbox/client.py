"""A blocking client for one connection to a guest agent.

:class:`AgentClient` drives :class:`~pyvmm.sandbox.connection.AgentConnection`
over a socket: the VM's vsock Unix socket (:meth:`AgentClient.connect` does
Firecracker's ``CONNECT <port>`` / ``OK <host port>`` handshake), or any
connected stream socket (tests use socketpairs and the agent's ``--unix``
mode). One operation runs at a time on a connection (only
:meth:`~AgentClient.send_signal` may come from another thread); the agent
serves every connection in its own process, so concurrent work means one
client per thread.

Every wait is bounded: the handshake, a ping, a file transfer without
progress and the start of a command by ``timeout``; a running command by its
own ``timeout`` (enforced by the agent) plus ``timeout_grace``. Everything
the agent sends is capped (frames by the protocol, captured output by
``max_output``, file transfers by ``max_files`` / ``max_bytes``). After an
error in the middle of an operation (a timeout, an exception from a
callback, Ctrl-C) or any protocol error (a refused archive included) the
connection is closed, which makes the agent kill a running command; errors
that leave the connection between operations (a file the guest does not
have, a command not found) keep it open.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from pyvmm.errors import ConfigError
from pyvmm.sandbox.connection import AgentConnection, Closed, Event, State
from pyvmm.sandbox.errors import (
    AgentDisconnected,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    LocalProtocolError,
    OutputLimitError,
)
from pyvmm.sandbox.messages import (
    Data,
    Done,
    Exec,
    Exit,
    Failure,
    Get,
    Hello,
    Output,
    Pong,
    Put,
    Started,
    check_guest_path,
)
from pyvmm.sandbox.protocol import AGENT_PORT
from pyvmm.sandbox.results import (
    ExecResult,
    TransferStats,
    exec_result,
    operation_error,
    start_failure,
)
from pyvmm.sandbox.stdin_feed import StdinFeed, StdinSource
from pyvmm.sandbox.tarsafe import SafeExtractor, check_destination, make_staging
from pyvmm.sandbox.tarwriter import TarWriter
from pyvmm.sandbox.vsock_connect import connect_vsock

#: Seconds to wait for a handshake, a PONG, progress of a transfer, a command to start.
DEFAULT_TIMEOUT = 30.0
#: Seconds after a command's own timeout before the host gives up on the agent.
DEFAULT_TIMEOUT_GRACE = 10.0
#: Bytes of stdout (and of stderr) kept in an ExecResult.
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
DEFAULT_MAX_FILES = 100_000
DEFAULT_MAX_BYTES = 1024**3
_RECV_SIZE = 256 * 1024
#: Queue more stdin or PUT data only while less than this waits to be sent.
_SEND_HIGH_WATER = 256 * 1024
_STREAMS = {1: "stdout", 2: "stderr"}
_T = TypeVar("_T")


class AgentClient:
    """One connection to a guest agent (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        timeout_grace: float = DEFAULT_TIMEOUT_GRACE,
        received: bytes = b"",
    ) -> None:
        """Take over ``sock`` (connected to an agent) and do the HELLO exchange.

        ``received`` is what was already read from it (after a CONNECT
        handshake). Raises :class:`AgentUnavailable` if no HELLO comes within
        ``timeout``, :class:`AgentProtocolError` if the agent speaks no
        version this pyvmm does.
        """
        self.timeout = timeout
        self.timeout_grace = timeout_grace
        self._sock = sock
        self._conn = AgentConnection()
        self._out = bytearray()
        self._lock = threading.Lock()
        self._closed: str | None = None
        self._poll = select.poll()
        # send_signal() may come from another thread or a signal handler: it queues
        # the signal and wakes the thread that runs the command through this pipe.
        self._signals: list[int] = []
        self._signals_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._wake_r, select.POLLIN)
        sock.setblocking(False)
        try:
            if received:
                self._conn.receive_data(received)
            self._pump(time.monotonic() + timeout, what="the agent's HELLO")
            self._pump(time.monotonic() + timeout, what="sending HELLO", drain_to=0)
        except (AgentTimeout, AgentDisconnected) as exc:
            self._abandon(str(exc))
            raise AgentUnavailable(f"no agent answered: {exc}") from None
        except BaseException as exc:
            self._abandon(str(exc))
            raise

    @classmethod
    def connect(
        cls,
        uds_path: str | os.PathLike[str],
        port: int = AGENT_PORT,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        timeout_grace: float = DEFAULT_TIMEOUT_GRACE,
    ) -> AgentClient:
        """Connect through a VM's vsock Unix socket (one attempt)."""
        sock, rest = connect_vsock(uds_path, port, timeout)
        return cls(sock, timeout=timeout, timeout_grace=timeout_grace, received=rest)

    @classmethod
    def wait_ready(
        cls,
        uds_path: str | os.PathLike[str],
        port: int = AGENT_PORT,
        *,
        timeout: float = 60.0,
        interval: float = 0.05,
        request_timeout: float = DEFAULT_TIMEOUT,
        alive: Callable[[], bool] | None = None,
        first_attempt: float | None = None,
    ) -> AgentClient:
        """Connect, retrying while the VM boots, until ``timeout`` seconds have passed.

        ``alive`` (e.g. "the VM process still runs") is asked between tries;
        when it says False the wait ends at once. ``first_attempt`` bounds
        the first try's handshake; each later try gets twice as long, up to
        ``request_timeout``. For a VM just restored from a snapshot: a
        connection that reaches the guest before it has handled the vsock
        transport reset is lost (Linux resets it without a word), and the
        VMM gives up on it only after seconds, so short tries find the agent
        sooner.
        """
        deadline = time.monotonic() + timeout
        attempt = request_timeout if first_attempt is None else first_attempt
        last = "no attempt made"
        while True:
            left = deadline - time.monotonic()
            try:
                client = cls.connect(
                    uds_path, port, timeout=max(0.05, min(attempt, request_timeout, left)),
                    timeout_grace=DEFAULT_TIMEOUT_GRACE,
                )  # fmt: skip
                client.timeout = request_timeout
                return client
            except AgentUnavailable as exc:
                last = str(exc)
            attempt *= 2
            if alive is not None and not alive():
                raise AgentUnavailable(f"the VM stopped before its agent answered ({last})")
            if time.monotonic() + interval > deadline:
                raise AgentUnavailable(f"no agent answered within {timeout:g} s ({last})")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.5)

    # --- the public operations ------------------------------------------------------

    @property
    def hello(self) -> Hello:
        """What the agent announced (its versions, caps and name)."""
        assert self._conn.hello is not None
        return self._conn.hello

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def ping(self) -> float:
        """A round trip to the agent; returns it in seconds."""
        with self._operation("ping"):
            started = time.monotonic()
            self._conn.send_ping(os.urandom(8))
            self._expect(Pong, self._pump(started + self.timeout, what="PONG"))
            return time.monotonic() - started

    def exec(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdin: StdinSource | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it to end.

        ``env`` adds to (or overrides) the agent's PATH and HOME. ``stdin``
        is bytes or a binary file (read as the command wants it); None gives
        the command ``/dev/null``. ``timeout`` (seconds) is enforced by the
        agent: the command's process group is killed and the result says
        ``timed_out`` (exit code 124). Output is streamed to ``on_stdout`` /
        ``on_stderr`` as it comes, or else kept (at most ``max_output`` bytes
        per stream: more raises :class:`OutputLimitError`, and the command is
        killed).
        """
        request = Exec.build(
            argv, env=env, cwd=cwd, uid=uid, gid=gid, timeout=timeout,
            stdin_piped=stdin is not None,
        )  # fmt: skip
        feed = StdinFeed(stdin) if stdin is not None else None
        sinks = {1: on_stdout, 2: on_stderr}
        kept = {1: bytearray(), 2: bytearray()}
        with self._operation("exec"):
            started = time.monotonic()
            self._take_signals()  # asked for before this command: not for it
            self._conn.send_exec(request)
            deadline: float | None = started + self.timeout
            running = False
            while True:
                waiting_for = "the command to end" if running else "the command to start"
                event = self._pump(deadline, what=waiting_for, stdin=feed)
                if isinstance(event, Started):
                    running = True
                    deadline = (
                        None if timeout is None else time.monotonic() + timeout + self.timeout_grace
                    )
                elif isinstance(event, Output):
                    sink = sinks[event.fd]
                    if sink is not None:
                        sink(event.data)
                        continue
                    kept[event.fd] += event.data
                    if len(kept[event.fd]) > max_output:
                        raise OutputLimitError(
                            f"the command's {_STREAMS[event.fd]} went over {max_output} bytes "
                            "(max_output); it was killed"
                        )
                elif isinstance(event, Exit):
                    return exec_result(event, kept, time.monotonic() - started)
                elif isinstance(event, Failure) and not running:
                    return start_failure(event, request, time.monotonic() - started)
                elif isinstance(event, Failure):
                    raise operation_error(event, "exec")
                else:
                    raise AgentProtocolError(f"unexpected {type(event).__name__} during exec")

    def put(
        self,
        host_path: str | os.PathLike[str],
        guest_path: str,
        *,
        mkdirs: bool = True,
        uid: int | None = None,
        gid: int | None = None,
        max_files: int = DEFAULT_MAX_FILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
    ) -> TransferStats:
        """Copy a host file or directory tree to ``guest_path`` (created or replaced;
        an existing non-empty guest directory is not replaced). Modes and mtimes
        are kept; owners become ``uid``/``gid`` (default: the agent's, root).
        ``timeout`` bounds the whole transfer (the client's ``timeout`` bounds
        each wait for progress)."""
        request = Put(check_guest_path(guest_path, "put destination"), uid, gid, mkdirs)
        for what, value in (("uid", uid), ("gid", gid)):
            if value is not None and not 0 <= value < 2**32 - 1:
                raise ConfigError(f"put {what} must be from 0 to 4294967294, not {value}")
        source = Path(host_path)
        if not source.exists():
            raise ConfigError(f"cannot put {source}: it does not exist")
        writer = TarWriter(source, max_files=max_files, max_bytes=max_bytes)
        with self._operation("put"):
            started = time.monotonic()
            overall = None if timeout is None else started + timeout
            self._conn.send_put(request)
            event: Event | None = None
            problem: ConfigError | None = None
            try:
                for chunk in writer.chunks():
                    self._conn.send_put_data(chunk)
                    event = self._pump(
                        self._progress_deadline(overall),
                        what="the agent to take PUT data",
                        drain_to=_SEND_HIGH_WATER,
                    )
                    if event is not None:
                        break  # the agent refused the stream (the table allows nothing else)
            except ConfigError as exc:
                problem = exc  # end the stream without its end-of-archive: nothing is placed
            self._conn.send_put_end()
            if event is None:
                event = self._pump(self._progress_deadline(overall), what="the result of PUT")
            if problem is not None:
                raise problem
            if isinstance(event, Failure):
                raise operation_error(event, f"put {source} to {guest_path}")
            done = self._expect(Done, event)
            if (done.entries, done.content_bytes) != (writer.entries, writer.content_bytes):
                raise AgentProtocolError(
                    f"the agent stored {done.entries} entries and {done.content_bytes} bytes; "
                    f"pyvmm sent {writer.entries} and {writer.content_bytes}"
                )
            return TransferStats(done.entries, done.content_bytes, time.monotonic() - started)

    def get(
        self,
        guest_path: str,
        host_path: str | os.PathLike[str],
        *,
        max_files: int = DEFAULT_MAX_FILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float | None = None,
    ) -> TransferStats:
        """Copy a guest file or directory tree to ``host_path``, which must not be an
        existing directory (an existing file is replaced by a file). Nothing is
        written outside ``host_path``; a refused or failed transfer leaves
        nothing behind (see :mod:`pyvmm.sandbox.tarsafe`). ``timeout`` bounds
        the whole transfer, as for :meth:`put`."""
        request = Get(check_guest_path(guest_path, "get source"))
        dest = Path(host_path)
        check_destination(dest)
        with self._operation("get"):
            started = time.monotonic()
            overall = None if timeout is None else started + timeout
            extractor = SafeExtractor(make_staging(dest), max_files=max_files, max_bytes=max_bytes)
            try:
                self._conn.send_get(request)
                while True:
                    event = self._pump(self._progress_deadline(overall), what="GET data")
                    if isinstance(event, Data):
                        extractor.feed(event.data)
                        continue
                    if isinstance(event, Failure):
                        raise operation_error(event, f"get {guest_path}")
                    done = self._expect(Done, event)
                    stats = extractor.finish()
                    if (done.entries, done.content_bytes) != (stats.entries, stats.content_bytes):
                        raise AgentProtocolError(
                            f"the agent reported {done.entries} entries and {done.content_bytes} "
                            f"bytes but sent {stats.entries} and {stats.content_bytes}"
                        )
                    extractor.place(dest)
                    return TransferStats(
                        stats.entries, stats.content_bytes, time.monotonic() - started, done.skipped
                    )
            finally:
                extractor.close()

    def send_signal(self, signo: int) -> None:
        """Send ``signo`` to the running command's process group (ignored when none runs).

        Thread-safe, and safe in a signal handler: it only queues the signal;
        the thread in :meth:`exec` sends it (a SIGINT handler of a CLI can so
        forward Ctrl-C to the command).
        """
        if isinstance(signo, bool) or not isinstance(signo, int) or not 0 < signo < 128:
            raise ConfigError(f"signal must be a number from 1 to 127, not {signo!r}")
        with self._signals_lock:
            self._signals.append(signo)
        with suppress(OSError):  # a full pipe already wakes it; a closed client ignores it
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        self._abandon("closed by the caller")

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the engine ---------------------------------------------------------------

    @contextmanager
    def _operation(self, what: str) -> Iterator[None]:
        if self._closed is not None:
            raise AgentDisconnected(
                f"cannot {what}: the agent connection is closed ({self._closed})"
            )
        if not self._lock.acquire(blocking=False):
            raise LocalProtocolError(
                f"cannot {what}: another operation runs on this connection "
                "(use one AgentClient per thread)"
            )
        try:
            yield
        except BaseException as exc:
            # In the middle of an operation, or after a hostile frame: this connection is done.
            if self._conn.state is not State.IDLE or isinstance(exc, AgentProtocolError):
                self._abandon(f"{what} failed: {exc}" if str(exc) else f"{what} was interrupted")
            raise
        finally:
            self._lock.release()

    def _abandon(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
            self._sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _take_signals(self) -> list[int]:
        with self._signals_lock:
            signals, self._signals = self._signals, []
        return signals

    def _progress_deadline(self, overall: float | None) -> float:
        """When the next sign of progress is due: ``timeout`` from now, or the overall end."""
        deadline = time.monotonic() + self.timeout
        return deadline if overall is None else min(deadline, overall)

    def _expect(self, kind: type[_T], event: Event | None) -> _T:
        if not isinstance(event, kind):
            raise AgentProtocolError(f"expected {kind.__name__}, got {type(event).__name__}")
        return event

    def _pump(
        self,
        deadline: float | None,
        *,
        what: str,
        stdin: StdinFeed | None = None,
        drain_to: int | None = None,
    ) -> Event | None:
        """Move bytes until the connection has an event (returned), or, with
        ``drain_to``, until no more than that many bytes wait to be sent (None).

        ``stdin`` is fed to the command while it runs and the send queue is short.
        """
        while True:
            event = self._conn.next_event()
            if isinstance(event, Closed):
                raise AgentDisconnected(f"the agent closed the connection while waiting for {what}")
            if event is not None:
                return event
            if self._conn.state is State.EXEC_RUNNING:
                for signo in self._take_signals():
                    self._conn.send_signal(signo)
            self._out += self._conn.data_to_send()
            if drain_to is not None and len(self._out) <= drain_to:
                return None
            feeding = self._feeding(stdin)
            if feeding and stdin.fd is None:  # type: ignore[union-attr]
                self._conn.send_stdin(stdin.read())  # type: ignore[union-attr]
                continue
            self._wait_once(deadline, what, stdin if feeding else None)

    def _feeding(self, stdin: StdinFeed | None) -> bool:
        """Whether to feed ``stdin`` now: a command is starting or running, and the
        send queue is short (a slow agent slows the feed, never grows the queue)."""
        return (
            stdin is not None
            and not stdin.done
            and self._conn.state in (State.EXEC_STARTING, State.EXEC_RUNNING)
            and len(self._out) < _SEND_HIGH_WATER
        )

    def _wait_once(self, deadline: float | None, what: str, stdin: StdinFeed | None) -> None:
        """One poll of the socket (and of ``stdin``'s fd), then the transfers it allows."""
        sock = self._sock
        self._poll.register(sock, select.POLLIN | (select.POLLOUT if self._out else 0))
        if stdin is not None:
            self._poll.register(stdin.fd, select.POLLIN)
        try:
            ready = dict(self._poll.poll(_poll_ms(deadline)))
        finally:
            if stdin is not None:
                self._poll.unregister(stdin.fd)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise AgentTimeout(f"no answer from the agent within the time allowed for {what}")
        if ready.get(self._wake_r):
            with suppress(OSError):
                os.read(self._wake_r, 4096)
        if stdin is not None and ready.get(stdin.fd):
            self._conn.send_stdin(stdin.read())
        flags = ready.get(sock.fileno(), 0)
        if flags & select.POLLOUT and self._out:
            self._write()
        if flags & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._read()

    def _write(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()  # the agent is gone: reading will say so
            return
        del self._out[:sent]

    def _read(self) -> None:
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._conn.receive_data(data)


def _poll_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000) + 1)
