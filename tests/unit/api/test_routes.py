"""The router against a fake controller: every route and every pre/post-boot rule."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from pyvmm.api import models, operations
from pyvmm.api.controller import InstanceInfo, VmmController
from pyvmm.api.http import ApiServer
from pyvmm.api.routes import (
    LOAD_SNAPSHOT_NOT_ALLOWED,
    MISSING_KERNEL,
    NOT_SUPPORTED_POST_BOOT,
    NOT_SUPPORTED_PRE_BOOT,
    Router,
)
from pyvmm.api.vm_config import VmResources
from pyvmm.errors import ConfigError, HostError
from pyvmm.vmm.lifecycle import VmState


class FakeController:
    """Records calls; ``fail`` makes the next call of that name raise."""

    def __init__(self) -> None:
        self._state = VmState.NOT_STARTED
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}

    @property
    def state(self) -> str:
        return self._state

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail.pop(name)

    def instance_info(self) -> InstanceInfo:
        return InstanceInfo("vm-1", self._state, "0.1.0")

    def start(self, resources: VmResources) -> None:
        self._record("start", resources)
        self._state = VmState.RUNNING

    def load_snapshot(self, params: operations.SnapshotLoadParams, resources: VmResources) -> None:
        self._record("load_snapshot", params)
        self._state = VmState.RUNNING if params.resume_vm else VmState.PAUSED

    def configure_logger(self, config: models.Logger) -> None:
        self._record("configure_logger", config)

    def configure_metrics(self, config: models.Metrics) -> None:
        self._record("configure_metrics", config)

    def pause(self) -> None:
        self._record("pause")
        self._state = VmState.PAUSED

    def resume(self) -> None:
        self._record("resume")
        self._state = VmState.RUNNING

    def send_ctrl_alt_del(self) -> None:
        self._record("send_ctrl_alt_del")

    def flush_metrics(self) -> None:
        self._record("flush_metrics")

    def create_snapshot(self, params: operations.SnapshotCreateParams) -> None:
        self._record("create_snapshot", params)

    def patch_drive(self, drive_id, path_on_host, rate_limiter) -> None:
        self._record("patch_drive", drive_id, path_on_host, rate_limiter)

    def patch_net(self, iface_id, rx, tx) -> None:
        self._record("patch_net", iface_id, rx, tx)

    def set_balloon_target(self, amount_mib: int) -> None:
        self._record("set_balloon_target", amount_mib)

    def balloon_stats(self) -> dict[str, int]:
        self._record("balloon_stats")
        return {"target_pages": 256, "actual_pages": 0, "target_mib": 1, "actual_mib": 0}

    def set_balloon_stats_interval(self, seconds: int) -> None:
        self._record("set_balloon_stats_interval", seconds)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _check_protocol(controller: FakeController) -> VmmController:
    return controller  # type-checks that the fake satisfies the protocol


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("vmlinux", "root.ext4", "new.ext4"):
        (tmp_path / name).write_bytes(b"\0" * 512)
        paths[name] = str(tmp_path / name)
    return paths


class Api:
    """Calls the router like the HTTP server does; answers (status, JSON or None, headers)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, value, _ = self.full(method, path, body)
        return status, value

    def full(self, method: str, path: str, body: Any = None) -> tuple[int, Any, dict]:
        raw = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        response = self.router.handle(method, path, raw)
        return response.status, response.body, dict(response.headers)

    def fault(self, method: str, path: str, body: Any = None, status: int = 400) -> str:
        got_status, value = self(method, path, body)
        assert got_status == status, value
        assert set(value) == {"fault_message"}
        return value["fault_message"]

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, value = self(method, path, body)
        assert status in (200, 204), value
        return value


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
def api(controller: FakeController) -> Api:
    return Api(Router(controller))


def configure(api: Api, files: dict[str, str]) -> None:
    api.ok("PUT", "/boot-source", {"kernel_image_path": files["vmlinux"]})
    api.ok(
        "PUT",
        "/drives/rootfs",
        {"drive_id": "rootfs", "path_on_host": files["root.ext4"], "is_root_device": True},
    )
    api.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})


