"""Firecracker's own API tests, replayed against ``pyvmm-firecracker``.

Each test mirrors one check of Firecracker's
``tests/integration_tests/functional/test_api.py`` (cited in its docstring
as ``test_api.py::<test>``) that needs no Firecracker guest artifact: the
probe guest stands in for the kernel where a boot is needed, and files are
empty images. Firecracker's behaviour is the reference; where pyvmm answers
the same status with other words, the test checks that the message names
the field and the problem. Where pyvmm deliberately differs (no virtio-pmem,
no virtio-mem), the test says so and checks pyvmm's answer.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm

pytestmark = requires_kvm

AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."


class Api(Vmm):
    """A pyvmm-firecracker process with the helpers Firecracker's tests use."""

    def fault(self, method: str, path: str, body: object = None, status: int = 400) -> str:
        got, reply = self.request(method, path, body)
        assert got == status, (got, reply)
        return reply["fault_message"]

    def image(self, name: str, size: int = 1 << 20) -> str:
        path = self.sock.parent / name
        path.write_bytes(bytes(size))
        return str(path)

    def basic_config(self, probe: Path, boot_args: str = "counter") -> None:
        """Firecracker's ``basic_config``: 2 vCPUs, 256 MiB, a root drive."""
        self.ok("PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": boot_args})
        self.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
        self.ok(
            "PUT",
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": self.image("rootfs.ext4"),
                "is_root_device": True,
                "is_read_only": False,
            },
        )

    def start(self) -> None:
        self.ok("PUT", "/actions", {"action_type": "InstanceStart"})


@pytest.fixture
def api(tmp_path: Path):
    instance = Api(tmp_path)
    yield instance
    instance.close()


@pytest.fixture
def tap():
    """A TAP name unique to this test process (pyvmm creates the device itself)."""
    import os

    return f"pyvconf{os.getpid() % 100000}"


# --- pre-boot configuration ---------------------------------------------------------------


