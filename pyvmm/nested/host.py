"""A nested KVM host: a Linux L1 under QEMU-TCG with a working ``/dev/kvm``.

Why: on a PVM host guest kernel code is emulated about 3000 times slower
(ENVIRONMENT.md), so a real Linux guest cannot be booted there. QEMU's TCG
emulates AMD SVM on any CPU, so Debian's generic kernel booted under TCG gets
a real ``/dev/kvm`` from ``kvm_amd``. The host's ``/`` is shared read-only
into L1 over virtio-9p and L1 runs commands ``chroot``-ed into it, so the
host's own Python and pyvmm run there unchanged.

What L1 sees (at the same absolute paths as the host): everything read-only,
except the current directory, ``/tmp``, the work directory and any extra
``writable`` directories, which are writable 9p shares; ``/proc``, ``/sys``,
``/dev`` (with ``/dev/kvm``) and ``/run`` are L1's own. Commands get
``TMPDIR`` on an L1 tmpfs. The files the host and L1 exchange are described
in :mod:`pyvmm.nested.agent`; a command can also stream its stdin and
stdout through the console port (:mod:`pyvmm.nested.console`), which is how
a terminal or a pipe reaches a VM in L1.

Every wait here is bounded: boot, each command (unless the caller asks for
no limit), and shutdown. An L1 whose console shows no progress for
``stall_timeout`` seconds while it boots is killed and booted once more (the
caller hears about it through ``notify``); a command that overruns is
killed in L1 and reported with :class:`NestedTimeoutError`; an L1 that
dies, hangs or reports a lasting soft lockup is reported with the tail of
its console log. The work directory is removed on every way out
(:mod:`pyvmm.nested.workdir` also removes those of killed runs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import HostError
from pyvmm.nested import workdir as workdirs
from pyvmm.nested.agent import (
    L1_TMPDIR,
    AgentFiles,
    command_script,
    config_script,
    plan_shares,
)
from pyvmm.nested.console import ConsoleChannel
from pyvmm.nested.qemu import QEMU, TCG_ACCEL, default_cmdline, prepare_l1_images, qemu_argv

DEFAULT_BOOT_TIMEOUT_S = 120.0
#: An L1 that prints nothing on its console for this long while it boots is
#: stuck (a normal boot prints a line at least every second or two).
DEFAULT_STALL_S = 20.0
#: Boots tried before giving up on a stalling L1 (the first, and one retry).
BOOT_ATTEMPTS = 2
SHUTDOWN_TIMEOUT_S = 15.0
CANCEL_GRACE_S = 10.0
#: A soft lockup that L1 reports as lasting this long means L1 will not recover:
#: its watchdog reports at about 23 s, 49 s, 75 s...; the first report can be a
#: host that starved QEMU for a while, the second one has never recovered here.
LOCKUP_FATAL_S = 45
_POLL_S = 0.05
_CONSOLE_TAIL_LINES = 20
#: QEMU warns about every CPU feature TCG lacks, twice; not worth a tail line.
_QEMU_NOISE = "TCG doesn't support requested feature"
_OUTPUT_TAIL_CHARS = 2000
_STATUS_MAX_BYTES = 8
_DRAIN_IDLE_S = 0.3
_DRAIN_LIMIT_S = 5.0
_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s")
#: A kernel console line's time stamp, left out of the progress line.
_KERNEL_TIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")


class NestedError(HostError):
    """The nested host failed: L1 did not boot, died, or stopped answering."""


class NestedBootError(NestedError):
    """L1 did not reach its agent loop."""


class NestedTimeoutError(NestedError):
    """A command did not finish in time (it was killed in L1)."""


class NestedStallError(NestedError):
    """L1 stopped making progress while a command ran (its kernel reports a lasting
    soft lockup). Not the command's fault: it may be run again in a new L1."""


