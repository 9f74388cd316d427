"""A nested KVM host: a Linux L1 under QEMU-TCG with a working ``/dev/kvm``.

Why: on a PVM host guest kernel code is emulated about 3000 times slower
(ENVIRONMENT.md), so a real Linux guest cannot be booted there. QEMU's TCG
emulates AMD SVM on any CPU, so Debian's generic kernel booted under TCG gets
a real ``/dev/kvm`` from ``kvm_amd``. The host's ``/`` is shared read-only
into L1 over virtio-9p and L1 runs commands ``chroot``-ed into it, so the
host's own Python and pyvmm run there unchanged.

What L1 sees (at the same absolute paths as the host): everything read-only,
except the current directory, ``/tmp`` and the work directory, which are
writable 9p shares; ``/proc``, ``/sys``, ``/dev`` (with ``/dev/kvm``) and
``/run`` are L1's own. Commands get ``TMPDIR`` on an L1 tmpfs. The files the
host and L1 exchange are described in :mod:`pyvmm.nested.agent`.

Every wait here is bounded: boot, each command, and shutdown. A command that
overruns is killed in L1 and reported with :class:`NestedTimeoutError`; an L1
that dies or hangs is reported with the tail of its console log, which is
kept in :attr:`NestedHost.console_log`.
"""

from __future__ import annotations

import contextlib
import os
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
from pyvmm.nested.agent import (
    INIT_SCRIPT,
    L1_MODULES,
    L1_TMPDIR,
    AgentFiles,
    Share,
    command_script,
    config_script,
    plan_shares,
)

QEMU = "qemu-system-x86_64"
#: L1's kernel command line, before :func:`tsc_arguments`.
L1_CMDLINE = "console=ttyS0 panic=-1 mitigations=off"

DEFAULT_BOOT_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 15.0
CANCEL_GRACE_S = 10.0
_POLL_S = 0.05
_CONSOLE_TAIL_LINES = 20
#: QEMU warns about every CPU feature TCG lacks, twice; not worth a tail line.
_QEMU_NOISE = "TCG doesn't support requested feature"
_OUTPUT_TAIL_CHARS = 2000


class NestedError(HostError):
    """The nested host failed: L1 did not boot, died, or stopped answering."""


class NestedBootError(NestedError):
    """L1 did not reach its agent loop."""


class NestedTimeoutError(NestedError):
    """A command did not finish in time (it was killed in L1)."""


@dataclass(frozen=True)
class NestedResult:
    """What a command did: exit status, output, and wall time seen by the host."""

    returncode: int
    stdout: str
    stderr: str
    duration: float


OutputSink = Callable[[bytes], None]


def qemu_argv(
    kernel: Path,
    initrd: Path,
    shares: Sequence[Share],
    console_log: Path,
    *,
    memory_mib: int = 2048,
    cpus: int = 2,
    cmdline: str = L1_CMDLINE,
    qemu: str = QEMU,
) -> list[str]:
    """The QEMU command line of an L1 (TCG with SVM and NPT, one 9p device per share)."""
    argv = [
        qemu,
        "-M", "microvm,acpi=on",
        "-accel", "tcg",
        "-cpu", "EPYC,+svm,+npt",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-monitor", "none",
        "-serial", f"file:{console_log}",
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline,
    ]  # fmt: skip
    for index, share in enumerate(shares):
        fsdev = (
            f"local,id=fs{index},path={_qemu_value(share.host_path)},security_model=none,"
            f"multidevs=remap" + (",readonly=on" if share.readonly else "")
        )
        argv += ["-fsdev", fsdev]
        argv += ["-device", f"virtio-9p-device,fsdev=fs{index},mount_tag={share.tag}"]
    return argv


