"""Metrics lines (deltas, gauges, FIFOs) and Firecracker-style log lines."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.logs import configure_logging, parse_level
from pyvmm.metrics import FIRECRACKER_GROUPS, MetricsWriter


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def own(line: dict) -> dict:
    """A line without Firecracker's fixed groups (tested on their own below)."""
    return {key: value for key, value in line.items() if key not in FIRECRACKER_GROUPS}


def test_counters_are_deltas_and_latencies_are_gauges(tmp_path: Path) -> None:
    state = {"net0": {"tx_frames": 10, "mac": "x"}, "latencies_us": {"pause_vm": 40}}
    writer = MetricsWriter(tmp_path / "m", [lambda: state], clock=lambda: 1.5)
    writer.flush()
    state = {"net0": {"tx_frames": 25, "mac": "x"}, "latencies_us": {"pause_vm": 40}}
    writer.flush()
    writer.close()  # a last line, with nothing new
    first, second, last = map(own, read_lines(tmp_path / "m"))
    assert first == {"utc_timestamp_ms": 1500, "net0": {"tx_frames": 10, "mac": "x"},
                     "latencies_us": {"pause_vm": 40}}  # fmt: skip
    assert second["net0"]["tx_frames"] == 15 and second["latencies_us"]["pause_vm"] == 40
    assert last["net0"]["tx_frames"] == 0
    writer.close()  # idempotent


def test_sources_merge_into_one_line(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m", [lambda: {"a": {"x": 1}}])
    writer.add_source(lambda: {"a": {"y": 2}, "b": {"z": 3}})
    writer.flush()
    writer.close()
    assert own(read_lines(tmp_path / "m")[0]) | {"utc_timestamp_ms": 0} == {
        "utc_timestamp_ms": 0, "a": {"x": 1, "y": 2}, "b": {"z": 3}
    }  # fmt: skip


def test_a_fifo_without_reader_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = MetricsWriter(fifo, [lambda: {"g": {"n": 1}}])
    for _ in range(2000):  # far more than a pipe holds
        writer.flush()
    writer.close()


def test_periodic_lines_come_when_due(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m", [lambda: {"g": {"n": 1}}], interval=0.05)
    assert not writer.flush_if_due()  # not yet
    time.sleep(0.06)
    assert writer.flush_if_due() and not writer.flush_if_due()
    writer.close()
    assert len(read_lines(tmp_path / "m")) == 2  # the due one and the last one


def test_lines_carry_firecrackers_groups_and_names(tmp_path: Path) -> None:
    """A reader written for Firecracker's lines (Kata's) finds its groups, zero if unused."""
    writer = MetricsWriter(tmp_path / "m", [lambda: {"vcpu": {"exit_io_out": 7}}])
    writer.flush()
    writer.close()
    (line, _) = read_lines(tmp_path / "m")
    for group in (
        "api_server",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "logger",
        "mmds",
        "seccomp",
        "signals",
        "vcpu",
        "vmm",
        "deprecated_api",
    ):
        assert group in line, group  # fmt: skip
    assert line["put_api_requests"]["actions_fails"] == 0
    assert line["vcpu"]["exit_io_out"] == 7 and line["vcpu"]["exit_mmio_read"] == 0
    assert line["seccomp"]["num_faults"] == 0


def test_an_unopenable_metrics_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot open metrics file .*No such file"):
        MetricsWriter(tmp_path / "missing" / "m")


@pytest.fixture(autouse=True)
def restore_pyvmm_logger():
    logger = logging.getLogger("pyvmm")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def test_log_lines_carry_the_instance_id_level_and_origin(tmp_path: Path) -> None:
    path = tmp_path / "log"
    handler = configure_logging("vm-7", path, "debug", show_level=True, show_origin=True)
    try:
        logging.getLogger("pyvmm.vmm.machine").debug("paused")
        logging.getLogger("other").error("not ours")
    finally:
        logging.getLogger("pyvmm").removeHandler(handler)
        handler.close()
    (line,) = path.read_text().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[vm-7:MainThread:DEBUG:test_metrics_logs:\d+\] "
        r"paused",
        line,
    ), line


def test_module_filter_and_level(tmp_path: Path) -> None:
    path = tmp_path / "log"
    handler = configure_logging("vm", path, "Warning", module="vcpu")
    try:
        logging.getLogger("pyvmm.vmm.vcpu").warning("kept")
        logging.getLogger("pyvmm.vmm.machine").warning("filtered out")
        logging.getLogger("pyvmm.vmm.vcpu").info("below the level")
    finally:
        logging.getLogger("pyvmm").removeHandler(handler)
        handler.close()
    assert [line.split("] ")[1] for line in path.read_text().splitlines()] == ["kept"]


def test_bad_log_level() -> None:
    with pytest.raises(ConfigError, match="log level 'loud' is not one of Error, Warning"):
        parse_level("loud")


def test_a_log_fifo_without_reader_never_blocks_the_vmm(tmp_path: Path) -> None:
    """Kata opens its log FIFO for reading first; a FIFO nobody reads must not hang the VMM."""
    fifo = tmp_path / "logs.fifo"
    os.mkfifo(fifo)
    handler = configure_logging("vm-1", fifo, "Info")
    try:
        log = logging.getLogger("pyvmm.test")
        for index in range(5000):  # far more than a pipe holds
            log.info("line %d %s", index, "x" * 100)
        assert handler.stream.missed > 0
    finally:
        logging.getLogger("pyvmm").removeHandler(handler)
        handler.close()
