"""Seccomp filters in Firecracker's JSON format, parsed and checked once.

The format is Firecracker's (its ``docs/seccompiler.md``), so a filter file
written for Firecracker loads here unchanged::

    {"vmm": {"default_action": "trap", "filter_action": "allow",
             "filter": [{"syscall": "read"},
                        {"syscall": "ioctl", "comment": "KVM_RUN",
                         "args": [{"arg_index": 1, "arg_type": "dword",
                                   "op": "eq", "val": 44672}]}]},
     "api": {...}, "vcpu": {...}}

One key per thread role, each a filter: ``default_action`` when no rule
matches, ``filter_action`` when one does, and ``filter``, rules that are
OR-ed; a rule's ``args`` conditions are AND-ed. Actions are ``allow``,
``trap``, ``log``, ``kill_thread``, ``kill_process``, ``{"errno": N}`` and
``{"trace": N}``; operators ``eq ne lt le gt ge`` and ``{"masked_eq": MASK}``.
Syscalls are names (resolved by libseccomp when compiling); values are
decimal integers.

Why a parser of our own in front of libseccomp: the file is user input, so
every mistake must become one line naming where it is (``vcpu.filter[3].args[0]:
op 'equal' is not one of ...``) before anything is compiled or installed.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from pyvmm.errors import ConfigError

#: A filter file is a few hundred rules; anything much larger is not one.
MAX_FILE_BYTES = 1 << 20
MAX_RULES_PER_FILTER = 4096
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class ActionKind(Enum):
    ALLOW = "allow"
    TRAP = "trap"
    LOG = "log"
    KILL_THREAD = "kill_thread"
    KILL_PROCESS = "kill_process"
    ERRNO = "errno"
    TRACE = "trace"


class Action(NamedTuple):
    kind: ActionKind
    value: int = 0  # the errno or trace number


class Op(Enum):
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    MASKED_EQ = "masked_eq"


class Condition(NamedTuple):
    """``args[arg_index] <op> value``; ``dword`` looks at the low 32 bits only."""

    arg_index: int
    qword: bool
    op: Op
    value: int
    mask: int = 0  # for MASKED_EQ: (arg & mask) == value


class Rule(NamedTuple):
    syscall: str
    conditions: tuple[Condition, ...] = ()


class Filter(NamedTuple):
    default_action: Action
    filter_action: Action
    rules: tuple[Rule, ...]


# --- parsing ------------------------------------------------------------------------------
def parse_filters(document: object, where: str = "filter file") -> dict[str, Filter]:
    """``{role: Filter}`` from a decoded JSON document; ConfigError names any mistake."""
    if not isinstance(document, Mapping) or not document:
        raise ConfigError(f"{where}: expected an object mapping thread roles to filters")
    filters = {}
    for role, body in document.items():
        if not isinstance(role, str) or not role:
            raise ConfigError(f"{where}: a thread role must be a non-empty string")
        filters[role] = parse_filter(body, f"{where}: {role}")
    return filters


def parse_filter(body: object, where: str) -> Filter:
    fields = _object(body, where, required={"default_action", "filter_action", "filter"})
    rules = fields["filter"]
    if not isinstance(rules, list):
        raise ConfigError(f"{where}.filter: expected a list of rules")
    if len(rules) > MAX_RULES_PER_FILTER:
        raise ConfigError(f"{where}.filter: {len(rules)} rules, at most {MAX_RULES_PER_FILTER}")
    return Filter(
        default_action=parse_action(fields["default_action"], f"{where}.default_action"),
        filter_action=parse_action(fields["filter_action"], f"{where}.filter_action"),
        rules=tuple(_rule(rule, f"{where}.filter[{n}]") for n, rule in enumerate(rules)),
    )


def parse_action(value: object, where: str) -> Action:
    """``"trap"`` or ``{"errno": 1}``: Firecracker's spelling of a seccomp action."""
    if isinstance(value, str):
        kind = _enum(ActionKind, value, where)
        if kind in (ActionKind.ERRNO, ActionKind.TRACE):
            raise ConfigError(f"{where}: {value!r} needs a number: {{{value!r}: N}}")
        return Action(kind)
    if isinstance(value, Mapping) and len(value) == 1:
        ((name, number),) = value.items()
        kind = _enum(ActionKind, name, where)
        if kind not in (ActionKind.ERRNO, ActionKind.TRACE):
            raise ConfigError(f"{where}: {name!r} takes no number; write it as a string")
        return Action(kind, _int(number, f"{where}.{name}", 0, 0xFFFF))
    raise ConfigError(f"{where}: expected an action name or {{'errno': N}} / {{'trace': N}}")


def _rule(body: object, where: str) -> Rule:
    fields = _object(body, where, required={"syscall"}, optional={"args", "comment"})
    name = fields["syscall"]
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
        raise ConfigError(f"{where}.syscall: expected a syscall name, got {name!r}")
    args = fields.get("args", [])
    if not isinstance(args, list) or len(args) > 6:
        raise ConfigError(f"{where}.args: expected a list of at most 6 conditions")
    conditions = tuple(_condition(arg, f"{where}.args[{n}]") for n, arg in enumerate(args))
    return Rule(name, conditions)


def _condition(body: object, where: str) -> Condition:
    fields = _object(
        body, where, required={"arg_index", "arg_type", "op", "val"}, optional={"comment"}
    )
    index = _int(fields["arg_index"], f"{where}.arg_index", 0, 5)
    arg_type = fields["arg_type"]
    if arg_type not in ("dword", "qword"):
        raise ConfigError(f"{where}.arg_type: expected 'dword' or 'qword', got {arg_type!r}")
    qword = arg_type == "qword"
    limit = _U64 if qword else _U32
    value = _int(fields["val"], f"{where}.val", 0, limit)
    op_field = fields["op"]
    if isinstance(op_field, Mapping) and len(op_field) == 1 and "masked_eq" in op_field:
        mask = _int(op_field["masked_eq"], f"{where}.op.masked_eq", 0, limit)
        return Condition(index, qword, Op.MASKED_EQ, value, mask)
    op = _enum(Op, op_field, f"{where}.op")
    if op is Op.MASKED_EQ:
        raise ConfigError(f"{where}.op: write masked_eq as {{'masked_eq': MASK}}")
    return Condition(index, qword, op, value)


def _object(
    body: object, where: str, required: set[str], optional: frozenset | set = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: expected an object")
    missing = sorted(required - body.keys())
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(body.keys()) - required - set(optional))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    return body


def _enum(enum: type[Enum], value: object, where: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        names = ", ".join(member.value for member in enum)
        raise ConfigError(f"{where}: {value!r} is not one of {names}") from None


def _int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: expected an integer from {low} to {high}, got {value!r}")
    return value


# --- files --------------------------------------------------------------------------------
def read_filter_file(path: str | os.PathLike[str]) -> dict[str, Filter]:
    """Parse the filter file at ``path``: a regular file of at most 1 MiB of JSON."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise ConfigError(f"cannot open seccomp filter {str(path)!r}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"seccomp filter {str(path)!r} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(
                f"seccomp filter {str(path)!r} is {info.st_size} bytes, at most {MAX_FILE_BYTES}"
            )
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return parse_filter_text(data, repr(str(path)))


def parse_filter_text(data: bytes | str, where: str = "filter file") -> dict[str, Filter]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"seccomp filter {where} is not valid JSON: {error}") from None
    return parse_filters(document, f"seccomp filter {where}")
