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
