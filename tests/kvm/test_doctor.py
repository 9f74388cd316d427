from __future__ import annotations

from pyvmm import doctor
from tests.conftest import requires_kvm


def test_host_facts_are_reported() -> None:
    assert doctor.virtualization_kind() in {"vmx", "svm", "pvm", "none"}
    assert doctor.cgroup_version() != ""
    assert doctor.seccomp_status().startswith(("available", "not available"))
    assert doctor.tun_status() != ""


@requires_kvm
def test_doctor_report_includes_speed_probe(probe_elf, capsys) -> None:
    lines: list[str] = []
    assert doctor.run_doctor(lines.append) == 0
    report = "\n".join(lines)
    for label in (
        "kvm device:",
        "KVM API version:",
        "capabilities:",
        "virtualization:",
        "pyvmm run:",
        "guest speed:",
        "/dev/net/tun:",
        "cgroups:",
        "seccomp:",
    ):
        assert label in report
    speed = next(line for line in lines if line.startswith("guest speed:"))
    assert "CPL0" in speed and "CPL3" in speed, speed


def test_doctor_says_where_pyvmm_run_puts_a_vm() -> None:
    assert doctor.run_path_line("vmx") == "every guest runs directly on this host's KVM"
    pvm = doctor.run_path_line("pvm", qemu_found=True)
    assert pvm.startswith("Linux guests run in a nested KVM host") and "probe" in pvm
    missing = doctor.run_path_line("pvm", qemu_found=False)
    assert missing.endswith("needs qemu-system-x86_64, which is not installed")
