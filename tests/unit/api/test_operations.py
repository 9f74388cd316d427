"""Request bodies that are not devices: logger, metrics, MMDS, snapshots, actions."""

from __future__ import annotations

import pytest

from pyvmm.api import operations
from tests.support.assertions import error_of


def test_mmds_config():
    config = operations.parse_mmds_config({"network_interfaces": ["eth0"]})
    assert config == operations.MmdsConfig(("eth0",))
    assert config.to_json()["ipv4_address"] == "169.254.169.254"
    v2 = operations.parse_mmds_config(
        {"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.1.1"}
    )
    assert operations.parse_mmds_config(v2.to_json()) == v2
    assert error_of(operations.parse_mmds_config, {"network_interfaces": []}) == (
        "mmds-config: network_interfaces must list at least one network interface id"
    )
    for address in ("10.0.0.1", "169.254.0.1", "169.254.255.1", "169.254.1.256", "169.254.01.1"):
        assert "must be a link-local IPv4 address" in error_of(
            operations.parse_mmds_config, {"network_interfaces": ["a"], "ipv4_address": address}
        )
    assert 'must be one of "V1", "V2"' in error_of(
        operations.parse_mmds_config, {"network_interfaces": ["a"], "version": "V3"}
    )


def test_mmds_contents_must_be_an_object():
    assert operations.parse_mmds_contents({"a": [1]}) == {"a": [1]}
    assert error_of(operations.parse_mmds_contents, [1]) == (
        "mmds: the metadata must be a JSON object, not [1]"
    )


def test_snapshot_create():
    params = operations.parse_snapshot_create({"snapshot_path": "/s", "mem_file_path": "/m"})
    assert params == operations.SnapshotCreateParams("/s", "/m", "Full")
    assert error_of(
        operations.parse_snapshot_create,
        {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Half"},
    ).startswith('snapshot-create: snapshot_type must be one of "Full", "Diff"')
    assert error_of(operations.parse_snapshot_create, {"snapshot_path": "/s"}) == (
        "snapshot-create: mem_file_path is required"
    )


def test_snapshot_load_with_backend_and_overrides():
    params = operations.parse_snapshot_load(
        {
            "snapshot_path": "/s",
            "mem_backend": {"backend_type": "Uffd", "backend_path": "/uffd.sock"},
            "resume_vm": True,
            "track_dirty_pages": True,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
            "vsock_override": {"uds_path": "/v2"},
        }
    )
    assert params.mem_backend == operations.MemBackend("Uffd", "/uffd.sock")
    assert params.resume_vm and params.track_dirty_pages
    assert params.network_overrides == (operations.NetworkOverride("eth0", "tap9"),)
    assert params.vsock_override == "/v2"
    assert params.deprecated_fields == ()


def test_snapshot_load_legacy_fields_map_to_the_new_ones():
    params = operations.parse_snapshot_load(
        {"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": True}
    )
    assert params.mem_backend == operations.MemBackend("File", "/m")
    assert params.track_dirty_pages
    assert params.deprecated_fields == ("mem_file_path", "enable_diff_snapshots")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"snapshot_path": "/s"}, "snapshot-load: mem_backend (or the deprecated mem_file_path)"),
        (
            {
                "snapshot_path": "/s",
                "mem_file_path": "/m",
                "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            },
            "snapshot-load: give either mem_backend or mem_file_path, not both",
        ),
        (
            {"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}},
            'snapshot-load: mem_backend: backend_type must be one of "File", "Uffd"',
        ),
        (
            {
                "snapshot_path": "/s",
                "mem_file_path": "/m",
                "network_overrides": [
                    {"iface_id": "a", "host_dev_name": "t1"},
                    {"iface_id": "a", "host_dev_name": "t2"},
                ],
            },
            'snapshot-load: network_overrides names iface_id "a" twice',
        ),
        (
            {
                "snapshot_path": "/s",
                "mem_file_path": "/m",
                "network_overrides": [{"iface_id": "a"}],
            },
            "snapshot-load: network_overrides[0]: host_dev_name is required",
        ),
        ({"mem_file_path": "/m"}, "snapshot-load: snapshot_path is required"),
        (
            {"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "2M"},
            "snapshot-load: huge_pages is not supported by pyvmm",
        ),
    ],
)
def test_snapshot_load_errors(body, message):
    assert error_of(operations.parse_snapshot_load, body).startswith(message)


def test_vm_state_and_actions():
    assert operations.parse_vm_state({"state": "Paused"}) == "Paused"
    assert operations.parse_vm_state({"state": "Resumed"}) == "Resumed"
    assert error_of(operations.parse_vm_state, {"state": "Running"}) == (
        'vm: state must be one of "Paused", "Resumed", not "Running"'
    )
    assert error_of(operations.parse_vm_state, {}) == "vm: state is required"
    for action in ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"):
        assert operations.parse_instance_action({"action_type": action}) == action
    assert "unknown field" in error_of(
        operations.parse_instance_action, {"action_type": "InstanceStart", "x": 1}
    )