def test_put_boot_source_with_a_missing_kernel(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_put_update_pre_boot: an invalid ``kernel_image_path``."""
    message = api.fault("PUT", "/boot-source", {"kernel_image_path": "foo.bar"})
    assert "kernel_image_path" in message and "No such file or directory" in message
    api.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf)})


def test_put_drive_with_a_missing_file(api: Api) -> None:
    """test_api.py::test_api_put_update_pre_boot: an invalid ``path_on_host``."""
    body = {
        "drive_id": "rootfs",
        "path_on_host": "foo.bar",
        "is_read_only": True,
        "is_root_device": True,
    }
    assert "No such file or directory" in api.fault("PUT", "/drives/rootfs", body)


def test_two_root_devices_are_refused(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_put_update_pre_boot: "A root block device already exists"."""
    api.basic_config(probe_elf)
    scratch = {
        "drive_id": "scratch",
        "path_on_host": api.image("scratch"),
        "is_read_only": False,
        "is_root_device": False,
    }
    api.ok("PUT", "/drives/scratch", scratch)
    message = api.fault("PUT", "/drives/scratch", {**scratch, "is_root_device": True})
    assert "root device" in message and "already is" in message
    # Valid updates to path_on_host and is_read_only are allowed.
    api.ok(
        "PUT",
        "/drives/scratch",
        {**scratch, "path_on_host": api.image("other"), "is_read_only": True},
    )


def test_put_machine_config_with_every_field(api: Api) -> None:
    """test_api.py::test_api_put_update_pre_boot: vcpu_count, smt, mem_size_mib,
    track_dirty_pages and cpu_template C3 are all stored and shown."""
    config = {
        "vcpu_count": 4,
        "smt": True,
        "mem_size_mib": 256,
        "track_dirty_pages": True,
        "cpu_template": "C3",
    }
    api.ok("PUT", "/machine-config", config)
    shown = api.ok("GET", "/machine-config")
    assert {key: shown[key] for key in config} == config


def test_network_interfaces_need_unique_macs_and_taps(api: Api, tap: str) -> None:
    """test_api.py::test_net_api_put_update_pre_boot."""
    api.ok(
        "PUT",
        "/network-interfaces/1",
        {"iface_id": "1", "guest_mac": "06:00:00:00:00:01", "host_dev_name": tap + "a"},
    )
    api.ok(
        "PUT",
        "/network-interfaces/2",
        {"iface_id": "2", "guest_mac": "07:00:00:00:00:01", "host_dev_name": tap + "b"},
    )
    message = api.fault(
        "PUT",
        "/network-interfaces/2",
        {"iface_id": "2", "host_dev_name": tap + "b", "guest_mac": "06:00:00:00:00:01"},
    )
    assert "guest_mac 06:00:00:00:00:01 is already used" in message
    api.ok(
        "PUT",
        "/network-interfaces/2",
        {"iface_id": "2", "host_dev_name": tap + "b", "guest_mac": "08:00:00:00:00:01"},
    )
    message = api.fault(
        "PUT",
        "/network-interfaces/1",
        {"iface_id": "1", "host_dev_name": tap + "b", "guest_mac": "06:00:00:00:00:01"},
    )
    assert "host_dev_name" in message and "already used" in message
    # After the fault, interface 1 still holds 06:00:00:00:00:01: a third can't take it.
    assert "already used" in api.fault(
        "PUT",
        "/network-interfaces/3",
        {"iface_id": "3", "host_dev_name": tap + "c", "guest_mac": "06:00:00:00:00:01"},
    )


def test_mmds_config_rules(api: Api, tap: str) -> None:
    """test_api.py::test_api_mmds_config."""
    assert "network_interfaces" in api.fault("PUT", "/mmds/config", {"network_interfaces": []})
    assert "not a configured network interface" in api.fault(
        "PUT", "/mmds/config", {"network_interfaces": ["foo"]}
    )
    api.ok(
        "PUT",
        "/network-interfaces/1",
        {"iface_id": "1", "guest_mac": "06:00:00:00:00:01", "host_dev_name": tap},
    )
    assert "not a configured network interface" in api.fault(
        "PUT", "/mmds/config", {"network_interfaces": ["1", "foo"]}
    )
    message = api.fault("PUT", "/mmds/config", {"version": "foo", "network_interfaces": ["1"]})
    assert "version" in message and '"V1", "V2"' in message
    api.ok("PUT", "/mmds/config", {"network_interfaces": ["1"]})
    assert api.ok("GET", "/vm/config")["mmds-config"]["version"] == "V1"
    api.ok("PUT", "/mmds/config", {"ipv4_address": "169.254.169.250", "network_interfaces": ["1"]})
    assert api.ok("GET", "/vm/config")["mmds-config"]["ipv4_address"] == "169.254.169.250"
    api.ok(
        "PUT",
        "/mmds/config",
        {"version": "V2", "ipv4_address": "169.254.169.250", "network_interfaces": ["1"]},
    )
    assert api.ok("GET", "/vm/config")["mmds-config"]["version"] == "V2"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"vcpu_count": "-2", "mem_size_mib": 128}, "vcpu_count"),
        ({"vcpu_count": 1, "mem_size_mib": 128, "smt": "random_string"}, "smt"),
        ({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "random_string"}, "cpu_template"),
        ({"mem_size_mib": 128}, "vcpu_count is required"),
        ({"vcpu_count": 2}, "mem_size_mib is required"),
        ({"vcpu_count": 1, "mem_size_mib": "-2"}, "mem_size_mib"),
        ({"vcpu_count": 1, "mem_size_mib": 1 << 64}, "mem_size_mib"),
    ],
)
def test_bad_machine_configs(api: Api, body: dict, field: str) -> None:
    """test_api.py::test_api_machine_config: the invalid PUTs, each a 400 naming the field."""
    assert field in api.fault("PUT", "/machine-config", body)


