"""``pyvmm-firecracker``'s command line as Firecracker's clients use it.

``--version`` as Kata Containers parses it, ``--snapshot-version`` and
``--describe-snapshot``, ``--enable-pci`` and ``--metadata`` (microheart,
Firecracker's own tests), the MMDS limit following the payload limit,
stale sockets left by a killed VMM, the C launcher that listens before
Python starts, and the probe guest booted with a Linux command line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import UnixHTTPConnection, Vmm

pytestmark = requires_kvm

MAIN = [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MAIN, *args], capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def semver(text: str) -> tuple[int, int, int]:
    """What Kata's fc.go does: first line, second word, "v" trimmed, then a semver."""
    word = text.split("\n")[0].split(" ")[1].strip().removeprefix("v")
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?", word)
    assert match, f"not a semantic version: {word!r}"
    return int(match[1]), int(match[2]), int(match[3])


def test_version_says_pyvmm_and_is_a_version_kata_accepts(tmp_path: Path) -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("pyvmm v") and "+pyvmm." in first
    assert semver(result.stdout) >= (0, 21, 1)  # Kata's fcMinSupportedVersion
    vmm = Vmm(tmp_path)
    try:
        assert vmm.ok("GET", "/version")["firecracker_version"] == first.split(" ")[1][1:]
        assert vmm.ok("GET", "/")["vmm_version"] == first.split(" ")[1][1:]
    finally:
        vmm.close()


def test_snapshot_version_and_describe_snapshot(tmp_path: Path, probe_elf: Path) -> None:
    version = run("--snapshot-version")
    assert version.returncode == 0 and re.fullmatch(r"v\d+\.0\.0\n", version.stdout)
    vmm = Vmm(tmp_path)
    try:
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
        vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "s"),
                                           "mem_file_path": str(tmp_path / "m")})  # fmt: skip
    finally:
        vmm.close()
    described = run("--describe-snapshot", str(tmp_path / "s"))
    assert (described.returncode, described.stdout) == (0, version.stdout)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path / "m", fifo, tmp_path / "missing"):
        result = run("--describe-snapshot", str(bad), timeout=10)  # a FIFO must not hang it
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result
        assert result.stderr.startswith("pyvmm: error: ")


def test_config_file_with_enable_pci_and_metadata(tmp_path: Path, probe_elf: Path) -> None:
    """microheart's command line (``--config-file C --enable-pci``) plus ``--metadata``."""
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(probe_elf),
                        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }))  # fmt: skip
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"latest": {"meta-data": {"instance-id": "i-1"}}}))
    vmm = Vmm(tmp_path, "--config-file", str(config), "--enable-pci", "--metadata", str(metadata))
    try:
        vmm.wait_serial(r"probe: idle")
        assert vmm.ok("GET", "/")["state"] == "Running"
        assert vmm.ok("GET", "/mmds") == {"latest": {"meta-data": {"instance-id": "i-1"}}}
    finally:
        vmm.close()