def boot(api: Api, files: dict[str, str]) -> None:
    configure(api, files)
    api.ok("PUT", "/actions", {"action_type": "InstanceStart"})


# --- generic request rules --------------------------------------------------------------


def test_the_fake_satisfies_the_protocol(controller):
    assert _check_protocol(controller) is controller


def test_unknown_paths_and_methods_are_400(api):
    assert api.fault("GET", "/nothing") == "Invalid request method and/or path: GET /nothing."
    assert api.fault("PATCH", "/boot-source", {"a": 1}) == (
        "Invalid request method and/or path: PATCH /boot-source."
    )
    assert api.fault("POST", "/actions", {"a": 1}).startswith("Invalid request method")
    assert api.fault("DELETE", "/drives/x").startswith("Invalid request method")
    # Under a resource with sub-resources an unknown one is an error, as in Firecracker.
    assert api.fault("PUT", "/mmds/other", {"a": 1}).startswith("Invalid request method")
    assert api.fault("GET", "/balloon/other").startswith("Invalid request method")
    assert api.router.counters.as_metrics()["invalid_api_requests"] == {
        "path_count": 6,
        "path_fails": 6,
    }


def test_extra_path_segments_are_ignored_as_firecracker_ignores_them(api, files):
    assert api.ok("GET", "/machine-config/extra")["vcpu_count"] == 1
    assert api.ok("GET", "/vm/config/more")["drives"] == []
    body = {"drive_id": "a", "path_on_host": files["root.ext4"], "is_root_device": False}
    api.ok("PUT", "/drives/a/b", body)
    assert list(api.router.resources.drives) == ["a"]


def test_body_presence_rules(api):
    assert api.fault("GET", "/", b"{}") == "GET request cannot have a body."
    assert api.fault("PUT", "/boot-source") == "Empty PUT request."
    assert api.fault("PATCH", "/vm") == "Empty PATCH request."
    assert api.fault("PATCH", "/machine-config", {}) == "Empty PATCH request."


def test_bodies_must_be_strict_json(api):
    prefix = "An error occurred when deserializing the json body of a request: "
    assert api.fault("PUT", "/logger", b"{").startswith(prefix)
    assert api.fault("PUT", "/logger", b'{"level": NaN}').startswith(prefix)
    assert "duplicate field" in api.fault("PUT", "/logger", b'{"level": "Info", "level": "Off"}')
    assert api.fault("PUT", "/logger", b"[" * 5000).startswith(prefix)


def test_path_ids_are_checked_and_must_match_the_body(api, files):
    body = {"drive_id": "rootfs", "path_on_host": files["root.ext4"], "is_root_device": True}
    assert api.fault("PUT", "/drives/", body) == "The ID cannot be empty."
    assert api.fault("PUT", "/drives/a-b", body) == (
        "API Resource IDs can only contain alphanumeric characters and underscores."
    )
    assert api.fault("PUT", "/drives/other", body) == (
        "The id from the path does not match the id from the body!"
    )
    net = {"iface_id": "eth0", "host_dev_name": "tap0"}
    assert api.fault("PUT", "/network-interfaces/eth1", net) == (
        "The id from the path [eth1] does not match the id from the body [eth0]!"
    )
    api.ok("PUT", "/drives/rootfs/", body)  # one trailing slash is fine


def test_model_errors_are_400_with_the_field_named(api):
    assert api.fault("PUT", "/machine-config", {"vcpu_count": "x", "mem_size_mib": 128}) == (
        'machine-config: vcpu_count must be an integer between 1 and 32, not "x"'
    )


# --- GET routes -------------------------------------------------------------------------


def test_get_instance_info_and_version(api):
    assert api.ok("GET", "/") == {
        "id": "vm-1",
        "state": "Not started",
        "started": False,  # Firecracker 0.2x's field, which Kata's client reads
        "vmm_version": "0.1.0",
        "app_name": "pyvmm",
    }
    assert api.ok("GET", "/version") == {"firecracker_version": "0.1.0"}