def test_machine_config_defaults_and_patches(api: Api) -> None:
    """test_api.py::test_api_machine_config: default smt, PATCH smt, mem_size_mib 0."""
    api.ok("PATCH", "/machine-config", {"track_dirty_pages": True})
    api.ok("PUT", "/machine-config", {"mem_size_mib": 128, "vcpu_count": 1})
    assert api.ok("GET", "/machine-config")["smt"] is False
    api.ok("PATCH", "/machine-config", {"smt": True})
    assert "mem_size_mib" in api.fault("PATCH", "/machine-config", {"mem_size_mib": 0})
    api.ok("PATCH", "/machine-config", {"mem_size_mib": 256})


def test_cpu_template_field_is_deprecated_even_none(api: Api) -> None:
    """test_api.py::test_negative_machine_config_api: a Deprecation header for PUT and PATCH."""
    for method, body in (
        ("PUT", {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "None"}),
        ("PATCH", {"cpu_template": "None"}),
    ):
        api.conn.request(method, "/machine-config", body=json.dumps(body))
        response = api.conn.getresponse()
        response.read()
        assert response.status == 204 and response.getheader("Deprecation") == "true"


def test_cpu_config_needs_a_valid_body(api: Api) -> None:
    """test_api.py::test_api_cpu_config: ``foo`` is refused. pyvmm has no custom templates
    (it has the static ones), so every /cpu-config is a 400 saying so."""
    assert "custom CPU templates are not supported by pyvmm" in api.fault(
        "PUT", "/cpu-config", {"foo": False}
    )


# --- after boot ----------------------------------------------------------------------------


def test_put_updates_are_refused_after_boot(api: Api, probe_elf: Path, tap: str) -> None:
    """test_api.py::test_api_put_update_post_boot."""
    api.basic_config(probe_elf)
    api.ok(
        "PUT",
        "/network-interfaces/1",
        {"iface_id": "1", "host_dev_name": tap, "guest_mac": "06:00:00:00:00:01"},
    )
    api.start()
    assert api.fault("PUT", "/boot-source", {"kernel_image_path": str(probe_elf)}) == AFTER_START
    assert api.fault("PATCH", "/machine-config", {"vcpu_count": 4}) == AFTER_START
    assert api.fault("PUT", "/machine-config", {"vcpu_count": 4, "mem_size_mib": 128}) == (
        AFTER_START
    )
    assert (
        api.fault(
            "PUT",
            "/mmds/config",
            {"version": "V2", "ipv4_address": "169.254.169.250", "network_interfaces": ["1"]},
        )
        == AFTER_START
    )


def test_rate_limiters_of_every_shape(api: Api, tap: str) -> None:
    """test_api.py::test_rate_limiters_api_config (without its pmem device)."""
    bw, ops = {"size": 1000000, "refill_time": 100}, {"size": 1, "refill_time": 100}
    for drive_id, limiter in (
        ("bw", {"bandwidth": bw}),
        ("ops", {"ops": ops}),
        ("bwops", {"bandwidth": bw, "ops": ops}),
        ("nada", {}),
    ):
        api.ok(
            "PUT",
            f"/drives/{drive_id}",
            {
                "drive_id": drive_id,
                "path_on_host": api.image(drive_id),
                "is_read_only": False,
                "is_root_device": False,
                "rate_limiter": limiter,
            },
        )
    for index, limits in enumerate(
        (
            {"tx_rate_limiter": {"bandwidth": bw}},
            {"rx_rate_limiter": {"bandwidth": bw}},
            {
                "rx_rate_limiter": {"bandwidth": bw, "ops": ops},
                "tx_rate_limiter": {"bandwidth": bw, "ops": ops},
            },
        ),
        1,
    ):
        api.ok(
            "PUT",
            f"/network-interfaces/{index}",
            {
                "iface_id": str(index),
                "guest_mac": f"06:00:00:00:00:0{index}",
                "host_dev_name": f"{tap}{index}",
                **limits,
            },
        )
    api.ok("PUT", "/entropy", {"rate_limiter": {"bandwidth": bw, "ops": ops}})


