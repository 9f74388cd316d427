"""The Firecracker-compatible API end to end: a real ``pyvmm-firecracker`` process,
its Unix socket, the probe guest on the host's /dev/kvm.

Also ``pyvmm run --config`` and ``--config-file --no-api`` with Firecracker's
JSON config format, and an unmodified Firecracker client from PyPI
(``firecracker-python``'s ``Api``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm

pytestmark = requires_kvm


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(self._path)


class Vmm:
    """A ``pyvmm-firecracker`` process and a keep-alive API connection to it."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        """Runs in ``tmp_path``: relative paths a request names (logs, metrics) land there."""
        self.sock = tmp_path / "api.sock"
        self.out = tmp_path / "serial.out"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()",
             "--api-sock", str(self.sock), *args],
            stdin=subprocess.DEVNULL,
            stdout=self.out.open("wb"),
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self._listening():  # a stale socket file may be there before ours
            assert self.process.poll() is None, self.process.stderr.read().decode()
            assert time.monotonic() < deadline, "the API socket never appeared"
            time.sleep(0.01)
        self.conn = UnixHTTPConnection(self.sock)

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.sock))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        finally:
            probe.close()
        return True

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: object = None) -> object:
        status, reply = self.request(method, path, body)
        assert status in (200, 204), (status, reply)
        return reply

    def serial(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_serial(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.serial())) is None:
            assert time.monotonic() < deadline, f"{pattern!r} not in {self.serial()[-500:]!r}"
            time.sleep(0.05)
        return match

    def close(self) -> int:
        """SIGTERM (if still running) and wait; ``stderr_text`` then holds what it printed."""
        self.conn.close()
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(20)
        finally:
            if not self.process.stderr.closed:
                self.stderr_text = self.process.stderr.read().decode(errors="replace")
                self.process.stderr.close()


@pytest.fixture
def vmm(tmp_path: Path):
    instance = Vmm(tmp_path, "--id", "api-test", "--metrics-path", str(tmp_path / "metrics"))
    yield instance
    instance.close()


def counters(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"counter: (\d+)", text)]


def test_boot_pause_resume_over_the_api(vmm: Vmm, probe_elf: Path, tmp_path: Path) -> None:
    version = vmm.ok("GET", "/version")["firecracker_version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\+pyvmm\.\d+\.\d+\.\d+.*", version), version
    assert vmm.ok("GET", "/") == {
        "id": "api-test", "state": "Not started", "started": False, "vmm_version": version,
        "app_name": "pyvmm",
    }  # fmt: skip
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
    vmm.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    status, reply = vmm.request("PATCH", "/vm", {"state": "Paused"})
    assert status == 400 and "before starting" in reply["fault_message"]
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    assert vmm.ok("GET", "/")["state"] == "Running"
    vmm.wait_serial(r"counter: 3\b")
    status, reply = vmm.request("PUT", "/boot-source", {"kernel_image_path": str(probe_elf)})
    assert status == 400 and "after starting" in reply["fault_message"]

    vmm.ok("PATCH", "/vm", {"state": "Paused"})
    assert vmm.ok("GET", "/")["state"] == "Paused"
    paused = counters(vmm.serial())
    time.sleep(0.8)
    assert counters(vmm.serial()) == paused
    vmm.ok("PATCH", "/vm", {"state": "Resumed"})
    vmm.wait_serial(rf"counter: {paused[-1] + 2}\b")
    seen = counters(vmm.serial())
    assert seen == list(range(seen[-1] + 1))

    vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    lines = [json.loads(line) for line in (tmp_path / "metrics").read_text().splitlines()]
    last = lines[-1]
    assert last["patch_api_requests"]["vm_count"] >= 3
    assert last["latencies_us"]["pause_vm"] > 0 and last["latencies_us"]["resume_vm"] > 0
    vcpu_total = {k: sum(line.get("vcpu", {}).get(k, 0) for line in lines) for k in last["vcpu"]}
    assert vcpu_total["exit_io_out"] > 20  # the counter's UART output
    assert vcpu_total["exit_interrupted"] >= 2  # one per vCPU parked
    config = vmm.ok("GET", "/vm/config")
    assert config["machine-config"]["vcpu_count"] == 2
    assert config["boot-source"]["boot_args"] == "counter"
    assert vmm.close() == 143  # SIGTERM stops the guest; the status says so, as `pyvmm run`


def test_the_process_exits_with_the_guest(vmm: Vmm, probe_elf: Path) -> None:
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "hello"})
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    assert vmm.process.wait(30) == 0  # the probe resets the VM at its end: a clean exit
    assert "PROBE RESULT: PASS" in vmm.serial()
    assert not vmm.sock.exists(), "the API socket was left behind"


def test_concurrent_clients_and_a_stalled_one(vmm: Vmm, probe_elf: Path) -> None:
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(vmm.sock))
    stalled.sendall(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
    others = [Vmm.__new__(Vmm) for _ in range(4)]
    for other in others:
        other.conn = UnixHTTPConnection(vmm.sock)
    for other in others:
        assert Vmm.request(other, "GET", "/machine-config")[0] == 200
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    vmm.wait_serial(r"counter: 1\b")
    for other in others:
        other.conn.close()
    stalled.close()


def firecracker_config(probe: Path, cmdline: str) -> dict:
    return {
        "boot-source": {"kernel_image_path": str(probe), "boot_args": cmdline},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": False},
        "drives": [],
    }


def test_config_file_with_no_api(tmp_path: Path, probe_elf: Path) -> None:
    config = tmp_path / "vm.json"
    config.write_text(json.dumps(firecracker_config(probe_elf, "hello")))
    result = subprocess.run(
        [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()",
         "--no-api", "--config-file", str(config)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hello from probe" in result.stdout


def test_pyvmm_run_accepts_a_firecracker_config(tmp_path: Path, probe_elf: Path) -> None:
    config = tmp_path / "vm.json"
    config.write_text(json.dumps(firecracker_config(probe_elf, "hello")))
    run = [sys.executable, "-m", "pyvmm", "run", "--config", str(config)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "hello from probe" in result.stdout
    both = subprocess.run([*run, "--cpus", "2"], capture_output=True, text=True, check=False)
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "pyvmm: error: --config already describes the VM; drop --cpus or put it in the file"
    )
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": 3}}))
    bad = subprocess.run(run, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "kernel_image_path" in bad.stderr


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    no_api = subprocess.run(
        [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()", "--no-api"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert no_api.returncode == 2
    assert no_api.stderr.strip() == (
        "pyvmm: error: --no-api needs --config-file: nothing could start the microVM"
    )
    taken = tmp_path / "taken"
    taken.write_text("")
    busy = subprocess.run(
        [sys.executable, "-m", "pyvmm", "serve", "--api-sock", str(taken)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1
    assert str(taken) in busy.stderr and taken.read_text() == ""


def test_an_unmodified_firecracker_client_boots_and_pauses(
    vmm: Vmm, probe_elf: Path, tmp_path: Path
) -> None:
    """``firecracker-python``'s own API client, as its MicroVM class uses it.

    (Importing the package prints a warning that no ``firecracker`` binary is
    installed and creates /var/lib/firecracker: its own import-time checks.)
    """
    from firecracker import api as api_module

    api = api_module.Api(str(vmm.sock))
    try:
        assert api.describe.get().json()["state"] == "Not started"
        api.boot.put(kernel_image_path=str(probe_elf), boot_args="counter")
        api.machine_config.put(vcpu_count=1, mem_size_mib=64)
        api.actions.put(action_type="InstanceStart")
        vmm.wait_serial(r"counter: 2\b")
        api.vm.patch(state="Paused")
        assert api.describe.get().json()["state"] == "Paused"
        api.vm.patch(state="Resumed")
        with pytest.raises(api_module.APIError, match="after starting"):
            api.boot.put(kernel_image_path=str(probe_elf))
    finally:
        api.close()


def test_snapshot_over_the_api_and_load_in_a_new_process(probe_elf: Path, tmp_path: Path) -> None:
    """Full then diff snapshots through PUT /snapshot/create; a fresh pyvmm-firecracker
    loads the full one with PUT /snapshot/load and the counter goes on."""
    first = Vmm(tmp_path, "--id", "source")
    try:
        boot = {"kernel_image_path": str(probe_elf), "boot_args": "counter"}
        first.ok("PUT", "/boot-source", boot)
        machine = {"vcpu_count": 2, "mem_size_mib": 96, "track_dirty_pages": True}
        first.ok("PUT", "/machine-config", machine)
        (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
        drive = {"drive_id": "data", "path_on_host": str(tmp_path / "disk.img"),
                 "is_root_device": False,
                 "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}  # fmt: skip
        first.ok("PUT", "/drives/data", drive)
        first.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        first.wait_serial(r"counter: 3\b")
        snapshot = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
        status, reply = first.request("PUT", "/snapshot/create", snapshot)
        assert status == 400 and "Paused" in reply["fault_message"]
        first.ok("PATCH", "/vm", {"state": "Paused"})
        first.ok("PUT", "/snapshot/create", snapshot)
        last = counters(first.serial())[-1]
        first.ok("PATCH", "/vm", {"state": "Resumed"})
        first.ok("PATCH", "/vm", {"state": "Paused"})
        first.ok("PUT", "/snapshot/create", {
            "snapshot_type": "Diff", "snapshot_path": str(tmp_path / "ds"),
            "mem_file_path": str(tmp_path / "dm"),
        })  # fmt: skip
    finally:
        first.close()
    assert (tmp_path / "ds").exists() and (tmp_path / "dm").exists()

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = Vmm(second_dir, "--id", "restored")
    try:
        status, reply = second.request("PUT", "/snapshot/load", {
            "snapshot_path": str(tmp_path / "m"),
            "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "m")},
        })  # fmt: skip
        assert status == 400 and "not a pyvmm snapshot" in reply["fault_message"]
        second.ok("PUT", "/snapshot/load", {
            "snapshot_path": str(tmp_path / "s"),
            "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "m")},
            "resume_vm": True,
        })  # fmt: skip
        assert second.ok("GET", "/")["state"] == "Running"
        second.wait_serial(rf"counter: {last + 2}\b")
        assert counters(second.serial())[0] == last + 1
        # The restored VM's own configuration, not the defaults (bug 3 of the redesign).
        shown = second.ok("GET", "/vm/config")
        assert shown["machine-config"]["vcpu_count"] == 2
        assert shown["machine-config"]["mem_size_mib"] == 96
        assert second.ok("GET", "/machine-config")["mem_size_mib"] == 96
        (restored_drive,) = shown["drives"]
        assert restored_drive["drive_id"] == "data"
        assert restored_drive["path_on_host"] == str(tmp_path / "disk.img")
        assert restored_drive["rate_limiter"]["ops"]["size"] == 100
        assert shown["boot-source"]["kernel_image_path"] == str(probe_elf)
    finally:
        second.close()


def test_patch_drive_and_network_interface_after_boot(
    vmm: Vmm, probe_elf: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(bytes(1 << 20))
    second.write_bytes(bytes(2 << 20))
    tap = f"pyvapi{os.getpid() % 10000}"
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
    drive = {"drive_id": "data", "path_on_host": str(first), "is_root_device": False}
    vmm.ok("PUT", "/drives/data", drive)
    vmm.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap})
    status, reply = vmm.request("PATCH", "/drives/data", {"drive_id": "data"})
    assert status == 400 and "before starting" in reply["fault_message"]
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    vmm.wait_serial(r"counter: 1\b")
    vmm.ok("PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(second),
           "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}})  # fmt: skip
    bucket = {"size": 1 << 20, "refill_time": 100}
    vmm.ok("PATCH", "/network-interfaces/eth0",
           {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": bucket}})  # fmt: skip
    status, reply = vmm.request("PATCH", "/drives/other", {"drive_id": "other"})
    assert status == 400, reply
    status, reply = vmm.request(
        "PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(tmp_path / "none")}
    )
    assert status == 400 and "none" in reply["fault_message"]
    config = vmm.ok("GET", "/vm/config")
    assert config["drives"][0]["path_on_host"] == str(second)
    assert config["drives"][0]["rate_limiter"]["ops"]["size"] == 100
    vmm.wait_serial(r"counter: 3\b")  # the guest never noticed
