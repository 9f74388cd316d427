from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.config import (
    MachineConfig,
    RateLimitSpec,
    TokenBucketSpec,
    parse_memory_size,
    parse_rate_limit,
)
from pyvmm.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("128", 128 << 20),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("4096B", 4096),
        ("64MiB", 64 << 20),
        ("16k", 16 << 10),
    ],
)
def test_parse_memory_size(text: str, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5", "1.0000001K", "12X"])
def test_parse_memory_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_memory_size(text)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vcpus": 0}, "cpus must be between 1 and 32"),
        ({"vcpus": 33}, "cpus must be between 1 and 32"),
        ({"mem_size": 1 << 20}, "too small"),
        ({"mem_size": (64 << 20) + 1}, "not a multiple"),
        ({"mem_size": 1 << 50}, "too large"),
    ],
)
def test_a_config_is_checked_when_made(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MachineConfig(kernel=Path("k"), **changes)


def test_defaults_are_a_valid_config() -> None:
    config = MachineConfig(kernel=Path("k"), vcpus=32)
    assert config.device_ids == ()


def test_cpu_template_names() -> None:
    from pyvmm.config import CPU_TEMPLATES
    from pyvmm.vmm.cpuid import TEMPLATES

    assert set(CPU_TEMPLATES) == {"auto", *TEMPLATES}  # the config knows what vmm offers
    for name in ("auto", "none", "pvm"):
        MachineConfig(kernel=Path("k"), cpu_template=name)
    with pytest.raises(ConfigError, match="unknown CPU template 'fast'; choose one of auto"):
        MachineConfig(kernel=Path("k"), cpu_template="fast")


def test_parse_drive() -> None:
    from pyvmm.config import DriveConfig, parse_drive

    assert parse_drive("path=/a.img") == DriveConfig(Path("/a.img"))
    assert parse_drive("/a.img,ro,root") == DriveConfig(Path("/a.img"), True, True)
    assert parse_drive("path=/a.img,root") == DriveConfig(Path("/a.img"), False, True)
    for bad, message in [
        ("ro", "has no path"),
        ("path=/a,rw", "'rw' is not one of"),
        ("", "no path"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_drive(bad)


def test_drive_checks(tmp_path: Path) -> None:
    from pyvmm.config import DriveConfig

    image = tmp_path / "d.img"
    two_roots = (DriveConfig(image, root=True), DriveConfig(image, root=True, drive_id="b"))
    with pytest.raises(ConfigError, match="only one drive can be the root"):
        MachineConfig(kernel=Path("k"), drives=two_roots)
    same_id = (DriveConfig(image, drive_id="d"), DriveConfig(image, drive_id="d"))
    with pytest.raises(ConfigError, match="device id 'd' is used twice"):
        MachineConfig(kernel=Path("k"), drives=same_id)


def test_device_ids_name_every_virtio_device_in_order() -> None:
    from pyvmm.config import DriveConfig, NetConfig, VsockConfig

    config = MachineConfig(
        kernel=Path("k"),
        drives=(DriveConfig(Path("a")), DriveConfig(Path("b"), drive_id="data")),
        nets=(NetConfig("tap0", iface_id="eth0"), NetConfig("tap1")),
        rng=True,
        vsock=VsockConfig(3, Path("/tmp/v.sock")),
    )
    assert config.device_ids == ("drive0", "data", "eth0", "net1", "rng", "vsock")


def test_parse_net() -> None:
    from pyvmm.config import NetConfig, parse_net

    assert parse_net("tap=tap0") == NetConfig("tap0")
    net = parse_net("tap=tap0,mac=02:00:00:00:00:2a")
    assert net.mac_bytes() == bytes([2, 0, 0, 0, 0, 0x2A])
    derived = NetConfig("tap1").mac_bytes()
    assert len(derived) == 6 and derived[0] == 0x02
    for bad, message in [
        ("mac=02:00:00:00:00:01", "has no tap=NAME"),
        ("tap=t,mac=zz", "not six hex bytes"),
        ("tap=t,speed=10", "'speed=10' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_net(bad)
    # Firecracker takes any MAC, multicast ones included: so does pyvmm.
    assert parse_net("tap=t,mac=01:00:00:00:00:01").mac == "01:00:00:00:00:01"


def test_parse_net_rate_limits() -> None:
    from pyvmm.config import NetConfig, parse_net

    net = parse_net("tap=t0,rx_bw=10M/1s,tx_ops=1000/100ms,rx_ops=500,tx_bw=1G")
    assert net == NetConfig(
        "t0",
        None,
        rx_rate_limit=RateLimitSpec(TokenBucketSpec(10 << 20, 1000), TokenBucketSpec(500, 1000)),
        tx_rate_limit=RateLimitSpec(TokenBucketSpec(1 << 30, 1000), TokenBucketSpec(1000, 100)),
    )
    assert parse_net("tap=t0,tx_bw=1K").rx_rate_limit is None
    for bad, message in [
        ("tap=t,rx_bw=1K,rx_bw=2K", "rx_bw= is given twice"),
        ("tap=t,rx_bw=", "'rx_bw=' is not one of"),
        ("tap=t,rx_speed=1", "'rx_speed=1' is not one of tap=NAME, mac=MAC, rx_bw=RATE"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_net(bad)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("rx_bw=abc", r"network t option rx_bw='abc': .*expected SIZE like 10M"),
        ("rx_ops=10/1h", r"network t option rx_ops='10/1h': .*should be like 100ms or 1s"),
        ("tx_bw=0", r"network t option tx_bw='0': .*must be positive"),
        ("tx_ops=5MB", r"network t option tx_ops='5MB': .*a count like 1000"),
    ],
)
def test_net_rate_limits_are_validated(option: str, message: str) -> None:
    from pyvmm.config import parse_net

    with pytest.raises(ConfigError, match=message) as info:
        parse_net(f"tap=t,{option}")
    assert "\n" not in str(info.value)


def test_rng_rate_limit() -> None:
    from pyvmm.config import build_machine_config

    config = build_machine_config(kernel="k", rng_rate="bw=1K/1s,ops=10")
    assert config.rng and config.rng_rate_limit == parse_rate_limit("bw=1K/1s,ops=10")
    with pytest.raises(ConfigError, match=r"rng rate 'bw=x': .*expected SIZE"):
        build_machine_config(kernel="k", rng_rate="bw=x")
    with pytest.raises(ConfigError, match="needs the rng device"):
        MachineConfig(kernel=Path("k"), rng_rate_limit=parse_rate_limit("bw=1K"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "9" * 400}, "is not a size"),
        ({"vcpus": "9" * 400}, "cpus must be a whole number"),
        ({"vcpus": "two"}, "cpus must be a whole number, not 'two'"),
        ({"memory": "64", "drives": ["path=/d,bw=" + "9" * 400]}, "expected SIZE"),
    ],
)
def test_the_shared_constructor_refuses_bad_text_with_one_line(options, message) -> None:
    from pyvmm.config import build_machine_config

    with pytest.raises(ConfigError, match=message) as info:
        build_machine_config(kernel="k", **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("inf"), 1e400, "5"])
def test_timeouts_must_be_finite_and_positive(value) -> None:
    from pyvmm.config import finite_timeout

    with pytest.raises(ConfigError, match="timeout"):
        finite_timeout(value)
    assert finite_timeout(2) == 2.0 and finite_timeout(None) is None


def test_parse_vsock() -> None:
    from pyvmm.config import VsockConfig, parse_vsock

    assert parse_vsock("cid=3,uds=/tmp/v.sock") == VsockConfig(3, Path("/tmp/v.sock"))
    assert parse_vsock("uds_path=/tmp/v.sock, cid=0x10") == VsockConfig(16, Path("/tmp/v.sock"))
    with pytest.raises(ConfigError, match="has no cid=N"):
        parse_vsock("uds=/tmp/v.sock")


# --- rate limit shorthand -------------------------------------------------------------


def test_parse_rate_limit_shorthand() -> None:
    spec = parse_rate_limit("bw=10M/1s, ops=1000/100ms")
    assert spec == RateLimitSpec(TokenBucketSpec(10 << 20, 1000), TokenBucketSpec(1000, 100))
    only_bw = parse_rate_limit("bw=64KiB")
    assert only_bw == RateLimitSpec(bandwidth=TokenBucketSpec(65536, 1000))
    assert parse_rate_limit("ops=2K/2s").ops == TokenBucketSpec(2048, 2000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("bw", "expected bw=SIZE"),
        ("iops=5", "expected bw=SIZE"),
        ("bw=10X", "expected SIZE"),
        ("ops=10MB", "expected a count"),
        ("bw=1M,bw=2M", "twice"),
        ("bw=0", "positive"),
        ("bw=1M/1h", "like 100ms"),
        ("ops=10/0ms", "positive"),
        ("bw=1M,", "expected bw=SIZE"),
        ("bw=" + "9" * 400 + "/1s", "expected SIZE"),
        ("bw=99999999999999999999G", "too large"),
    ],
)
def test_parse_rate_limit_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rate_limit(text)
