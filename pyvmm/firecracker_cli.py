"""``pyvmm-firecracker`` (and ``pyvmm serve``): Firecracker's command line, served by pyvmm.

Tools that launch the ``firecracker`` binary can launch this instead: the
flags are Firecracker's, with the same defaults (``--api-sock
/run/firecracker.socket``, ``--id anonymous-instance``), and the guest's
serial console is on stdin/stdout. Seccomp is Firecracker's too: every
thread gets its role's filter (pyvmm's defaults, or ``--seccomp-filter
FILE`` in Firecracker's JSON format), ``--no-seccomp`` turns them off, and
a denied system call ends the process with status 148. The jailer's
start-time flags are accepted and have no effect, so existing launch
scripts (and ``pyvmm-jailer``) run unchanged. ``--enable-pci`` is accepted
and logged: pyvmm's devices are virtio-mmio, which every client's guest
finds through the kernel command line or ACPI.

Start-up order: the API socket is bound before anything else is imported
(:mod:`pyvmm.api.early_socket`), so a client that connects right after
spawning the process is queued by the kernel, not refused; then a thread
answers ``GET /`` while the rest is imported (:mod:`pyvmm.api.early_responder`),
unless ``--config-file`` is given (Firecracker answers nothing before that boot).

Versions (:func:`version_text`, :mod:`pyvmm.api.version`): the first line
is ``pyvmm v<API>+pyvmm.<pyvmm>``, e.g. ``pyvmm v1.17.0+pyvmm.0.1.0``.
Tools that read the second word of the first line as Firecracker's version
(Kata Containers: ``v``-prefixed semver, at least 0.21.1) accept it; a
person reads ``pyvmm``. ``GET /version`` and ``GET /`` give the same string
without the ``v``.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself is not imported this early
if TYPE_CHECKING:
    from pyvmm.api.early_socket import EarlySocket

#: Flags after which no socket is bound: they print and exit, or need none.
_NO_SOCKET_FLAGS = ("--no-api", "--version", "-h", "--help", "--snapshot-version",
                    "--describe-snapshot")  # fmt: skip
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"  # as pyvmm.serve's (not imported this early)


def version_text() -> str:
    """``--version``: Firecracker's first line (``<name> v<version>``), then what pyvmm is."""
    from pyvmm.api.version import FIRECRACKER_API_VERSION, pyvmm_version, vmm_version
    from pyvmm.snapshot.state import FORMAT_VERSION

    return (
        f"pyvmm v{vmm_version()}\n\n"
        f"Serves the Firecracker API {FIRECRACKER_API_VERSION}; pyvmm {pyvmm_version()}; "
        f"snapshot data format v{FORMAT_VERSION}.0.0\n"
    )


def _early_socket_path(argv: list[str]) -> str | None:
    """The ``--api-sock`` value to bind before parsing flags properly (None: bind none)."""
    if any(arg in _NO_SOCKET_FLAGS or arg.startswith("--describe-snapshot=") for arg in argv):
        return None
    return _flag_value(argv, "--api-sock", DEFAULT_API_SOCK)


def _flag_value(argv: list[str], flag: str, default: str) -> str:
    """The last value given to ``flag`` (as click takes it), or ``default``."""
    value = default
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def main() -> None:
    """The console script: bind the API socket first, then parse flags and serve."""
    from pyvmm.api.early_socket import adopt_handed, bind_early

    argv = sys.argv[1:]
    path = _early_socket_path(argv)
    early = adopt_handed(path) if path else None  # bound by the C launcher (launcher.c)
    if early is None and path:
        early = bind_early(path)
    if early is not None and not any(arg.split("=")[0] == "--config-file" for arg in argv):
        _end_cleanly_on_sigterm(early)
        early.answer_early(_flag_value(argv, "--id", DEFAULT_INSTANCE_ID))
    try:
        _run_command(argv, early)
    finally:
        if early is not None and early.listener.fileno() >= 0:
            early.release()  # never served (bad flags, --help): leave nothing behind


def _end_cleanly_on_sigterm(early: EarlySocket) -> None:
    """A client that saw ``GET /`` answered may stop the VMM before ``serve`` handles
    signals: SIGTERM then ends it as ``serve`` would before a boot (status 0), without
    leaving the socket file behind."""
    import os
    import signal

    def end(signum: int, frame: object) -> None:
        early.remove_file()
        os._exit(0)

    signal.signal(signal.SIGTERM, end)


