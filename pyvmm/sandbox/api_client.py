"""A minimal client for a jailed VMM's Firecracker API (HTTP/1.1 on a Unix socket).

One connection per request (the server allows keep-alive; a jailed
sandbox makes a handful of requests in its life). Every wait is bounded,
answers are capped at :data:`MAX_RESPONSE_BYTES` (the VMM is confined
because it may be compromised: its answers are not trusted to be small),
and a failure is a :class:`~pyvmm.sandbox.errors.SandboxVmError` naming the
request and quoting the VMM's ``fault_message``.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

from pyvmm.sandbox.errors import SandboxVmError

MAX_RESPONSE_BYTES = 64 * 1024
REQUEST_TIMEOUT = 60.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Requests to the API socket at ``path``."""

    def __init__(self, path: Path, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def wait_listening(self, deadline: float, alive: object) -> None:
        """Wait until the socket accepts connections (the VMM starts it late)."""
        while True:
            try:
                probe = _UnixConnection(self.path, 1.0)
                probe.connect()
                probe.close()
                return
            except OSError as exc:
                if not alive() or time.monotonic() > deadline:  # type: ignore[operator]
                    raise SandboxVmError(
                        f"the jailed VMM's API socket {self.path} never answered: {exc}"
                    ) from None
                time.sleep(0.02)

    def request(self, method: str, path: str, body: object | None = None) -> object:
        """Send one request; the parsed JSON answer (None when empty)."""
        conn = _UnixConnection(self.path, self.timeout)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise SandboxVmError(f"{method} {path} to the jailed VMM failed: {exc}") from None
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise SandboxVmError(f"{method} {path}: the jailed VMM's answer is too long")
        answer = _parse(raw)
        if response.status not in (200, 204):
            fault = answer.get("fault_message") if isinstance(answer, dict) else None
            detail = str(fault)[:500] if fault else raw[:200].decode(errors="replace")
            raise SandboxVmError(
                f"{method} {path}: the jailed VMM answered {response.status}: {detail}"
            )
        return answer


def _parse(raw: bytes) -> object:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"fault_message": raw[:200].decode(errors="replace")}
