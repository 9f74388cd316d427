"""VmResources: cross-request rules, GET /vm/config, the config file, the MachineConfig mapping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import layout
from pyvmm.api import models, operations
from pyvmm.api.machine_config import to_machine_config, to_vm_resources
from pyvmm.api.mmds import MmdsLimitError, MmdsNotInitializedError, MmdsStore, merge_patch
from pyvmm.api.vm_config import MAX_CONFIG_FILE_BYTES, VmResources
from pyvmm.config import (
    DEFAULT_LINUX_CMDLINE,
    DriveConfig,
    NetConfig,
    RateLimitSpec,
    TokenBucketSpec,
    VsockConfig,
)
from pyvmm.errors import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A kernel, an initrd and three disk images (one not writable)."""
    paths = {}
    for name in ("vmlinux", "initrd", "root.ext4", "data.ext4", "ro.ext4"):
        path = tmp_path / name
        path.write_bytes(b"\0" * 512)
        paths[name] = str(path)
    os.chmod(paths["ro.ext4"], 0o444)
    return paths


def drive(path: str, drive_id: str = "rootfs", root: bool = False, **extra) -> models.Drive:
    return models.parse_drive(
        {"drive_id": drive_id, "path_on_host": path, "is_root_device": root, **extra}
    )


def net(iface_id: str, tap: str, mac: str | None = None) -> models.NetworkInterface:
    return models.parse_network_interface(
        {"iface_id": iface_id, "host_dev_name": tap, "guest_mac": mac}
    )


# --- rules ------------------------------------------------------------------------------


