"""``Sandbox``: a throw-away microVM that runs commands and moves files for its caller.

    from pyvmm.sandbox import Sandbox

    with Sandbox(memory="256M") as sandbox:
        sandbox.put("src/", "/work/src")
        result = sandbox.exec(["sh", "-c", "cd /work/src && make test"], timeout=600)
        print(result.exit_code, result.stdout.decode())
        sandbox.get("/work/src/report.xml", "report.xml")

A sandbox is fresh: the first one of a configuration boots the guest and
snapshots it once its agent answers; every sandbox (that first one too) is
a clone of that snapshot, restored in milliseconds with its own disks,
vsock socket, CID, TAPs and MACs, reseeded RNG, host name and clock
(:mod:`pyvmm.sandbox.launch`). It is confined by default
(:mod:`pyvmm.sandbox.runners`), and its network is off unless asked for.

Several execs may run in one sandbox, one after another or at once from
several threads (each on its own agent connection). :meth:`fork` makes
running copies of a sandbox; :meth:`snapshot` saves one to a directory that
:meth:`Sandbox.restore` brings back. Every failure is a typed
:class:`~pyvmm.sandbox.errors.SandboxError`: the VM's own (it did not boot,
crashed, stopped: :class:`~pyvmm.sandbox.errors.SandboxVmError`, quoting its
console), the agent's, or the caller's (:class:`~pyvmm.errors.ConfigError`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import ConfigError
from pyvmm.sandbox.cache import DISK_DIR, MEM_FILE, STATE_FILE, CacheEntry, read_entry
from pyvmm.sandbox.client import DEFAULT_MAX_OUTPUT, AgentClient
from pyvmm.sandbox.config import SandboxConfig, sandbox_config
from pyvmm.sandbox.errors import (
    AgentDisconnected,
    AgentTimeout,
    AgentUnavailable,
    SandboxClosed,
    SandboxError,
)
from pyvmm.sandbox.identity import clock_command
from pyvmm.sandbox.launch import (
    Launched,
    launch_cached,
    launch_fresh,
    restore_entry,
    vm_error,
)
from pyvmm.sandbox.results import ExecResult, TransferStats
from pyvmm.sandbox.runners import Runner, choose_runner
from pyvmm.sandbox.stdin_feed import StdinSource

#: Seconds a VM may take to report its stop once its agent's connection dropped.
STOP_GRACE = 2.0
#: Agent errors that may mean the VM itself went away (checked, then reported as such).
_VM_SIGNS = (AgentDisconnected, AgentTimeout, AgentUnavailable)


@dataclass(frozen=True)
class LastExec:
    """The most recent exec of a sandbox (the pytest plugin shows it on failure)."""

    argv: tuple[str, ...]
    result: ExecResult | None
    error: str | None = None


class Sandbox:
    """One sandbox; see the module docstring.

    Give a :class:`~pyvmm.sandbox.config.SandboxConfig` or the keyword
    arguments of :func:`~pyvmm.sandbox.config.sandbox_config` (``kernel``,
    ``initrd``, ``cmdline``, ``cpus``, ``memory``, ``drives``, ``nets``,
    ``rng``, ``confine``, ``fresh_boot``, ``cache_dir``, ...). The VM is
    ready when the constructor returns.
    """

    def __init__(self, config: SandboxConfig | None = None, **options: object) -> None:
        if config is None:
            config = sandbox_config(**options)  # type: ignore[arg-type]
        elif options:
            raise ConfigError("give a SandboxConfig or keyword options, not both")
        runner = choose_runner(config)
        launched = (
            launch_fresh(config, runner) if config.fresh_boot else launch_cached(config, runner)
        )
        self._setup(config, runner, launched)

    def _setup(self, config: SandboxConfig, runner: Runner, launched: Launched) -> None:
        self.config = config
        self._runner = runner
        self._launched = launched
        self._vm = launched.vm
        self._lock = threading.Lock()
        self._idle: list[AgentClient] = [launched.agent] if launched.agent is not None else []
        self._busy: set[AgentClient] = set()
        self._closed = False
        self._paused = False
        #: The most recent exec (argv, result or error), for reports.
        self.last_exec: LastExec | None = None

    @classmethod
    def _adopt(
        cls, config: SandboxConfig, runner: Runner, launched: Launched, *, paused: bool = False
    ) -> Sandbox:
        """A Sandbox around a VM made elsewhere (a fork, a pool, a saved snapshot)."""
        sandbox = cls.__new__(cls)
        sandbox._setup(config, runner, launched)
        sandbox._paused = paused
        return sandbox

    # --- what it is -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The sandbox's name (its guest's host name)."""
        return self._launched.identity.name

    @property
    def cid(self) -> int:
        return self._launched.identity.cid

    @property
    def taps(self) -> tuple[str, ...]:
        """The host TAP device of each network interface."""
        return self._launched.identity.taps

    @property
    def macs(self) -> tuple[str, ...]:
        return self._launched.identity.macs

    @property
    def vsock_uds(self) -> Path:
        """The VM's vsock Unix socket (for other agent-speaking tools)."""
        return self._vm.vsock_uds

    @property
    def from_cache(self) -> bool | None:
        """True if restored from an existing snapshot; False if this one booted the
        template; None for a fresh boot or a fork."""
        return self._launched.cached

    @property
    def timings(self) -> Mapping[str, float]:
        """Seconds spent making it: ``template`` (cache lookup or boot), ``disks``,
        ``restore``, ``agent`` (first answer and identity), or ``boot``."""
        return dict(self._launched.timings)

    def console_tail(self, chars: int = 2000) -> str:
        """The end of the guest's serial console."""
        return self._vm.console_tail(chars)

    @property
    def alive(self) -> bool:
        return not self._closed and self._vm.alive()

    # --- commands and files ------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: StdinSource | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` in the guest; see :meth:`AgentClient.exec` for the details.

        The exit code follows the shell: the command's status, 128+N for a
        signal, 124 for ``timeout``, 126/127 when it cannot be run or is not
        found. Output goes to the callbacks as it comes, else it is kept.
        """
        if isinstance(argv, str | bytes) or not argv:
            raise ConfigError(
                "argv must be a non-empty list of strings, e.g. ['sh', '-c', 'echo hi']"
            )
        shown = tuple(str(a) for a in argv)
        try:
            with self._client("exec") as client:
                result = client.exec(
                    argv, env=env, cwd=cwd, uid=uid, gid=gid, stdin=stdin, timeout=timeout,
                    on_stdout=on_stdout, on_stderr=on_stderr, max_output=max_output,
                )  # fmt: skip
        except SandboxError as exc:
            self.last_exec = LastExec(shown, None, str(exc))
            raise
        self.last_exec = LastExec(shown, result)
        return result

    def put(
        self, host_path: str | os.PathLike[str], guest_path: str, *, timeout: float | None = None
    ) -> TransferStats:
        """Copy a host file or directory tree into the guest (modes and mtimes kept)."""
        with self._client("put") as client:
            return client.put(host_path, guest_path, timeout=timeout)

    def get(
        self, guest_path: str, host_path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> TransferStats:
        """Copy a guest file or directory tree to ``host_path`` (checked as hostile)."""
        with self._client("get") as client:
            return client.get(guest_path, host_path, timeout=timeout)

    def send_signal(self, signo: int) -> None:
        """Send ``signo`` to the process group of every command running now (safe in a
        signal handler: it only queues the signal for the threads running them)."""
        for client in list(self._busy):
            client.send_signal(signo)

    @contextlib.contextmanager
    def _client(self, what: str) -> Iterator[AgentClient]:
        """An agent connection of its own for one operation (reused when idle)."""
        with self._lock:
            self._check_open(what)
            if self._paused:
                raise SandboxError(f"cannot {what}: the sandbox is paused (resume() it first)")
            client = self._idle.pop() if self._idle else None
        if client is None:
            try:
                client = AgentClient.connect(self.vsock_uds, timeout=self.config.ready_timeout)
            except SandboxError as exc:
                raise self._explain(exc, what) from None
        with self._lock:
            self._busy.add(client)
        try:
            yield client
        except _VM_SIGNS as exc:
            raise self._explain(exc, what) from None
        finally:
            with self._lock:
                self._busy.discard(client)
                if not client.closed and not self._closed:
                    self._idle.append(client)
                else:
                    client.close()

    def _explain(self, exc: SandboxError, what: str) -> SandboxError:
        """The VM's failure if it stopped (quoting its console), else ``exc`` itself.

        A guest that powers off or crashes drops the agent's connection a
        moment before the VMM records why it stopped: give it that moment
        (not for a timeout: a VM that is still running is the likely cause).
        """
        grace = 0.0 if isinstance(exc, AgentTimeout) else STOP_GRACE
        deadline = time.monotonic() + grace
        while self._vm.alive():
            if time.monotonic() >= deadline:
                return exc
            time.sleep(0.02)
        return vm_error(self._vm, f"{what} failed: {exc}")

    # --- lifecycle -----------------------------------------------------------------------

    def pause(self) -> None:
        """Stop the guest where it is (its clock too); :meth:`resume` continues it."""
        with self._lock:
            self._check_open("pause")
            if self._busy:
                raise SandboxError("cannot pause while an operation runs in the sandbox")
            self._vm.pause()
            self._paused = True

    def resume(self, *, set_clock: bool = False) -> None:
        """Continue a paused guest; ``set_clock`` also sets its clock to the host's."""
        with self._lock:
            self._check_open("resume")
            self._vm.resume()
            self._paused = False
        if set_clock:
            result = self.exec(clock_command(), timeout=30)
            if result.exit_code != 0:
                raise SandboxError(
                    "setting the guest's clock failed: " + result.stderr.decode(errors="replace")
                )

    def snapshot(self, directory: str | os.PathLike[str]) -> Path:
        """Save the sandbox to a new ``directory`` (state, memory, disk copies, meta);
        :meth:`Sandbox.restore` makes running copies of it. The sandbox carries on."""
        from pyvmm.sandbox.snapshots import save_sandbox

        target = Path(directory)
        with self._lock:
            self._check_open("snapshot")
            if self._busy:
                raise SandboxError("cannot snapshot while an operation runs in the sandbox")
            was_paused = self._paused
            if not was_paused:
                self._vm.pause()
            try:
                save_sandbox(self._vm, self._launched, self._runner.kind, self.config, target)
            finally:
                if not was_paused:
                    self._vm.resume()
        return target

    @classmethod
    def restore(
        cls, directory: str | os.PathLike[str], config: SandboxConfig | None = None
    ) -> Sandbox:
        """A running copy of a :meth:`snapshot` directory (which stays as it is).

        ``config`` (default: a fresh default one) sets how it runs:
        confinement, timeouts, network interfaces.
        """
        config = config or sandbox_config()
        entry = read_entry(Path(directory))
        runner = choose_runner(config)
        launched = restore_entry(entry, config, runner)
        return cls._adopt(config, runner, launched)

    def fork(self, n: int = 1) -> list[Sandbox]:
        """``n`` running copies of this sandbox as it is now, each with its own
        identity (disks, socket, CID, TAPs, MACs, RNG, host name)."""
        from pyvmm.sandbox.snapshots import fork_entries

        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 256:
            raise ConfigError(f"fork takes a number of copies from 1 to 256, not {n!r}")
        with self._fork_snapshot() as entry:
            return [
                Sandbox._adopt(self.config, self._runner, launched)
                for launched in fork_entries(entry, self.config, self._runner, n)
            ]

    @contextlib.contextmanager
    def _fork_snapshot(self) -> Iterator[CacheEntry]:
        directory = self._launched.workdir.path / f"fork-{time.monotonic_ns()}"
        self.snapshot(directory)
        try:
            yield read_entry(directory)
        finally:
            _remove_snapshot(directory)

    def close(self) -> None:
        """Throw the sandbox away: its VM, connections, disks and directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = self._idle + list(self._busy)
            self._idle = []
        for client in clients:
            client.close()
        try:
            self._vm.close()
        finally:
            self._launched.workdir.remove()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SandboxClosed(f"cannot {what}: the sandbox is closed")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "paused" if self._paused else "running"
        return f"<Sandbox {self.name} {state}>"


def _remove_snapshot(directory: Path) -> None:
    for name in (STATE_FILE, MEM_FILE):
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    import shutil

    shutil.rmtree(directory / DISK_DIR, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