def _command():
    """The click command (built on first use: click is imported after the socket is bound)."""
    from pathlib import Path

    import click

    from pyvmm.serve import DEFAULT_INSTANCE_ID, ServeOptions, run_serve

    levels = click.Choice(
        ["Error", "Warning", "Info", "Debug", "Trace", "Off"], case_sensitive=False
    )
    path = click.Path(path_type=Path)

    def print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(version_text(), nl=False)
            ctx.exit()

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--api-sock", default=DEFAULT_API_SOCK, show_default=True, help="API socket path."
    )
    @click.option("--id", "instance_id", default=DEFAULT_INSTANCE_ID, show_default=True)
    @click.option("--config-file", type=path, help="Firecracker JSON config.")
    @click.option("--metadata", type=path, help="JSON file: the MMDS data store's first contents.")
    @click.option("--no-api", is_flag=True, help="No API socket; boot from --config-file.")
    @click.option(
        "--boot-timer", is_flag=True, help="Accepted: the boot timer device is always on."
    )
    @click.option("--log-path", type=path, help="Log file or FIFO.")
    @click.option("--level", type=levels, default=None, help="Log level (default Info).")
    @click.option("--show-level", is_flag=True, help="Put the level in each log line.")
    @click.option("--show-log-origin", is_flag=True, help="Put module:line in each log line.")
    @click.option("--module", default=None, help="Log only this pyvmm module.")
    @click.option("--metrics-path", type=path, help="Metrics file or FIFO.")
    @click.option("--http-api-max-payload-size", type=click.IntRange(min=1, max=1 << 30))
    @click.option("--mmds-size-limit", type=click.IntRange(min=1, max=1 << 30))
    @click.option("--no-seccomp", is_flag=True, help="Run without seccomp filters.")
    @click.option("--seccomp-filter", type=path, help="Seccomp filters (Firecracker's JSON).")
    @click.option("--enable-pci", is_flag=True, help="Accepted: pyvmm's devices are virtio-mmio.")
    @click.option("--snapshot-version", is_flag=True, help="Print the snapshot format version.")
    @click.option("--describe-snapshot", type=path, help="Print a snapshot file's format version.")
    @click.option("--start-time-us", default=None, hidden=True)
    @click.option("--start-time-cpu-us", default=None, hidden=True)
    @click.option("--parent-cpu-time-us", default=None, hidden=True)
    @click.option("--version", is_flag=True, expose_value=False, is_eager=True,
                  callback=print_version, help="Print the version and exit.")  # fmt: skip
    @click.pass_context
    def firecracker(ctx: click.Context, **flags: object) -> None:
        """Serve Firecracker's API for one microVM; exits when the guest stops."""
        if flags["snapshot_version"]:
            from pyvmm.snapshot.state import FORMAT_VERSION

            click.echo(f"v{FORMAT_VERSION}.0.0")
            return
        if flags["describe_snapshot"] is not None:
            _describe_snapshot(flags["describe_snapshot"])
            return
        if flags["no_seccomp"] and flags["seccomp_filter"] is not None:
            raise click.UsageError("--no-seccomp and --seccomp-filter exclude each other")
        _quiet_logging(flags)
        run_serve(_options(flags, ctx.obj, ServeOptions))

    return firecracker


def _run_command(argv: list[str], early: object) -> None:
    """Click's errors as one ``pyvmm: error:`` line and status 2, like every pyvmm error."""
    import click

    try:
        code = _command().main(
            argv, prog_name="pyvmm-firecracker", obj=early, standalone_mode=False
        )
    except click.ClickException as exc:
        print(f"pyvmm: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _quiet_logging(flags: dict) -> None:
    import logging

    if flags["level"] is None and flags["log_path"] is None:
        logging.basicConfig(level=logging.WARNING, format="pyvmm: %(message)s")
    if flags["enable_pci"]:
        logging.getLogger("pyvmm").info(
            "--enable-pci: pyvmm has no PCI; devices stay on virtio-mmio"
        )


def _options(flags: dict, early: object, options_type: type) -> object:
    from pathlib import Path

    return options_type(
        api_sock=None if flags["no_api"] else Path(flags["api_sock"]),
        instance_id=flags["instance_id"],
        config_file=flags["config_file"],
        metadata=flags["metadata"],
        log_path=flags["log_path"],
        level=flags["level"],
        show_level=flags["show_level"],
        show_log_origin=flags["show_log_origin"],
        log_module=flags["module"],
        metrics_path=flags["metrics_path"],
        http_api_max_payload_size=flags["http_api_max_payload_size"],
        mmds_size_limit=flags["mmds_size_limit"],
        seccomp=not flags["no_seccomp"],
        seccomp_filter=flags["seccomp_filter"],
        early_socket=early,
    )


def _describe_snapshot(path: object) -> None:
    """``--describe-snapshot FILE``: the state file's format version, or one error line."""
    import click

    from pyvmm.snapshot.files import SnapshotError
    from pyvmm.snapshot.state import FORMAT_VERSION, read_state

    try:
        read_state(str(path))
    except SnapshotError as exc:
        click.echo(f"pyvmm: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"v{FORMAT_VERSION}.0.0")


def __getattr__(name: str) -> object:
    """``firecracker``: the click command, for ``pyvmm serve`` (built on first use)."""
    if name == "firecracker":
        command = _command()
        globals()["firecracker"] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # how the C launcher runs it: python -m pyvmm.firecracker_cli
    main()
