"""``pyvmm exec``: run one command in a fresh, throw-away sandbox.

    pyvmm exec [VM options] [--put HOST:GUEST]... [--get GUEST:HOST]...
               [--env NAME=VALUE]... [--cwd DIR] [--timeout SECONDS] -- COMMAND [ARG...]

A sandbox (:class:`~pyvmm.sandbox.sandbox.Sandbox`) is made from the VM
options (the default guest unless ``--kernel`` is given), the ``--put``
files go in, COMMAND runs with pyvmm's stdin forwarded to it and its stdout
and stderr streamed to pyvmm's as they come, the ``--get`` files come out
(also when the command failed), and the sandbox is thrown away.

Exit status, as ``docker run``'s:

- COMMAND's own status; 128+N when signal N killed it;
- 124 when ``--timeout`` killed it;
- 126 when it cannot be run, 127 when it is not found;
- 125 when pyvmm or the VM failed (a bad option, a boot failure, an agent
  that never answered, a guest crash, a failed ``--put``): one
  ``pyvmm: error:`` line, then the end of the guest's console when the VM
  was involved. A failed ``--get`` prints its error line and exits 125
  unless COMMAND already failed (then its status stays).

The first SIGINT or SIGTERM is forwarded to COMMAND's process group (so
Ctrl-C reaches it as it would locally); a second one abandons it: the VM is
thrown away and pyvmm exits 130 or 143.

On a host whose KVM cannot run guest kernel code at speed (PVM) a Linux
sandbox runs in a nested host exactly as ``pyvmm run`` does
(:mod:`pyvmm.nested.placement` decides, :mod:`pyvmm.cli_exec_nested`
relays): this same command runs there, with ``--nested never``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.nested.placement import MODES as NESTED_MODES

EXIT_PYVMM = 125


@dataclass(frozen=True)
class ExecPlan:
    """What to do in the sandbox, parsed from the command line."""

    argv: tuple[str, ...]
    puts: tuple[tuple[Path, str], ...] = ()
    gets: tuple[tuple[str, Path], ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None


def parse_put(text: str) -> tuple[Path, str]:
    """``HOST:GUEST``: split at the last ``:`` (a guest path has none), GUEST absolute."""
    host, sep, guest = text.rpartition(":")
    if not sep or not host or not guest.startswith("/"):
        raise ConfigError(f"--put {text[:100]!r} is not HOST:GUEST with an absolute GUEST path")
    return Path(host), guest


def parse_get(text: str) -> tuple[str, Path]:
    """``GUEST:HOST``: split at the first ``:`` (a guest path has none), GUEST absolute."""
    guest, sep, host = text.partition(":")
    if not sep or not host or not guest.startswith("/"):
        raise ConfigError(f"--get {text[:100]!r} is not GUEST:HOST with an absolute GUEST path")
    return guest, Path(host)


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not (name[0].isalpha() or name[0] == "_"):
            raise ConfigError(f"--env {item[:100]!r} is not NAME=VALUE")
        env[name] = value
    return env


def _fail(message: str, code: int = EXIT_PYVMM) -> None:
    """One ``pyvmm: error:`` line (what follows a first line is quoted, indented)."""
    first, _, rest = str(message).partition("\n")
    click.echo(f"pyvmm: error: {first}", err=True)
    for line in rest.splitlines():
        click.echo(f"  {line}", err=True)
    sys.exit(code)


class ExecCommand(click.Command):
    """Flag mistakes are pyvmm's 125 too, as one line (``docker run`` exits 125 for them)."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            _fail(exc.format_message())