def test_patch_before_boot(api: Api, probe_elf: Path, tap: str) -> None:
    """test_api.py::test_api_patch_pre_boot."""
    api.basic_config(probe_elf)
    api.ok(
        "PUT",
        "/drives/scratch",
        {
            "drive_id": "scratch",
            "path_on_host": api.image("scratch"),
            "is_root_device": False,
            "is_read_only": False,
        },
    )
    api.ok(
        "PUT",
        "/network-interfaces/1",
        {"iface_id": "1", "host_dev_name": tap, "guest_mac": "06:00:00:00:00:01"},
    )
    assert "Invalid request method" in api.fault(
        "PATCH", "/boot-source", {"kernel_image_path": "otherfile"}
    )
    api.ok("PATCH", "/machine-config", {"vcpu_count": 4})
    assert api.ok("GET", "/machine-config")["vcpu_count"] == 4
    assert "Invalid request method" in api.fault("PATCH", "/logger", {"level": "Error"})
    assert (
        api.fault("PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": "foo.bar"})
        == BEFORE_START
    )
    assert api.fault("PATCH", "/network-interfaces/1", {"iface_id": "1"}) == BEFORE_START
    # Firecracker: NOT_SUPPORTED_BEFORE_START for pmem; pyvmm has no virtio-pmem at all.
    assert "virtio-pmem" in api.fault("PATCH", "/pmem/nonexistent", {"id": "nonexistent"})


def test_patch_after_boot(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_negative_api_patch_post_boot."""
    api.basic_config(probe_elf)
    api.start()
    assert "Invalid request method" in api.fault(
        "PATCH", "/boot-source", {"kernel_image_path": "otherfile"}
    )
    assert api.fault("PATCH", "/machine-config", {"vcpu_count": 4}) == AFTER_START
    assert "Invalid request method" in api.fault("PATCH", "/logger", {"level": "Error"})


def test_drive_patch(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_drive_patch and its _drive_patch: PATCH semantics after boot,
    including the same path_on_host twice (once with a rate limiter)."""
    api.basic_config(probe_elf)
    scratch = api.image("scratch")
    api.ok(
        "PUT",
        "/drives/scratch",
        {
            "drive_id": "scratch",
            "path_on_host": scratch,
            "is_root_device": False,
            "is_read_only": False,
        },
    )
    assert (
        api.fault("PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": "foo.bar"})
        == BEFORE_START
    )
    api.start()
    assert "nothing to update" in api.fault("PATCH", "/drives/scratch", {"drive_id": "scratch"})
    for field, value in (("is_read_only", True), ("io_engine", "Sync"), ("is_root_device", False)):
        message = api.fault(
            "PATCH",
            "/drives/scratch",
            {"drive_id": "scratch", "path_on_host": "foo.bar", field: value},
        )
        assert f'unknown field "{field}"' in message
    message = api.fault(
        "PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": "foo.bar"}
    )
    assert "foo.bar" in message and "No such file or directory" in message
    new = api.image("scratch_new")
    api.ok("PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": new})
    limiter = {
        "bandwidth": {"size": 1000000, "refill_time": 100},
        "ops": {"size": 1, "refill_time": 100},
    }
    api.ok(
        "PATCH",
        "/drives/scratch",
        {"drive_id": "scratch", "path_on_host": new, "rate_limiter": limiter},
    )  # the same path again
    api.ok(
        "PATCH",
        "/drives/scratch",
        {
            "drive_id": "scratch",
            "rate_limiter": {
                "bandwidth": {"size": 5000, "refill_time": 100},
                "ops": {"size": 500, "refill_time": 100},
            },
        },
    )
    assert "No such file or directory" in api.fault(
        "PATCH",
        "/drives/scratch",
        {"drive_id": "scratch", "path_on_host": "foo.bar", "rate_limiter": limiter},
    )
    shown = api.ok("GET", "/vm/config")["drives"][1]
    assert shown["path_on_host"] == new and shown["rate_limiter"]["ops"]["size"] == 500


