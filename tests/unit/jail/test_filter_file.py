"""Firecracker's JSON seccomp format: what parses, and the one-line error for what does not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.jail.filter_file import (
    MAX_FILE_BYTES,
    Action,
    ActionKind,
    Condition,
    Op,
    parse_filter_text,
    read_filter_file,
)

FIRECRACKER_STYLE = {
    "vmm": {
        "default_action": "trap",
        "filter_action": "allow",
        "filter": [
            {"syscall": "read"},
            {
                "syscall": "ioctl",
                "comment": "KVM_RUN",
                "args": [
                    {"arg_index": 1, "arg_type": "dword", "op": "eq", "val": 44672, "comment": "x"}
                ],
            },
            {
                "syscall": "mmap",
                "args": [{"arg_index": 2, "arg_type": "qword", "op": {"masked_eq": 4}, "val": 0}],
            },
        ],
    },
    "api": {"default_action": {"errno": 1}, "filter_action": "log", "filter": []},
    "vcpu": {"default_action": "kill_process", "filter_action": {"trace": 7}, "filter": []},
}


def parse(document: object) -> dict:
    return parse_filter_text(json.dumps(document))


def test_a_firecracker_file_parses_with_every_feature() -> None:
    filters = parse(FIRECRACKER_STYLE)
    assert set(filters) == {"vmm", "api", "vcpu"}
    vmm = filters["vmm"]
    assert vmm.default_action == Action(ActionKind.TRAP)
    assert [rule.syscall for rule in vmm.rules] == ["read", "ioctl", "mmap"]
    assert vmm.rules[1].conditions == (Condition(1, False, Op.EQ, 44672),)
    assert vmm.rules[2].conditions == (Condition(2, True, Op.MASKED_EQ, 0, mask=4),)
    assert filters["api"].default_action == Action(ActionKind.ERRNO, 1)
    assert filters["vcpu"].filter_action == Action(ActionKind.TRACE, 7)


def with_rule(rule: object) -> dict:
    return {"vcpu": {"default_action": "trap", "filter_action": "allow", "filter": [rule]}}


def with_arg(**changes: object) -> dict:
    arg = {"arg_index": 1, "arg_type": "dword", "op": "eq", "val": 1, **changes}
    return with_rule({"syscall": "ioctl", "args": [arg]})


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "expected an object mapping thread roles to filters"),
        ({}, "expected an object mapping thread roles to filters"),
        ({"vmm": {"filter_action": "allow", "filter": []}}, "vmm: missing default_action"),
        (
            {"vmm": {"default_action": "nope", "filter_action": "allow", "filter": []}},
            "vmm.default_action: 'nope' is not one of allow, trap",
        ),
        (
            {"vmm": {"default_action": "errno", "filter_action": "allow", "filter": []}},
            "vmm.default_action: 'errno' needs a number",
        ),
        (
            {"vmm": {"default_action": {"trap": 1}, "filter_action": "allow", "filter": []}},
            "vmm.default_action: 'trap' takes no number",
        ),
        (
            {"vmm": {"default_action": {"errno": 70000}, "filter_action": "allow", "filter": []}},
            "vmm.default_action.errno: expected an integer from 0 to 65535, got 70000",
        ),
        (
            {"vmm": {"default_action": "trap", "filter_action": "allow", "filter": {}}},
            "vmm.filter: expected a list of rules",
        ),
        (with_rule({"syscall": "re ad"}), "vcpu.filter[0].syscall: expected a syscall name"),
        (with_rule({"syscall": "read", "extra": 1}), "vcpu.filter[0]: unknown field 'extra'"),
        (with_arg(arg_index=6), "args[0].arg_index: expected an integer from 0 to 5, got 6"),
        (with_arg(arg_type="word"), "args[0].arg_type: expected 'dword' or 'qword', got 'word'"),
        (with_arg(val=1 << 32), "args[0].val: expected an integer from 0 to 4294967295"),
        (with_arg(val=True), "args[0].val: expected an integer"),
        (with_arg(val=-1), "args[0].val: expected an integer from 0"),
        (with_arg(op="equal"), "args[0].op: 'equal' is not one of eq, ne"),
        (with_arg(op="masked_eq"), "args[0].op: write masked_eq as {'masked_eq': MASK}"),
    ],
)
def test_each_mistake_is_one_line_naming_its_place(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(document)
    text = str(error.value)
    assert message in text
    assert "\n" not in text


def test_json_errors_and_deep_nesting_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse_filter_text(b"{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        parse_filter_text(b"[" * 100_000)


def test_files_are_type_checked_and_size_capped(tmp_path: Path) -> None:
    good = tmp_path / "f.json"
    good.write_text(json.dumps(FIRECRACKER_STYLE))
    assert set(read_filter_file(good)) == {"vmm", "api", "vcpu"}
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_filter_file(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot open seccomp filter .*No such file"):
        read_filter_file(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match=f"at most {MAX_FILE_BYTES}"):
        read_filter_file(big)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened without blocking, then refused
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_filter_file(fifo)