def test_get_machine_config_defaults_and_updates(api):
    assert api.ok("GET", "/machine-config") == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == (204, None)
    api.ok("PATCH", "/machine-config", {"track_dirty_pages": True})
    assert api.ok("GET", "/machine-config")["track_dirty_pages"] is True
    assert api.ok("GET", "/machine-config")["vcpu_count"] == 2
    # PUT resets what it does not name.
    api.ok("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 256})
    assert api.ok("GET", "/machine-config")["track_dirty_pages"] is False
    assert "smt is enabled" in api.fault("PATCH", "/machine-config", {"smt": True})


def test_get_vm_config_shows_everything_configured(api, files):
    configure(api, files)
    api.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    api.ok("PUT", "/entropy", {})
    api.ok("PUT", "/mmds/config", {"version": "V2", "network_interfaces": ["eth0"]})
    config = api.ok("GET", "/vm/config")
    assert config["boot-source"]["kernel_image_path"] == files["vmlinux"]
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs"]
    assert config["network-interfaces"][0]["host_dev_name"] == "tap0"
    assert config["vsock"] == {"guest_cid": 3, "uds_path": "/tmp/v.sock"}
    assert config["entropy"] == {"rate_limiter": None}
    assert config["mmds-config"]["network_interfaces"] == ["eth0"]
    assert VmResources.from_json(config).to_json() == config


# --- pre-boot configuration -------------------------------------------------------------


def test_pre_boot_resources_are_stored(api, files, controller):
    configure(api, files)
    resources = api.router.resources
    assert resources.boot_source.kernel_image_path == files["vmlinux"]
    assert list(resources.drives) == ["rootfs"] and list(resources.nets) == ["eth0"]
    assert controller.calls == []  # configuring is not acting
    assert "is not a regular file" in api.fault(
        "PUT", "/boot-source", {"kernel_image_path": str(Path(files["vmlinux"]).parent)}
    )
    second_root = {"drive_id": "b", "path_on_host": files["new.ext4"], "is_root_device": True}
    assert "already is" in api.fault("PUT", "/drives/b", second_root)


def test_logger_and_metrics_go_to_the_controller(api, controller):
    api.ok("PUT", "/logger", {"level": "debug"})
    assert controller.calls == [("configure_logger", (models.Logger(level="Debug"),))]
    api.ok("PUT", "/metrics", {"metrics_path": "/tmp/m"})
    assert api.fault("PUT", "/metrics", {"metrics_path": "/tmp/m"}) == (
        "Metrics error: Reinitialization of metrics not allowed."
    )
    controller.fail["configure_logger"] = HostError("cannot open /x: Permission denied")
    assert api.fault("PUT", "/logger", {"log_path": "/x"}) == (
        "Logger error: cannot open /x: Permission denied"
    )
    assert api.router.resources.logger == models.Logger(level="Debug")  # unchanged


def test_mmds_config_needs_the_interface_and_v1_is_deprecated(api, files):
    assert "not a configured network interface" in api.fault(
        "PUT", "/mmds/config", {"network_interfaces": ["eth0"]}
    )
    configure(api, files)
    status, _, headers = api.full("PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
    assert status == 204 and headers == {"Deprecation": "true"}
    status, _, headers = api.full(
        "PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}
    )
    assert status == 204 and headers == {}


def test_deprecated_fields_are_flagged(api):
    _, _, headers = api.full("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "vsock_id": "x"})
    assert headers == {"Deprecation": "true"}
    _, _, headers = api.full("PATCH", "/machine-config", {"cpu_template": "None", "vcpu_count": 2})
    assert headers == {"Deprecation": "true"}


# --- MMDS -------------------------------------------------------------------------------


def test_mmds_put_patch_get_before_and_after_boot(api, files, controller):
    assert api.ok("GET", "/mmds") == {}
    assert api.fault("PATCH", "/mmds", {"a": 1}) == (
        "MMDS error: The MMDS data store is not initialized."
    )
    api.ok("PUT", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-1", "x": 1}}})
    api.ok("PATCH", "/mmds", {"latest": {"meta-data": {"x": None}}})
    assert api.ok("GET", "/mmds") == {"latest": {"meta-data": {"ami-id": "ami-1"}}}
    assert "must be a JSON object" in api.fault("PUT", "/mmds", [1, 2])
    boot(api, files)
    api.ok("PATCH", "/mmds", {"post": True})
    assert api.ok("GET", "/mmds")["post"] is True


def test_mmds_over_its_limit_is_413(controller):
    resources = VmResources(mmds_size_limit=100)
    api = Api(Router(controller, resources))
    message = api.fault("PUT", "/mmds", {"k": "v" * 200}, status=413)
    assert message.startswith("MMDS limit exceeded error:")
    assert api.router.body_limit("PUT", "/mmds") == 51200
    big = Api(Router(controller, VmResources(mmds_size_limit=100_000)))
    assert big.router.body_limit("PATCH", "/mmds") == 100_000
    assert big.router.body_limit("PUT", "/drives/x") == 51200


def test_mmds_data_does_not_rule_out_a_snapshot_load(api):
    api.ok("PUT", "/mmds", {"a": 1})
    api.ok("PUT", "/logger", {"level": "Info"})
    api.ok("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"})


# --- InstanceStart and the pre/post-boot rules ------------------------------------------


def test_instance_start_needs_a_kernel(api, controller):
    assert api.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == MISSING_KERNEL
    assert controller.calls == []


def test_instance_start_hands_the_resources_to_the_controller(api, files, controller):
    boot(api, files)
    assert controller.calls == [("start", (api.router.resources,))]
    assert api.ok("GET", "/")["state"] == "Running"


def test_a_failed_start_is_reported_and_can_be_retried(api, files, controller):
    configure(api, files)
    controller.fail["start"] = HostError("this host's KVM lacks KVM_CAP_IRQCHIP")
    assert api.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "Start microvm error: this host's KVM lacks KVM_CAP_IRQCHIP"
    )
    assert controller.state == VmState.NOT_STARTED
    controller.fail["start"] = OSError(2, "No such file or directory", "/dev/kvm")
    assert api.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
        "Start microvm error: No such file or directory: /dev/kvm"
    )
    api.ok("PUT", "/actions", {"action_type": "InstanceStart"})


def test_a_controller_bug_is_a_500(api, files, controller):
    configure(api, files)
    controller.fail["start"] = ZeroDivisionError("oops")
    message = api.fault("PUT", "/actions", {"action_type": "InstanceStart"}, status=500)
    assert message == "Internal error: ZeroDivisionError: oops"
    assert api.router.counters.as_metrics()["put_api_requests"]["actions_fails"] == 1


PRE_BOOT_ONLY = [
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
    ("PATCH", "/machine-config", {"vcpu_count": 2}),
    ("PUT", "/drives/d", {"drive_id": "d", "path_on_host": "/d", "is_root_device": False}),
    ("PUT", "/network-interfaces/e", {"iface_id": "e", "host_dev_name": "tap5"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}),
    ("PUT", "/entropy", {}),
    ("PUT", "/logger", {"level": "Info"}),
    ("PUT", "/metrics", {"metrics_path": "/m"}),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}),
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}),
]
POST_BOOT_ONLY = [
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/vm", {"state": "Resumed"}),
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m"}),
]


