"""``pyvmm exec`` through a nested host, on hosts whose KVM cannot run Linux at speed.

The decision is :func:`pyvmm.nested.placement.choose`'s, as for ``pyvmm
run``. When it says "nested", this process boots an L1
(:class:`~pyvmm.nested.host.NestedHost`) and runs the same ``pyvmm exec``
there with ``--nested never``: the VM, its vsock socket and the agent's
connection all live in L1, where they can reach each other.

- Everything is resolved here first: the default guest is fetched and
  built on this host (L1 sees the host's files read-only), every path is
  made absolute, and the inner command gets explicit flags.
- Writable in L1: the current directory and ``/tmp`` (always, by the
  nested host), the snapshot cache (so a snapshot made in one L1 serves the
  next ``pyvmm exec``) and the directories ``--get`` writes to.
- stdin goes through the nested host's console port in frames
  (:mod:`pyvmm.sandbox.stdin_frames`): binary input and its end arrive
  intact. The inner command's stdout comes back through the same port,
  its stderr through the nested host's files; both as they come.
- The exit status is the inner ``pyvmm exec``'s; 125 with one line when the
  nested host itself fails; 130/143 after SIGINT/SIGTERM (L1 is stopped).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from pyvmm.cli_exec import EXIT_PYVMM, ExecPlan, output_writer
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.sandbox.config import SandboxConfig

#: Seconds L1 may need beyond the command's own ``--timeout``: its boot, Python's
#: start there, and a first boot of the guest to fill the snapshot cache.
HOST_MARGIN_S = 1200.0


def placement_for(config: SandboxConfig, mode: str) -> bool:
    """True if this sandbox runs in a nested host (printing the placement's notice)."""
    from pyvmm.doctor import virtualization_kind
    from pyvmm.nested.placement import Where, choose, inside_nested_host, is_linux_kernel
    from pyvmm.sandbox.guest import resolve_guest

    kernel, _, _ = resolve_guest(config)
    placement = choose(
        mode, is_linux_kernel(kernel), virtualization_kind(), inside_nested=inside_nested_host()
    )
    nested = placement.where is Where.NESTED
    if nested and config.nets:
        raise ConfigError(
            "--net: the TAP device of a sandbox in the nested host would live inside it, out "
            "of this host's reach; use --nested never (slow here), or a host with VMX/SVM"
        )
    if placement.notice:
        click.echo(placement.notice, err=True)
    return nested


def inner_argv(config: SandboxConfig, plan: ExecPlan, cache_dir: Path) -> list[str]:
    """The same ``pyvmm exec`` for L1: explicit flags, absolute paths, framed stdin."""
    from pyvmm.sandbox.guest import resolve_guest

    kernel, initrd, cmdline = resolve_guest(config)
    args = ["--nested", "never", "--stdin-frames", "--kernel", str(kernel), "--cmdline", cmdline]
    args += ["--initrd", str(initrd)] if initrd is not None else []
    args += ["--cpus", str(config.vcpus), "--memory", f"{config.mem_size >> 20}M"]
    args += ["--cpu-template", config.cpu_template, "--cache-dir", str(cache_dir)]
    for drive in config.drives:
        text = (
            f"path={drive.path}"
            + (",ro" if drive.read_only else "")
            + (",root" if drive.root else "")
        )
        if drive.rate_limit is not None:
            raise ConfigError("--drive rate limits are not passed to a nested host; drop them")
        args += ["--drive", text]
    args += ["--rng"] if config.rng else []
    args += ["--fresh-boot"] if config.fresh_boot else []
    args += [] if config.confine else ["--no-confine"]
    for host, guest in plan.puts:
        args += ["--put", f"{host.resolve()}:{guest}"]
    for guest, host in plan.gets:
        args += ["--get", f"{guest}:{host.resolve()}"]
    for name, value in plan.env.items():
        args += ["--env", f"{name}={value}"]
    args += ["--cwd", plan.cwd] if plan.cwd is not None else []
    args += ["--timeout", repr(plan.timeout)] if plan.timeout is not None else []
    # The module itself, not `pyvmm exec`: the same command without the CLI's other imports.
    return [sys.executable, "-m", "pyvmm.cli_exec", *args, "--", *plan.argv]


def writable_dirs(plan: ExecPlan, cache_dir: Path) -> list[Path]:
    """Directories L1 must write: the snapshot cache and where ``--get`` puts files."""
    dirs = [cache_dir]
    for _, host in plan.gets:
        parent = host.resolve().parent
        if parent == Path("/"):
            raise ConfigError(f"--get {host}: a nested host cannot write directly in /")
        if parent not in dirs:
            dirs.append(parent)
    return dirs


def run_nested(context: click.Context, config: SandboxConfig, plan: ExecPlan) -> int:
    """Run ``plan`` in a sandbox in a new nested host; the exit status."""
    from pyvmm.nested.host import NestedHost
    from pyvmm.nested.signals import Signalled, signals_raise
    from pyvmm.sandbox.cache import SnapshotCache
    from pyvmm.sandbox.stdin_frames import encode_to_pipe

    cache_dir = SnapshotCache.default(config.cache_dir).root
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv = inner_argv(config, plan, cache_dir)
        writable = writable_dirs(plan, cache_dir)
    except (OSError, PyvmmError) as exc:
        _error(f"{exc}")
        return EXIT_PYVMM
    stdin = _stdin_fd()
    frames = encode_to_pipe(stdin, on_error=lambda message: None)
    timeout = None if plan.timeout is None else plan.timeout + HOST_MARGIN_S
    try:
        with signals_raise():
            host = NestedHost(writable=writable, notify=_error_line)
            try:
                host.start()
                result = host.run(
                    argv, timeout, stdin=frames, on_stdout=output_writer(sys.stdout.fileno()),
                    on_stderr=output_writer(sys.stderr.fileno()),
                )  # fmt: skip
            finally:
                with contextlib.suppress(Signalled):
                    host.stop(graceful=False)
        return result.returncode
    except Signalled as signalled:
        _error_line(f"pyvmm: received {signalled.name}; the nested host was stopped")
        return signalled.exit_status
    except PyvmmError as exc:
        _error(f"the nested host failed: {exc}")
        return EXIT_PYVMM
    finally:
        with contextlib.suppress(OSError):
            os.close(frames)


def _stdin_fd() -> int:
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
        return fd
    except (AttributeError, ValueError, OSError):
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _error(message: str) -> None:
    first, _, rest = message.partition("\n")
    _error_line(f"pyvmm: error: {first}")
    for line in rest.splitlines():
        _error_line(f"  {line}")


def _error_line(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