def test_bad_metadata_files_are_one_line_errors(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"k": "v" * 60_000}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2")
    sock = tmp_path / "api.sock"
    for path, problem in (
        (fifo, "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
        (big, "at most 51200 are accepted"),
        (bad_json, "is not valid JSON"),
        (tmp_path / "missing.json", "No such file or directory"),
    ):
        result = run("--api-sock", str(sock), "--metadata", str(path), timeout=20)
        assert result.returncode == 2, result
        assert result.stderr.startswith("pyvmm: error: metadata file ")
        assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not sock.exists(), "the early-bound API socket was left behind"


def test_bad_flags_are_one_line_and_leave_no_socket(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    result = run("--api-sock", str(sock), "--bogus")
    assert result.returncode == 2
    assert result.stderr == "pyvmm: error: No such option '--bogus'.\n"
    assert not sock.exists()
    result = run("--api-sock", str(sock), "--http-api-max-payload-size", "9" * 400)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "--http-api-max-payload-size" in result.stderr


def test_mmds_limit_follows_the_payload_limit_as_in_firecracker(tmp_path: Path) -> None:
    """Firecracker: without --mmds-size-limit, the data store may be as large as a body."""
    big = {"k": "v" * 80_000}
    vmm = Vmm(tmp_path, "--http-api-max-payload-size", "100000")
    try:
        vmm.ok("PUT", "/mmds", big)
        assert vmm.ok("GET", "/mmds") == big
    finally:
        vmm.close()
    small = tmp_path / "small"
    small.mkdir()
    vmm = Vmm(small, "--http-api-max-payload-size", "100000", "--mmds-size-limit", "1000")
    try:
        status, reply = vmm.request("PUT", "/mmds", big)
        assert status == 413 and "limit of 1000" in reply["fault_message"]
    finally:
        vmm.close()


def test_a_killed_vmms_socket_is_replaced_by_the_next(tmp_path: Path, probe_elf: Path) -> None:
    """SIGKILL leaves the API socket and the vsock socket; the next start reuses both paths."""
    uds = tmp_path / "v.sock"
    first = Vmm(tmp_path)
    first.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
    first.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    first.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(uds)})
    first.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    first.process.send_signal(signal.SIGKILL)
    first.close()
    assert first.sock.exists() and uds.exists()  # what a SIGKILL leaves behind
    second = Vmm(tmp_path)
    try:
        second.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf),
                                          "boot_args": "counter"})  # fmt: skip
        second.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        second.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(uds)})
        second.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        second.wait_serial(r"counter: 1\b")
    finally:
        assert second.close() == 143
        log = second.stderr_text
    assert f"removed the stale socket {second.sock}" in log
    assert f"removed the stale socket {uds}" in log


def test_the_launcher_listens_before_python_starts(tmp_path: Path) -> None:
    """pyvmm's C launcher: the socket accepts connections while Python has not even started
    (here the "python" it execs first sleeps 2 s), and they are served once it runs."""
    from pyvmm.api.launcher import build_launcher

    slow_python = tmp_path / "slow-python"
    slow_python.write_text(f'#!/bin/sh\nsleep 2\nexec "{sys.executable}" "$@"\n')
    slow_python.chmod(0o755)
    launcher = build_launcher(tmp_path / "cache", python=str(slow_python))
    sock = tmp_path / "api.sock"
    process = subprocess.Popen(
        [str(launcher), "--api-sock", str(sock), "--id", "early"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 1.5
        while not sock.exists():
            assert time.monotonic() < deadline, "no socket while the interpreter was starting"
            time.sleep(0.005)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))  # accepted by the kernel's backlog: no refusal
        assert b"slow-python" in Path(f"/proc/{process.pid}/cmdline").read_bytes()  # not Python
        client.close()
        conn = UnixHTTPConnection(sock)
        conn.request("GET", "/")
        reply = json.loads(conn.getresponse().read())
        assert reply["id"] == "early" and reply["state"] == "Not started"
        conn.close()
    finally:
        process.terminate()
        process.wait(20)
        process.stderr.close()
    assert not sock.exists()


@pytest.mark.parametrize(
    ("boot_args", "expected"),
    [
        ("console=ttyS0 reboot=k panic=1 pci=off ip=172.16.0.2::172.16.0.1:255.255.255.252"
         "::eth0:off quiet hello", "PROBE RESULT: PASS"),
        ("console=ttyS0 reboot=k panic=1 bogus", "PROBE RESULT: FAIL unknown program 'bogus'"),
    ],
)  # fmt: skip
def test_the_probe_takes_a_linux_command_line(
    tmp_path: Path, probe_elf: Path, boot_args: str, expected: str
) -> None:
    vmm = Vmm(tmp_path)
    try:
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": boot_args})
        vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert vmm.process.wait(30) == 0  # the probe resets the VM at its end
        assert expected in vmm.serial()
    finally:
        vmm.close()
