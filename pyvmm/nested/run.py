"""Running one VM inside a nested host, with this terminal or pipe as its console.

:func:`run_vm` is what ``pyvmm run`` does when :mod:`pyvmm.nested.placement`
says "nested": it boots an L1 (:class:`~pyvmm.nested.host.NestedHost`), runs
the same ``pyvmm run`` there (the caller gives its arguments, with every
path resolved on this host) and connects it to this process's stdin and
stdout through the console port:

- stdin a terminal: it is put in raw mode here, every key goes to the guest,
  and the escape keys are read here (Ctrl-A X quits at once, exit status 0;
  Ctrl-A H shows the help), exactly as when the VM runs directly;
- stdin a pipe, a file or /dev/null: its bytes stream to the guest's serial
  console and its end arrives as the console's end-of-file, so a shell
  reading the console exits and the default guest powers off.

The exit status is the inner ``pyvmm run``'s (the guest's stop reason), 130
or 143 after SIGINT or SIGTERM, and 1 with one line when the nested host
itself fails. Paths the VM writes must be writable in L1: their directories
become writable shares (:func:`writable_dirs`). TAP devices and vsock
sockets would live in L1, out of this host's reach, so they are refused
with one line (:func:`unreachable_from_host`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from pyvmm.guestkit.progress import Progress
from pyvmm.nested.signals import Signalled, signals_raise

EXIT_FAILED = 1
#: How much longer than the VM's own ``--timeout`` the host waits for L1.
TIMEOUT_MARGIN_S = 300.0


class VmPaths(Protocol):
    """What :func:`writable_dirs` reads from a ``MachineConfig``."""

    serial_out: Path | None
    drives: Sequence[object]
    nets: Sequence[object]
    vsock: object | None


def unreachable_from_host(config: VmPaths) -> str | None:
    """Why this VM cannot usefully run in a nested host, or None."""
    if config.nets:
        return (
            "--net: a TAP device for a VM in the nested host would be created inside the "
            "nested host, where nothing on this host can reach it; run the VM here with "
            "--nested never (slow on this host), or on a host with VMX/SVM"
        )
    if config.vsock is not None:
        return (
            "--vsock: the Unix socket of a VM in the nested host would live inside the nested "
            "host, where programs on this host cannot connect to it; run the VM here with "
            "--nested never (slow on this host), or on a host with VMX/SVM"
        )
    return None


def check_boot_files(kernel: Path, initrd: Path | None, cmdline: str) -> None:
    """Check here what the VM in L1 would reject, before booting L1 for it.

    The kernel is parsed (format, architecture, boot protocol), the command
    line checked against its limit and the initrd's format recognised, so a
    bad file costs a one-line error at once instead of a nested host's boot.
    """
    from pyvmm.boot.cmdline import encode_cmdline
    from pyvmm.boot.files import open_input
    from pyvmm.boot.initrd import check_initrd_format
    from pyvmm.boot.kernel import inspect_kernel

    with open_input(kernel, "kernel image") as f:
        image = inspect_kernel(f, str(kernel))
    encode_cmdline(cmdline, image.cmdline_limit)
    if initrd is not None:
        with open_input(initrd, "initrd") as f:
            check_initrd_format(f, str(initrd))


def writable_dirs(config: VmPaths) -> list[Path]:
    """The directories L1 must be able to write for this VM (serial log, writable disks).

    Raises ValueError with a one-line reason when one of them is ``/``,
    which is never shared writable.
    """
    files: list[tuple[str, Path]] = []
    if config.serial_out is not None:
        files.append(("--serial-out", Path(config.serial_out)))
    for index, drive in enumerate(config.drives):
        if not getattr(drive, "read_only", False):
            files.append((f"drive {index}", Path(drive.path)))  # type: ignore[attr-defined]
    dirs: list[Path] = []
    for what, path in files:
        parent = path.resolve().parent
        if parent == Path("/"):
            raise ValueError(
                f"{what}: {path} is directly in /, which the nested host cannot share "
                "writable; move it into a directory"
            )
        if parent not in dirs:
            dirs.append(parent)
    return dirs


def run_vm(
    argv: Sequence[str],
    *,
    writable: Sequence[Path] = (),
    timeout: float | None = None,
    stdin: int | None = None,
) -> int:
    """Run ``argv`` (a ``pyvmm run`` command line) in a new nested host; its exit status."""
    from pyvmm.errors import PyvmmError
    from pyvmm.host.terminal import raw_terminal
    from pyvmm.nested.host import NestedHost

    source, close_source = _input_fd(stdin)
    terminal = os.isatty(source)
    host_timeout = None if timeout is None else timeout + TIMEOUT_MARGIN_S
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    try:
        with signals_raise(), raw_terminal(source) if terminal else contextlib.nullcontext():
            host = NestedHost(writable=writable, notify=_notice)
            try:
                host.start()
                # Python and pyvmm start in L1 (several seconds under TCG) before
                # the guest says anything: show that until the first output.
                starting = Progress("starting the VM in the nested host", None, sys.stderr)
                starting.begin()
                result = host.run(
                    list(argv),
                    host_timeout,
                    stdin=source,
                    terminal=terminal,
                    on_stdout=_writer(out, starting),
                    on_stderr=_writer(err, starting),
                )
                starting.end()
            finally:
                try:
                    host.stop(graceful=False)
                except Signalled:  # arrived while stopping: finish stopping, then go
                    host.stop(graceful=False)
                    raise
        return result.returncode
    except Signalled as signalled:
        _notice(f"pyvmm: received {signalled.name}; the nested host was stopped")
        return signalled.exit_status
    except PyvmmError as error:
        _notice(f"pyvmm: the nested host failed: {error}")
        return EXIT_FAILED
    finally:
        if close_source:
            os.close(source)


def _input_fd(stdin: int | None) -> tuple[int, bool]:
    """``stdin`` if it is an open fd, else /dev/null (and whether we opened it)."""
    if stdin is not None:
        try:
            os.fstat(stdin)
            return stdin, False
        except OSError:
            pass
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), True


def _writer(stream: BinaryIO, starting: Progress) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        starting.end()
        with contextlib.suppress(BrokenPipeError):
            stream.write(data)
            stream.flush()

    return write


def _notice(message: str) -> None:
    """One line on stderr, starting at column 0 even while the terminal is raw."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(("\r" if sys.stderr.isatty() else "") + message + "\n")
        sys.stderr.flush()
