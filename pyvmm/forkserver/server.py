"""The fork server: a warm template process that forks one VM process per ``pyvmm run``.

Why: most of a ``pyvmm run``'s start-up is the interpreter importing pyvmm,
and every such process carries its own interpreter heap. A server that
imported everything once (:mod:`pyvmm.forkserver.preload`) forks children
that start at once and share those pages.

One thread, one ``poll`` loop: ``fork()`` in a process with other threads
can copy a lock some other thread held, so the server never starts one
(and checks, before every fork). The loop watches the listening socket,
each client connection, a pidfd per VM process (readable when it ends;
signals sent through it can never reach a recycled pid) and a wake-up pipe
for the server's own signals.

Lifetime rules:

- a client is a connection: its request (argv, cwd, umask, environment,
  stdio fds; :mod:`~pyvmm.forkserver.protocol`) makes one VM process, the
  server replies its pid, relays the client's SIGINT/SIGTERM/SIGHUP to it,
  and replies its exit status or signal when it ends, then closes;
- a client that hangs up (killed) gets its VM process SIGTERMed, then
  SIGKILLed if it is still there :data:`STOP_GRACE` seconds later;
- a VM process never outlives the server: ``PR_SET_PDEATHSIG`` sends it
  SIGTERM when the server dies; a server stopped by SIGTERM, SIGINT or
  SIGHUP (one it was started with ignored, as under ``nohup``, stays
  ignored) removes its socket, SIGTERMs every VM process (SIGKILL after
  the grace, or at once on a second signal), reports each end to its
  client, and exits 0;
- a bad request (garbage, over the size limits, the wrong number of fds,
  another uid, no request within 10 s) gets one ``error`` line and the
  connection closes; nothing else changes.

What the server runs under, and why:

- **Only its own uid may talk to it.** The socket is created 0600 (under a
  umask, so there is no moment it is wider) and every connection's
  SO_PEERCRED uid must equal the server's. Such a peer could run ``pyvmm
  run`` itself: the server grants it nothing it did not have.
- **No seccomp filter of its own.** Filters are inherited across fork and
  stack, so a server filter would bind every VM process before it ran a
  line of its own. A VM process *is* ``pyvmm run`` and needs, before its
  own per-thread filters go on, what ``pyvmm run`` needs: confinement
  (rlimits, cgroups, ``setns``, ``pivot_root``, ``mount``, ``setuid``,
  Landlock, seccomp) and, for Linux on a PVM host or the default guest,
  ``fork``/``execve`` of QEMU and of the guest kit's tools. A filter that
  allows all that confines nothing. The vmm/api/vcpu/io filters still go
  on in every VM process, exactly as in a direct ``pyvmm run`` (the same
  code runs), and the server's own input is a few kilobytes of JSON parsed
  by :mod:`~pyvmm.forkserver.protocol` from a same-uid peer.
- **no_new_privs.** Set on the server and so inherited by every VM
  process: nothing started from it gains privileges through a set-uid
  program. ``pyvmm run`` needs none (its seccomp set-up sets the same bit).
- **cgroups.** A VM process starts in the server's cgroup, and is charged
  there unless its ``pyvmm run`` command line moves it (``--cgroup``): a CI
  system that wants one cgroup per job class starts one server per class
  (in that cgroup), or passes ``--cgroup``.
- Also inherited from the server rather than the client: uid, groups,
  resource limits, namespaces, scheduling. The client passes what differs
  between calls (argv, cwd, umask, ``PYVMM_*`` and the variables in
  :data:`~pyvmm.forkserver.protocol.FORWARDED_ENV`, stdio).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import select
import signal
import sys
import threading
import time

from pyvmm.forkserver.child import SERVER_LOGGER, become_vm_process
from pyvmm.forkserver.connection import Child, Connection, peer_uid
from pyvmm.forkserver.protocol import ProtocolError, Request, parse_request, parse_signal
from pyvmm.host.unix_socket import ListeningSocket

log = logging.getLogger(SERVER_LOGGER)

#: Seconds between the SIGTERM and the SIGKILL of a VM process nobody waits for.
STOP_GRACE = 10.0
#: The signals that stop the server.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: fds one waiting client may hold in the server: its socket and three received.
_FDS_PER_CLIENT = 4
_PR_SET_NO_NEW_PRIVS = 38
_POLL_IN = select.POLLIN | select.POLLPRI


def listen(path: str) -> ListeningSocket:
    """The server's socket at ``path``, mode 0600 from the start (stale sockets replaced)."""
    previous = os.umask(0o177)
    try:
        return ListeningSocket(path, "fork server socket")
    finally:
        os.umask(previous)