@click.command("exec", cls=ExecCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kernel", default=None, help="Kernel (default: the guest kit's guest with the agent)."
)
@click.option("--initrd", default=None, help="Initial ramdisk (with --kernel).")
@click.option("--cmdline", default=None, help="Kernel command line; it must start pyvmm-agent.")
@click.option("--cpus", default="1", show_default=True, help="Number of vCPUs.")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM (MiB or 512M, 2G).")
@click.option(
    "--drive",
    "drives",
    multiple=True,
    help="A disk as in `pyvmm run` (path=IMG[,ro][,root]); "
    "never written: a writable one is copied for the sandbox.",
)
@click.option(
    "--net",
    "nets",
    multiple=True,
    help="A network interface: auto (a TAP of its own) or tap=NAME[,mac=MAC]. Off unless given.",
)
@click.option("--rng", is_flag=True, help="Add a virtio-rng device.")
@click.option("--cpu-template", default="auto", show_default=True, help="none, pvm or auto.")
@click.option(
    "--put",
    "puts",
    multiple=True,
    metavar="HOST:GUEST",
    help="Copy a host file or directory into the guest before COMMAND.",
)
@click.option(
    "--get",
    "gets",
    multiple=True,
    metavar="GUEST:HOST",
    help="Copy a guest file or directory out after COMMAND (also when it failed).",
)
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Set a variable.")
@click.option("--cwd", default=None, help="COMMAND's working directory in the guest.")
@click.option("--timeout", type=float, default=None, help="Kill COMMAND after SECONDS (exit 124).")
@click.option(
    "--fresh-boot", is_flag=True, help="Boot the guest instead of restoring its snapshot."
)
@click.option("--no-confine", is_flag=True, help="Run the VMM without seccomp, jail or cgroups.")
@click.option(
    "--cache-dir",
    default=None,
    help="Where snapshots are cached (default: ~/.cache/pyvmm/sandbox, or $PYVMM_CACHE/sandbox).",
)
@click.option(
    "--nested",
    "nested_mode",
    type=click.Choice(NESTED_MODES),
    default="auto",
    show_default=True,
    help="Where the VM runs, as for `pyvmm run`.",
)
@click.option("--stdin-frames", is_flag=True, hidden=True)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(**options: object) -> None:
    """Run COMMAND in a fresh microVM; exits with its status (125: pyvmm failed)."""
    try:
        config, plan = _parse(options)
    except ConfigError as exc:
        _fail(str(exc))
    from pyvmm.cli_exec_nested import placement_for, run_nested

    try:
        config = with_default_guest(config)
        nested = placement_for(config, str(options["nested_mode"]))
    except PyvmmError as exc:
        _fail(str(exc))
    if nested:
        sys.exit(run_nested(click.get_current_context(), config, plan))
    sys.exit(run_exec(config, plan, framed_stdin=bool(options["stdin_frames"])))


def _parse(options: dict[str, object]) -> tuple[object, ExecPlan]:
    from pyvmm.config import finite_timeout
    from pyvmm.sandbox.config import sandbox_config

    config = sandbox_config(
        kernel=options["kernel"],  # type: ignore[arg-type]
        initrd=options["initrd"],  # type: ignore[arg-type]
        cmdline=options["cmdline"],  # type: ignore[arg-type]
        cpus=options["cpus"],  # type: ignore[arg-type]
        memory=options["memory"],  # type: ignore[arg-type]
        drives=options["drives"],  # type: ignore[arg-type]
        nets=options["nets"],  # type: ignore[arg-type]
        rng=bool(options["rng"]),
        cpu_template=str(options["cpu_template"]),
        confine=not options["no_confine"],
        fresh_boot=bool(options["fresh_boot"]),
        cache_dir=options["cache_dir"],  # type: ignore[arg-type]
    )
    plan = ExecPlan(
        argv=tuple(options["command"]),  # type: ignore[arg-type]
        puts=tuple(parse_put(p) for p in options["puts"]),  # type: ignore[attr-defined]
        gets=tuple(parse_get(g) for g in options["gets"]),  # type: ignore[attr-defined]
        env=parse_env(options["env"]),  # type: ignore[arg-type]
        cwd=options["cwd"],  # type: ignore[arg-type]
        timeout=finite_timeout(options["timeout"], "--timeout"),  # type: ignore[arg-type]
    )
    for host, _ in plan.puts:
        if not host.exists():
            raise ConfigError(f"--put {host}: no such file or directory")
    return config, plan


def with_default_guest(config):  # (SandboxConfig) -> SandboxConfig
    """``config`` with the default guest's kernel and initrd when it names no kernel.

    Built here, in the front end, with the guest kit imported: the runtime
    would ask the guest kit in a child process (:func:`pyvmm.sandbox.guest.default_guest`),
    one Python start more (about 7 s in a nested host).
    """
    if config.kernel is not None:
        return config
    import dataclasses

    from pyvmm.errors import HostError
    from pyvmm.guestkit.sandbox_guest import build_sandbox_guest

    try:
        kernel, initrd = build_sandbox_guest()
    except OSError as exc:  # e.g. a read-only cache (a nested host sees the host's read-only)
        raise HostError(f"cannot build the default sandbox guest: {exc}") from None
    return dataclasses.replace(config, kernel=kernel, initrd=initrd)


def run_exec(config: object, plan: ExecPlan, *, framed_stdin: bool = False) -> int:
    """Run ``plan`` in a new sandbox here; the exit status (see the module docstring)."""
    from pyvmm.sandbox.sandbox import Sandbox

    stdin = _stdin(framed_stdin)
    interrupts: list[int] = []
    try:
        sandbox = Sandbox(config)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except PyvmmError as exc:
        _fail(str(exc))
    with sandbox, _forward_signals(sandbox, interrupts):
        try:
            for host, guest in plan.puts:
                sandbox.put(host, guest)
            result = sandbox.exec(
                list(plan.argv),
                env=plan.env or None,
                cwd=plan.cwd,
                stdin=stdin,
                timeout=plan.timeout,
                on_stdout=output_writer(1),
                on_stderr=output_writer(2),
            )
        except KeyboardInterrupt:
            return 128 + (interrupts[-1] if interrupts else signal.SIGINT)
        except PyvmmError as exc:
            _fail(str(exc))
        if result.error is not None:
            click.echo(f"pyvmm: {plan.argv[0]}: {result.error}", err=True)
        status = result.exit_code
        for guest, host in plan.gets:
            try:
                sandbox.get(guest, host)
            except PyvmmError as exc:
                click.echo(f"pyvmm: error: --get {guest}: {exc}", err=True)
                status = status or EXIT_PYVMM
    return status


def _stdin(framed: bool):  # -> BinaryIO | None
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None
    if framed:
        from pyvmm.sandbox.stdin_frames import decode_to_pipe

        fd = decode_to_pipe(fd, on_error=lambda message: None)
    return os.fdopen(os.dup(fd) if not framed else fd, "rb", buffering=0)


def output_writer(fd: int) -> Callable[[bytes], None]:
    """Write each chunk whole to ``fd`` (stdout or stderr), quietly once its reader is gone."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(BrokenPipeError):
            while view:
                view = view[os.write(fd, view) :]

    return write


@contextlib.contextmanager
def _forward_signals(sandbox: object, interrupts: list[int]):  # type: ignore[no-untyped-def]
    """First SIGINT/SIGTERM: to COMMAND; a second one: KeyboardInterrupt (abandon it)."""

    def handler(signum: int, frame: object) -> None:
        interrupts.append(signum)
        if len(interrupts) > 1:
            raise KeyboardInterrupt
        with contextlib.suppress(PyvmmError):
            sandbox.send_signal(signum)  # type: ignore[attr-defined]

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":  # ``python -m pyvmm.cli_exec``: the nested host's way in
    exec_command(prog_name="pyvmm exec")
