"""Connect to a guest's vsock port through its VM's Unix socket (Firecracker's convention).

The VMM listens on the vsock device's ``uds_path`` (see
:mod:`pyvmm.host.vsock_uds`): a client sends ``CONNECT <port>\n`` and, once
the guest accepted, reads ``OK <host port>\n``; then the socket carries the
stream. A guest with nobody listening on the port refuses (the VMM closes
the socket without an OK).
"""

from __future__ import annotations

import os
import socket

from pyvmm.sandbox.errors import AgentUnavailable

#: The reply to CONNECT is "OK <u32>\n": 14 bytes at most.
MAX_CONNECT_REPLY = 32


def connect_vsock(
    uds_path: str | os.PathLike[str], port: int, timeout: float
) -> tuple[socket.socket, bytes]:
    """Connect to guest vsock ``port`` through a VM's vsock Unix socket.

    Returns the socket and any bytes that came after the ``OK`` line (the
    guest may speak first). Raises :class:`AgentUnavailable` when there is no
    socket, no VM behind it, or the guest refuses the port.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(uds_path))
        sock.sendall(b"CONNECT %d\n" % port)
        reply = bytearray()
        while b"\n" not in reply:
            chunk = sock.recv(MAX_CONNECT_REPLY)
            if not chunk:
                raise AgentUnavailable(
                    f"the guest refused vsock port {port} (is its agent running yet?)"
                )
            reply += chunk
            if len(reply) > MAX_CONNECT_REPLY and b"\n" not in reply[:MAX_CONNECT_REPLY]:
                raise AgentUnavailable(f"{uds_path} answered CONNECT with an overlong line")
    except TimeoutError:
        sock.close()
        raise AgentUnavailable(
            f"no answer to CONNECT {port} on {uds_path} within {timeout:g} s"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise AgentUnavailable(
            f"no VM listens on {uds_path} (is the VM running with this vsock?)"
        ) from None
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(
            f"cannot connect through {uds_path}: {exc.strerror or exc}"
        ) from None
    except AgentUnavailable:
        sock.close()
        raise
    line, _, rest = bytes(reply).partition(b"\n")
    if not (line.startswith(b"OK ") and line[3:].isdigit()):
        sock.close()
        raise AgentUnavailable(f"{uds_path} answered CONNECT with {line[:40]!r}, not 'OK <port>'")
    return sock, rest
