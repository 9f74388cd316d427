from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.config import MachineConfig, parse_memory_size
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
def test_validate_rejects(changes: dict, message: str) -> None:
    config = MachineConfig(kernel=Path("k"), **changes)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_validate_accepts_defaults() -> None:
    MachineConfig(kernel=Path("k"), vcpus=32).validate()


def test_cpu_template_names() -> None:
    for name in ("auto", "none", "pvm"):
        MachineConfig(kernel=Path("k"), cpu_template=name).validate()
    with pytest.raises(ConfigError, match="unknown CPU template 'fast'; choose one of auto"):
        MachineConfig(kernel=Path("k"), cpu_template="fast").validate()


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
    image.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="does not exist"):
        MachineConfig(kernel=Path("k"), drives=(DriveConfig(tmp_path / "no.img"),)).validate()
    two_roots = (DriveConfig(image, root=True), DriveConfig(image, root=True))
    with pytest.raises(ConfigError, match="only one drive can be the root"):
        MachineConfig(kernel=Path("k"), drives=two_roots).validate()


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
        ("tap=t,mac=01:00:00:00:00:01", "multicast"),
        ("tap=t,speed=10", "'speed=10' is not one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_net(bad)


def test_parse_net_rate_limits() -> None:
    from pyvmm.config import NetConfig, parse_net

    net = parse_net("tap=t0,rx_bw=10M/1s,tx_ops=1000/100ms,rx_ops=500,tx_bw=1G")
    assert net == NetConfig(
        "t0", None, rx_rate_limit="bw=10M/1s,ops=500", tx_rate_limit="ops=1000/100ms,bw=1G"
    )
    net.validate()
    MachineConfig(kernel=Path("k"), nets=(net,)).validate()
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

    config = MachineConfig(kernel=Path("k"), nets=(parse_net(f"tap=t,{option}"),))
    with pytest.raises(ConfigError, match=message) as info:
        config.validate()
    assert "\n" not in str(info.value)


def test_rng_rate_limit() -> None:
    MachineConfig(kernel=Path("k"), rng=True, rng_rate_limit="bw=1K/1s,ops=10").validate()
    with pytest.raises(ConfigError, match=r"rng rate 'bw=x': .*expected SIZE"):
        MachineConfig(kernel=Path("k"), rng=True, rng_rate_limit="bw=x").validate()
    with pytest.raises(ConfigError, match="needs the rng device"):
        MachineConfig(kernel=Path("k"), rng_rate_limit="bw=1K").validate()


def test_parse_vsock() -> None:
    from pyvmm.config import VsockConfig, parse_vsock

    assert parse_vsock("cid=3,uds=/tmp/v.sock") == VsockConfig(3, Path("/tmp/v.sock"))
    assert parse_vsock("uds_path=/tmp/v.sock, cid=0x10") == VsockConfig(16, Path("/tmp/v.sock"))
    with pytest.raises(ConfigError, match="has no cid=N"):
        parse_vsock("uds=/tmp/v.sock")