@pytest.mark.parametrize(("method", "path", "body"), PRE_BOOT_ONLY)
def test_pre_boot_only_requests_are_refused_after_start(api, files, controller, method, path, body):
    boot(api, files)
    calls = len(controller.calls)
    before = api.ok("GET", "/vm/config")
    assert api.fault(method, path, body) == NOT_SUPPORTED_POST_BOOT
    assert len(controller.calls) == calls
    assert api.ok("GET", "/vm/config") == before


@pytest.mark.parametrize(("method", "path", "body"), POST_BOOT_ONLY)
def test_post_boot_only_requests_are_refused_before_start(
    api, files, controller, method, path, body
):
    configure(api, files)
    assert api.fault(method, path, body) == NOT_SUPPORTED_PRE_BOOT
    assert controller.calls == []


def test_anytime_requests_work_in_every_state(api, files, controller):
    for state in ("before", "running", "paused"):
        if state == "running":
            boot(api, files)
        if state == "paused":
            api.ok("PATCH", "/vm", {"state": "Paused"})
        for path in ("/", "/version", "/vm/config", "/machine-config", "/mmds"):
            assert api("GET", path)[0] == 200
        api.ok("PUT", "/mmds", {"state": state})
    assert api.ok("GET", "/")["state"] == "Paused"


