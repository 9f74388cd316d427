"""State dataclasses to JSON values and back, guided by their type hints.

Device and config states are frozen dataclasses of plain values (ints,
bools, bytes, paths, nested states). :func:`encode` turns one into JSON
values: bytes become ``{"b64": ...}``; a field typed ``object`` (a virtio
transport's device state) carries the name of its class, which must be in
the registry passed to :func:`decode`, so a state file can never name an
arbitrary class. :func:`decode` checks every value against the hint and
raises :class:`CodecError` naming the field that does not fit.
"""

from __future__ import annotations

import base64
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError


class CodecError(ValueError):
    """A JSON value does not fit the type the state class declares."""


def encode(value: Any) -> Any:
    """JSON values for ``value`` (a state dataclass or anything it may hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        return {f.name: _encode_as(getattr(value, f.name), hints[f.name]) for f in fields_of(value)}
    if isinstance(value, bytes | bytearray):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    if value is None or isinstance(value, bool | int | str | float):
        return value
    raise CodecError(f"cannot save a {type(value).__name__}")


def fields_of(value: Any) -> tuple[dataclasses.Field, ...]:
    """The fields a state saves: ``init`` fields (derived ones are made again on load)."""
    return tuple(f for f in dataclasses.fields(value) if f.init)


def _encode_as(value: Any, hint: Any) -> Any:
    """Encode ``value`` for a field typed ``hint``: ``object`` values carry their class name,
    in a dict of them too (a device state by device name)."""
    if hint is object:
        return encode_tagged(value)
    if typing.get_origin(hint) is dict and typing.get_args(hint)[1] is object:
        return {str(key): encode_tagged(item) for key, item in value.items()}
    return encode(value)


def encode_tagged(value: Any) -> Any:
    """Like :func:`encode`, recording the class name (for fields typed ``object``)."""
    if value is None:
        return None
    return {"type": type(value).__name__, "state": encode(value)}


def decode(data: Any, hint: Any, registry: dict[str, type], where: str = "state") -> Any:
    """The value of type ``hint`` that ``data`` (from :func:`encode`) describes."""
    origin = typing.get_origin(hint)
    if hint is object:
        return _decode_tagged(data, registry, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(data, hint, registry, where)
    if origin in (types.UnionType, typing.Union):
        return _decode_union(data, typing.get_args(hint), registry, where)
    if origin is tuple:
        return _decode_tuple(data, typing.get_args(hint), registry, where)
    if origin is dict:
        return _decode_dict(data, typing.get_args(hint), registry, where)
    return _decode_scalar(data, hint, where)


def _decode_tagged(data: Any, registry: dict[str, type], where: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("type") not in registry:
        raise CodecError(f"{where}: unknown state type {_describe(data)}")
    return decode(data.get("state"), registry[data["type"]], registry, where)


def _decode_dataclass(data: Any, hint: type, registry: dict[str, type], where: str) -> Any:
    if not isinstance(data, dict):
        raise CodecError(f"{where}: expected an object, got {_describe(data)}")
    hints = typing.get_type_hints(hint)
    values = {}
    for f in dataclasses.fields(hint):
        if not f.init:
            continue
        if f.name in data:
            values[f.name] = decode(data[f.name], hints[f.name], registry, f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CodecError(f"{where}.{f.name}: missing")
    unknown = set(data) - {f.name for f in dataclasses.fields(hint) if f.init}
    if unknown:
        raise CodecError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    try:
        return hint(**values)
    except ConfigError as exc:  # a config that checks itself when made (MachineConfig)
        raise CodecError(f"{where}: {exc}") from None


def _decode_union(data: Any, options: tuple, registry: dict[str, type], where: str) -> Any:
    if data is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return decode(data, option, registry, where)
        except CodecError as exc:
            errors.append(str(exc))
    raise CodecError(errors[0] if errors else f"{where}: {_describe(data)}")


def _decode_tuple(data: Any, args: tuple, registry: dict[str, type], where: str) -> tuple:
    if not isinstance(data, list):
        raise CodecError(f"{where}: expected a list, got {_describe(data)}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(data)
    elif len(args) != len(data):
        raise CodecError(f"{where}: expected {len(args)} items, got {len(data)}")
    return tuple(
        decode(item, arg, registry, f"{where}[{i}]")
        for i, (item, arg) in enumerate(zip(data, args, strict=True))
    )


def _decode_dict(data: Any, args: tuple, registry: dict[str, type], where: str) -> dict:
    key_type, value_type = args
    if not isinstance(data, dict):
        raise CodecError(f"{where}: expected an object, got {_describe(data)}")
    return {
        decode(_dict_key(key, key_type, where), key_type, registry, where): decode(
            item, value_type, registry, f"{where}[{key}]"
        )
        for key, item in data.items()
    }


def _decode_bytes(data: Any, where: str) -> bytes:
    if not isinstance(data, dict) or not isinstance(data.get("b64"), str):
        raise CodecError(f"{where}: expected bytes, got {_describe(data)}")
    try:
        return base64.b64decode(data["b64"], validate=True)
    except ValueError:
        raise CodecError(f"{where}: invalid base64") from None


#: Plain JSON values: the check each hint's value must pass, and what it is called.
_SCALARS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    str: (lambda v: isinstance(v, str), "a str"),
    float: (lambda v: isinstance(v, float), "a float"),
    Path: (lambda v: isinstance(v, str), "a path"),
}


def _decode_scalar(data: Any, hint: Any, where: str) -> Any:
    if hint is bytes:
        return _decode_bytes(data, where)
    if hint not in _SCALARS:
        raise CodecError(f"{where}: cannot load a {hint!r}")
    check, name = _SCALARS[hint]
    if not check(data):
        raise CodecError(f"{where}: expected {name}, got {_describe(data)}")
    return Path(data) if hint is Path else data


def _dict_key(key: str, key_type: Any, where: str) -> Any:
    """JSON object keys are strings; integer keys (MSR numbers) are stored in decimal."""
    if key_type is int:
        try:
            return int(key)
        except ValueError:
            raise CodecError(f"{where}: key {key!r} is not an integer") from None
    return key


def _describe(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 40 else text[:37] + "..."
