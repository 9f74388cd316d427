"""A restored clone's own drives and vsock CID (pyvmm.snapshot.overrides.CloneOverrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.config import ConfigError, build_machine_config
from pyvmm.snapshot.files import SnapshotError
from pyvmm.snapshot.overrides import CloneOverrides, restored_config


def saved() -> object:
    return build_machine_config(
        kernel="/k", drives=["path=/img/root.img,ro", "path=/img/data.img"],
        nets=["tap=tpl0"], vsock="cid=3,uds=/tpl/v.sock",
    )  # fmt: skip


def test_a_clone_gets_its_drives_cid_tap_and_socket() -> None:
    clone = CloneOverrides(drives={"drive1": Path("/sbx/data.img")}, vsock_cid=1234)
    config = restored_config(saved(), {"tpl0": "pvs1"}, "/sbx/v.sock", clone)  # type: ignore[arg-type]
    assert [d.path for d in config.drives] == [Path("/img/root.img"), Path("/sbx/data.img")]
    assert config.drives[0].read_only and not config.drives[1].read_only
    assert config.vsock.guest_cid == 1234 and config.vsock.uds_path == Path("/sbx/v.sock")
    assert config.nets[0].tap == "pvs1"


def test_unknown_drives_and_bad_cids_are_refused() -> None:
    with pytest.raises(SnapshotError, match="names no saved drive"):
        restored_config(saved(), {}, None, CloneOverrides(drives={"drive9": Path("/x")}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CID 2 is out of range"):
        restored_config(saved(), {}, None, CloneOverrides(vsock_cid=2))  # type: ignore[arg-type]
    no_vsock = build_machine_config(kernel="/k")
    with pytest.raises(SnapshotError, match="no vsock device"):
        restored_config(no_vsock, {}, None, CloneOverrides(vsock_cid=9))
