"""The client side: ``pyvmm run`` relayed to a fork server, in a process that stays small.

Run by :mod:`pyvmm.entry` when ``PYVMM_FORKSERVER`` names a server. It
imports only the standard library and :mod:`pyvmm.forkserver.protocol`,
never click or the VM machinery: its whole job is to hand its command line,
working directory, umask, environment and standard fds to the server, then
stand in for the VM's process until it ends. So, to whoever started it, it
behaves as a direct ``pyvmm run`` would:

- the VM's process writes to and reads from this process's own stdin,
  stdout and stderr (passed with SCM_RIGHTS), so output and input need no
  copying here;
- SIGINT, SIGTERM and SIGHUP sent to this process are forwarded (through
  the server, which owns the VM's process and so can never signal a reused
  pid); a SIGKILLed client closes its connection, and the server then stops
  the VM with SIGTERM;
- it exits with the VM process's status, or ends by the same signal.

Its own failures (no server at the path, a refused request) are one
``pyvmm: error:`` line and status 2, like any other ``pyvmm`` usage error;
a server that goes away before the VM ended is one line and status 1.

Once the VM process runs, the client execs the server's small C waiter
(:mod:`pyvmm.forkserver.waiter`) when it is built, so that a waiting client
costs about 1 MiB rather than an interpreter's ~8; otherwise it waits here.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import sys

from pyvmm.forkserver.protocol import (
    FORWARDED_SIGNALS,
    MAX_CONTROL_BYTES,
    STANDARD_FDS,
    FrameReader,
    ProtocolError,
    Request,
    forwarded_env,
    frame,
    parse_reply,
    request_frame,
)

EXIT_USAGE = 2
EXIT_FAILED = 1


def relay(path: str, argv: list[str], prog: str) -> int:
    """Run ``pyvmm <argv>`` through the server at ``path``; the exit status to exit with.

    May not return: a VM process ended by a signal ends this one by the same signal.
    """
    forwarder = _SignalForwarder()
    try:
        sock = _connect(path)
        if sock is None:
            return EXIT_USAGE
        with sock:
            request = _request(argv, prog)
            if request is None:
                return EXIT_USAGE
            try:
                sock.sendmsg(
                    [request_frame(request)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", request.fds))],
                )
            except OSError as error:
                return _error(f"fork server {path}: cannot send the request: {error.strerror}", 1)
            forwarder.attach(sock)
            return _wait_for_end(sock, path)
    finally:
        forwarder.restore()


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        _error(
            f"no fork server at {path!r} ({reason}); start one with "
            f"'pyvmm forkserver --socket {path}' or unset PYVMM_FORKSERVER"
        )
        return None
    return sock


def _request(argv: list[str], prog: str) -> Request | None:
    try:
        cwd = os.getcwd()
    except OSError as error:
        _error(f"the current directory cannot be used: {error.strerror}")
        return None
    umask = os.umask(0o022)
    os.umask(umask)
    return Request(
        argv=tuple(argv),
        prog=prog,
        cwd=cwd,
        umask=umask,
        env=forwarded_env(os.environ),
        fds=tuple(fd for fd in STANDARD_FDS if _is_open(fd)),
    )


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _wait_for_end(sock: socket.socket, path: str) -> int:
    """Read replies until the VM's process ends; its status."""
    reader = FrameReader(MAX_CONTROL_BYTES)
    while True:
        try:
            data = sock.recv(4096)
        except OSError as error:
            data, lost = b"", error.strerror
        else:
            lost = "the connection closed"
        if not data:
            return _error(f"fork server {path}: {lost} before the VM ended", EXIT_FAILED)
        reader.feed(data)
        try:
            while (message := reader.next_frame()) is not None:
                reply = parse_reply(message)
                if reply.kind == "error":
                    return _error(f"fork server {path}: {reply.value}")
                if reply.kind == "pid" and reader.pending == 0:
                    _hand_over(sock, path)  # returns only if there is no waiter to run
                if reply.kind == "exit":
                    return int(reply.value)
                if reply.kind == "killed":
                    return _die_by(int(reply.value))
        except ProtocolError as error:
            return _error(f"fork server {path}: {error}", EXIT_FAILED)


def _hand_over(sock: socket.socket, path: str) -> None:
    """Become the small C waiter (:mod:`pyvmm.forkserver.waiter`) for the rest of the wait.

    The forwarded signals are blocked across ``exec`` (a blocked signal stays
    pending, and the waiter unblocks them once its handlers are in place), so
    none is lost or takes its default action in between.
    """
    from pyvmm.forkserver.waiter import usable_waiter

    waiter = usable_waiter()
    if waiter is None:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        os.set_inheritable(sock.fileno(), True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(waiter, [waiter, str(sock.fileno()), path])
    except OSError:
        os.set_inheritable(sock.fileno(), False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)


def _die_by(signum: int) -> int:
    """End this process by ``signum``, as the VM's process ended (128+N if that fails)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass
    return 128 + signum


def _error(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"pyvmm: error: {message}\n")
    sys.stderr.flush()
    return code


class _SignalForwarder:
    """Forwards SIGINT, SIGTERM and SIGHUP as signal frames once the request has gone.

    Installed first thing, so a Ctrl-C while connecting is not a traceback:
    signals that come before the request is sent wait and go right after it.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._waiting: list[int] = []
        self._previous = {
            sig: signal.signal(sig, self._on_signal) for sig in sorted(FORWARDED_SIGNALS)
        }

    def _on_signal(self, signum: int, frame_: object) -> None:
        if self._sock is None:
            self._waiting.append(signum)
        else:
            self._send(signum)

    def attach(self, sock: socket.socket) -> None:
        self._sock = sock
        waiting, self._waiting = self._waiting, []
        for signum in waiting:
            self._send(signum)

    def _send(self, signum: int) -> None:
        try:  # noqa: SIM105 - contextlib is one import more for the client
            self._sock.sendall(frame({"signal": signum}))  # type: ignore[union-attr]
        except OSError:
            pass  # the server is gone: the read loop reports it

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._sock is None and self._waiting:
            _die_by(self._waiting[0])  # a signal came before anything was sent
