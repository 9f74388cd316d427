"""The VM process: what a forked child of the server does to become a ``pyvmm run``.

The child starts as a copy of the server; before it runs the client's
command line it must look like a fresh ``pyvmm run`` started by the client:

- its own session and process group (a terminal's job control and signals
  aimed at the server's group leave it alone), and ``PR_SET_PDEATHSIG`` so
  it gets SIGTERM if the server dies (SIGTERM, not SIGKILL: the VM stops
  the way a signalled ``pyvmm run`` does, restoring a raw terminal);
- the client's stdin, stdout and stderr on fds 0-2 (a closed one closed),
  and no other fd of the server's (other clients' sockets and fds);
- the client's working directory, umask and forwarded environment
  variables; Python's standard streams rebuilt for the new fds (a terminal
  is line-buffered, a pipe is not); the signal dispositions and logging
  set-up of a new interpreter;
- the same end: exit status of :func:`pyvmm.cli.run_cli`, uncaught
  exceptions printed as the interpreter would, exit handlers run, and a
  KeyboardInterrupt ending the process by SIGINT.

It never returns into the server's code: every path ends in ``os._exit``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import logging
import os
import signal
import sys
import tempfile
import traceback
from typing import NoReturn

from pyvmm.forkserver.protocol import STANDARD_FDS, UNFORWARDED_PYVMM_ENV, Request, is_forwarded

#: The server's logger: its handler writes to the server's stderr, never a VM's.
SERVER_LOGGER = "pyvmm.forkserver"
#: What a child that could not even start its command exits with.
EXIT_SETUP_FAILED = 1
EXIT_USAGE = 2

_PR_SET_PDEATHSIG = 1
_STREAM_NAMES = ("stdin", "stdout", "stderr")


def become_vm_process(request: Request, fds: list[int], server_pid: int) -> NoReturn:
    """Run in the forked child: turn into the client's ``pyvmm run`` and exit with its status."""
    code = EXIT_SETUP_FAILED
    try:
        _leave_the_server(server_pid)
        _take_standard_fds(request.fds, fds)
        _enter_client_context(request)
        code = _run(request)
    except BaseException as error:  # nothing may unwind into the server's loop
        with contextlib.suppress(OSError):
            os.write(2, f"pyvmm: error: the fork server could not start the VM: {error}\n".encode())
    finally:
        os._exit(code)


def _leave_the_server(server_pid: int) -> None:
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != server_pid:  # the server died before the line above
        os._exit(EXIT_SETUP_FAILED)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    server_log = logging.getLogger(SERVER_LOGGER)
    for handler in list(server_log.handlers):
        server_log.removeHandler(handler)
    server_log.propagate = True
    server_log.setLevel(logging.NOTSET)


def _take_standard_fds(present: tuple[int, ...], fds: list[int]) -> None:
    """The client's fds on 0-2 (those it had closed stay closed); every other fd closed."""
    for target, fd in zip(present, fds, strict=True):
        os.dup2(fd, target)
    for target in STANDARD_FDS:
        if target not in present:
            with contextlib.suppress(OSError):
                os.close(target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    for target, name in zip(STANDARD_FDS, _STREAM_NAMES, strict=True):
        stream = _text_stream(target, getattr(sys, name)) if target in present else None
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _text_stream(fd: int, like: io.TextIOWrapper | None) -> io.TextIOWrapper:
    """A standard stream on ``fd`` made as the interpreter makes it at start-up."""
    encoding = like.encoding if like is not None else "utf-8"
    errors = like.errors if like is not None else ("backslashreplace" if fd == 2 else "strict")
    write_through = like.write_through if like is not None else False
    binary = open(fd, "rb" if fd == 0 else "wb", closefd=False)  # noqa: SIM115 - sys owns it
    return io.TextIOWrapper(
        binary,
        encoding=encoding,
        errors=errors,
        line_buffering=fd == 2 or os.isatty(fd),
        write_through=write_through,
    )


def _enter_client_context(request: Request) -> None:
    os.umask(request.umask)
    for name in [name for name in os.environ if is_forwarded(name)]:
        del os.environ[name]
    for name in UNFORWARDED_PYVMM_ENV:
        os.environ.pop(name, None)
    os.environ.update(request.env)
    tempfile.tempdir = None  # computed again from the client's TMPDIR
    sys.argv = [request.prog, *request.argv]
    try:
        os.chdir(request.cwd)
    except OSError as error:
        sys.stderr.write(
            f"pyvmm: error: cannot enter the working directory {request.cwd!r}: {error.strerror}\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_USAGE)


def _run(request: Request) -> int:
    from pyvmm.cli import run_cli

    try:
        run_cli(args=list(request.argv), prog_name=request.prog)
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    except BaseException:  # printed as the interpreter prints it
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish()
    return code


def _exit_status(value: object) -> int:
    """What the interpreter exits with for ``SystemExit(value)``."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    with contextlib.suppress(Exception):
        print(value, file=sys.stderr)
    return 1


def _finish() -> None:
    """What the interpreter does at exit: exit handlers, then flush the streams."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