def test_boot_source_files_must_exist(files, tmp_path):
    resources = VmResources()
    resources.set_boot_source(models.BootSource(files["vmlinux"], None, files["initrd"]))
    with pytest.raises(ConfigError, match=r'kernel_image_path ".*/nope": No such file'):
        resources.set_boot_source(models.BootSource(str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"initrd_path .* is not a regular file"):
        resources.set_boot_source(models.BootSource(files["vmlinux"], None, str(tmp_path)))


def test_a_read_write_drive_must_be_writable(tmp_path):
    """Checked as 'nobody' (root may write any file): a read-only image is refused
    read-write and accepted read-only."""
    shared = Path(tempfile.mkdtemp(prefix="pyvmm-rw-"))
    try:
        shared.chmod(0o755)
        image = shared / "ro.img"
        image.write_bytes(bytes(4096))
        image.chmod(0o444)
        script = (
            "import os, pyvmm.api.vm_config as vc, pyvmm.api.models as m;"
            "from pyvmm.errors import ConfigError;"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
            "r = vc.VmResources();"
            f"d = lambda ro: m.Drive(drive_id='d', path_on_host={str(image)!r},"
            " is_root_device=False, is_read_only=ro);"
            "exec('try:\\n r.set_drive(d(False))\\nexcept ConfigError as e: print(e)');"
            "r.set_drive(d(True)); print('read-only ok')"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(shared)
    assert result.returncode == 0, result.stderr
    assert "is not writable (set is_read_only to use it read-only)" in result.stdout
    assert "read-only ok" in result.stdout


def test_only_one_root_drive_and_it_comes_first(files):
    resources = VmResources()
    resources.set_drive(drive(files["data.ext4"], "data"))
    resources.set_drive(drive(files["root.ext4"], "rootfs", root=True))
    with pytest.raises(
        ConfigError, match='drive "second" cannot be the root device: drive "rootfs"'
    ):
        resources.set_drive(drive(files["data.ext4"], "second", root=True))
    # Replacing the root drive itself is fine.
    resources.set_drive(drive(files["root.ext4"], "rootfs", root=True, is_read_only=True))
    assert [d.drive_id for d in resources.drive_order()] == ["rootfs", "data"]
    assert resources.drives["rootfs"].is_read_only


def test_put_on_an_existing_id_replaces_in_place(files):
    resources = VmResources()
    resources.set_drive(drive(files["root.ext4"], "a"))
    resources.set_drive(drive(files["data.ext4"], "b"))
    resources.set_drive(drive(files["data.ext4"], "a"))
    assert list(resources.drives) == ["a", "b"]
    assert resources.drives["a"].path_on_host == files["data.ext4"]


def test_macs_and_taps_are_unique_across_interfaces():
    resources = VmResources()
    resources.set_network_interface(net("eth0", "tap0", "06:00:00:00:00:01"))
    with pytest.raises(
        ConfigError, match=r'guest_mac 06:00:00:00:00:01 is already used by .*"eth0"'
    ):
        resources.set_network_interface(net("eth1", "tap1", "06:00:00:00:00:01"))
    with pytest.raises(ConfigError, match=r'host_dev_name "tap0" is already used by .*"eth0"'):
        resources.set_network_interface(net("eth1", "tap0"))
    resources.set_network_interface(net("eth0", "tap0", "06:00:00:00:00:01"))  # same id: replace
    resources.set_network_interface(net("eth1", "tap1"))
    assert list(resources.nets) == ["eth0", "eth1"]


def test_virtio_device_count_is_capped(files):
    resources = VmResources()
    for index in range(layout.MAX_VIRTIO_DEVICES - 1):
        resources.set_drive(drive(files["data.ext4"], f"d{index}"))
    resources.set_entropy(models.Entropy())
    with pytest.raises(ConfigError, match="at most 16 virtio devices"):
        resources.set_network_interface(net("eth0", "tap0"))
    resources.set_drive(drive(files["data.ext4"], "d0"))  # a replacement still fits


def test_mmds_config_names_existing_interfaces_and_metrics_are_set_once():
    resources = VmResources()
    with pytest.raises(ConfigError, match='names "eth0", which is not a configured network'):
        resources.set_mmds_config(operations.MmdsConfig(("eth0",)))
    resources.set_network_interface(net("eth0", "tap0"))
    resources.set_mmds_config(operations.MmdsConfig(("eth0",)))
    resources.set_metrics(models.Metrics("/m"))
    with pytest.raises(ConfigError, match="already initialized"):
        resources.set_metrics(models.Metrics("/m"))


def test_patched_drive_and_net_merge_without_storing(files):
    resources = VmResources()
    limited = {"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}
    resources.set_drive(drive(files["root.ext4"], "rootfs", root=True, **limited))
    patch = models.PartialDrive("rootfs", files["data.ext4"], None)
    new = resources.patched_drive(patch)
    assert new.path_on_host == files["data.ext4"] and new.rate_limiter.ops.size == 10
    assert resources.drives["rootfs"].path_on_host == files["root.ext4"]
    resources.replace_drive(new)
    assert resources.drives["rootfs"] == new
    with pytest.raises(ConfigError, match='no drive has drive_id "other"'):
        resources.patched_drive(models.PartialDrive("other"))
    with pytest.raises(ConfigError, match="No such file"):
        resources.patched_drive(models.PartialDrive("rootfs", files["data.ext4"] + ".gone"))

    resources.set_network_interface(net("eth0", "tap0"))
    tx = models.RateLimiterConfig(models.TokenBucketConfig(100, 10))
    new_net = resources.patched_network_interface(models.PartialNetworkInterface("eth0", None, tx))
    assert new_net.tx_rate_limiter == tx and new_net.rx_rate_limiter is None
    with pytest.raises(ConfigError, match='no network interface has iface_id "eth9"'):
        resources.patched_network_interface(models.PartialNetworkInterface("eth9"))


# --- MMDS store -------------------------------------------------------------------------


def test_mmds_store_put_patch_get_and_limit():
    store = MmdsStore(limit=40)
    assert store.get() == {}
    with pytest.raises(MmdsNotInitializedError, match="not initialized"):
        store.patch({"a": 1})
    store.put({"a": {"b": 1, "c": 2}})
    store.patch({"a": {"b": None, "d": [1]}, "e": "x"})
    assert store.get() == {"a": {"c": 2, "d": [1]}, "e": "x"}
    with pytest.raises(MmdsLimitError, match="limit of 40"):
        store.patch({"big": "y" * 40})
    assert store.get() == {"a": {"c": 2, "d": [1]}, "e": "x"}  # refused whole
    with pytest.raises(MmdsLimitError):
        store.put({"big": "y" * 40})
    copy = store.get()
    copy["a"]["c"] = 99
    assert store.get()["a"]["c"] == 2


def test_merge_patch_follows_rfc_7396_examples():
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch(["a", "b"], {"a": "c"}) == {"a": "c"}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


# --- GET /vm/config and the config file -------------------------------------------------


def example_config(files: dict[str, str]) -> dict:
    """A Firecracker config file using every section pyvmm supports."""
    return {
        "boot-source": {
            "kernel_image_path": files["vmlinux"],
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            "initrd_path": files["initrd"],
        },
        "drives": [
            {
                "drive_id": "rootfs",
                "partuuid": None,
                "is_root_device": True,
                "cache_type": "Unsafe",
                "is_read_only": False,
                "path_on_host": files["root.ext4"],
                "io_engine": "Sync",
                "rate_limiter": None,
                "socket": None,
            },
            {
                "drive_id": "scratch",
                "is_root_device": False,
                "path_on_host": files["data.ext4"],
                "rate_limiter": {
                    "bandwidth": {"size": 10485760, "refill_time": 1000},
                    "ops": {"size": 500, "refill_time": 100},
                },
            },
        ],
        "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 1024,
            "smt": False,
            "track_dirty_pages": True,
            "huge_pages": "None",
        },
        "cpu-config": None,
        "balloon": None,
        "network-interfaces": [
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}
        ],
        "vsock": None,
        "logger": {"log_path": "/tmp/fc.log", "level": "Debug", "show_level": True},
        "metrics": {"metrics_path": "/tmp/fc.metrics"},
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
        "entropy": {},
        "pmem": [],
        "memory-hotplug": None,
    }


def test_full_firecracker_config_file(files, tmp_path):
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(example_config(files)))
    resources = VmResources.from_config_file(path)
    assert resources.boot_source.initrd_path == files["initrd"]
    assert [d.drive_id for d in resources.drive_order()] == ["rootfs", "scratch"]
    assert resources.drives["scratch"].rate_limiter.ops.size == 500
    assert resources.machine_config == models.MachineConfiguration(2, 1024, False, True)
    assert resources.nets["eth0"].guest_mac == "06:00:ac:10:00:02"
    assert resources.logger.level == "Debug" and resources.metrics.metrics_path == "/tmp/fc.metrics"
    assert resources.mmds_config.version == "V2"
    assert resources.entropy == models.Entropy()

    shown = resources.to_json()
    assert shown["machine-config"] == example_config(files)["machine-config"]
    assert shown["drives"][0] == example_config(files)["drives"][0]
    assert shown["mmds-config"]["ipv4_address"] == "169.254.169.254"
    # What GET /vm/config prints reads back as the same configuration.
    again = VmResources.from_json(json.loads(json.dumps(shown)))
    assert again.to_json() == shown