def test_pause_and_resume_are_idempotent(api: Api, probe_elf: Path) -> None:
    """Firecracker answers 204 to pausing a paused VM and resuming a running one
    (its lifecycle: vmm.rs pause_vm/resume_vm; exercised by its snapshot tests)."""
    api.basic_config(probe_elf)
    api.start()
    api.ok("PATCH", "/vm", {"state": "Resumed"})  # running: a no-op
    api.ok("PATCH", "/vm", {"state": "Paused"})
    api.ok("PATCH", "/vm", {"state": "Paused"})  # paused: a no-op
    assert api.ok("GET", "/")["state"] == "Paused"
    api.ok("PATCH", "/vm", {"state": "Resumed"})
    assert api.ok("GET", "/")["state"] == "Running"


def test_version_before_and_after_boot(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_version: the same semver before and after boot."""
    api.basic_config(probe_elf)
    before = api.ok("GET", "/version")
    api.start()
    assert api.ok("GET", "/version") == before
    assert before["firecracker_version"].split("+")[0].count(".") == 2


def test_vsock_put_twice_then_not_after_boot(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_vsock."""
    api.basic_config(probe_elf)
    uds = str(api.sock.parent / "vsock.sock")
    api.ok("PUT", "/vsock", {"guest_cid": 15, "uds_path": uds})
    api.ok("PUT", "/vsock", {"guest_cid": 166, "uds_path": uds})
    for cid in (15, 166):
        api.conn.request(
            "PUT",
            "/vsock",
            body=json.dumps({"vsock_id": "vsock1", "guest_cid": cid, "uds_path": uds}),
        )
        response = api.conn.getresponse()
        response.read()
        assert response.status == 204 and response.getheader("Deprecation") == "true"
    api.start()
    assert api.fault("PUT", "/vsock", {"guest_cid": 17, "uds_path": uds}) == AFTER_START


def test_entropy_put_twice_then_not_after_boot(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_entropy."""
    api.basic_config(probe_elf)
    api.ok("PUT", "/entropy", {})
    api.ok("PUT", "/entropy", {})
    api.start()
    assert api.fault("PUT", "/entropy", {}) == AFTER_START


def test_memory_hotplug_is_not_supported(api: Api) -> None:
    """test_api.py::test_api_memory_hotplug: pyvmm has no virtio-mem; every
    /hotplug/memory request is a 400 that says so."""
    for method, body in (
        ("PUT", {"total_size_mib": 1024}),
        ("PATCH", {"requested_size_mib": 512}),
        ("GET", None),
    ):
        assert "virtio-mem" in api.fault(method, "/hotplug/memory", body)


def test_balloon(api: Api, probe_elf: Path) -> None:
    """test_api.py::test_api_balloon."""
    api.basic_config(probe_elf)
    assert api.fault("PATCH", "/balloon", {"amount_mib": 0})
    api.ok("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True})
    api.ok(
        "PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 5}
    )
    assert api.ok("GET", "/balloon") == {
        "amount_mib": 0,
        "deflate_on_oom": False,
        "stats_polling_interval_s": 5,
    }
    assert api.fault("PATCH", "/balloon", {"amount_mib": 2})  # not before boot
    assert api.fault(
        "PUT",
        "/balloon",
        {"amount_mib": 1024, "deflate_on_oom": False, "stats_polling_interval_s": 5},
    )
    api.start()
    api.ok("PATCH", "/balloon", {"amount_mib": 4})
    assert api.fault("PATCH", "/balloon", {"amount_mib": 300})
    api.ok("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5})
    assert api.ok("GET", "/balloon") == {
        "amount_mib": 4,
        "deflate_on_oom": False,
        "stats_polling_interval_s": 5,
    }
    assert "amount_mib" in api.fault("PATCH", "/balloon", {"amount_mib": 33554432})
    stats = api.ok("GET", "/balloon/statistics")
    assert stats["target_mib"] == 4 and stats["target_pages"] == 4 * 256


# --- snapshots -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "snapshot_path": "foo",
                "mem_backend": {"backend_type": "File", "backend_path": "bar"},
                "mem_file_path": "bar",
            },
            "either mem_backend or mem_file_path",
        ),
        ({"snapshot_path": "foo", "mem_backend": {"backend_path": "bar"}}, "backend_type"),
        ({"snapshot_path": "foo", "mem_backend": {"backend_type": "File"}}, "backend_path"),
        (
            {"snapshot_path": "foo", "mem_backend": {"backend_type": "foo", "backend_path": "bar"}},
            '"File", "Uffd"',
        ),
        ({"mem_backend": {"backend_type": "File", "backend_path": "bar"}}, "snapshot_path"),
        ({"snapshot_path": "foo"}, "mem_backend (or the deprecated mem_file_path) is required"),
    ],
)
def test_bad_snapshot_loads(api: Api, body: dict, field: str) -> None:
    """test_api.py::test_negative_snapshot_load_api."""
    assert field in api.fault("PUT", "/snapshot/load", body)


def test_deprecated_mem_file_path_is_flagged_even_when_the_load_fails(api: Api) -> None:
    """test_api.py::test_negative_snapshot_load_api: the Deprecation header on failure too.
    (Firecracker then exits; pyvmm stays up and says what is missing.)"""
    api.conn.request(
        "PUT", "/snapshot/load", body=json.dumps({"snapshot_path": "foo", "mem_file_path": "bar"})
    )
    response = api.conn.getresponse()
    reply = json.loads(response.read())
    assert response.status == 400 and "foo" in reply["fault_message"]
    assert api.ok("GET", "/")["state"] == "Not started"


def test_snapshot_load_only_before_any_boot_configuration(api: Api, probe_elf: Path) -> None:
    """Firecracker's rpc_interface.rs: LoadSnapshot after a boot-specific resource fails."""
    api.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf)})
    assert "boot-specific resources" in api.fault(
        "PUT",
        "/snapshot/load",
        {"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}},
    )


def test_snapshot_create_needs_a_paused_vm(api: Api, probe_elf: Path) -> None:
    """firecracker.yaml /snapshot/create: "The microVM should be in the Paused state"."""
    api.basic_config(probe_elf)
    body = {
        "snapshot_path": str(api.sock.parent / "s"),
        "mem_file_path": str(api.sock.parent / "m"),
    }
    assert api.fault("PUT", "/snapshot/create", body) == BEFORE_START
    api.start()
    assert "paused" in api.fault("PUT", "/snapshot/create", body)
    api.ok("PATCH", "/vm", {"state": "Paused"})
    api.ok("PUT", "/snapshot/create", body)


# --- HTTP ------------------------------------------------------------------------------------


def test_body_larger_than_the_payload_limit(api: Api) -> None:
    """Firecracker's test_api_server.py / micro_http: a body over
    --http-api-max-payload-size (51200 by default) is a 400 naming the sizes."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(api.sock))
    sock.sendall(b"PUT /mmds HTTP/1.1\r\nContent-Length: 51201\r\n\r\n")
    reply = sock.recv(65536).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 400")
    assert "Request payload with size 51201 is larger than the limit of 51200" in reply


def test_get_with_a_body_and_empty_puts(api: Api) -> None:
    """Firecracker's parsed_request.rs: GET with a body, PUT and PATCH without one."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(api.sock))
    sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert b"GET request cannot have a body" in sock.recv(65536)
    sock.close()
    assert api.fault("PUT", "/boot-source", None) == "Empty PUT request."
