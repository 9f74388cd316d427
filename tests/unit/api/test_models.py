"""Request-body models: every parser's accepted shapes and one-line errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.api import models, operations
from pyvmm.api.fields import Fields, loads_strict, show
from pyvmm.config import RateLimitSpec, TokenBucketSpec
from pyvmm.devices.rate_limiter import KEEP, LimiterPatch
from pyvmm.errors import ConfigError
from tests.support.assertions import error_of

# --- fields -----------------------------------------------------------------------------


def test_fields_reject_non_objects_and_unknown_names():
    assert error_of(lambda v: Fields(v, "x", ("a",)), [1]) == "x must be a JSON object, not [1]"
    assert (
        error_of(lambda v: Fields(v, "x", ("a", "b")), {"c": 1})
        == 'x: unknown field "c" (expected one of a, b)'
    )


def test_fields_unsupported_name_says_so_but_null_is_fine():
    def parse(value):
        return Fields(value, "x", ("a",), unsupported={"b": "no b here"})

    assert error_of(parse, {"b": 1}) == "x: b is not supported by pyvmm (no b here)"
    parse({"b": None})


def test_show_quotes_json_and_shortens():
    assert show("x") == '"x"'
    assert show(None) == "null"
    assert len(show("y" * 100)) == 40


@pytest.mark.parametrize("bad", [True, 2.0, "1", None])
def test_integer_rejects_non_integers(bad):
    fields = Fields({"n": bad}, "x", ("n",))
    with pytest.raises(ConfigError, match=r"n must be an integer between 0 and 5|n is required"):
        fields.required_integer("n", 0, 5)


def test_loads_strict_rejects_nan_duplicates_and_deep_nesting():
    for data in (b"NaN", b'{"a": 1, "a": 2}', b"[" * 100_000, b"\xff", b"{} {}"):
        with pytest.raises(ValueError):
            loads_strict(data)
    assert loads_strict(b'{"a": [1, 2.5, "x", null]}') == {"a": [1, 2.5, "x", None]}


# --- rate limiters ----------------------------------------------------------------------


def test_rate_limiter_parses_buckets_into_the_config_spec():
    limiter = models.parse_rate_limiter(
        {
            "bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 50},
            "ops": {"size": 10, "refill_time": 1000},
        },
        "drive: rate_limiter",
    )
    assert limiter == models.RateLimiterConfig(
        models.TokenBucketConfig(1000, 100, 50), models.TokenBucketConfig(10, 1000)
    )
    spec = limiter.to_spec()
    assert spec == RateLimitSpec(TokenBucketSpec(1000, 100, 50), TokenBucketSpec(10, 1000))
    assert models.RateLimiterConfig.from_spec(spec) == limiter
    assert limiter.to_json()["ops"] == {"size": 10, "one_time_burst": None, "refill_time": 1000}


def test_a_patch_body_keeps_absent_buckets_and_removes_disabled_ones():
    patch = models.parse_rate_limiter({"ops": {"size": 0, "refill_time": 0}}, "patch").to_patch()
    assert patch == LimiterPatch(bandwidth=KEEP, ops=None)
    patch = models.parse_rate_limiter({"bandwidth": {"size": 5, "refill_time": 9}}, "p").to_patch()
    assert patch == LimiterPatch(bandwidth=TokenBucketSpec(5, 9), ops=KEEP)


def test_rate_limiter_errors_name_the_bucket_field():
    def parse(value):
        return models.parse_rate_limiter(value, "drive: rate_limiter")

    assert error_of(parse, {"bandwidth": {"size": -1, "refill_time": 1}}) == (
        "drive: rate_limiter.bandwidth: size must be an integer between 0 and "
        f"{models.U64_MAX}, not -1"
    )
    assert error_of(parse, {"ops": {"size": 1}}) == (
        "drive: rate_limiter.ops: refill_time is required"
    )
    # Firecracker's TokenBucket and RateLimiter take unknown fields silently.
    assert parse({"bw": {}, "ops": {"size": 1, "refill_time": 2, "x": 3}}) == (
        models.RateLimiterConfig(None, models.TokenBucketConfig(1, 2))
    )
    assert "must be a JSON object" in error_of(parse, {"ops": 5})


def test_disabled_buckets_vanish_from_device_config_but_remove_limits_in_patches():
    drive = models.parse_drive(
        {
            "drive_id": "d",
            "path_on_host": "/x",
            "is_root_device": False,
            "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100}},
        }
    )
    assert drive.rate_limiter is None
    current = models.RateLimiterConfig(
        models.TokenBucketConfig(100, 10), models.TokenBucketConfig(5, 10)
    )
    patch = models.RateLimiterConfig(bandwidth=models.TokenBucketConfig(0, 0))
    assert models.merge_rate_limiter(current, patch) == models.RateLimiterConfig(
        None, models.TokenBucketConfig(5, 10)
    )
    assert models.merge_rate_limiter(current, None) is current
    new_ops = models.RateLimiterConfig(ops=models.TokenBucketConfig(7, 70))
    assert models.merge_rate_limiter(None, new_ops) == new_ops


@given(
    size=st.integers(0, models.U64_MAX),
    refill=st.integers(0, models.U64_MAX),
    burst=st.integers(0, models.U64_MAX),
)
def test_token_bucket_round_trips(size, refill, burst):
    bucket = models.TokenBucketConfig(size, refill, burst)
    assert models.parse_token_bucket(bucket.to_json(), "b") == bucket


# --- boot source and machine config -----------------------------------------------------


def test_boot_source():
    boot = models.parse_boot_source({"kernel_image_path": "/k", "boot_args": ""})
    assert boot == models.BootSource("/k", "", None)
    assert models.parse_boot_source(boot.to_json()) == boot
    assert error_of(models.parse_boot_source, {}) == "boot-source: kernel_image_path is required"
    assert error_of(models.parse_boot_source, {"kernel_image_path": 3}) == (
        "boot-source: kernel_image_path must be a string, not 3"
    )
    assert "unknown field" in error_of(
        models.parse_boot_source, {"kernel_image_path": "/k", "kernel": "/k"}
    )


def test_machine_config_put_requires_both_sizes_and_resets_flags():
    update = models.parse_machine_config({"vcpu_count": 2, "mem_size_mib": 256})
    assert update == models.MachineConfigUpdate(2, 256, False, False, "None", None, replaces=True)
    assert error_of(models.parse_machine_config, {"vcpu_count": 2}) == (
        "machine-config: mem_size_mib is required"
    )


def test_machine_config_vcpu_error_reads_as_specified():
    assert error_of(models.parse_machine_config, {"vcpu_count": "x", "mem_size_mib": 128}) == (
        'machine-config: vcpu_count must be an integer between 1 and 32, not "x"'
    )
    for bad in (0, 33, True):
        assert "vcpu_count must be" in error_of(
            models.parse_machine_config, {"vcpu_count": bad, "mem_size_mib": 128}
        )


def test_machine_config_templates_and_huge_pages():
    update = models.parse_machine_config(
        {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None", "huge_pages": "None"}
    )
    assert update.cpu_template == "None"
    for name in ("C3", "T2", "T2S", "T2CL", "T2A"):
        assert models.parse_machine_config_update({"cpu_template": name}).cpu_template == name
    assert error_of(models.parse_machine_config_update, {"cpu_template": "V1N1"}) == (
        'machine-config: cpu_template "V1N1" is an aarch64 template; pyvmm runs on x86_64'
    )
    assert "cpu_template must be one of" in error_of(
        models.parse_machine_config_update, {"cpu_template": "X9"}
    )
    assert models.parse_machine_config_update({"huge_pages": "2M"}).huge_pages == "2M"
    assert 'huge_pages must be one of "None", "2M"' in error_of(
        models.parse_machine_config_update, {"huge_pages": "1G"}
    )
    shown = models.MachineConfiguration().updated(models.MachineConfigUpdate(cpu_template="T2"))
    assert shown.to_json()["cpu_template"] == "T2"
    assert "cpu_template" not in models.MachineConfiguration().to_json()
    assert "mem_size_mib must be" in error_of(
        models.parse_machine_config_update, {"mem_size_mib": 0}
    )


def test_machine_config_patch_is_partial_and_smt_needs_even_vcpus():
    assert models.parse_machine_config_update({}).empty
    base = models.MachineConfiguration(vcpu_count=3)
    update = models.parse_machine_config_update({"smt": True})
    with pytest.raises(ConfigError, match="1 or an even number when smt is enabled, not 3"):
        base.updated(update)
    assert base.updated(models.parse_machine_config_update({"smt": True, "vcpu_count": 4})) == (
        models.MachineConfiguration(vcpu_count=4, smt=True)
    )
    assert base.updated(models.MachineConfigUpdate(mem_size_mib=512)).vcpu_count == 3


@given(vcpus=st.integers(1, 32), mib=st.integers(16, 1 << 20), dirty=st.booleans())
def test_machine_configuration_round_trips(vcpus, mib, dirty):
    config = models.MachineConfiguration(vcpus, mib, track_dirty_pages=dirty)
    assert models.MachineConfiguration().updated(models.parse_machine_config(config.to_json())) == (
        config
    )


# --- drives -----------------------------------------------------------------------------


DRIVE = {"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": True}


def test_drive_defaults_and_round_trip():
    drive = models.parse_drive(DRIVE)
    assert drive == models.Drive("rootfs", "/img", True)
    assert drive.is_read_only is False and drive.io_engine == "Sync"
    assert models.parse_drive(drive.to_json()) == drive
    full = models.parse_drive(
        {
            **DRIVE,
            "is_read_only": True,
            "partuuid": "0eaa91a0-01",
            "cache_type": "Writeback",
            "io_engine": "Sync",
            "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}},
        }
    )
    assert models.parse_drive(full.to_json()) == full


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drive_id": ""}, "drive: drive_id must not be empty"),
        ({"drive_id": "a-b"}, "drive: drive_id must be non-empty and made of letters"),
        ({"is_root_device": None}, "drive: is_root_device is required"),
        ({"is_root_device": 1}, "drive: is_root_device must be true or false, not 1"),
        ({"path_on_host": None}, "drive: path_on_host is required"),
        ({"cache_type": "None"}, 'drive: cache_type must be one of "Unsafe", "Writeback"'),
        ({"io_engine": "Kernel"}, 'drive: io_engine must be one of "Sync", "Async"'),
        ({"socket": "/s"}, "drive: socket is not supported by pyvmm (vhost-user"),
        ({"partuuid": "x y"}, "drive: partuuid must be a partition UUID"),
        ({"size": 1}, 'drive: unknown field "size"'),
    ],
)
def test_drive_errors(change, message):
    assert error_of(models.parse_drive, {**DRIVE, **change}).startswith(message)


def test_async_io_engine_multicast_mac_and_mtu_are_accepted():
    """Firecracker accepts them; pyvmm records them (its one I/O model serves Async)."""
    assert models.parse_drive({**DRIVE, "io_engine": "Async"}).io_engine == "Async"
    net = models.parse_network_interface({**NET, "guest_mac": "01:00:5e:00:00:01", "mtu": 9000})
    assert (net.guest_mac, net.mtu) == ("01:00:5e:00:00:01", 9000)
    assert models.parse_network_interface(net.to_json()) == net


def test_partial_drive():
    patch = models.parse_partial_drive({"drive_id": "d", "path_on_host": "/new"})
    assert patch == models.PartialDrive("d", "/new", None)
    assert "unknown field" in error_of(
        models.parse_partial_drive, {"drive_id": "d", "is_read_only": True}
    )
    assert error_of(models.parse_partial_drive, {}) == "drive: drive_id is required"


# --- network interfaces -----------------------------------------------------------------


NET = {"iface_id": "eth0", "host_dev_name": "tap0"}


def test_network_interface_and_round_trip():
    net = models.parse_network_interface(
        {
            **NET,
            "guest_mac": "06:00:AC:10:00:02",
            "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}},
        }
    )
    assert net.guest_mac == "06:00:ac:10:00:02"
    assert net.rx_rate_limiter is None and net.tx_rate_limiter is not None
    assert models.parse_network_interface(net.to_json()) == net


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guest_mac": "06:00:ac:10:00"}, "network-interface: guest_mac must be six hex bytes"),
        ({"host_dev_name": "a" * 16}, "network-interface: host_dev_name must be a TAP device"),
        ({"host_dev_name": "tap/0"}, "network-interface: host_dev_name must be a TAP device"),
        ({"host_dev_name": None}, "network-interface: host_dev_name is required"),
        ({"mtu": 100}, "network-interface: mtu must be an integer between 576 and 65535"),
        ({"iface_id": "eth 0"}, "network-interface: iface_id must be non-empty"),
    ],
)
def test_network_interface_errors(change, message):
    assert error_of(models.parse_network_interface, {**NET, **change}).startswith(message)


def test_partial_network_interface():
    patch = models.parse_partial_network_interface(
        {"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}
    )
    assert patch.rx_rate_limiter == models.RateLimiterConfig(ops=models.TokenBucketConfig(0, 0))
    assert patch.tx_rate_limiter is None
    assert "unknown field" in error_of(
        models.parse_partial_network_interface, {"iface_id": "eth0", "host_dev_name": "tap1"}
    )


# --- other devices, logger, metrics, MMDS -----------------------------------------------


def test_vsock():
    vsock = models.parse_vsock({"guest_cid": 3, "uds_path": "/v.sock"})
    assert vsock == models.Vsock(3, "/v.sock")
    assert models.parse_vsock(vsock.to_json()) == vsock
    assert models.parse_vsock({"guest_cid": 9, "uds_path": "/v", "vsock_id": "x"}).vsock_id == "x"
    assert error_of(models.parse_vsock, {"guest_cid": 2, "uds_path": "/v"}) == (
        f"vsock: guest_cid must be an integer between 3 and {models.U32_MAX - 1}, not 2"
    )
    assert error_of(models.parse_vsock, {"guest_cid": 3}) == "vsock: uds_path is required"


def test_entropy():
    assert models.parse_entropy({}) == models.Entropy()
    entropy = models.parse_entropy({"rate_limiter": {"bandwidth": {"size": 5, "refill_time": 9}}})
    assert models.parse_entropy(entropy.to_json()) == entropy
    assert "unknown field" in error_of(models.parse_entropy, {"rate": 1})


# --- snapshots, VM state, actions -------------------------------------------------------


# --- robustness: any field set to any JSON value gives a ConfigError or a value ---------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
VALID_BODIES = [
    (models.parse_boot_source, {"kernel_image_path": "/k", "boot_args": "x", "initrd_path": "/i"}),
    (models.parse_machine_config, {"vcpu_count": 2, "mem_size_mib": 128, "smt": False}),
    (models.parse_drive, {**DRIVE, "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}),
    (models.parse_partial_drive, {"drive_id": "d", "path_on_host": "/p"}),
    (models.parse_network_interface, {**NET, "guest_mac": "06:00:00:00:00:01"}),
    (models.parse_partial_network_interface, {"iface_id": "e", "rx_rate_limiter": {}}),
    (models.parse_vsock, {"guest_cid": 3, "uds_path": "/v"}),
    (models.parse_entropy, {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}),
    (models.parse_logger, {"level": "Info", "log_path": "/l"}),
    (models.parse_metrics, {"metrics_path": "/m", "properties": {"a": "b"}}),
    (operations.parse_mmds_config, {"network_interfaces": ["e"], "ipv4_address": "169.254.1.1"}),
    (operations.parse_snapshot_create, {"snapshot_path": "/s", "mem_file_path": "/m"}),
    (
        operations.parse_snapshot_load,
        {
            "snapshot_path": "/s",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            "network_overrides": [{"iface_id": "e", "host_dev_name": "t"}],
        },
    ),
    (operations.parse_vm_state, {"state": "Paused"}),
    (operations.parse_instance_action, {"action_type": "InstanceStart"}),
]


@settings(max_examples=300)
@given(case=st.sampled_from(VALID_BODIES), data=st.data())
def test_any_field_value_parses_or_gives_one_line_config_error(case, data):
    parse, body = case
    parse(body)  # the base body is valid
    key = data.draw(st.sampled_from([*body, "extra"]))
    changed = {**body, key: data.draw(json_values)}
    try:
        parse(json.loads(json.dumps(changed)))
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_logger_levels_are_case_insensitive_and_canonical():
    assert models.parse_logger({"level": "debug"}).level == "Debug"
    assert models.parse_logger({"level": "WARNING"}).level == "Warn"
    logger = models.parse_logger(
        {"log_path": "/l", "level": "Info", "show_level": True, "module": "api"}
    )
    assert models.parse_logger(logger.to_json()) == logger
    assert error_of(models.parse_logger, {"level": "loud"}).startswith(
        'logger: level must be one of "Off", "Trace"'
    )
    assert error_of(models.parse_logger, {"show_level": "yes"}) == (
        'logger: show_level must be true or false, not "yes"'
    )


def test_metrics():
    metrics = models.parse_metrics({"metrics_path": "/m", "properties": {"b": "2", "a": "1"}})
    assert metrics.properties == (("a", "1"), ("b", "2"))
    assert models.parse_metrics(metrics.to_json()) == metrics
    assert error_of(models.parse_metrics, {}) == "metrics: metrics_path is required"
    assert error_of(models.parse_metrics, {"metrics_path": "/m", "properties": {"a": 1}}) == (
        'metrics: properties["a"] must be a string, not 1'
    )
