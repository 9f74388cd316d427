"""SandboxConfig: strings or typed values, every mistake one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox.config import config_from_options, sandbox_config


def test_defaults_are_confined_and_offline() -> None:
    config = sandbox_config()
    assert config.confine and not config.nets and not config.fresh_boot
    assert config.mem_size == 256 << 20 and config.kernel is None


def test_strings_are_parsed_once(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * 4096)
    config = sandbox_config(cpus="2", memory="512M", drives=[f"path={image},ro,root"],
                            nets=["auto", "tap=tap7,mac=02:00:00:00:00:07"])  # fmt: skip
    assert config.vcpus == 2 and config.mem_size == 512 << 20
    assert config.drives[0].path == image.resolve() and config.drives[0].read_only
    assert config.nets[0] is None and config.nets[1].tap == "tap7"
    assert config.drive_ids == ("drive0",)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel": "/no/such/kernel"}, "is not a file"),
        ({"initrd": __file__}, "an initrd needs a kernel"),
        ({"cpus": "0"}, "cpus must be between 1 and 32"),
        ({"memory": "lots"}, "memory"),
        ({"drives": ["path=/no/such.img"]}, "is not a file"),
        ({"nets": ["wifi"]}, "network option"),
        ({"cpu_template": "T9"}, "unknown CPU template"),
        ({"boot_timeout": -1}, "boot timeout must be a positive"),
    ],
)
def test_mistakes_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        sandbox_config(**options)
    assert "\n" not in str(info.value)


def test_marker_options_are_checked_by_name() -> None:
    assert config_from_options({"memory": "128M"}).mem_size == 128 << 20
    with pytest.raises(ConfigError, match="unknown sandbox option 'memroy'"):
        config_from_options({"memroy": "128M"})