def tsc_arguments(cpuinfo: str | None = None) -> str:
    """``tsc_early_khz=<host TSC> tsc=reliable``, or "" if the frequency is unknown.

    Why: under TCG the guest's TSC is the host's, but L1 has no reference
    clock to calibrate it against except the emulated PIT (microvm has no HPET
    and no ACPI PM timer), and on a busy host that calibration fails in about
    half of the boots, after which the kernel hangs before /init. Telling the
    kernel the frequency skips the calibration. ``cpu MHz`` in /proc/cpuinfo
    is the TSC frequency on the virtual machines this is meant for (the
    nested host is only used where KVM has no VMX/SVM).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                khz = round(float(value) * 1000)
            except ValueError:
                return ""
            return f"tsc_early_khz={khz} tsc=reliable" if khz > 0 else ""
    return ""


def _qemu_value(path: Path) -> str:
    """A path as a QEMU option value (a comma is written twice)."""
    return str(path).replace(",", ",,")


def prepare_l1_images(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """The L1 kernel (Debian's generic flavour, which has 9p) and its initramfs.

    The kernel is the ELF vmlinux extracted from the bzImage: QEMU boots it
    through its PVH entry, which saves the 3-4 s the bzImage spends
    decompressing itself under TCG (L1 is ready in about 5 s instead of 9).
    Where it cannot be extracted, the bzImage is booted instead. The first call
    downloads the kernel package (about 70 MB) through apt; everything is
    cached by the guest kit afterwards.
    """
    from pyvmm.errors import PyvmmError
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs
    from pyvmm.guestkit.vmlinux import kernel_vmlinux

    package = fetch_kernel("generic", cache_dir=cache_dir)
    try:
        kernel = kernel_vmlinux(package)
    except PyvmmError:
        kernel = package.vmlinuz
    initrd = build_initramfs(package, L1_MODULES, INIT_SCRIPT, cache_dir=cache_dir)
    return kernel, initrd


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


class NestedHost:
    """One L1 under QEMU-TCG that runs commands for the host.

    ``cwd`` (default: the current directory) is shared writable and is where
    commands start; ``workdir`` holds the console log and the agent's files
    (default: a new temporary directory, removed by :meth:`stop` unless
    ``keep_workdir``). A given ``workdir`` is kept; its ``agent/`` directory is
    emptied at start. Use as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(
        self,
        *,
        cwd: Path | str | None = None,
        workdir: Path | str | None = None,
        keep_workdir: bool = False,
        share_tmp: bool = True,
        memory_mib: int = 2048,
        cpus: int = 2,
        cache_dir: Path | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S,
        qemu: str = QEMU,
        kernel_cmdline: str | None = None,
        host_cache: str = "loose",
    ) -> None:
        self.cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.keep_workdir = keep_workdir or workdir is not None
        self.share_tmp = share_tmp
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.cache_dir = cache_dir
        self.boot_timeout = boot_timeout
        self.qemu = qemu
        self.host_cache = host_cache
        self.kernel_cmdline = (
            kernel_cmdline
            if kernel_cmdline is not None
            else f"{L1_CMDLINE} {tsc_arguments()}".strip()
        )
        #: Seconds from QEMU's start to the agent's ``ready`` (None before).
        self.boot_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
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
        """Boot L1 and wait until its agent serves commands."""
        if self._process is not None:
            raise NestedError("this nested host was already started")
        if shutil.which(self.qemu) is None:
            raise NestedError(
                f"{self.qemu} not found on PATH (Debian: apt-get install qemu-system-x86)"
            )
        kernel, initrd = prepare_l1_images(self.cache_dir)
        try:
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="pyvmm-nested-")).resolve()
            files = AgentFiles(self.workdir)
            shutil.rmtree(files.directory, ignore_errors=True)
            files.directory.mkdir(parents=True)
            self.shared_dir.mkdir(exist_ok=True)
            tmp = Path(tempfile.gettempdir()).resolve() if self.share_tmp else None
            shares = plan_shares(self.workdir, self.cwd, tmp)
            files.config.write_text(config_script(self.workdir, shares, self.host_cache))
            self.console_log.write_bytes(b"")
        except OSError as exc:
            raise NestedError(f"cannot prepare the nested host's work directory: {exc}") from exc
        argv = qemu_argv(
            kernel, initrd, shares, self.console_log, memory_mib=self.memory_mib, cpus=self.cpus,
            cmdline=self.kernel_cmdline, qemu=self.qemu,
        )  # fmt: skip
        started = time.monotonic()
        with open(self.qemu_log, "wb") as log:
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
        try:
            self._wait_for(files.ready, started + self.boot_timeout, failure=NestedBootError)
        except (_Overdue, NestedError) as exc:
            message = (
                str(exc)
                if isinstance(exc, NestedError)
                else self._with_console(f"L1 did not boot within {self.boot_timeout:g} s")
            )
            self.keep_workdir = True  # the message points into it
            self.stop()
            raise NestedBootError(message) from None
        self.boot_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Power L1 off (killing QEMU if it does not exit in time). Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                AgentFiles(self._require_workdir()).shutdown.write_bytes(b"")
            try:
                process.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(3)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        if self._own_workdir and not self.keep_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- commands ------------------------------------------------------------

    def run(
        self,
        command: Sequence[str] | str,
        timeout: float,
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
    ) -> NestedResult:
        """Run ``command`` in L1 and wait at most ``timeout`` seconds for it.

        A sequence is an argv, a string is ``sh`` code. It starts in ``cwd``
        (default: the shared current directory) with :func:`command_environment`
        plus ``env``. ``on_stdout``/``on_stderr`` receive output as it arrives.
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
                files.command(n, "ready").write_bytes(b"")
            except OSError as exc:
                raise NestedError(f"cannot hand command {n} to the nested host: {exc}") from exc
            self._next += 1  # the agent now waits for the next number
            started = time.monotonic()
            out = _Tail(files.command(n, "out"), on_stdout)
            err = _Tail(files.command(n, "err"), on_stderr)
            status_file = files.command(n, "status")
            try:
                self._wait_for(status_file, started + timeout, tails=(out, err))
            except _Overdue:
                fate = (
                    "was killed"
                    if self._cancel(files, n, out, err)
                    else f"L1 did not kill it within {CANCEL_GRACE_S:g} s (L1 is stuck)"
                )
                raise NestedTimeoutError(
                    self._with_console(
                        f"`{describe(command)}` did not finish within {timeout:g} s in the "
                        f"nested host and {fate}{_output_tails(out, err)}",
                        with_qemu_log=False,
                    )
                ) from None
            duration = time.monotonic() - started
            out.poll()
            err.poll()
            return NestedResult(
                returncode=_read_status(status_file),
                stdout=out.text(),
                stderr=err.text(),
                duration=duration,
            )

    def _cancel(self, files: AgentFiles, n: int, out: _Tail, err: _Tail) -> bool:
        """Ask L1 to kill command ``n``; False (and the host marked stuck) if it does not."""
        try:
            files.command(n, "cancel").write_bytes(b"")
            self._wait_for(
                files.command(n, "status"), time.monotonic() + CANCEL_GRACE_S, tails=(out, err)
            )
        except (_Overdue, NestedError, OSError):
            self._wedged = f"command {n} could not be killed within {CANCEL_GRACE_S:g} s"
            return False
        return True

    def _wait_for(
        self,
        path: Path,
        deadline: float,
        tails: Sequence[_Tail] = (),
        failure: type[NestedError] = NestedError,
    ) -> None:
        """Poll until ``path`` exists; raise ``failure`` if QEMU exits, :class:`_Overdue`
        at ``deadline``."""
        process = self._process
        assert process is not None
        while not path.exists():
            for tail in tails:
                tail.poll()
            if process.poll() is not None:
                raise failure(
                    self._with_console(f"L1 (QEMU) exited with status {process.returncode}")
                )
            if time.monotonic() > deadline:
                raise _Overdue
            time.sleep(_POLL_S)

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
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def _with_console(self, message: str, with_qemu_log: bool = True) -> str:
        if self.workdir is None:
            return message
        tail = self.console_tail(with_qemu_log=with_qemu_log)
        return f"{message}\nL1 console log: {self.console_log}" + (f"\n{tail}" if tail else "")


class _Overdue(Exception):
    """A command's deadline passed (internal: run() turns it into a timeout error)."""


class _Tail:
    """Reads a growing file in increments, passing new bytes to an optional sink."""

    def __init__(self, path: Path, sink: OutputSink | None) -> None:
        self.path = path
        self.sink = sink
        self._data = bytearray()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(len(self._data))
                chunk = f.read()
        except OSError:
            return
        if chunk:
            self._data += chunk
            if self.sink is not None:
                self.sink(chunk)

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
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise NestedError(f"the L1 agent wrote a malformed status {text!r} to {path}") from None


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
