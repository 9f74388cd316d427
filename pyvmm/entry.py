"""The ``pyvmm`` command's first module: relay to a fork server, or run the CLI.

``pyvmm run`` with ``PYVMM_FORKSERVER=PATH`` in the environment goes through
the fork server at PATH (:mod:`pyvmm.forkserver`): this process then imports
only the standard library and the small client, and the VM runs in a child
of a server that imported pyvmm once. Everything else - other commands, or
no variable - imports :mod:`pyvmm.cli` and runs it as always. An empty
variable counts as unset. The server is never a silent fallback: when the
variable is set and nobody serves the path, the command fails and says so.

Nothing heavier than ``os`` and ``sys`` is imported before that choice is made.
"""

from __future__ import annotations

import os
import sys

#: The environment variable naming the fork server's socket.
SERVER_ENV = "PYVMM_FORKSERVER"


def main() -> None:
    args = sys.argv[1:]
    server = os.environ.get(SERVER_ENV)
    if server and args[:1] == ["run"]:
        from pyvmm.forkserver.client import relay

        sys.exit(relay(server, args, program_name()))
    from pyvmm.cli import run_cli

    run_cli()


def program_name() -> str:
    """The name click would show in usage lines for this process (``pyvmm``,
    or ``python -m pyvmm``): the server's child runs click under it."""
    package = getattr(sys.modules.get("__main__"), "__package__", None)
    if not package:
        return os.path.basename(sys.argv[0])
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    module = package if name == "__main__" else f"{package}.{name}"
    return f"python -m {module.lstrip('.')}"
