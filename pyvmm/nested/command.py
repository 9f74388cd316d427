"""``pyvmm nested -- COMMAND...``: run a command where real Linux guests boot.

On a host with VMX or SVM, COMMAND simply runs here. Elsewhere (a PVM host,
or no KVM at all) it runs in a fresh nested host (:mod:`pyvmm.nested.host`)
with the current directory and /tmp writable, and its output is streamed
back. COMMAND's stdin is /dev/null (``pyvmm run`` connects a VM's console
itself: :mod:`pyvmm.nested.run`). The exit status is COMMAND's; the nested
host's own failures use the statuses of ``timeout(1)`` and ``env(1)``: 124
for a command that overran ``--timeout`` (it is killed), 125 for an L1 that
did not boot or died, 126/127 when COMMAND cannot be run directly, and
130/143 after SIGINT/SIGTERM (L1 is stopped and its files removed first).

Register it with ``main.add_command(nested)`` in :mod:`pyvmm.cli`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import click

EXIT_TIMEOUT = 124
EXIT_NESTED_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

DEFAULT_TIMEOUT_S = 1800.0


def _fail(message: str, code: int) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(code)


def _write(stream: BinaryIO) -> Callable[[bytes], None]:
    def sink(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return sink


@click.command(
    "nested",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Kill COMMAND after SECONDS (exit status 124).",
)
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep L1's console log and the agent's files in DIR.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def nested(timeout: float, keep_logs: Path | None, command: tuple[str, ...]) -> None:
    """Run COMMAND in a nested KVM host (Linux under QEMU-TCG with kvm-amd).

    For hosts whose KVM cannot run guest kernels at speed (PVM): the nested
    host shares this machine's files (read-only, except the current directory
    and /tmp), so `pyvmm nested -- python3 -m pytest tests/test_x.py` works as
    it would here. On a host with VMX/SVM, COMMAND runs directly.
    """
    from pyvmm.doctor import virtualization_kind

    kind = virtualization_kind()
    if kind in ("vmx", "svm"):
        click.echo(
            f"pyvmm: this host has hardware virtualization ({kind}): running the command directly",
            err=True,
        )
        sys.exit(_run_directly(command, timeout))
    sys.exit(_run_nested(command, timeout, keep_logs))


def _run_directly(command: tuple[str, ...], timeout: float) -> int:
    try:
        return subprocess.run(command, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        click.echo(f"pyvmm: error: the command did not finish within {timeout:g} s", err=True)
        return EXIT_TIMEOUT
    except FileNotFoundError:
        click.echo(f"pyvmm: error: command not found: {command[0]}", err=True)
        return EXIT_NOT_FOUND
    except OSError as exc:
        click.echo(f"pyvmm: error: cannot run {command[0]}: {exc.strerror}", err=True)
        return EXIT_CANNOT_EXECUTE


def _run_nested(command: tuple[str, ...], timeout: float, keep_logs: Path | None) -> int:
    from pyvmm.errors import PyvmmError
    from pyvmm.nested.host import NestedHost, NestedTimeoutError
    from pyvmm.nested.signals import Signalled, signals_raise

    if keep_logs is not None:
        try:
            keep_logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"cannot create {keep_logs}: {exc.strerror}", EXIT_NESTED_FAILED)
    hint = "" if keep_logs is not None else " (--keep-logs DIR keeps L1's logs)"
    try:
        with signals_raise(), NestedHost(workdir=keep_logs) as host:
            result = host.run(
                list(command),
                timeout,
                on_stdout=_write(sys.stdout.buffer),
                on_stderr=_write(sys.stderr.buffer),
            )
    except NestedTimeoutError as error:
        click.echo(f"pyvmm: error: {error}", err=True)
        return EXIT_TIMEOUT
    except PyvmmError as error:
        click.echo(f"pyvmm: error: {error}{hint}", err=True)
        return EXIT_NESTED_FAILED
    except Signalled as signalled:
        click.echo(f"pyvmm: received {signalled.name}; the nested host was shut down", err=True)
        return signalled.exit_status
    if keep_logs is not None:
        click.echo(f"pyvmm: nested host logs kept in {keep_logs}", err=True)
    return result.returncode