# --- post-boot actions ------------------------------------------------------------------


def test_actions_after_boot(api, files, controller):
    boot(api, files)
    api.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    api.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    api.ok("PATCH", "/vm", {"state": "Paused"})
    api.ok("PATCH", "/vm", {"state": "Resumed"})
    assert controller.names == ["start", "send_ctrl_alt_del", "flush_metrics", "pause", "resume"]
    controller.fail["pause"] = HostError("vcpu0 did not stop")
    assert api.fault("PATCH", "/vm", {"state": "Paused"}) == (
        "Internal VMM error: vcpu0 did not stop"
    )
    assert 'must be one of "InstanceStart"' in api.fault("PUT", "/actions", {"action_type": "Go"})


def test_snapshot_create_needs_a_paused_vm(api, files, controller):
    boot(api, files)
    body = {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}
    assert "must be paused first" in api.fault("PUT", "/snapshot/create", body)
    api.ok("PATCH", "/vm", {"state": "Paused"})
    api.ok("PUT", "/snapshot/create", body)
    assert controller.calls[-1] == (
        "create_snapshot",
        (operations.SnapshotCreateParams("/s", "/m", "Diff"),),
    )
    controller.fail["create_snapshot"] = ConfigError("cannot write /s: disk full")
    assert api.fault("PUT", "/snapshot/create", body) == (
        "Create snapshot error: cannot write /s: disk full"
    )


def test_patch_drive_updates_the_device_and_the_config(api, files, controller):
    boot(api, files)
    limiter = {"bandwidth": {"size": 1000, "refill_time": 100}}
    api.ok(
        "PATCH",
        "/drives/rootfs",
        {"drive_id": "rootfs", "path_on_host": files["new.ext4"], "rate_limiter": limiter},
    )
    name, args = controller.calls[-1]
    assert name == "patch_drive"
    assert args == (
        "rootfs",
        files["new.ext4"],
        models.RateLimiterConfig(models.TokenBucketConfig(1000, 100)),
    )
    drive = api.ok("GET", "/vm/config")["drives"][0]
    assert drive["path_on_host"] == files["new.ext4"]
    assert drive["rate_limiter"]["bandwidth"]["size"] == 1000
    # A disabled bucket removes the limit.
    api.ok(
        "PATCH",
        "/drives/rootfs",
        {"drive_id": "rootfs", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}},
    )
    assert api.ok("GET", "/vm/config")["drives"][0]["rate_limiter"] is None

    assert "nothing to update" in api.fault("PATCH", "/drives/rootfs", {"drive_id": "rootfs"})
    assert 'no drive has drive_id "other"' in api.fault(
        "PATCH", "/drives/other", {"drive_id": "other", "path_on_host": files["new.ext4"]}
    )
    assert "No such file" in api.fault(
        "PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/no/such/img"}
    )
    controller.fail["patch_drive"] = HostError("cannot reopen the image")
    assert (
        api.fault(
            "PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": files["root.ext4"]}
        )
        == "Drive config error: Unable to patch the block device: cannot reopen the image"
    )
    assert api.ok("GET", "/vm/config")["drives"][0]["path_on_host"] == files["new.ext4"]


def test_patch_net_updates_rate_limiters(api, files, controller):
    boot(api, files)
    tx = {"ops": {"size": 100, "refill_time": 1000}}
    api.ok("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "tx_rate_limiter": tx})
    assert controller.calls[-1] == (
        "patch_net",
        ("eth0", None, models.RateLimiterConfig(ops=models.TokenBucketConfig(100, 1000))),
    )
    shown = api.ok("GET", "/vm/config")["network-interfaces"][0]
    assert shown["tx_rate_limiter"]["ops"]["size"] == 100 and shown["rx_rate_limiter"] is None
    assert "no network interface has iface_id" in api.fault(
        "PATCH", "/network-interfaces/eth9", {"iface_id": "eth9"}
    )


# --- snapshot load ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("PUT", "/entropy", {}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}),
        ("PUT", "/boot-source", {"kernel_image_path": "/no/such/kernel"}),  # even a failed one
    ],
)
def test_snapshot_load_only_on_a_fresh_vmm(api, controller, method, path, body):
    api(method, path, body)
    load = {"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}
    assert api.fault("PUT", "/snapshot/load", load) == LOAD_SNAPSHOT_NOT_ALLOWED
    assert "load_snapshot" not in controller.names


def test_snapshot_load_a_parse_error_does_not_count_as_configuration(api):
    api("PUT", "/machine-config", {"vcpu_count": "x"})
    api.ok("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"})


