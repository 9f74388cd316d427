"""The VM under a sandbox, seen through what a sandbox needs of it.

A sandbox's VMM runs one of two ways (:mod:`pyvmm.sandbox.confinement`
chooses): in the calling process (:class:`InProcessVm`, a
:class:`~pyvmm.vmm.machine.Machine` whose threads carry the seccomp filters
of their roles) or as a jailed process driven over Firecracker's API
(:class:`~pyvmm.sandbox.jailed.JailedVm`). Both offer the
:class:`SandboxVm` protocol, so the sandbox code never asks which.

The guest's console is kept only as a bounded tail (the machine's
:class:`~pyvmm.vmm.serial_tail.SerialTail`): a guest printing without end
costs its own time, never the host's memory. Error messages quote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pyvmm.config import MachineConfig
from pyvmm.snapshot.overrides import CloneOverrides
from pyvmm.vmm.threads import NO_SETUP, ThreadSetup

if TYPE_CHECKING:
    from pyvmm.vmm.machine import Machine

#: Characters of console output quoted in error messages.
CONSOLE_TAIL_CHARS = 2000


class SandboxVm(Protocol):
    """What a sandbox does with its VM."""

    #: The host side of the VM's vsock device (Firecracker's CONNECT convention).
    vsock_uds: Path

    def alive(self) -> bool: ...

    def failure(self) -> str | None:
        """Why the VM stopped, once it has (None while it runs)."""

    def console_tail(self, chars: int = CONSOLE_TAIL_CHARS) -> str: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def snapshot(self, state_path: Path, mem_path: Path) -> None:
        """Snapshot the paused VM (files on the host, whatever the VM sees)."""

    def close(self) -> None: ...


class InProcessVm:
    """A :class:`~pyvmm.vmm.machine.Machine` in this process (see the module docstring)."""

    def __init__(self, machine: Machine, vsock_uds: Path) -> None:
        self.machine = machine
        self.vsock_uds = vsock_uds

    @classmethod
    def boot(cls, config: MachineConfig, setup: ThreadSetup = NO_SETUP) -> InProcessVm:
        """Build and start ``config`` (which must have a vsock device)."""
        from pyvmm.vmm.machine import Machine

        assert config.vsock is not None
        machine = Machine(config, serial_out=_discard, thread_setup=setup)
        machine.start()
        return cls(machine, config.vsock.uds_path)

    @classmethod
    def restore(
        cls,
        state_path: Path,
        mem_path: Path,
        *,
        vsock_uds: Path,
        clone: CloneOverrides,
        net_overrides: dict[str, str],
        setup: ThreadSetup = NO_SETUP,
        resume: bool = True,
    ) -> InProcessVm:
        """A clone of the snapshot, running (or paused without ``resume``)."""
        from pyvmm.microvm import restore_clone

        machine = restore_clone(
            state_path, mem_path, clone, serial_out=_discard, net_overrides=net_overrides,
            vsock_uds=vsock_uds, thread_setup=setup,
        )  # fmt: skip
        vm = cls(machine, vsock_uds)
        if resume:
            try:
                machine.resume()
            except BaseException:
                machine.close()
                raise
        return vm

    def alive(self) -> bool:
        return self.machine.wait(0) is None

    def failure(self) -> str | None:
        reason = self.machine.stop_reason
        return None if reason is None else str(reason)

    def console_tail(self, chars: int = CONSOLE_TAIL_CHARS) -> str:
        try:
            tail = self.machine.devices.serial_tail
        except RuntimeError:  # not built
            return ""
        return tail.text()[-chars:] if tail is not None else ""

    def pause(self) -> None:
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    def snapshot(self, state_path: Path, mem_path: Path) -> None:
        self.machine.snapshot(state_path, mem_path)

    def close(self) -> None:
        self.machine.close()


def _discard(data: bytes) -> None:
    """Console bytes go nowhere but the machine's bounded tail."""
