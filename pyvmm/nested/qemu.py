"""The L1 machine: its QEMU command line, kernel command line and images.

L1 is Debian's generic kernel under ``qemu-system-x86_64 -M microvm`` with
TCG emulating an AMD CPU with SVM and nested paging, so that ``kvm_amd``
gives L1 a working ``/dev/kvm``. Each 9p share is one virtio-9p device; the
console port is a virtio-serial port backed by a Unix socket of QEMU's (see
:mod:`pyvmm.nested.agent` for what runs inside).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyvmm.nested.agent import CONSOLE_PORT_NAME, INIT_SCRIPT, L1_MODULES, Share

QEMU = "qemu-system-x86_64"

#: L1's kernel command line, before :func:`tsc_arguments`.
L1_CMDLINE = "console=ttyS0 panic=-1 mitigations=off"

#: QEMU's ``-accel`` value for L1.
TCG_ACCEL = "tcg"


def qemu_argv(
    kernel: Path,
    initrd: Path,
    shares: Sequence[Share],
    console_log: Path,
    *,
    memory_mib: int = 2048,
    cpus: int = 2,
    cmdline: str = L1_CMDLINE,
    qemu: str = QEMU,
    console_socket: Path | None = None,
    accel: str = TCG_ACCEL,
) -> list[str]:
    """The QEMU command line of an L1 (TCG with SVM and NPT, one 9p device per share,
    and the console port when ``console_socket`` is given)."""
    argv = [
        qemu,
        "-M", "microvm,acpi=on",
        "-accel", accel,
        "-cpu", "EPYC,+svm,+npt",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-monitor", "none",
        "-serial", f"file:{console_log}",
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline,
    ]  # fmt: skip
    for index, share in enumerate(shares):
        fsdev = (
            f"local,id=fs{index},path={_qemu_value(share.host_path)},security_model=none,"
            f"multidevs=remap" + (",readonly=on" if share.readonly else "")
        )
        argv += ["-fsdev", fsdev]
        argv += ["-device", f"virtio-9p-device,fsdev=fs{index},mount_tag={share.tag}"]
    if console_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=console,path={_qemu_value(console_socket)},server=on,wait=off",
            "-device", "virtio-serial-device,max_ports=2",
            "-device", f"virtserialport,chardev=console,name={CONSOLE_PORT_NAME}",
        ]  # fmt: skip
    return argv


def tsc_arguments(cpuinfo: str | None = None) -> str:
    """``tsc_early_khz=<host TSC> tsc=reliable``, or "" if the frequency is unknown.

    Why: under TCG the guest's TSC is the host's, but L1 has no reference
    clock to calibrate it against except the emulated PIT (microvm has no HPET
    and no ACPI PM timer), and on a busy host that calibration fails in about
    half of the boots, after which the kernel hangs before /init. Telling the
    kernel the frequency skips the calibration. ``cpu MHz`` in /proc/cpuinfo
    is the TSC frequency on the virtual machines this is meant for (the
    nested host is only used where KVM has no VMX/SVM).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                khz = round(float(value) * 1000)
            except ValueError:
                return ""
            return f"tsc_early_khz={khz} tsc=reliable" if khz > 0 else ""
    return ""


def default_cmdline() -> str:
    return f"{L1_CMDLINE} {tsc_arguments()}".strip()


def _qemu_value(path: Path) -> str:
    """A path as a QEMU option value (a comma is written twice)."""
    return str(path).replace(",", ",,")


def prepare_l1_images(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """The L1 kernel (Debian's generic flavour, which has 9p) and its initramfs.

    The kernel is the ELF vmlinux extracted from the bzImage: QEMU boots it
    through its PVH entry, which saves the 3-4 s the bzImage spends
    decompressing itself under TCG (L1 is ready in about 5 s instead of 9).
    Where it cannot be extracted, the bzImage is booted instead. The first call
    downloads the kernel package (about 70 MB) through apt; everything is
    cached by the guest kit afterwards.
    """
    from pyvmm.errors import PyvmmError
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs
    from pyvmm.guestkit.vmlinux import kernel_vmlinux

    package = fetch_kernel("generic", cache_dir=cache_dir)
    try:
        kernel = kernel_vmlinux(package)
    except PyvmmError:
        kernel = package.vmlinuz
    initrd = build_initramfs(package, L1_MODULES, INIT_SCRIPT, cache_dir=cache_dir)
    return kernel, initrd
