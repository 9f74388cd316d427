"""The L1 machine's QEMU command line and kernel arguments."""

from __future__ import annotations

from pathlib import Path

from pyvmm.nested.agent import Share
from pyvmm.nested.qemu import qemu_argv, tsc_arguments


def test_qemu_argv_has_tcg_svm_and_one_9p_device_per_share() -> None:
    shares = [Share("host", Path("/"), readonly=True), Share("work", Path("/tmp/a,b"))]
    argv = qemu_argv(Path("/k"), Path("/i"), shares, Path("/tmp/c.log"), memory_mib=1024)
    line = " ".join(argv)
    for piece in (
        "-M microvm,acpi=on -accel tcg -cpu EPYC,+svm,+npt -m 1024 -smp 2",
        "-serial file:/tmp/c.log",
        "-kernel /k -initrd /i",
        "-fsdev local,id=fs0,path=/,security_model=none,multidevs=remap,readonly=on",
        "-device virtio-9p-device,fsdev=fs0,mount_tag=host",
        "path=/tmp/a,,b,security_model=none,multidevs=remap -device",
        "mount_tag=work",
    ):
        assert piece in line


def test_tsc_arguments_come_from_cpu_mhz() -> None:
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.412\nflags\t\t: fpu\n"
    assert tsc_arguments(cpuinfo) == "tsc_early_khz=2445412 tsc=reliable"
    assert tsc_arguments("processor : 0\n") == ""


def test_the_console_port_is_a_virtio_serial_port_on_a_socket() -> None:
    argv = qemu_argv(
        Path("/k"), Path("/i"), [], Path("/c.log"), console_socket=Path("/w/console.sock")
    )
    line = " ".join(argv)
    assert "-chardev socket,id=console,path=/w/console.sock,server=on,wait=off" in line
    assert "-device virtserialport,chardev=console,name=pyvmm.console" in line
    assert "-console" not in line
