"""An agent connection that drops because the guest stopped is reported as the VM's failure."""

from __future__ import annotations

import time

import pytest

from pyvmm.sandbox import sandbox as sandbox_module
from pyvmm.sandbox.errors import AgentDisconnected, AgentTimeout, SandboxVmError
from pyvmm.sandbox.sandbox import Sandbox


class StoppingVm:
    """A VM that records its stop ``after`` seconds (as a VMM thread does, a bit late)."""

    def __init__(self, after: float) -> None:
        self.stops_at = time.monotonic() + after

    def alive(self) -> bool:
        return time.monotonic() < self.stops_at

    def failure(self) -> str | None:
        return None if self.alive() else "the guest powered off"

    def console_tail(self, chars: int = 0) -> str:
        return "reboot: Power down"


def sandbox_with(vm: StoppingVm) -> Sandbox:
    sandbox = Sandbox.__new__(Sandbox)  # only _explain is exercised: no VM is made
    sandbox._vm = vm  # type: ignore[attr-defined]
    return sandbox


def test_a_dropped_connection_waits_for_the_stop_reason() -> None:
    error = sandbox_with(StoppingVm(0.2))._explain(AgentDisconnected("gone"), "exec")
    assert isinstance(error, SandboxVmError)
    text = str(error)
    assert text.startswith("exec failed: gone; the VM stopped: the guest powered off")
    assert "guest console (end)" in text and "Power down" in text


def test_a_running_vm_leaves_the_agent_error_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_module, "STOP_GRACE", 0.1)
    sandbox = sandbox_with(StoppingVm(60))
    error = AgentDisconnected("gone")
    assert sandbox._explain(error, "exec") is error
    started = time.monotonic()
    timeout = AgentTimeout("slow")
    assert sandbox._explain(timeout, "exec") is timeout  # no grace for a timeout
    assert time.monotonic() - started < 0.05