@dataclass(frozen=True)
class NestedResult:
    """What a command did: exit status, output, and wall time seen by the host.

    A command run with ``stdin`` streams its stdout to ``on_stdout`` only
    (``stdout`` is empty); ``user_quit`` is True when the user pressed the
    quit key (Ctrl-A X) at the terminal, which ends the run at once.
    """

    returncode: int
    stdout: str
    stderr: str
    duration: float
    user_quit: bool = False


OutputSink = Callable[[bytes], None]


def command_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a command in L1: the host's essentials plus ``extra``.

    ``PATH`` starts with this interpreter's directory (so ``python3`` is the
    Python running pyvmm, not a shim), ``PYTHONPATH`` starts with the directory
    holding the imported ``pyvmm`` package, and ``PYVMM_NESTED=1`` tells the
    command where it runs.
    """
    import pyvmm

    host = os.environ
    path = [str(Path(sys.executable).parent)]
    path += [p for p in host.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":") if p]
    pythonpath = [str(Path(pyvmm.__file__).resolve().parent.parent)]
    pythonpath += [p for p in host.get("PYTHONPATH", "").split(":") if p]
    env = {
        "PATH": ":".join(dict.fromkeys(path)),
        "HOME": host.get("HOME", "/root"),
        "TERM": "dumb",
        "TMPDIR": L1_TMPDIR,
        "PYTHONPATH": ":".join(dict.fromkeys(pythonpath)),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYVMM_NESTED": "1",
    }
    for key in ("LANG", "LC_ALL", "LC_CTYPE", "USER", "LOGNAME", "PYVMM_CACHE"):
        if key in host:
            env[key] = host[key]
    env.update(extra or {})
    return env


def describe(command: Sequence[str] | str) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _stderr_line(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


class NestedHost:
    """One L1 under QEMU-TCG that runs commands for the host.

    ``cwd`` (default: the current directory) is shared writable and is where
    commands start; ``writable`` lists more directories to share writable.
    ``workdir`` holds the console log and the agent's files (default: a new
    temporary directory, removed by :meth:`stop` unless ``keep_workdir``). A
    given ``workdir`` is kept; its ``agent/`` directory is emptied at start.
    ``notify`` receives one-line notices (a stalled boot being retried;
    default: stderr). Use as a context manager, or call :meth:`start` and
    :meth:`stop`; both clean up whatever way they are left.
    """

    def __init__(
        self,
        *,
        cwd: Path | str | None = None,
        workdir: Path | str | None = None,
        keep_workdir: bool = False,
        share_tmp: bool = True,
        writable: Sequence[Path | str] = (),
        memory_mib: int = 2048,
        cpus: int = 2,
        cache_dir: Path | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
        stall_timeout: float = DEFAULT_STALL_S,
        boot_attempts: int = BOOT_ATTEMPTS,
        qemu: str = QEMU,
        accel: str = TCG_ACCEL,
        kernel_cmdline: str | None = None,
        host_cache: str = "loose",
        notify: Callable[[str], object] | None = None,
    ) -> None:
        self.cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.keep_workdir = keep_workdir or workdir is not None
        self.share_tmp = share_tmp
        self.writable = tuple(Path(path).resolve() for path in writable)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.cache_dir = cache_dir
        self.boot_timeout = boot_timeout
        self.stall_timeout = stall_timeout
        self.boot_attempts = max(1, boot_attempts)
        self.qemu = qemu
        self.accel = accel
        self.host_cache = host_cache
        self.kernel_cmdline = kernel_cmdline if kernel_cmdline is not None else default_cmdline()
        self.notify = notify if notify is not None else _stderr_line
        #: Seconds from QEMU's start to the agent's ``ready`` (None before).
        self.boot_seconds: float | None = None
        #: Boots that stalled and were retried (0 for a first-time boot).
        self.boot_retries = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._console: ConsoleChannel | None = None
        self._started = False
        self._next = 0
        self._wedged: str | None = None
        self._lock = threading.Lock()

    # --- paths ----------------------------------------------------------------

    def _require_workdir(self) -> Path:
        if self.workdir is None:
            raise NestedError("the nested host has no work directory before start()")
        return self.workdir

    @property
    def console_log(self) -> Path:
        """L1's serial console (kernel messages and /init's log)."""
        return self._require_workdir() / "console.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self._require_workdir() / "qemu.log"

    @property
    def shared_dir(self) -> Path:
        """A scratch directory at the same path, writable, on the host and in L1."""
        return self._require_workdir() / "shared"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def usable(self) -> bool:
        """Running, and not stuck on a command that could not be killed."""
        return self.running and self._wedged is None

    # --- lifecycle -----------------------------------------------------------

    def __enter__(self) -> NestedHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> NestedHost:
        """Boot L1 and wait until its agent serves commands.

        Whatever ends this early (an error, a signal turned into an exception,
        Ctrl-C) stops QEMU and removes the work directory before it propagates.
        """
        if self._started:
            raise NestedError("this nested host was already started")
        self._started = True
        if shutil.which(self.qemu) is None:
            raise NestedError(
                f"{self.qemu} not found on PATH (Debian: apt-get install qemu-system-x86)"
            )
        try:
            kernel, initrd = prepare_l1_images(self.cache_dir)
            self._prepare_workdir()
            self._boot(kernel, initrd)
        except BaseException:
            self.stop(graceful=False)
            raise
        return self

    def stop(self, graceful: bool = True) -> None:
        """Power L1 off and remove the work directory (unless kept). Idempotent.

        ``graceful=False`` kills QEMU at once (the user quit, or boot failed):
        nothing in L1 holds data the host needs, since the writable shares
        are not cached in L1.
        """
        process = self._process
        if process is not None and process.poll() is None:
            if graceful and self.workdir is not None:
                with contextlib.suppress(OSError):
                    AgentFiles(self.workdir).shutdown.write_bytes(b"")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(SHUTDOWN_TIMEOUT_S)
            _end_process(process)
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._own_workdir and not self.keep_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _prepare_workdir(self) -> None:
        try:
            if self.workdir is None:
                workdirs.remove_stale()
                self.workdir = workdirs.create()
            files = AgentFiles(self.workdir)
            shutil.rmtree(files.directory, ignore_errors=True)
            files.directory.mkdir(parents=True)
            self.shared_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise NestedError(f"cannot prepare the nested host's work directory: {exc}") from exc

    def _boot(self, kernel: Path, initrd: Path) -> None:
        """Boot L1, once more if the first boot stalls."""
        from pyvmm.guestkit.progress import task

        workdir = self._require_workdir()
        tmp = Path(tempfile.gettempdir()).resolve() if self.share_tmp else None
        shares = plan_shares(workdir, self.cwd, tmp, self.writable)
        files = AgentFiles(workdir)
        try:
            files.config.write_text(config_script(workdir, shares, self.host_cache))
        except OSError as exc:
            raise NestedError(f"cannot write {files.config}: {exc.strerror}") from exc
        socket_path = workdir / "console.sock"
        argv = qemu_argv(
            kernel, initrd, shares, self.console_log, memory_mib=self.memory_mib, cpus=self.cpus,
            cmdline=self.kernel_cmdline, qemu=self.qemu, console_socket=socket_path,
            accel=self.accel,
        )  # fmt: skip
        with task("booting the nested host") as progress:
            for attempt in range(1, self.boot_attempts + 1):
                started = time.monotonic()
                self._spawn(argv, attempt)
                self._console = ConsoleChannel(socket_path)
                try:
                    if not self._console.connect(started + self.boot_timeout, lambda: self.running):
                        raise NestedBootError(self._with_console(self._exited()))
                    self._wait_until_ready(files, started, progress.stage)
                except _Stalled as stall:
                    self._kill_for_retry()
                    if attempt == self.boot_attempts:
                        raise NestedBootError(
                            self._with_console(
                                f"L1 stalled while booting, {attempt} times: {stall}"
                            )
                        ) from None
                    self.boot_retries += 1
                    self.notify(
                        f"pyvmm: the nested host stalled while booting ({stall}); "
                        "booting it once more"
                    )
                    continue
                self.boot_seconds = time.monotonic() - started
                return

    def _spawn(self, argv: list[str], attempt: int) -> None:
        if attempt > 1:  # keep the stalled boot's log beside the new one
            earlier = self.console_log.with_name(f"console-{attempt - 1}.log")
            with contextlib.suppress(OSError):
                os.replace(self.console_log, earlier)
            with contextlib.suppress(OSError):
                (self._require_workdir() / "console.sock").unlink()
        try:
            self.console_log.write_bytes(b"")
            log = open(self.qemu_log, "ab")  # noqa: SIM115 - QEMU keeps its own copy
        except OSError as exc:
            raise NestedError(f"cannot write the nested host's logs: {exc}") from exc
        with log:
            log.write(("$ " + shlex.join(argv) + "\n").encode())
            log.flush()
            try:
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, not QEMU
                    preexec_fn=_parent_death_signal(),
                )
            except OSError as exc:
                raise NestedBootError(f"cannot start {self.qemu}: {exc}") from exc

    def _exited(self) -> str:
        code = self._process.returncode if self._process is not None else None
        return f"L1 (QEMU) exited with status {code}"

    def _kill_for_retry(self) -> None:
        if self._process is not None:
            _end_process(self._process, term_wait=1.0)
        if self._console is not None:
            self._console.close()
            self._console = None
        with contextlib.suppress(OSError):
            AgentFiles(self._require_workdir()).ready.unlink()

    def _wait_until_ready(
        self, files: AgentFiles, started: float, stage: Callable[[str], None]
    ) -> None:
        """Wait for the agent's ``ready``; :class:`_Stalled` when the console stops moving."""
        deadline = started + self.boot_timeout
        size, moved = 0, time.monotonic()
        while not files.ready.exists():
            process = self._process
            assert process is not None
            if process.poll() is not None:
                raise NestedBootError(self._with_console(self._exited()))
            now = time.monotonic()
            try:
                current = self.console_log.stat().st_size
            except OSError:
                current = size
            if current != size:
                size, moved = current, now
                stage(_KERNEL_TIME.sub("", _last_line(self.console_log)))
            elif now - moved > self.stall_timeout:
                raise _Stalled(
                    f"no console output for {self.stall_timeout:g} s after "
                    f"{_last_line(self.console_log) or 'starting'!r}"
                )
            if now > deadline:
                raise NestedBootError(
                    self._with_console(f"L1 did not boot within {self.boot_timeout:g} s")
                )
            time.sleep(_POLL_S)

    # --- commands ------------------------------------------------------------

    def run(
        self,
        command: Sequence[str] | str,
        timeout: float | None,
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        stdin: int | None = None,
        terminal: bool = False,
    ) -> NestedResult:
        """Run ``command`` in L1 and wait at most ``timeout`` seconds (None: no limit).

        A sequence is an argv, a string is ``sh`` code. It starts in ``cwd``
        (default: the shared current directory) with :func:`command_environment`
        plus ``env``. ``on_stdout``/``on_stderr`` receive output as it arrives.

        With ``stdin`` (a host fd), the command's stdin and stdout are the
        console port: the fd's bytes stream in, and its end arrives as the
        console's end-of-file character; with ``terminal`` the fd is a
        person's terminal instead (put it in raw mode first): the escape keys
        work (Ctrl-A X ends the run with ``user_quit``) and nothing is sent
        at its end.

        Raises :class:`NestedTimeoutError` when the command overruns (it is
        killed in L1) and :class:`NestedError` when L1 dies or is stuck.
        """
        with self._lock:
            if not self.running:
                raise NestedError(self._with_console("the nested host is not running"))
            if self._wedged is not None:
                raise NestedError(f"the nested host is stuck: {self._wedged}")
            files = AgentFiles(self._require_workdir())
            script = command_script(
                command, Path(cwd).resolve() if cwd is not None else self.cwd,
                command_environment(env),
            )  # fmt: skip
            n = self._next
            try:
                files.command(n, "sh").write_text(script)
                if stdin is not None:
                    files.command(n, "console").write_bytes(b"")
                files.command(n, "ready").write_bytes(b"")
            except OSError as exc:
                raise NestedError(f"cannot hand command {n} to the nested host: {exc}") from exc
            self._next += 1  # the agent now waits for the next number
            stream = _Stream(self, files, n, on_stdout, on_stderr, stdin, terminal)
            try:
                return stream.wait(command, timeout)
            finally:
                stream.close()

    def _cancel(self, files: AgentFiles, n: int, stream: _Stream) -> bool:
        """Ask L1 to kill command ``n``; False (and the host marked stuck) if it does not."""
        try:
            files.command(n, "cancel").write_bytes(b"")
            deadline = time.monotonic() + CANCEL_GRACE_S
            while not files.command(n, "status").exists():
                stream.pump()
                if not self.running or time.monotonic() > deadline:
                    raise _Overdue
        except (_Overdue, OSError):
            self._wedged = f"command {n} could not be killed within {CANCEL_GRACE_S:g} s"
            return False
        return True

    # --- diagnostics -----------------------------------------------------------

    def console_tail(self, lines: int = _CONSOLE_TAIL_LINES, with_qemu_log: bool = False) -> str:
        """The last ``lines`` lines of L1's console log (and of QEMU's own log)."""
        paths = [self.console_log, self.qemu_log] if with_qemu_log else [self.console_log]
        parts = []
        for path in paths:
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            tail = [line for line in text.splitlines() if line.strip() and _QEMU_NOISE not in line][
                -lines:
            ]
            if tail:
                parts.append(f"--- {path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def _with_console(self, message: str, with_qemu_log: bool = True) -> str:
        if self.workdir is None:
            return message
        tail = self.console_tail(with_qemu_log=with_qemu_log)
        where = f"\nL1 console log: {self.console_log}" if self.keep_workdir else ""
        return f"{message}{where}" + (f"\n{tail}" if tail else "")


class _Stalled(Exception):
    """L1's console stopped moving while it booted (internal: start() retries)."""


class _Stream:
    """One running command: its output, its input relay, and the checks while it runs."""

    def __init__(
        self,
        host: NestedHost,
        files: AgentFiles,
        n: int,
        on_stdout: OutputSink | None,
        on_stderr: OutputSink | None,
        stdin: int | None,
        terminal: bool,
    ) -> None:
        self.host = host
        self.files = files
        self.n = n
        self.on_stdout = on_stdout
        self.out = _Tail(files.command(n, "out"), on_stdout)
        self.err = _Tail(files.command(n, "err"), on_stderr)
        self.l1_console = _Tail(host.console_log, None, keep=False)
        self.quit = threading.Event()
        self.relay = None
        self.console = host._console if stdin is not None else None
        if stdin is not None:
            self.relay = self._start_relay(stdin, terminal)

    def _start_relay(self, stdin: int, terminal: bool):  # -> InputRelay
        from pyvmm.host.console_input import EOT, InputRelay
        from pyvmm.host.terminal import EscapeFilter

        if self.console is None:
            raise NestedError("the nested host has no console port")
        relay = InputRelay(
            stdin,
            self.console.fileno(),
            end_of_input=b"" if terminal else EOT,
            escape=EscapeFilter(on_help=_write_terminal) if terminal else None,
            on_quit=self.quit.set,
        )
        relay.start(on_error=lambda message: self.quit.set())
        return relay

    def pump(self) -> None:
        """Move output along; wait up to one poll interval."""
        self.out.poll()
        self.err.poll()
        if self.console is not None:
            data = self.console.read(_POLL_S)
            if data and self.on_stdout is not None:
                self.on_stdout(data)
        else:
            time.sleep(_POLL_S)

    def wait(self, command: Sequence[str] | str, timeout: float | None) -> NestedResult:
        host = self.host
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        status_file = self.files.command(self.n, "status")
        while not status_file.exists():
            self.pump()
            if self.quit.is_set():
                host._wedged = "the user quit while a command ran"
                return NestedResult(0, "", self.err.text(), time.monotonic() - started, True)
            if not host.running:
                raise NestedError(host._with_console(self._died()))
            lockup = self._lasting_lockup()
            if lockup is not None:
                host._wedged = lockup
                raise NestedStallError(host._with_console(lockup, with_qemu_log=False))
            if deadline is not None and time.monotonic() > deadline:
                fate = (
                    "was killed"
                    if host._cancel(self.files, self.n, self)
                    else f"L1 did not kill it within {CANCEL_GRACE_S:g} s (L1 is stuck)"
                )
                raise NestedTimeoutError(
                    host._with_console(
                        f"`{describe(command)}` did not finish within {timeout:g} s in the "
                        f"nested host and {fate}{_output_tails(self.out, self.err)}",
                        with_qemu_log=False,
                    )
                )
        duration = time.monotonic() - started
        if self.console is not None and self.on_stdout is not None:
            self.console.drain(self.on_stdout, _DRAIN_IDLE_S, _DRAIN_LIMIT_S)
        self.out.poll()
        self.err.poll()
        return NestedResult(
            returncode=_read_status(status_file),
            stdout=self.out.text(),
            stderr=self.err.text(),
            duration=duration,
        )

    def _died(self) -> str:
        process = self.host._process
        code = process.returncode if process is not None else None
        return f"L1 (QEMU) exited with status {code} while command {self.n} ran"

    def _lasting_lockup(self) -> str | None:
        """A soft lockup L1 reports as lasting :data:`LOCKUP_FATAL_S` or more, if any."""
        new = self.l1_console.poll()
        worst = max((int(m.group(1)) for m in _LOCKUP.finditer(new)), default=0)
        if worst < LOCKUP_FATAL_S:
            return None
        return (
            f"L1 stopped making progress (its kernel reports a soft lockup of {worst} s) "
            f"while command {self.n} ran"
        )

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()


class _Overdue(Exception):
    """A wait's deadline passed (internal)."""


class _Tail:
    """Reads a growing file in increments, passing new bytes to an optional sink.

    With ``keep=False`` only the read position is kept, not the data.
    """

    def __init__(self, path: Path, sink: OutputSink | None, keep: bool = True) -> None:
        self.path = path
        self.sink = sink
        self.keep = keep
        self._data = bytearray()
        self._offset = 0

    def poll(self) -> bytes:
        """Read what was appended since the last call; return it."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return b""
        if chunk:
            self._offset += len(chunk)
            if self.keep:
                self._data += chunk
            if self.sink is not None:
                self.sink(chunk)
        return chunk

    def text(self) -> str:
        return self._data.decode("utf-8", "replace")


def _output_tails(out: _Tail, err: _Tail) -> str:
    parts = []
    for name, tail in (("stdout", out), ("stderr", err)):
        text = tail.text()[-_OUTPUT_TAIL_CHARS:].rstrip()
        if text:
            parts.append(f"\n--- its {name} (end) ---\n{text}")
    return "".join(parts)


def _read_status(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(_STATUS_MAX_BYTES + 1).decode("ascii", "replace").strip()
    except OSError as exc:
        raise NestedError(f"cannot read the L1 agent's status file {path}: {exc}") from None
    if len(text) > _STATUS_MAX_BYTES or not text.isdigit():
        raise NestedError(f"the L1 agent wrote a malformed status {text[:20]!r} to {path}")
    return int(text)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies.

    So a killed test run leaves no orphaned QEMU behind. libc is loaded here,
    before the fork, so the child only makes one call.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _end_process(process: subprocess.Popen[bytes], term_wait: float = 3.0) -> None:
    """SIGTERM, then SIGKILL if QEMU does not exit within ``term_wait`` s; reap it."""
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.terminate()
        try:
            process.wait(term_wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


def _last_line(path: Path) -> str:
    """The last non-empty line of a log, stripped (reads only its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            data = f.read()
    except OSError:
        return ""
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip() and _QEMU_NOISE not in line:
            return line.strip()
    return ""


def _write_terminal(text: str) -> None:
    """Show the escape help on the terminal (stderr, which is the same tty)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()
