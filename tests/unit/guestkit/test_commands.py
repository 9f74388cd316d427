"""``pyvmm guest kernel|initramfs|command-arg``, with the fetchers replaced by fakes."""

from __future__ import annotations

import base64
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pyvmm.errors import HostError
from pyvmm.guestkit import debian, initramfs, vmlinux
from pyvmm.guestkit.debian import KernelPackage


def _pkg(tmp_path: Path) -> KernelPackage:
    return KernelPackage(
        flavor="cloud",
        package="linux-image-6.1.0-1-cloud-amd64-unsigned",
        deb_version="6.1.1-1",
        version="6.1.0-1-cloud-amd64",
        root=tmp_path,
        vmlinuz=tmp_path / "boot" / "vmlinuz-6.1.0-1-cloud-amd64",
        modules_dir=tmp_path / "lib" / "modules" / "6.1.0-1-cloud-amd64",
    )


def test_registers_every_command(group: click.Group) -> None:
    assert set(group.commands) == {"kernel", "initramfs", "command-arg", "rootfs"}


def test_kernel_prints_the_bzimage_or_vmlinux(
    group: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    def fake_fetch(flavor: str, refresh: bool = False) -> KernelPackage:
        seen.append((flavor, refresh))
        return _pkg(tmp_path)

    monkeypatch.setattr(debian, "fetch_kernel", fake_fetch)
    monkeypatch.setattr(vmlinux, "kernel_vmlinux", lambda pkg: pkg.root / "vmlinux")
    runner = CliRunner()
    result = runner.invoke(group, ["kernel"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{_pkg(tmp_path).vmlinuz}\n"
    result = runner.invoke(
        group, ["kernel", "--flavor", "generic", "--format", "vmlinux", "--refresh"]
    )
    assert result.output == f"{tmp_path / 'vmlinux'}\n"
    assert seen == [("cloud", False), ("generic", True)]


def test_kernel_error_is_one_line_and_exit_2(
    group: click.Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(flavor: str, refresh: bool = False) -> KernelPackage:
        raise HostError("apt-get download x failed: E: 404")

    monkeypatch.setattr(debian, "fetch_kernel", broken)
    result = CliRunner().invoke(group, ["kernel"])
    assert result.exit_code == 2
    assert result.output == "pyvmm: error: apt-get download x failed: E: 404\n"


def test_initramfs_without_modules_needs_no_kernel(
    group: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_build(kernel, modules, init_script, agent=False, compress=True):  # type: ignore[no-untyped-def]
        calls.append((kernel, tuple(modules), init_script, agent, compress))
        return tmp_path / "initrd.cpio.gz"

    def no_fetch(flavor: str) -> KernelPackage:
        raise AssertionError("the kernel must not be fetched")

    monkeypatch.setattr(initramfs, "build_initramfs", fake_build)
    monkeypatch.setattr(debian, "fetch_kernel", no_fetch)
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\necho hi\n")
    result = CliRunner().invoke(group, ["initramfs", "--init", str(init), "--no-compress"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{tmp_path / 'initrd.cpio.gz'}\n"
    assert calls == [(None, (), "#!/bin/sh\necho hi\n", True, False)]  # the agent is in


def test_initramfs_with_modules_fetches_the_flavor(
    group: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(debian, "fetch_kernel", lambda flavor: _pkg(tmp_path / flavor))
    monkeypatch.setattr(
        initramfs,
        "build_initramfs",
        lambda kernel, modules, init_script, agent=False, compress=True: (
            calls.append(
                (
                    kernel.flavor,
                    kernel.root.name,
                    modules,
                    init_script == initramfs.DEFAULT_INIT,
                    agent,
                )
            )
            or tmp_path / "x"
        ),
    )
    result = CliRunner().invoke(
        group, ["initramfs", "--flavor", "generic", "--module", "9p", "--module", "kvm-amd"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [("cloud", "generic", ("9p", "kvm-amd"), True, True)]


def test_initramfs_missing_init_file(group: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(group, ["initramfs", "--init", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.startswith("pyvmm: error: init script ")
    assert result.output.count("\n") == 1


def test_command_arg(group: click.Group) -> None:
    result = CliRunner().invoke(group, ["command-arg", "cat /proc/cpuinfo"])
    assert result.exit_code == 0
    key, _, value = result.output.strip().partition("=")
    assert key == "pyvmm.cmd"
    assert base64.b64decode(value) == b"cat /proc/cpuinfo"
    result = CliRunner().invoke(group, ["command-arg", "x" * 5000])
    assert result.exit_code == 2 and "too long" in result.output
