"""A bounded schemathesis run of Firecracker's API description against ``pyvmm-firecracker``.

Every one of the 38 operations in ``firecracker.yaml`` (a copy of
Firecracker's, with its attribution, beside this file) gets generated
requests, valid and invalid, ``EXAMPLES`` each, on one live process. The
contract checked is pyvmm's own promise to any client: no 5xx, every error
is Firecracker's ``{"fault_message": ...}`` JSON, no connection dropped,
and the process is alive and answering at the end. The process runs in a
scratch directory, so relative paths a generator invents (logs, metrics,
snapshot files) land there.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm

pytestmark = requires_kvm

SWAGGER = Path(__file__).with_name("firecracker.yaml")
EXAMPLES = 20  # per operation: 38 x 20 = 760 requests, about 25 s here


def test_generated_requests_never_break_the_api(tmp_path: Path) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="a test extra (pyproject.toml)")
    import requests_unixsocket
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_path(SWAGGER)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 38
    work = tmp_path / "cwd"
    work.mkdir()
    vmm = Vmm(work)
    session = requests_unixsocket.Session()
    session.mount("http://localhost", _socket_adapter(requests_unixsocket, vmm.sock))
    base_url = "http://localhost"  # requests to it go to the API socket
    seen: dict[str, set[int]] = {}
    try:
        for operation in operations:
            exercise = given(data=st.data())(_exercise(operation, vmm, base_url, session, seen))
            settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(exercise)()
        assert vmm.ok("GET", "/")["id"] == "anonymous-instance"
    finally:
        session.close()
        vmm.close()
    assert len(seen) == 38, sorted(set(o.path for o in operations) - {k.split()[1] for k in seen})


def _exercise(operation, vmm: Vmm, base_url: str, session, seen: dict[str, set[int]]):
    """One operation's check, for hypothesis to call with drawn data."""
    label = f"{operation.method.upper()} {operation.path}"

    def exercise(data) -> None:
        case = data.draw(operation.as_strategy())
        response = case.call(base_url=base_url, session=session, timeout=20)
        status = response.status_code
        seen.setdefault(label, set()).add(status)
        assert status < 500, (label, case.body, response.text)
        if status != 204 and response.content:
            reply = json.loads(response.content)
            if status >= 400:
                assert set(reply) == {"fault_message"} and reply["fault_message"]
        assert vmm.process.poll() is None, f"pyvmm-firecracker died after {label}"

    return exercise


def _socket_adapter(requests_unixsocket, sock: Path):
    """A requests adapter that sends every ``http://localhost`` request to ``sock``."""
    target = "http+unix://" + quote(str(sock), safe="") + "/"

    class SocketAdapter(requests_unixsocket.UnixAdapter):
        def get_connection(self, url, proxies=None):
            return super().get_connection(target, proxies)

    return SocketAdapter()