def confine_server() -> None:
    """What the server runs under (see the module docstring): no_new_privs, stdio open."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    for fd in (0, 1, 2):  # received fds must never land on 0-2
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


class ForkServer:
    """Serves ``listener`` until a stop signal; see the module docstring for the rules."""

    def __init__(self, listener: ListeningSocket, grace: float = STOP_GRACE) -> None:
        self._listener = listener
        self._grace = grace
        self._pid = os.getpid()
        self._uid = os.getuid()
        self._poll = select.poll()
        self._clients: dict[int, Connection] = {}
        self._children: dict[int, Child] = {}  # by pidfd
        self._waiters: dict[int, Connection] = {}  # pidfd -> the client still waiting
        self._signals: list[int] = []
        self._stopping = False
        self._accept_paused = False
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._fd_budget = max(_FDS_PER_CLIENT, soft - 32)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        """Run the loop until stopped and every VM process has ended."""
        self._poll.register(self._listener.fileno(), _POLL_IN)
        self._poll.register(self._wake_r, _POLL_IN)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN  # nohup, or a background job
        }
        previous_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            while not self._stopping or self._children or self._clients:
                for fd, _ in self._poll.poll(self._timeout_ms()):
                    self._dispatch(fd)
                self._handle_signals()
                self._expire(time.monotonic())
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._abandon()

    # --- events ------------------------------------------------------------------------

    def _dispatch(self, fd: int) -> None:
        if fd == self._listener.fileno() and not self._stopping:
            self._accept()
        elif fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        elif fd in self._children:
            self._child_ended(self._children[fd])
        elif fd in self._clients:
            self._client_readable(self._clients[fd])

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.sock.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of fds or memory: the clients wait in the backlog
                log.warning("cannot accept a client (%s): waiting for one to end", error.strerror)
                self._pause_accepting()
                return
            client = Connection(sock)
            uid = peer_uid(sock)
            if uid != self._uid:
                self._refuse(client, f"refused: uid {uid} is not the fork server's uid {self._uid}")
            elif self._fds_in_use() + _FDS_PER_CLIENT > self._fd_budget:
                self._refuse(client, f"busy: {len(self._children)} VMs run (the fd limit)")
            else:
                self._clients[client.fileno()] = client
                self._poll.register(client.fileno(), _POLL_IN)

    def _client_readable(self, client: Connection) -> None:
        try:
            frames = client.receive()
            if frames is None:
                self._client_gone(client)
                return
            for message in frames:
                if client.child is None:
                    self._start(client, parse_request(message))
                else:
                    client.child.signal(parse_signal(message))
        except ProtocolError as error:
            self._refuse(client, str(error))
        except OSError as error:  # the host's limits (fds, processes, memory): this client only
            self._refuse(client, f"cannot serve the request: {error}")

    def _pause_accepting(self) -> None:
        """Stop watching the listener (it stays readable: polling it would spin)."""
        if not self._accept_paused and not self._stopping:
            self._poll.unregister(self._listener.fileno())
            self._accept_paused = True

    def _resume_accepting(self) -> None:
        if self._accept_paused and not self._stopping:
            self._poll.register(self._listener.fileno(), _POLL_IN)
            self._accept_paused = False

    def _start(self, client: Connection, request: Request) -> None:
        """Fork the VM process for ``request``; the client gets its pid."""
        client.check_fds(request)
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1 or threading.active_count() != 1:
            log.error("the server has %d threads: it will not fork", threads)
            self._refuse(client, f"the fork server has {threads} threads; it cannot fork safely")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as error:
            self._refuse(client, f"cannot start a VM process: {error.strerror}")
            return
        if pid == 0:
            become_vm_process(request, client.fds, self._pid)  # never returns
        try:
            child = Child(pid)
        except OSError:  # no pidfd (out of fds): the unreaped pid is still ours to kill
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        client.release_fds()
        client.child = child
        self._children[child.pidfd] = child
        self._waiters[child.pidfd] = client
        self._poll.register(child.pidfd, _POLL_IN)
        client.reply({"pid": pid})
        log.debug("VM process %d: %s", pid, " ".join(request.argv)[:200])

    def _child_ended(self, child: Child) -> None:
        status = child.reap()
        if status is None:  # a stale event for a reused fd number: still running
            return
        self._poll.unregister(child.pidfd)
        del self._children[child.pidfd]
        child.close()
        client = self._waiters.pop(child.pidfd, None)
        log.debug(
            "VM process %d ended after %.3f s: %s", child.pid, time.monotonic() - child.started,
            f"exit {status}" if status >= 0 else signal.Signals(-status).name,
        )  # fmt: skip
        if client is not None:
            client.reply({"exit": status} if status >= 0 else {"killed": -status})
            self._drop(client)

    def _client_gone(self, client: Connection) -> None:
        if client.child is not None:
            log.info("client of VM process %d hung up: stopping it", client.child.pid)
        self._drop(client)

    def _refuse(self, client: Connection, message: str) -> None:
        """One error line to the client, then it is dropped (its VM process, if any, stops)."""
        log.warning("%s", message)
        client.reply({"error": message})
        self._drop(client)

    def _drop(self, client: Connection) -> None:
        """Forget ``client``: a VM process still running for it is stopped."""
        if self._clients.pop(client.fileno(), None) is not None:
            self._poll.unregister(client.fileno())
            self._resume_accepting()
        child = client.child
        if child is not None and self._waiters.pop(child.pidfd, None) is not None:
            child.terminate(self._grace)
        client.close()

    # --- time and signals --------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if self._stopping:  # a second signal: no more grace
                log.info("%s again: killing %d VM processes", signal.Signals(signum).name,
                         len(self._children))  # fmt: skip
                for child in self._children.values():
                    child.signal(signal.SIGKILL)
                continue
            log.info("%s: stopping (%d VM processes running)", signal.Signals(signum).name,
                     len(self._children))  # fmt: skip
            if not self._accept_paused:
                self._poll.unregister(self._listener.fileno())
            self._stopping = True
            self._listener.close()
            for client in list(self._clients.values()):
                if client.child is None:
                    self._refuse(client, "the fork server is stopping")
            for child in self._children.values():
                child.terminate(self._grace)

    def _timeout_ms(self) -> int:
        deadlines = [c.deadline for c in self._clients.values() if c.child is None]
        deadlines += [c.kill_at for c in self._children.values() if c.kill_at is not None]
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _expire(self, now: float) -> None:
        for client in list(self._clients.values()):
            if client.child is None and client.deadline <= now:
                self._refuse(client, "no whole request within 10 s of connecting")
        for child in self._children.values():
            if child.kill_at is not None and child.kill_at <= now:
                log.warning("VM process %d ignored SIGTERM: killing it", child.pid)
                child.signal(signal.SIGKILL)
                child.kill_at = None

    def _fds_in_use(self) -> int:
        return len(self._clients) * _FDS_PER_CLIENT + len(self._children)

    def _abandon(self) -> None:
        """Leaving the loop early (an exception): no VM process or fd may be left behind."""
        for client in list(self._clients.values()):
            self._drop(client)
        for child in list(self._children.values()):
            child.signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            child.close()
        self._children.clear()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
