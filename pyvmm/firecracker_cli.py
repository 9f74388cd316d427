"""``pyvmm-firecracker`` (and ``pyvmm serve``): Firecracker's command line, served by pyvmm.

Tools that launch the ``firecracker`` binary can launch this instead: the
flags are Firecracker's, with the same defaults (``--api-sock
/run/firecracker.socket``, ``--id anonymous-instance``), and the guest's
serial console is on stdin/stdout. Seccomp is Firecracker's too: every
thread gets its role's filter (pyvmm's defaults, or ``--seccomp-filter
FILE`` in Firecracker's JSON format), ``--no-seccomp`` turns them off, and
a denied system call ends the process with status 148. The jailer's
start-time flags are accepted and have no effect, so existing launch
scripts (and ``pyvmm-jailer``) run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import click

from pyvmm.serve import DEFAULT_API_SOCK, DEFAULT_INSTANCE_ID, ServeOptions, run_serve

_LEVELS = click.Choice(["Error", "Warning", "Info", "Debug", "Trace", "Off"], case_sensitive=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--api-sock", default=DEFAULT_API_SOCK, show_default=True, help="API socket path.")
@click.option("--id", "instance_id", default=DEFAULT_INSTANCE_ID, show_default=True)
@click.option("--config-file", type=click.Path(path_type=Path), help="Firecracker JSON config.")
@click.option("--no-api", is_flag=True, help="No API socket; boot from --config-file.")
@click.option("--boot-timer", is_flag=True, help="Accepted: the boot timer device is always on.")
@click.option("--log-path", type=click.Path(path_type=Path), help="Log file or FIFO.")
@click.option("--level", type=_LEVELS, default=None, help="Log level (default Info).")
@click.option("--show-level", is_flag=True, help="Put the level in each log line.")
@click.option("--show-log-origin", is_flag=True, help="Put module:line in each log line.")
@click.option("--module", default=None, help="Log only this pyvmm module.")
@click.option("--metrics-path", type=click.Path(path_type=Path), help="Metrics file or FIFO.")
@click.option("--http-api-max-payload-size", type=click.IntRange(min=1), default=None)
@click.option("--mmds-size-limit", type=click.IntRange(min=1), default=None)
@click.option("--no-seccomp", is_flag=True, help="Run without seccomp filters.")
@click.option(
    "--seccomp-filter",
    type=click.Path(path_type=Path),
    default=None,
    help="Seccomp filters in Firecracker's JSON format (default: pyvmm's own).",
)
@click.option("--start-time-us", default=None, hidden=True)
@click.option("--start-time-cpu-us", default=None, hidden=True)
@click.option("--parent-cpu-time-us", default=None, hidden=True)
@click.version_option(version=None, package_name="pyvmm", message="pyvmm %(version)s")
def firecracker(
    api_sock: str,
    instance_id: str,
    config_file: Path | None,
    no_api: bool,
    boot_timer: bool,
    log_path: Path | None,
    level: str | None,
    show_level: bool,
    show_log_origin: bool,
    module: str | None,
    metrics_path: Path | None,
    http_api_max_payload_size: int | None,
    mmds_size_limit: int | None,
    no_seccomp: bool,
    seccomp_filter: Path | None,
    **_ignored: object,
) -> None:
    """Serve Firecracker's API for one microVM; exits when the guest stops."""
    import logging

    if level is None and log_path is None:
        logging.basicConfig(level=logging.WARNING, format="pyvmm: %(message)s")
    if no_seccomp and seccomp_filter is not None:
        raise click.UsageError("--no-seccomp and --seccomp-filter exclude each other")
    run_serve(
        ServeOptions(
            api_sock=None if no_api else Path(api_sock),
            instance_id=instance_id,
            config_file=config_file,
            log_path=log_path,
            level=level,
            show_level=show_level,
            show_log_origin=show_log_origin,
            log_module=module,
            metrics_path=metrics_path,
            http_api_max_payload_size=http_api_max_payload_size,
            mmds_size_limit=mmds_size_limit,
            seccomp=not no_seccomp,
            seccomp_filter=seccomp_filter,
        )
    )


def main() -> None:
    firecracker(prog_name="pyvmm-firecracker")