def test_snapshot_load_then_resume(api, controller):
    status, _, headers = api.full(
        "PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}
    )
    assert status == 204 and headers == {"Deprecation": "true"}
    assert controller.state == VmState.PAUSED
    api.ok("PATCH", "/vm", {"state": "Resumed"})
    assert api.fault("PUT", "/actions", {"action_type": "InstanceStart"}) == (
        NOT_SUPPORTED_POST_BOOT
    )


def test_snapshot_load_failure(api, controller):
    controller.fail["load_snapshot"] = ConfigError("snapshot file /s: bad magic")
    body = {"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}
    assert api.fault("PUT", "/snapshot/load", body) == (
        "Load snapshot error: snapshot file /s: bad magic"
    )


def test_router_from_a_config_file_starts_and_counts_as_configured(files, controller):
    resources = VmResources.from_json(
        {
            "boot-source": {"kernel_image_path": files["vmlinux"]},
            "logger": {"level": "Info"},
            "metrics": {"metrics_path": "/tmp/m"},
        }
    )
    router = Router(controller, resources)
    router.boot_from_config()
    assert controller.names == ["configure_logger", "configure_metrics", "start"]
    with pytest.raises(ConfigError, match="The requested operation is not supported after"):
        router.boot_from_config()
    assert controller.names == ["configure_logger", "configure_metrics", "start"]
    failing = FakeController()
    failing.fail["start"] = HostError("no KVM")
    with pytest.raises(ConfigError, match=r"^Start microvm error: no KVM$"):
        Router(failing, resources).boot_from_config()
    fresh = Router(
        FakeController(),
        VmResources.from_json({"boot-source": {"kernel_image_path": files["vmlinux"]}}),
    )
    assert Api(fresh).fault(
        "PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m"}
    ) == (LOAD_SNAPSHOT_NOT_ALLOWED)


# --- counters ---------------------------------------------------------------------------


def test_counters_per_route(api, files):
    configure(api, files)
    api("PUT", "/drives/x", {"drive_id": "x"})
    api("GET", "/")
    metrics = api.router.counters.as_metrics()
    assert metrics["put_api_requests"]["drive_count"] == 2
    assert metrics["put_api_requests"]["drive_fails"] == 1
    assert metrics["put_api_requests"]["boot_source_count"] == 1
    assert metrics["get_api_requests"] == {"instance_info_count": 1, "instance_info_fails": 0}


# --- end to end: router behind the HTTP server ------------------------------------------


def test_router_over_http(files, controller):
    directory = Path(tempfile.mkdtemp(prefix="pyvmm-api-"))
    router = Router(controller)
    try:
        with ApiServer(directory / "api.sock", router, body_limit=router.body_limit) as server:
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(server.path))
            stream = sock.makefile("rwb")

            def call(method: str, path: str, body: Any = None) -> tuple[int, bytes]:
                raw = b"" if body is None else json.dumps(body).encode()
                stream.write(
                    f"{method} {urllib.parse.quote(path)} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Content-Length: {len(raw)}\r\n\r\n".encode()
                    + raw
                )
                stream.flush()
                status = int(stream.readline().split()[1])
                length = 0
                while (line := stream.readline()) != b"\r\n":
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                return status, stream.read(length)

            assert call("PUT", "/boot-source", {"kernel_image_path": files["vmlinux"]})[0] == 204
            assert call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, b"")
            status, body = call("GET", "/")
            assert status == 200 and json.loads(body)["state"] == "Running"
            status, body = call("PUT", "/boot-source", {"kernel_image_path": files["vmlinux"]})
            assert status == 400 and json.loads(body) == {"fault_message": NOT_SUPPORTED_POST_BOOT}
            sock.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- Firecracker's other routes -------------------------------------------------------------