def test_minimal_config_file_gets_defaults(files):
    resources = VmResources.from_json({"boot-source": {"kernel_image_path": files["vmlinux"]}})
    assert resources.machine_config == models.MachineConfiguration()
    shown = resources.to_json()
    assert shown["drives"] == [] and shown["vsock"] is None and shown["entropy"] is None
    assert shown["machine-config"]["vcpu_count"] == 1
    assert shown["machine-config"]["mem_size_mib"] == 128


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"boot-source": None}, '"boot-source" is required'),
        ({"drive": []}, 'unknown key "drive" (expected one of logger, metrics'),
        ({"balloon": {"amount_mib": 1}}, "balloon: deflate_on_oom is required"),
        ({"cpu-config": {"cpuid_modifiers": []}}, '"cpu-config" is not supported by pyvmm'),
        ({"memory-hotplug": {"total_size_mib": 1}}, '"memory-hotplug" is not supported'),
        ({"pmem": [{"id": "p"}]}, '"pmem" is not supported by pyvmm'),
        ({"drives": {}}, "drives must be an array, not {}"),
        ({"drives": [{"drive_id": "x", "path_on_host": "/x"}]}, "drives[0]: is_root_device is"),
        ({"machine-config": {"vcpu_count": 64, "mem_size_mib": 128}}, "machine-config: vcpu_count"),
        ({"network-interfaces": [{"iface_id": "a"}]}, "network-interfaces[0]: host_dev_name is"),
        (
            {"mmds-config": {"network_interfaces": ["eth9"]}},
            "mmds-config: network_interfaces names",
        ),
        ({"vsock": {"guest_cid": 1, "uds_path": "/v"}}, "vsock: guest_cid must be"),
        ({"logger": {"level": "Loud"}}, "logger: level must be one of"),
    ],
)
def test_bad_config_files_name_the_key(files, change, message):
    config = {**example_config(files), **change}
    with pytest.raises(ConfigError) as info:
        VmResources.from_json(config)
    assert str(info.value).startswith(message)


