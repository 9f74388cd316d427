"""The ``pyvmm`` command line: parses flags into a config, runs a Machine.

User mistakes end with one line on stderr and exit status 2; a guest that
resets or powers off exits 0; any other end prints its reason and exits
non-zero. No traceback reaches the user for anything they can fix.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pyvmm.cli_confinement import confinement_options
from pyvmm.errors import ConfigError, HostError, PyvmmError
from pyvmm.nested.placement import MODES as NESTED_MODES

if TYPE_CHECKING:
    from pyvmm.config import MachineConfig
    from pyvmm.vmm.machine import Machine
    from pyvmm.vmm.threads import ThreadSetup

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="pyvmm: %(message)s",
    )


class LazyGroup(click.Group):
    """A command group whose heavier subcommands are imported only when named.

    ``pyvmm run`` must not pay for the nested host's, the sandboxes' or the
    Firecracker front end's imports at every start; ``--help`` still lists them.
    """

    #: Subcommand name -> "module:attribute" of its click command.
    lazy: dict[str, str] = {
        "exec": "pyvmm.cli_exec:exec_command",
        "forkserver": "pyvmm.forkserver.command:forkserver",
        "nested": "pyvmm.nested.command:nested",
        "serve": "pyvmm.firecracker_cli:firecracker",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attribute = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyvmm")
def main() -> None:
    """pyvmm: a KVM virtual machine monitor in Python."""


@main.command()
@click.option(
    "--config",
    "config_file",
    default=None,
    help="A Firecracker JSON config file (boot-source, drives, machine-config, "
    "network-interfaces, vsock, entropy) describing the whole VM.",
)
@click.option(
    "--kernel",
    default=None,
    help="Kernel: ELF vmlinux (PVH or 64-bit) or bzImage. Default: the guest kit's "
    "Debian cloud kernel with its busybox initramfs.",
)
@click.option("--initrd", default=None, help="Initial ramdisk loaded next to the kernel.")
@click.option("--cmdline", default=None, help="Kernel command line (default for Linux guests).")
@click.option("--cpus", default="1", help="Number of vCPUs, 1 to 32.")
@click.option("--memory", default="128", help="Guest RAM: MiB, or with a unit (512M, 2G).")
@click.option("--serial-out", default=None, help="Write the guest's serial output to FILE.")
@click.option("--timeout", type=float, default=None, help="Stop the VM after SECONDS.")
@click.option(
    "--cpu-template",
    default="auto",
    show_default=True,
    help="CPUID features to hide: none, pvm (no CMPXCHG16B), or auto (pvm on PVM hosts).",
)
@click.option(
    "--drive",
    "drives",
    multiple=True,
    help="A virtio-blk disk: path=IMG[,ro][,root][,bw=10M/1s][,ops=1000/1s] "
    "(repeatable; root adds root=/dev/vdX; bw/ops rate-limit it).",
)
@click.option(
    "--net",
    "nets",
    multiple=True,
    help="A virtio-net interface on a host TAP device: tap=NAME[,mac=MAC]"
    "[,rx_bw=10M/1s][,rx_ops=1000/1s][,tx_bw=RATE][,tx_ops=RATE] (repeatable; "
    "rx_*/tx_* rate-limit the bytes and frames the guest receives/sends).",
)
@click.option(
    "--vsock",
    default=None,
    metavar="cid=N,uds=PATH",
    help="A virtio-vsock device with guest CID N; host programs reach guest port P by "
    "connecting to PATH and sending 'CONNECT P\\n', guest connections to host port P "
    "go to PATH_P.",
)
@click.option("--rng", is_flag=True, help="Add a virtio-rng device (entropy from the host).")
@click.option(
    "--rng-rate",
    default=None,
    metavar="bw=RATE[,ops=RATE]",
    help="Rate-limit the virtio-rng device's entropy, e.g. bw=1K/1s,ops=100/1s (implies --rng).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--nested",
    "nested_mode",
    type=click.Choice(NESTED_MODES),
    default="auto",
    show_default=True,
    help="Where the VM runs. auto: a Linux kernel runs inside a nested KVM host (Linux under "
    "QEMU-TCG with kvm-amd) when this host's KVM cannot run guest kernel code at hardware "
    "speed (PVM, see `pyvmm doctor`); everything else runs here. always: in a nested host. "
    "never: here.",
)
@confinement_options
def run(
    config_file: str | None,
    kernel: str | None,
    initrd: str | None,
    cmdline: str | None,
    cpus: str,
    memory: str,
    serial_out: str | None,
    timeout: float | None,
    cpu_template: str,
    drives: tuple[str, ...],
    nets: tuple[str, ...],
    vsock: str | None,
    rng: bool,
    rng_rate: str | None,
    log_level: str,
    nested_mode: str,
    **confinement_flags: Any,
) -> None:
    """Boot a kernel; the serial console is on stdin/stdout (Ctrl-A X quits).

    With no --kernel: the default guest, Debian's cloud kernel with a busybox
    shell (fetched and built on first use). Piped stdin is run by that shell
    and its end powers the guest off: `printf 'uname -r\\n' | pyvmm run`.
    """
    _setup_logging(log_level)
    from pyvmm.config import DEFAULT_LINUX_CMDLINE, build_machine_config

    context = click.get_current_context()
    if config_file is not None:
        _refuse_flags_beside_config(context)
        try:
            config = _config_from_file(config_file)
        except (ConfigError, HostError) as error:
            _fail(str(error))
        sys.exit(_run_where_placed(context, config, nested_mode, timeout, confinement_flags))
    try:
        if kernel is None:
            kernel, initrd = _default_guest(initrd)
            if cmdline is None:
                cmdline = default_guest_cmdline(DEFAULT_LINUX_CMDLINE, _stdin_is_terminal())
        config = build_machine_config(
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            vcpus=cpus,
            memory=memory,
            serial_out=serial_out or None,
            cpu_template=cpu_template,
            rng=rng,
            rng_rate=rng_rate,
            drives=drives,
            nets=nets,
            vsock=vsock,
        )
    except (ConfigError, HostError) as error:
        _fail(str(error))
    sys.exit(_run_where_placed(context, config, nested_mode, timeout, confinement_flags))


def default_guest_cmdline(base: str, interactive: bool) -> str:
    """The default guest's kernel command line.

    ``loglevel=3`` keeps the console to critical messages (the kernel's
    harmless "PCI: Fatal: No config space access function found", an error on
    a platform without PCI that ``pci=off`` does not silence, included).
    An interactive shell for a terminal; for a pipe or a file, a
    non-interactive one that runs what arrives and ends the VM at its end.
    """
    return f"{base} loglevel=3 pyvmm.shell" + ("" if interactive else "=batch")


def _stdin_is_terminal() -> bool:
    fd = _stdin_fd()
    return fd is not None and os.isatty(fd)


def _run_where_placed(
    context: click.Context,
    config: object,
    nested_mode: str,
    timeout: float | None,
    confinement_flags: dict[str, Any],
) -> int:
    """Run the VM here or in a nested host, as :mod:`pyvmm.nested.placement` decides.

    A nested run gets the confinement flags with the others: it confines itself there.
    """
    from pyvmm.doctor import virtualization_kind
    from pyvmm.nested.placement import Where, choose, inside_nested_host, is_linux_kernel

    placement = choose(
        nested_mode,
        is_linux_kernel(config.kernel),  # type: ignore[attr-defined]
        virtualization_kind(),
        inside_nested=inside_nested_host(),
    )
    if placement.where is Where.DIRECT:
        if placement.notice:
            click.echo(placement.notice, err=True)
        return _run_machine(config, timeout, confinement_flags)
    from pyvmm.nested.run import check_boot_files, run_vm, unreachable_from_host, writable_dirs

    refusal = unreachable_from_host(config)  # type: ignore[arg-type]
    if refusal is not None:
        _fail(refusal)
    try:
        writable = writable_dirs(config)  # type: ignore[arg-type]
        check_boot_files(config.kernel, config.initrd, config.cmdline)  # type: ignore[attr-defined]
    except (ValueError, PyvmmError) as error:
        _fail(str(error))
    if placement.notice:
        click.echo(placement.notice, err=True)
    return run_vm(
        _inner_argv(context, config), writable=writable, timeout=timeout, stdin=_stdin_fd()
    )


def _inner_argv(context: click.Context, config: object) -> list[str]:
    """The same ``pyvmm run``, for the nested host: the flags the user gave, with the
    kernel, initrd and command line resolved here (the default guest included)."""
    args: list[str] = []
    resolved = ("kernel", "initrd", "cmdline", "nested_mode")
    for param in context.command.params:
        name = param.name
        if name is None or name in resolved or not isinstance(param, click.Option):
            continue
        if context.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            continue
        value = context.params[name]
        if param.is_flag:
            args += [param.opts[0]] if value else []
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        elif value is not None:
            args += [param.opts[0], str(value)]
    if context.params.get("config_file") is None:
        args += ["--kernel", str(Path(config.kernel).resolve())]  # type: ignore[attr-defined]
        if config.initrd is not None:  # type: ignore[attr-defined]
            args += ["--initrd", str(Path(config.initrd).resolve())]  # type: ignore[attr-defined]
        args += ["--cmdline", config.cmdline]  # type: ignore[attr-defined]
    return [sys.executable, "-m", "pyvmm", "run", "--nested", "never", *args]


_VM_FLAGS = (
    "kernel", "initrd", "cmdline", "cpus", "memory", "cpu_template", "drives", "nets",
    "vsock", "rng", "rng_rate",
)  # fmt: skip


def _refuse_flags_beside_config(context: click.Context) -> None:
    """With --config the file describes the VM: a VM flag as well is a mistake."""
    for param in context.command.params:
        if param.name in _VM_FLAGS and (
            context.get_parameter_source(param.name) is not click.core.ParameterSource.DEFAULT
        ):
            _fail(f"--config already describes the VM; drop {param.opts[0]} or put it in the file")


def _config_from_file(path: str) -> object:
    from pyvmm.api.machine_config import to_machine_config
    from pyvmm.api.vm_config import VmResources

    return to_machine_config(VmResources.from_config_file(path))


def _default_guest(initrd: str | None) -> tuple[str, str]:
    """The guest kit's default guest: Debian's cloud kernel and busybox initramfs.

    The initramfs carries the guest agent (``/bin/pyvmm-agent``), not started.
    """
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs

    package = fetch_kernel("cloud")
    return str(package.vmlinuz), initrd or str(build_initramfs(package, agent=True))


def _run_machine(config: object, timeout: float | None, confinement_flags: dict[str, Any]) -> int:
    from pyvmm.host.console_input import InputRelay
    from pyvmm.host.terminal import raw_terminal
    from pyvmm.vmm.machine import Machine

    stdin_fd = _stdin_fd()
    interactive = stdin_fd is not None and os.isatty(stdin_fd)
    stdout_fd = sys.stdout.fileno()

    def write_stdout(data: bytes) -> None:
        os.write(stdout_fd, data)

    setup, config = _confine(config, confinement_flags)  # type: ignore[arg-type]
    relay = None
    console_in = stdin_fd
    if stdin_fd is not None and not interactive:
        # Data, not a person: relayed so that its end reaches the guest as Ctrl-D.
        relay, console_in = InputRelay.to_pipe(stdin_fd)
    try:
        machine = Machine(
            config,
            serial_out=write_stdout,
            console_in=console_in,
            console_escape=interactive,
            thread_setup=setup,
        )
    except BaseException:
        if relay is not None:
            relay.close()
        raise
    if relay is not None:
        relay.start(
            on_error=lambda message: logging.getLogger("pyvmm").warning("%s", message),
            setup=setup,
        )

    try:
        with ExitStack() as stack:
            stack.enter_context(_signals_stop(machine))
            if interactive:
                stack.enter_context(raw_terminal(stdin_fd))
            try:
                reason = machine.run(timeout)
            except (ConfigError, HostError) as error:
                stack.close()
                _fail(str(error))
            except PyvmmError as error:
                stack.close()
                _fail(str(error), 1)
    finally:
        if relay is not None:
            relay.close()
    if not reason.clean:
        click.echo(f"pyvmm: {reason}", err=True)
    else:
        logging.getLogger("pyvmm").info("%s", reason)
    return reason.exit_code


def _confine(config: MachineConfig, flags: dict[str, Any]) -> tuple[ThreadSetup, MachineConfig]:
    """Confine this process as the flags ask (seccomp by default); the threads' setup,
    and the config as the confined process sees it (paths inside --jail)."""
    from pyvmm.cli_confinement import confinement
    from pyvmm.jail.confine import confine
    from pyvmm.vmm.threads import NO_SETUP

    try:
        options, config = confinement(flags, config)
        return confine(options) or NO_SETUP, config
    except (ConfigError, HostError) as error:
        _fail(str(error))
        raise  # not reached: _fail exits


@contextmanager
def _signals_stop(machine: Machine) -> Iterator[None]:
    """SIGINT and SIGTERM stop ``machine`` with a reason naming the signal, while inside."""
    from pyvmm.vmm.stop_reason import StopKind, StopReason

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        machine.stop(StopReason(StopKind.HOST_SIGNAL, f"received {name}"))

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdin_fd() -> int | None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    try:
        os.fstat(fd)
    except OSError:
        return None
    return fd


@main.command()
def doctor() -> None:
    """Report what this host offers pyvmm: KVM, virtualization kind, TAP, cgroups, seccomp."""
    from pyvmm.doctor import run_doctor

    sys.exit(run_doctor(click.echo))


@main.group()
def guest() -> None:
    """Build or fetch guest artifacts; each command prints a path."""


def _register_subcommands() -> None:
    from pyvmm.guestkit.commands import register

    register(guest)


_register_subcommands()


@guest.command("probe")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
def guest_probe(force: bool) -> None:
    """Build the probe guest (when needed) and print the path of its ELF."""
    from pyvmm.guestkit.probe import build_probe

    try:
        click.echo(str(build_probe(force=force)))
    except PyvmmError as error:
        _fail(str(error))


#: Raised for a bare group command since click 8.2 (absent before: nothing to catch).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run_cli(args: list[str] | None = None, prog_name: str | None = None) -> None:
    """The ``pyvmm`` command (its console script and the fork server's VM processes).

    Click's own usage errors (an unknown flag, a missing value) end like every
    other pyvmm error: one ``pyvmm: error:`` line and status 2, no usage text.
    """
    try:
        code = main.main(args=args, prog_name=prog_name, standalone_mode=False)
    except _NO_ARGS_IS_HELP as error:  # bare `pyvmm`: the help text, as click shows it
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:
        _fail(error.format_message(), error.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run_cli()
