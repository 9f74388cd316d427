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

This module holds the host's life cycle and its commands' hand-over; the
parts with a job of their own live beside it: the QEMU command line
(:mod:`pyvmm.nested.qemu`), QEMU as a child process
(:mod:`pyvmm.nested.qemu_process`), the boot watchdog
(:mod:`pyvmm.nested.boot_watch`), the console log
(:mod:`pyvmm.nested.console_log`), a running command
(:mod:`pyvmm.nested.command_stream`) and the error types
(:mod:`pyvmm.nested.errors`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pyvmm.nested import console_log as logs
from pyvmm.nested import qemu_process
from pyvmm.nested import workdir as workdirs
from pyvmm.nested.agent import (
    L1_TMPDIR,
    AgentFiles,
    command_script,
    config_script,
    plan_shares,
)
from pyvmm.nested.boot_watch import (
    BOOT_ATTEMPTS,
    DEFAULT_BOOT_TIMEOUT_S,
    DEFAULT_STALL_S,
    Stalled,
    exited,
    wait_until_ready,
)
from pyvmm.nested.command_stream import CommandStream, NestedResult, OutputSink, describe
from pyvmm.nested.console import ConsoleChannel
from pyvmm.nested.errors import (
    NestedBootError,
    NestedError,
    NestedStallError,
    NestedTimeoutError,
)
from pyvmm.nested.qemu import QEMU, TCG_ACCEL, default_cmdline, prepare_l1_images, qemu_argv

__all__ = [
    "BOOT_ATTEMPTS",
    "DEFAULT_BOOT_TIMEOUT_S",
    "DEFAULT_STALL_S",
    "NestedBootError",
    "NestedError",
    "NestedHost",
    "NestedResult",
    "NestedStallError",
    "NestedTimeoutError",
    "OutputSink",
    "command_environment",
    "describe",
]

SHUTDOWN_TIMEOUT_S = 15.0
_RETRY_TERM_WAIT_S = 1.0


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
            qemu_process.end(process)
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
                        raise NestedBootError(self.with_console(exited(self._process)))
                    self._wait_until_ready(files, started, progress.stage)
                except Stalled as stall:
                    self._kill_for_retry()
                    if attempt == self.boot_attempts:
                        raise NestedBootError(
                            self.with_console(f"L1 stalled while booting, {attempt} times: {stall}")
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
            self._process = qemu_process.spawn(argv, log, self.qemu)

    def _kill_for_retry(self) -> None:
        if self._process is not None:
            qemu_process.end(self._process, term_wait=_RETRY_TERM_WAIT_S)
        if self._console is not None:
            self._console.close()
            self._console = None
        with contextlib.suppress(OSError):
            AgentFiles(self._require_workdir()).ready.unlink()

    def _wait_until_ready(
        self, files: AgentFiles, started: float, stage: Callable[[str], None]
    ) -> None:
        """Wait for the agent's ``ready``; :class:`Stalled` when the console stops moving."""
        process = self._process
        assert process is not None
        wait_until_ready(
            process, self.console_log, files.ready, started=started,
            boot_timeout=self.boot_timeout, stall_timeout=self.stall_timeout, stage=stage,
            explain=self.with_console,
        )  # fmt: skip

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
                raise NestedError(self.with_console("the nested host is not running"))
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
            stream = CommandStream(
                self, files, n, self._console, on_stdout, on_stderr, stdin, terminal
            )
            try:
                return stream.wait(command, timeout)
            finally:
                stream.close()

    def exit_status(self) -> int | None:
        """QEMU's exit status, once it has been seen to exit (None before)."""
        return self._process.returncode if self._process is not None else None

    def mark_stuck(self, reason: str) -> None:
        """Refuse further commands: one could not be ended, or the user quit."""
        self._wedged = reason

    # --- diagnostics -----------------------------------------------------------

    def console_tail(self, lines: int = logs.TAIL_LINES, with_qemu_log: bool = False) -> str:
        """The last ``lines`` lines of L1's console log (and of QEMU's own log)."""
        paths = [self.console_log, self.qemu_log] if with_qemu_log else [self.console_log]
        return logs.tails(paths, lines)

    def with_console(self, message: str, with_qemu_log: bool = True) -> str:
        """``message`` with the tail of L1's logs (and where the console log is kept)."""
        if self.workdir is None:
            return message
        tail = self.console_tail(with_qemu_log=with_qemu_log)
        where = f"\nL1 console log: {self.console_log}" if self.keep_workdir else ""
        return f"{message}{where}" + (f"\n{tail}" if tail else "")