def test_flush_metrics_works_any_time(api, controller):
    api.ok("PUT", "/actions", {"action_type": "FlushMetrics"})  # Firecracker: 204 before boot too
    assert controller.names == ["flush_metrics"]


def test_metrics_from_the_command_line_cannot_be_reinitialized(api, controller):
    api.router.metrics_initialized = True  # --metrics-path
    assert api.fault("PUT", "/metrics", {"metrics_path": "/tmp/m"}) == (
        "Metrics error: Reinitialization of metrics not allowed."
    )
    assert controller.calls == []


def test_balloon_routes(api, files, controller):
    assert api.fault("GET", "/balloon").startswith("Balloon device is not configured")
    assert api.fault("PATCH", "/balloon", {"amount_mib": 1}).startswith("Balloon device is not")
    api.ok("PUT", "/balloon", {"amount_mib": 4, "deflate_on_oom": True,
                               "stats_polling_interval_s": 1})  # fmt: skip
    assert api.ok("GET", "/balloon") == {
        "amount_mib": 4, "deflate_on_oom": True, "stats_polling_interval_s": 1,
    }  # fmt: skip
    api.ok("PATCH", "/balloon", {"amount_mib": 8})  # before boot: the configuration changes
    assert api.fault("GET", "/balloon/statistics") == NOT_SUPPORTED_PRE_BOOT
    assert "free page hinting" in api.fault("PUT", "/balloon", {
        "amount_mib": 1, "deflate_on_oom": False, "free_page_hinting": True})  # fmt: skip
    boot(api, files)
    assert api.fault("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False}) == (
        NOT_SUPPORTED_POST_BOOT
    )
    api.ok("PATCH", "/balloon", {"amount_mib": 2})
    assert api.ok("GET", "/balloon/statistics")["target_pages"] == 256
    api.ok("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5})
    assert "cannot be turned on or off" in api.fault(
        "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 0}
    )
    assert controller.names[1:] == [
        "set_balloon_target", "balloon_stats", "set_balloon_stats_interval",
    ]  # fmt: skip
    assert api.ok("GET", "/balloon")["amount_mib"] == 2
    assert api.ok("GET", "/vm/config")["balloon"]["stats_polling_interval_s"] == 5
    assert "hinting" in api.fault("PATCH", "/balloon/hinting/start", {})
    assert "hinting" in api.fault("PATCH", "/balloon/hinting/stop")
    assert "hinting" in api.fault("GET", "/balloon/hinting/status")


def test_a_balloon_counts_as_configuration_for_snapshot_loads(api):
    api.ok("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False})
    body = {"snapshot_path": "/s", "mem_file_path": "/m"}
    assert api.fault("PUT", "/snapshot/load", body) == LOAD_SNAPSHOT_NOT_ALLOWED


def test_serial_output_path(api, files):
    api.ok("PUT", "/serial", {"serial_out_path": "/tmp/console.log"})
    assert api.router.resources.serial_out_path == "/tmp/console.log"
    assert "rate_limiter is not supported" in api.fault(
        "PUT", "/serial", {"serial_out_path": "/x", "rate_limiter": {"size": 1}}
    )
    boot(api, files)
    assert api.fault("PUT", "/serial", {"serial_out_path": "/x"}) == NOT_SUPPORTED_POST_BOOT


@pytest.mark.parametrize(
    ("method", "path", "body", "feature"),
    [
        ("PUT", "/cpu-config", {"cpuid_modifiers": []}, "custom CPU templates"),
        ("PUT", "/pmem/p0", {"id": "p0", "path_on_host": "/p"}, "virtio-pmem"),
        ("PATCH", "/pmem/p0", {"id": "p0"}, "virtio-pmem"),
        ("PUT", "/hotplug/memory", {"total_size_mib": 1024}, "virtio-mem"),
        ("PATCH", "/hotplug/memory", {"requested_size_mib": 0}, "virtio-mem"),
        ("GET", "/hotplug/memory", None, "virtio-mem"),
    ],
)
def test_routes_without_a_device_name_what_is_missing(api, method, path, body, feature):
    message = api.fault(method, path, body)
    assert feature in message and "not supported by pyvmm" in message