def test_config_file_ids_must_be_unique(files):
    config = example_config(files)
    config["drives"].append({**config["drives"][1]})
    with pytest.raises(ConfigError, match=r'drives\[2\]: the id "scratch" is used twice'):
        VmResources.from_json(config)


def test_config_file_errors_start_with_the_path(files, tmp_path):
    path = tmp_path / "vm.json"
    with pytest.raises(ConfigError, match=f"config file {path}: No such file"):
        VmResources.from_config_file(path)
    path.write_text('{\n  "boot-source": {,\n}')
    with pytest.raises(ConfigError, match=r"is not valid JSON: .*line 2 column"):
        VmResources.from_config_file(path)
    path.write_text('{"boot-source": {"kernel_image_path": "/no/such/kernel"}}')
    with pytest.raises(ConfigError, match=f"config file {path}: boot-source: kernel_image_path"):
        VmResources.from_config_file(path)
    path.write_text("[]")
    with pytest.raises(ConfigError, match="the configuration must be a JSON object"):
        VmResources.from_config_file(path)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vcpus=st.integers(1, 32),
    mib=st.integers(16, 4096),
    n_drives=st.integers(0, 3),
    root=st.booleans(),
    n_nets=st.integers(0, 3),
    entropy=st.booleans(),
)
def test_vm_config_round_trips(files, vcpus, mib, n_drives, root, n_nets, entropy):
    resources = VmResources()
    resources.set_boot_source(models.BootSource(files["vmlinux"], "quiet"))
    resources.update_machine_config(models.MachineConfigUpdate(vcpus, mib))
    for index in range(n_drives):
        resources.set_drive(drive(files["data.ext4"], f"d{index}", root=root and index == 1))
    for index in range(n_nets):
        resources.set_network_interface(
            net(f"eth{index}", f"tap{index}", f"06:00:00:00:00:0{index}")
        )
    if entropy:
        resources.set_entropy(models.Entropy())
    shown = resources.to_json()
    assert VmResources.from_json(json.loads(json.dumps(shown))).to_json() == shown


# --- the MachineConfig mapping ----------------------------------------------------------


def test_to_machine_config_maps_every_supported_field(files):
    resources = VmResources.from_json(example_config(files))
    config = to_machine_config(resources)
    assert config.kernel == Path(files["vmlinux"]) and config.initrd == Path(files["initrd"])
    assert config.cmdline == "console=ttyS0 reboot=k panic=1 pci=off"
    assert config.vcpus == 2 and config.mem_size == 1024 << 20
    assert config.cpu_template == "auto" and config.rng
    assert config.drives == (
        DriveConfig(Path(files["root.ext4"]), read_only=False, root=True, drive_id="rootfs"),
        DriveConfig(
            Path(files["data.ext4"]),
            read_only=False,
            root=False,
            rate_limit=RateLimitSpec(TokenBucketSpec(10485760, 1000), TokenBucketSpec(500, 100)),
            drive_id="scratch",
        ),
    )
    assert config.nets == (NetConfig(tap="tap0", mac="06:00:ac:10:00:02", iface_id="eth0"),)


def test_to_machine_config_defaults_and_partuuid(files):
    resources = VmResources()
    with pytest.raises(ConfigError, match="without kernel configuration"):
        to_machine_config(resources)
    resources.set_boot_source(models.BootSource(files["vmlinux"]))
    resources.set_drive(drive(files["data.ext4"], "data"))
    resources.set_drive(
        drive(files["root.ext4"], "rootfs", root=True, partuuid="0eaa91a0-01", is_read_only=True)
    )
    config = to_machine_config(resources)
    assert config.cmdline == f"{DEFAULT_LINUX_CMDLINE} root=PARTUUID=0eaa91a0-01 ro"
    assert [d.path for d in config.drives] == [Path(files["root.ext4"]), Path(files["data.ext4"])]
    assert not any(d.root for d in config.drives)
    assert config.mem_size == 128 << 20 and config.vcpus == 1 and not config.rng


