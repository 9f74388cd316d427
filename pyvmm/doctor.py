"""``pyvmm doctor``: what this host offers, measured where it can be.

Each check returns a line; none raises. It also says where ``pyvmm run``
puts a VM on this host (directly, or Linux guests in a nested host: the
decision itself is :mod:`pyvmm.nested.placement`'s). The speed probe boots the probe
guest and times a loop in guest kernel mode (CPL0) and in user mode (CPL3):
on a PVM host CPL0 is emulated and thousands of times slower, which decides
how real Linux guests can be tested here (see ENVIRONMENT.md).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

CPL0_ITERATIONS = 200_000
CPL3_ITERATIONS = 50_000_000
MARKER_PORT = 0x80
PVM_RATIO_THRESHOLD = 20.0


class SpeedResult(NamedTuple):
    cpl0_ns: float  # per loop iteration
    cpl3_ns: float

    @property
    def ratio(self) -> float:
        return self.cpl0_ns / self.cpl3_ns if self.cpl3_ns else float("inf")


class _MarkerDevice:
    """Timestamps each byte the guest writes to the marker port."""

    def __init__(self) -> None:
        self.marks: dict[int, int] = {}
        self._lock = threading.Lock()

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self.marks[data[0]] = time.perf_counter_ns()


def measure_guest_speed(probe: Path) -> SpeedResult:
    """Boot the probe with ``spin0``/``spin3`` and time both loops."""
    from pyvmm.config import MachineConfig
    from pyvmm.vmm.machine import Machine

    config = MachineConfig(
        kernel=probe, cmdline=f"spin0={CPL0_ITERATIONS} spin3={CPL3_ITERATIONS}", mem_size=32 << 20
    )
    marker = _MarkerDevice()
    machine = Machine(config)
    machine.add_pio_device(MARKER_PORT, 1, marker, "marker")
    reason = machine.run(timeout=120)
    marks = marker.marks
    if not {0xA0, 0xA1, 0xB0, 0xB1} <= marks.keys():
        raise RuntimeError(f"the probe did not report its loops ({reason})")
    return SpeedResult(
        cpl0_ns=(marks[0xA1] - marks[0xA0]) / CPL0_ITERATIONS,
        cpl3_ns=(marks[0xB1] - marks[0xB0]) / CPL3_ITERATIONS,
    )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def virtualization_kind() -> str:
    """'vmx', 'svm', 'pvm' or 'none', from CPU flags and loaded modules."""
    flags = _cpu_flags()
    if Path("/sys/module/kvm_pvm").exists():
        return "pvm"
    if "vmx" in flags:
        return "vmx"
    if "svm" in flags:
        return "svm"
    return "none"


def cgroup_version() -> str:
    """'v2', 'v1', or 'hybrid (v1 + v2 at ...)' from the cgroup mounts."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    v1 = [line.split()[1] for line in mounts if line.split()[2:3] == ["cgroup"]]
    v2 = [line.split()[1] for line in mounts if line.split()[2:3] == ["cgroup2"]]
    if v2 and not v1:
        return "v2"
    if v1 and v2:
        return f"hybrid (v1, with v2 at {v2[0]})"
    if v1:
        return "v1"
    return "none mounted"


def seccomp_status() -> str:
    actions = Path("/proc/sys/kernel/seccomp/actions_avail")
    if actions.exists():
        return f"available (actions: {actions.read_text().strip()})"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Seccomp:"):
                return "available"
    except OSError:
        pass
    return "not available"


def tun_status() -> str:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "present, no permission"
    except OSError as error:
        return f"present, cannot open ({error.strerror})"
    os.close(fd)
    return "ok (read/write)"


def run_doctor(echo: Callable[[str], None]) -> int:
    """Print the host report; exit status 0 if pyvmm can run VMs here."""
    from pyvmm.errors import PyvmmError
    from pyvmm.kvm import Kvm
    from pyvmm.kvm.constants import all_capabilities

    usable = True
    echo(f"kvm device:        {_kvm_access()}")
    try:
        with Kvm() as kvm:
            echo(f"KVM API version:   {kvm.api_version}")
            caps = {name: kvm.check_extension(cap) for name, cap in all_capabilities().items()}
            echo("capabilities:      " + ", ".join(f"{k}={v}" for k, v in sorted(caps.items())))
    except PyvmmError as error:
        echo(f"KVM:               unusable: {error}")
        usable = False
    kind = virtualization_kind()
    echo(f"virtualization:    {kind}" + (" (KVM by the kvm_pvm module)" if kind == "pvm" else ""))
    echo(f"pyvmm run:         {run_path_line(kind)}")
    if usable:
        echo(f"guest speed:       {_speed_line()}")
    echo(f"/dev/net/tun:      {tun_status()}")
    echo(f"cgroups:           {cgroup_version()}")
    echo(f"seccomp:           {seccomp_status()}")
    return 0 if usable else 1


def run_path_line(kind: str, qemu_found: bool | None = None) -> str:
    """Where ``pyvmm run`` (``--nested auto``) puts a VM on a host of this kind."""
    import shutil

    from pyvmm.nested.placement import HARDWARE_KINDS, describe_default

    line = describe_default(kind)
    if kind not in HARDWARE_KINDS:
        if qemu_found is None:
            qemu_found = shutil.which("qemu-system-x86_64") is not None
        if not qemu_found:
            line += "; the nested host needs qemu-system-x86_64, which is not installed"
    return line


def _kvm_access() -> str:
    path = "/dev/kvm"
    if not os.path.exists(path):
        return "missing"
    if not os.access(path, os.R_OK | os.W_OK):
        return "present, no read/write permission"
    return "ok (read/write)"


def _speed_line() -> str:
    from pyvmm.errors import PyvmmError
    from pyvmm.guestkit.probe import build_probe

    try:
        result = measure_guest_speed(build_probe())
    except (PyvmmError, RuntimeError) as error:
        return f"not measured: {error}"
    verdict = (
        "guest kernel code is emulated (PVM-like): boot real Linux guests in a nested host"
        if result.ratio > PVM_RATIO_THRESHOLD
        else "guest kernel code runs at hardware speed"
    )
    return (
        f"CPL0 {result.cpl0_ns:.2f} ns/iter, CPL3 {result.cpl3_ns:.2f} ns/iter "
        f"(x{result.ratio:.0f}): {verdict}"
    )
