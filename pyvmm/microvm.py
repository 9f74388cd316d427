"""The library API: one microVM a test harness can drive from Python.

    from pyvmm import MicroVM

    with MicroVM(kernel="vmlinux", initrd="initramfs.cpio", vcpus=2, memory="256M") as vm:
        vm.start()
        vm.console.wait_for("login:", timeout=60)
        vm.console.write("root\\n")
        vm.pause()
        vm.resume()

:class:`MicroVM` wraps a :class:`~pyvmm.vmm.machine.Machine` with what a
program needs around it: the guest's serial output collected in a
:class:`SerialConsole` (expect-style :meth:`SerialConsole.wait_for`), a pipe
to type into the guest's UART, and a context manager that always tears the
VM down. Nothing is global: several MicroVMs live side by side in one
process, each with its own threads and file descriptors.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pyvmm.config import (
    DEFAULT_LINUX_CMDLINE,
    DriveConfig,
    MachineConfig,
    NetConfig,
    VsockConfig,
    build_machine_config,
)
from pyvmm.errors import ConfigError
from pyvmm.snapshot.overrides import CloneOverrides
from pyvmm.vmm.machine import Machine, VmState
from pyvmm.vmm.stop_reason import StopKind, StopReason
from pyvmm.vmm.threads import NO_SETUP, ThreadRole, ThreadSetup, spawn


class ConsoleTimeout(TimeoutError):
    """:meth:`SerialConsole.wait_for` gave up; the message shows what the guest printed."""


class SerialConsole:
    """The guest's serial output, kept whole, with a read cursor for expect-style waits.

    The vCPU thread appends (:meth:`feed`); any thread may wait. Each
    successful :meth:`wait_for` moves the cursor past its match, so a
    sequence of waits follows the output in order, as ``pexpect`` does.

    It also owns the pipe that types into the guest's UART: :meth:`write`
    feeds one end, the machine reads :attr:`input_fd`, and
    :meth:`close_input` closes both.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._cursor = 0
        self._changed = threading.Condition()
        self._closed = False
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        #: The end the machine reads the guest's keyboard input from.
        self.input_fd: int | None = read_fd
        self._write_fd: int | None = write_fd

    def feed(self, data: bytes) -> None:
        with self._changed:
            self._data += data
            self._changed.notify_all()

    def close(self) -> None:
        """No more output will come: wake every waiter."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the guest printed so far (UTF-8, undecodable bytes replaced)."""
        with self._changed:
            return self._data.decode(errors="replace")

    def wait_for(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0) -> re.Match:
        """Wait until ``pattern`` (a regex) appears after the cursor; return the match.

        Raises :class:`ConsoleTimeout` after ``timeout`` seconds, or at once
        when the VM has stopped and the output can no longer change.
        """
        regex = _as_bytes_regex(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._data, self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    tail = self._data[-400:].decode(errors="replace")
                    why = "the VM stopped" if self._closed else f"{timeout:g} s passed"
                    raise ConsoleTimeout(
                        f"{regex.pattern!r} did not appear before {why}; the guest last "
                        f"printed: {tail!r}"
                    )
                self._changed.wait(remaining)

    def close_input(self) -> None:
        """Close both ends of the input pipe (after the machine stopped reading it)."""
        for name in ("_write_fd", "input_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def write(self, data: str | bytes) -> None:
        """Type ``data`` into the guest's UART (it arrives as fast as the guest reads)."""
        if self._write_fd is None:
            raise RuntimeError("this console has no input")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        view = memoryview(payload)
        while view:
            written = os.write(self._write_fd, view)
            view = view[written:]


def _as_bytes_regex(pattern: str | bytes | re.Pattern) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        source = pattern.pattern
        flags = pattern.flags & ~re.UNICODE
        return re.compile(source.encode() if isinstance(source, str) else source, flags)
    return re.compile(pattern.encode() if isinstance(pattern, str) else pattern)


def _with_seccomp(seccomp: bool | str | Path, thread_setup: ThreadSetup) -> ThreadSetup:
    """The thread setup ``seccomp`` asks for (library mode: a fault stops only that VM)."""
    if seccomp is False:
        return thread_setup
    if thread_setup is not NO_SETUP:
        raise ConfigError("give seccomp= or thread_setup=, not both")
    from pyvmm.jail.seccomp import FaultPolicy, make_setup

    return make_setup(None if seccomp is True else seccomp, FaultPolicy.STOP_VM)


class MicroVM:
    """One microVM: configure in the constructor, then start / pause / resume / stop.

    Give either a complete :class:`~pyvmm.config.MachineConfig` or keyword
    arguments: ``kernel``, ``initrd``, ``cmdline``, ``vcpus``, ``memory``
    (MiB as an int, or a size string such as ``"512M"``), ``drives`` and
    ``nets`` (config objects or the CLI's ``path=IMG,ro`` /
    ``tap=NAME,mac=..`` strings), ``rng``, ``cpu_template``, ``vsock``
    (``cid=N,uds=PATH`` or a config), ``track_dirty_pages`` (for diff
    snapshots). Bad values raise
    :class:`~pyvmm.errors.ConfigError` with a one-line message.

    ``seccomp=True`` (or the path of a filter file in Firecracker's format)
    runs the VM's own threads - vCPUs, I/O - under their roles' filters; the
    caller's threads stay as they are. A denied call fails that thread and
    stops this VM with a reason naming the call; the process and its other
    VMs go on. (``thread_setup`` is the general form, for a setup of your own.)
    """

    def __init__(
        self,
        config: MachineConfig | None = None,
        *,
        kernel: str | Path | None = None,
        initrd: str | Path | None = None,
        cmdline: str = DEFAULT_LINUX_CMDLINE,
        vcpus: int = 1,
        memory: int | str = 128,
        drives: Iterable[DriveConfig | str] = (),
        nets: Iterable[NetConfig | str] = (),
        rng: bool = False,
        cpu_template: str = "auto",
        vsock: VsockConfig | str | None = None,
        track_dirty_pages: bool = False,
        seccomp: bool | str | Path = False,
        thread_setup: ThreadSetup = NO_SETUP,
    ) -> None:
        thread_setup = _with_seccomp(seccomp, thread_setup)
        if config is None:
            if kernel is None:
                raise TypeError("MicroVM needs a config or kernel=")
            config = build_machine_config(
                kernel=kernel,
                initrd=initrd,
                cmdline=cmdline,
                vcpus=vcpus,
                memory=memory,
                drives=drives,
                nets=nets,
                rng=rng,
                cpu_template=cpu_template,
                vsock=vsock,
                track_dirty_pages=track_dirty_pages,
            )
        self.console = SerialConsole()
        self._closed = False
        try:
            self._machine = Machine(
                config,
                serial_out=self.console.feed,
                console_in=self.console.input_fd,
                thread_setup=thread_setup,
            )
        except BaseException:
            self.console.close_input()
            raise

    @classmethod
    def restore(
        cls,
        state_path: str | Path,
        mem_path: str | Path,
        *,
        net_overrides: dict[str, str] | None = None,
        vsock_uds: str | Path | None = None,
        resume: bool = True,
        seccomp: bool | str | Path = False,
        thread_setup: ThreadSetup = NO_SETUP,
        clone: CloneOverrides | None = None,
        new_generation: bool = True,
    ) -> MicroVM:
        """A MicroVM continuing from :meth:`snapshot` files (in this or another process).

        Running unless ``resume=False`` (then paused). ``net_overrides``
        renames TAP devices ({old TAP name: new}), ``vsock_uds`` moves the
        vsock socket; vsock connections are reset, as in Firecracker. A
        ``clone`` of a snapshot (one of several running at once) also gets
        its own drive images and vsock CID. The console holds only what the
        guest prints from now on. The VM gets a new VM generation id, so
        that clones reseed their RNGs apart (as Firecracker does on every
        load); ``new_generation=False`` keeps the saved id (a ``clone``
        always gets a new one). ``seccomp`` as in the constructor.
        """
        thread_setup = _with_seccomp(seccomp, thread_setup)
        vm = cls.__new__(cls)
        vm.console = SerialConsole()
        vm._closed = False
        try:
            if clone is None:
                vm._machine = Machine.restore(
                    state_path,
                    mem_path,
                    serial_out=vm.console.feed,
                    console_in=vm.console.input_fd,
                    net_overrides=net_overrides,
                    vsock_uds=vsock_uds,
                    resume=resume,
                    thread_setup=thread_setup,
                    new_generation=new_generation,
                )
            else:
                vm._machine = restore_clone(
                    state_path,
                    mem_path,
                    clone,
                    serial_out=vm.console.feed,
                    console_in=vm.console.input_fd,
                    net_overrides=net_overrides,
                    vsock_uds=vsock_uds,
                    thread_setup=thread_setup,
                )
                if resume:
                    vm._machine.resume()
        except BaseException:
            vm.console.close_input()
            raise
        vm._watch_for_stop()
        return vm

    @property
    def config(self) -> MachineConfig:
        """The VM's whole configuration (a restored VM's too; live changes included)."""
        return self._machine.config

    @property
    def machine(self) -> Machine:
        """The underlying machine (for tests and tools that need its internals)."""
        return self._machine

    @property
    def state(self) -> VmState:
        return self._machine.state

    def start(self) -> MicroVM:
        """Build the VM and start its vCPUs; returns self, for chaining."""
        self._machine.start()
        self._watch_for_stop()
        return self

    def _watch_for_stop(self) -> None:
        def watch() -> None:
            self._machine.wait()
            self.console.close()

        spawn(ThreadRole.VMM, "pyvmm-watch", watch, on_error=self._machine_failed)

    def _machine_failed(self, message: str) -> None:
        self._machine.stop(StopReason(StopKind.VMM_ERROR, message))

    def pause(self) -> None:
        self._machine.pause()

    def snapshot(self, state_path: str | Path, mem_path: str | Path, *, diff: bool = False) -> None:
        """Write a snapshot of the paused VM: a state file and a memory file.

        ``diff`` writes only the pages changed since the previous snapshot
        (needs ``track_dirty_pages``); merge it onto its base with
        :func:`pyvmm.snapshot.merge_diff`. Both files appear whole or not
        at all.
        """
        self._machine.snapshot(state_path, mem_path, diff=diff)

    def resume(self) -> None:
        self._machine.resume()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the guest stops (None if ``timeout`` passes first)."""
        return self._machine.wait(timeout)

    def stop(self) -> StopReason:
        """Stop the guest and tear everything down; returns why the VM ended."""
        self.close()
        reason = self._machine.stop_reason
        assert reason is not None
        return reason

    def close(self) -> None:
        """Tear down (idempotent): threads joined, every fd closed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._machine.close()
        finally:
            self.console.close()
            self.console.close_input()

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def restore_clone(
    state_path: str | Path,
    mem_path: str | Path,
    clone: CloneOverrides,
    *,
    serial_out: Callable[[bytes], object] | None = None,
    console_in: int | None = None,
    net_overrides: dict[str, str] | None = None,
    vsock_uds: str | Path | None = None,
    thread_setup: ThreadSetup = NO_SETUP,
) -> Machine:
    """``Machine.restore`` for a clone (its own drives and vsock CID), paused.

    ``Machine.restore`` does not take clone overrides (yet): these are the
    same two steps, with the overrides passed to
    :func:`~pyvmm.vmm.snapshots.load_snapshot`.
    """
    from pyvmm.vmm.snapshots import load_snapshot

    state, config, mem_fd = load_snapshot(
        state_path, mem_path, net_overrides or {}, vsock_uds, None, clone
    )
    try:
        machine = Machine(config, serial_out, console_in, thread_setup=thread_setup)
    except BaseException:
        os.close(mem_fd)
        raise
    machine._restore_from(state, mem_fd)  # see the docstring: until Machine.restore takes it
    return machine