def test_to_machine_config_maps_vsock_and_every_rate_limiter(files):
    bucket = {"size": 1000, "refill_time": 100}
    resources = VmResources.from_json(
        {
            "boot-source": {"kernel_image_path": files["vmlinux"]},
            "vsock": {"guest_cid": 3, "uds_path": "/run/v.sock"},
            "entropy": {"rate_limiter": {"bandwidth": bucket}},
            "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"ops": bucket}}
            ],
        }
    )
    config = to_machine_config(resources)
    assert config.vsock == VsockConfig(3, Path("/run/v.sock"))
    assert config.rng and config.rng_rate_limit == RateLimitSpec(
        bandwidth=TokenBucketSpec(1000, 100)
    )
    ops = RateLimitSpec(ops=TokenBucketSpec(1000, 100))
    assert config.nets == (NetConfig("tap0", None, ops, None, "eth0"),)


def test_to_machine_config_keeps_a_one_time_burst(files):
    """Firecracker accepts one_time_burst at PUT and honours it at InstanceStart; so do we."""
    resources = VmResources.from_json(
        {
            "boot-source": {"kernel_image_path": files["vmlinux"]},
            "drives": [
                {
                    "drive_id": "d",
                    "path_on_host": files["data.ext4"],
                    "is_root_device": False,
                    "rate_limiter": {"ops": {"size": 1, "refill_time": 1, "one_time_burst": 5}},
                }
            ],
        }
    )
    (drive,) = to_machine_config(resources).drives
    assert drive.rate_limit == RateLimitSpec(ops=TokenBucketSpec(1, 1, one_time_burst=5))


def test_a_machine_config_reads_back_as_the_same_resources(files):
    """What GET /vm/config shows after a snapshot load: the restored machine's config."""
    original = VmResources.from_json(example_config(files))
    config = to_machine_config(original)
    restored = VmResources()
    to_vm_resources(config, restored)
    assert to_machine_config(restored) == config
    shown = restored.to_json()
    assert [d["drive_id"] for d in shown["drives"]] == ["rootfs", "scratch"]
    assert shown["drives"][1]["rate_limiter"]["ops"] == {
        "size": 500,
        "one_time_burst": None,
        "refill_time": 100,
    }
    assert shown["machine-config"]["vcpu_count"] == 2
    assert shown["network-interfaces"][0]["host_dev_name"] == "tap0"


def test_config_files_that_are_not_small_regular_files_are_refused(tmp_path):
    """A FIFO would block for ever and /dev/zero never end: both refused before reading."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_CONFIG_FILE_BYTES + 1))
    for path, message in (
        (fifo, f"config file {fifo} is not a regular file"),
        (Path("/dev/zero"), "config file /dev/zero is not a regular file"),
        (tmp_path, f"config file {tmp_path} is not a regular file"),
        (big, f"config file {big} is {MAX_CONFIG_FILE_BYTES + 1} bytes; at most"),
        (tmp_path / "none.json", f"config file {tmp_path / 'none.json'}: No such file"),
    ):
        with pytest.raises(ConfigError) as info:
            VmResources.from_config_file(path)
        assert str(info.value).startswith(message)


def test_balloon_in_a_config_file_and_in_vm_config(files):
    resources = VmResources.from_json(
        {**example_config(files), "balloon": {"amount_mib": 8, "deflate_on_oom": True}}
    )
    shown = resources.to_json()
    assert shown["balloon"] == {
        "amount_mib": 8, "deflate_on_oom": True, "stats_polling_interval_s": 0,
    }  # fmt: skip
    assert (shown["cpu-config"], shown["pmem"], shown["memory-hotplug"]) == (None, [], None)


def test_templates_huge_pages_balloon_and_mtu_reach_the_machine_config(files):
    from pyvmm.api.balloon import BalloonResource

    resources = VmResources.from_json(example_config(files))
    resources.update_machine_config(
        models.MachineConfigUpdate(cpu_template="T2", huge_pages="2M", mem_size_mib=128)
    )
    resources.set_balloon(BalloonResource(16, True, 2))
    config = to_machine_config(resources)
    assert (config.cpu_template, config.huge_pages) == ("t2", True)
    assert config.balloon is not None and config.balloon.stats_polling_interval_s == 2
    assert config.device_ids[-1] == "balloon"
    shown = VmResources()
    to_vm_resources(config, shown)
    assert shown.machine_config.cpu_template == "T2" and shown.machine_config.huge_pages == "2M"
    assert shown.balloon == BalloonResource(16, True, 2)
