"""``pyvmm forkserver --socket PATH``: start the fork server and serve until a stop signal.

Order: refuse a bad or busy socket path (before the imports, which take a
second or two), import everything a run may need (so the socket appears
only when the server can fork at once), listen, say so on stderr (one
line: scripts wait for it, or for the socket), serve. Problems the
user can fix (a path in use, a missing directory) are one ``pyvmm: error:``
line and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from pyvmm.errors import PyvmmError
from pyvmm.forkserver.child import SERVER_LOGGER

EXIT_USAGE = 2


@click.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    metavar="PATH",
    help="Unix socket to serve on (created 0600; a stale one is replaced).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="The server's own log lines (on its stderr); debug lists every VM process.",
)
def forkserver(socket_path: str, log_level: str) -> None:
    """Run each `pyvmm run` forked from one warm process.

    The server imports pyvmm's VM machinery once; each `pyvmm run` with
    PYVMM_FORKSERVER=PATH in its environment then runs in a child forked
    from it, with the client's arguments, directory, PYVMM_* environment and
    terminal or pipes, and the client exits as the VM does. Only the
    server's own uid may connect. SIGTERM stops the server and every VM it
    runs.
    """
    _log_to_stderr(log_level)
    from pyvmm.host.unix_socket import check_socket_path

    try:
        check_socket_path(socket_path, "fork server socket")
    except PyvmmError as error:
        _fail(str(error))
    from pyvmm.forkserver.preload import preload
    from pyvmm.forkserver.server import ForkServer, confine_server, listen

    start = time.monotonic()
    count = preload()
    _build_waiter()
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as error:
        _fail(f"this kernel has no pidfd_open (Linux 5.3 or later is needed): {error.strerror}")
    try:
        confine_server()
        listener = listen(socket_path)
    except PyvmmError as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot set up the fork server: {error}")
    logging.getLogger(SERVER_LOGGER).info(
        "listening on %s (pid %d, %d modules imported in %.2f s)",
        listener.path, os.getpid(), count, time.monotonic() - start,
    )  # fmt: skip
    ForkServer(listener).serve()


def _build_waiter() -> None:
    """The clients' C waiter: without it they wait in Python, which only costs memory."""
    from pyvmm.forkserver.waiter import build_waiter

    log = logging.getLogger(SERVER_LOGGER)
    try:
        log.debug("clients wait in %s", build_waiter())
    except (PyvmmError, OSError) as error:
        log.warning("clients will wait in Python (~8 MiB each, not ~1): no waiter: %s", error)


def _log_to_stderr(level: str) -> None:
    """The server's lines go to its stderr; a VM process drops this handler."""
    log = logging.getLogger(SERVER_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pyvmm forkserver: %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, level.upper()))
    log.propagate = False


def _fail(message: str) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(EXIT_USAGE)
