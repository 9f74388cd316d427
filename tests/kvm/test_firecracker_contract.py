"""The issue's contract differences with Firecracker, each checked on a live process.

Values Firecracker accepts and pyvmm now serves (one_time_burst, the static
CPU templates, 2 MiB huge pages, io_engine Async, mtu, multicast MACs,
unknown fields where Firecracker tolerates them, /serial, FlushMetrics
without metrics), and the ones pyvmm cannot serve, refused with a 400 that
names the missing feature (Uffd, clock_realtime, snapshot huge pages,
vhost-user drives, another vendor's CPU template).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm

pytestmark = requires_kvm


@pytest.fixture
def vmm(tmp_path: Path):
    instance = Vmm(tmp_path)
    yield instance
    instance.close()


def boot(vmm: Vmm, probe: Path, program: str = "counter", **machine: object) -> None:
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": program})
    vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, **machine})


def start(vmm: Vmm) -> tuple[int, dict | None]:
    return vmm.request("PUT", "/actions", {"action_type": "InstanceStart"})


def host_vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":")[1].strip()
    return "unknown"


def test_one_time_burst_reaches_a_running_vm(vmm: Vmm, probe_elf: Path) -> None:
    """PUT accepted it and InstanceStart then failed "cannot have a one_time_burst yet"."""
    boot(vmm, probe_elf)
    image = vmm.sock.parent / "d.img"
    image.write_bytes(bytes(1 << 20))
    limiter = {"bandwidth": {"size": 1000, "one_time_burst": 5000, "refill_time": 100}}
    vmm.ok(
        "PUT",
        "/drives/d",
        {
            "drive_id": "d",
            "path_on_host": str(image),
            "is_root_device": False,
            "rate_limiter": limiter,
        },
    )
    vmm.ok(
        "PUT",
        "/entropy",
        {"rate_limiter": {"ops": {"size": 5, "one_time_burst": 50, "refill_time": 10}}},
    )
    assert start(vmm)[0] == 204
    shown = vmm.ok("GET", "/vm/config")
    assert shown["drives"][0]["rate_limiter"]["bandwidth"]["one_time_burst"] == 5000
    assert shown["entropy"]["rate_limiter"]["ops"]["one_time_burst"] == 50


def test_static_cpu_templates_start_on_their_vendor_and_are_refused_on_the_other(
    tmp_path: Path, probe_elf: Path
) -> None:
    vendor = host_vendor()
    fits, other = ("T2", "T2A") if vendor == "GenuineIntel" else ("T2A", "T2")
    for template, ok in ((fits, True), (other, False)):
        directory = tmp_path / template
        directory.mkdir()
        vmm = Vmm(directory)
        try:
            boot(vmm, probe_elf, "cpus", cpu_template=template)
            status, reply = start(vmm)
            if ok:
                assert status == 204, reply
                vmm.wait_serial(r"PROBE RESULT: PASS")
                assert vmm.ok("GET", "/machine-config")["cpu_template"] == template
            else:
                assert status == 400
                maker = "AMD" if template == "T2A" else "Intel"
                assert (
                    f"CPU template '{template}' is for {maker} hosts; this host's CPU is "
                    f"{vendor}" in reply["fault_message"]
                )
                assert vmm.ok("GET", "/")["state"] == "Not started"
        finally:
            vmm.close()


def test_huge_pages_back_guest_ram_or_are_refused_in_one_line(vmm: Vmm, probe_elf: Path) -> None:
    pool = Path("/proc/sys/vm/nr_hugepages")
    before = pool.read_text()
    boot(vmm, probe_elf, huge_pages="2M")
    try:
        pool.write_text("0")
        status, reply = start(vmm)
        assert status == 400 and "vm.nr_hugepages" in reply["fault_message"]
        pool.write_text(str(32 // 2 + 4))  # the guest's 32 MiB, and a little slack
        assert start(vmm)[0] == 204
        pid = vmm.process.pid
        smaps = Path(f"/proc/{pid}/smaps").read_text()
        assert "KernelPageSize:     2048 kB" in smaps  # guest RAM on 2 MiB pages
        assert vmm.ok("GET", "/machine-config")["huge_pages"] == "2M"
    finally:
        vmm.close()
        pool.write_text(before)


def test_async_io_engine_mtu_and_a_multicast_mac_are_accepted(vmm: Vmm, probe_elf: Path) -> None:
    boot(vmm, probe_elf)
    image = vmm.sock.parent / "d.img"
    image.write_bytes(bytes(1 << 20))
    vmm.ok(
        "PUT",
        "/drives/d",
        {
            "drive_id": "d",
            "path_on_host": str(image),
            "is_root_device": False,
            "io_engine": "Async",
        },
    )
    tap = f"pyvct{os.getpid() % 100000}"
    vmm.ok(
        "PUT",
        "/network-interfaces/eth0",
        {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": "03:00:00:00:00:01", "mtu": 9000},
    )
    assert start(vmm)[0] == 204
    shown = vmm.ok("GET", "/vm/config")
    assert shown["drives"][0]["io_engine"] == "Async"
    assert shown["network-interfaces"][0]["mtu"] == 9000
    assert shown["network-interfaces"][0]["guest_mac"] == "03:00:00:00:00:01"


def test_unknown_fields_are_tolerated_where_firecracker_tolerates_them(
    vmm: Vmm, probe_elf: Path
) -> None:
    """TokenBucket, /metrics, NetworkOverride and VsockOverride have no deny_unknown_fields."""
    boot(vmm, probe_elf)
    vmm.ok(
        "PUT", "/entropy", {"rate_limiter": {"ops": {"size": 5, "refill_time": 10, "future": 1}}}
    )
    vmm.ok("PUT", "/metrics", {"metrics_path": str(vmm.sock.parent / "m"), "future": True})
    other = vmm.sock.parent / "other"
    other.mkdir()
    fresh = Vmm(other)
    try:
        status, reply = fresh.request(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": "s",
                "mem_backend": {"backend_type": "File", "backend_path": "m"},
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9", "future": 1}],
                "vsock_override": {"uds_path": "/v", "future": 1},
            },
        )
        assert status == 400 and "unknown field" not in reply["fault_message"]
        assert "Load snapshot error" in reply["fault_message"]  # the files, not the shape
    finally:
        fresh.close()


def test_flush_metrics_and_metrics_from_the_command_line(tmp_path: Path, probe_elf: Path) -> None:
    plain = Vmm(tmp_path)
    try:
        plain.ok("PUT", "/actions", {"action_type": "FlushMetrics"})  # Firecracker: 204
    finally:
        plain.close()
    other = tmp_path / "other"
    other.mkdir()
    with_path = Vmm(other, "--metrics-path", str(other / "m"))
    try:
        status, reply = with_path.request("PUT", "/metrics", {"metrics_path": str(other / "n")})
        assert status == 400
        assert reply["fault_message"] == "Metrics error: Reinitialization of metrics not allowed."
        with_path.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        assert (other / "m").read_text().strip()
    finally:
        with_path.close()


def test_serial_route_sends_the_console_to_a_file(vmm: Vmm, probe_elf: Path) -> None:
    boot(vmm, probe_elf, "hello")
    console = vmm.sock.parent / "console.log"
    vmm.ok("PUT", "/serial", {"serial_out_path": str(console)})
    assert start(vmm)[0] == 204
    assert vmm.process.wait(30) == 0
    assert "hello from probe" in console.read_text()
    assert "hello from probe" not in vmm.serial()


@pytest.mark.parametrize(
    ("body", "feature"),
    [
        (
            {"mem_backend": {"backend_type": "Uffd", "backend_path": "/uffd.sock"}},
            "memory backend 'Uffd' is not supported",
        ),
        ({"mem_file_path": "m", "clock_realtime": True}, "clock_realtime is not supported"),
        ({"mem_file_path": "m", "huge_pages": "2M"}, "huge_pages is not supported by pyvmm"),
    ],
)
def test_snapshot_load_features_pyvmm_lacks_are_named(
    vmm: Vmm, tmp_path: Path, probe_elf: Path, body: dict, feature: str
) -> None:
    """Uffd, clock_realtime and snapshot huge pages: a 400 naming the missing feature."""
    snapshot = _snapshot(tmp_path, probe_elf)
    request = {"snapshot_path": str(snapshot), **body}
    if "mem_file_path" in request:
        request["mem_file_path"] = str(snapshot.with_name("m"))
    status, reply = vmm.request("PUT", "/snapshot/load", request)
    assert status == 400 and feature in reply["fault_message"], reply


def test_vhost_user_drives_are_named(vmm: Vmm) -> None:
    status, reply = vmm.request(
        "PUT", "/drives/v", {"drive_id": "v", "is_root_device": False, "socket": "/vhost.sock"}
    )
    assert status == 400 and "vhost-user" in reply["fault_message"]


def _snapshot(tmp_path: Path, probe: Path) -> Path:
    """A real snapshot (state file ``s``, memory ``m``) to load."""
    directory = tmp_path / "source"
    if (directory / "s").exists():
        return directory / "s"
    directory.mkdir()
    source = Vmm(directory)
    try:
        boot(source, probe)
        assert start(source)[0] == 204
        source.ok("PATCH", "/vm", {"state": "Paused"})
        source.ok(
            "PUT",
            "/snapshot/create",
            {"snapshot_path": str(directory / "s"), "mem_file_path": str(directory / "m")},
        )
    finally:
        source.close()
    return directory / "s"
