"""Reading one JSON object's fields, with one-line errors that name the field.

Every request body and config-file section is a JSON object whose fields
have a type and a range. :class:`Fields` checks them one at a time and
raises :class:`~pyvmm.errors.ConfigError` worded like::

    machine-config: vcpu_count must be an integer between 1 and 32, not "x"
    drive: unknown field "foo" (expected one of drive_id, path_on_host, ...)
    boot-source: kernel_image_path is required

Like Firecracker's ``deny_unknown_fields``, unknown fields are an error (a
typo must not be silently ignored), and ``null`` counts as absent, so an
object printed by ``GET /vm/config`` (which writes ``null`` for unset
options) reads back unchanged.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pyvmm.errors import ConfigError

#: Resource ids (drive_id, iface_id) and path ids: Firecracker's rule.
ID_RULE = "non-empty and made of letters, digits and underscores"


def show(value: Any, limit: int = 40) -> str:
    """``value`` as JSON, shortened: how error messages quote what the user sent."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_valid_id(value: str) -> bool:
    """Firecracker's id check: non-empty, only alphanumerics and ``_``."""
    return bool(value) and all(c == "_" or c.isalnum() for c in value)


def as_object(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else a :class:`ConfigError`."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a JSON object, not {show(value)}")
    return value


class Fields:
    """The fields of one JSON object, checked against a fixed set of names.

    ``where`` prefixes every message (``"machine-config"``,
    ``"drives[1]"``). Unknown names are rejected at construction; each
    accessor checks one field's type and range and returns its value, or the
    default when the field is absent or ``null``. ``unsupported`` names are
    Firecracker fields pyvmm does not implement: giving them is an error
    that says so, rather than "unknown field".
    """

    def __init__(
        self,
        value: Any,
        where: str,
        known: Iterable[str],
        unsupported: Mapping[str, str] | None = None,
        *,
        ignore_unknown: bool = False,
    ) -> None:
        """``ignore_unknown``: Firecracker's shapes without ``deny_unknown_fields``
        (TokenBucket, Metrics, the snapshot overrides) take extra fields silently."""
        self.where = where
        self.obj = as_object(value, where)
        known = tuple(known)
        if ignore_unknown:
            self.obj = {name: item for name, item in self.obj.items() if name in known}
        for name in self.obj:
            if unsupported and name in unsupported and self.obj[name] is not None:
                raise ConfigError(
                    f"{where}: {name} is not supported by pyvmm ({unsupported[name]})"
                )
            if name not in known and not (unsupported and name in unsupported):
                raise ConfigError(
                    f"{where}: unknown field {show(name)} (expected one of {', '.join(known)})"
                )

    # --- helpers ------------------------------------------------------------------
    def error(self, name: str, problem: str) -> ConfigError:
        """An error about field ``name``: ``"<where>: <name> <problem>"``."""
        return ConfigError(f"{self.where}: {name} {problem}")

    def has(self, name: str) -> bool:
        """Whether ``name`` is given (and not ``null``)."""
        return self.obj.get(name) is not None

    def _get(self, name: str, required: bool) -> Any:
        value = self.obj.get(name)
        if value is None and required:
            raise self.error(name, "is required")
        return value

    # --- typed accessors -----------------------------------------------------------
    def string(self, name: str, *, required: bool = False, empty: bool = False) -> str | None:
        """A string; empty strings are refused unless ``empty``."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {show(value)}")
        if not value and not empty:
            raise self.error(name, "must not be empty")
        if "\x00" in value:
            raise self.error(name, "must not contain NUL characters")
        return value

    def required_string(self, name: str) -> str:
        """A non-empty string that must be present."""
        value = self.string(name, required=True)
        assert value is not None
        return value

    def ident(self, name: str) -> str:
        """A required resource id (``drive_id``, ``iface_id``)."""
        value = self.required_string(name)
        if not is_valid_id(value):
            raise self.error(name, f"must be {ID_RULE}, not {show(value)}")
        return value

    def boolean(self, name: str, default: bool = False, *, required: bool = False) -> bool:
        """``true`` or ``false`` (0 and 1 are not booleans)."""
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, not {show(value)}")
        return value

    def optional_boolean(self, name: str) -> bool | None:
        """``true``, ``false`` or absent (None): for partial updates."""
        return self.boolean(name) if self.has(name) else None

    def integer(
        self,
        name: str,
        lo: int,
        hi: int,
        *,
        required: bool = False,
        default: int | None = None,
    ) -> int | None:
        """An integer in ``[lo, hi]`` (booleans and 2.0 are not integers)."""
        value = self._get(name, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(name, f"must be an integer between {lo} and {hi}, not {show(value)}")
        return value

    def required_integer(self, name: str, lo: int, hi: int) -> int:
        value = self.integer(name, lo, hi, required=True)
        assert value is not None
        return value

    def choice(
        self,
        name: str,
        choices: Sequence[str],
        default: str | None = None,
        *,
        required: bool = False,
        case_insensitive: bool = False,
    ) -> str | None:
        """One of ``choices`` (returned as spelled in ``choices``)."""
        value = self._get(name, required)
        if value is None:
            return default
        if isinstance(value, str):
            for choice in choices:
                if value == choice or (case_insensitive and value.lower() == choice.lower()):
                    return choice
        options = ", ".join(f'"{c}"' for c in choices)
        raise self.error(name, f"must be one of {options}, not {show(value)}")

    def object(self, name: str, *, required: bool = False) -> Mapping[str, Any] | None:
        """A nested JSON object (checked by the caller)."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(name, f"must be a JSON object, not {show(value)}")
        return value

    def array(self, name: str, *, required: bool = False) -> Sequence[Any] | None:
        """A JSON array (its items checked by the caller)."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(name, f"must be an array, not {show(value)}")
        return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate field {show(key)}")
        result[key] = value
    return result


def loads_strict(data: bytes | str) -> Any:
    """Decode JSON as Firecracker's serde does: no NaN/Infinity, no duplicate keys.

    Raises :class:`ValueError` (``json.JSONDecodeError`` included, with its
    line and column) for anything else than one valid JSON document, and for
    nesting too deep to decode.
    """
    try:
        return json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"the body is not UTF-8 ({exc.reason})") from None


def read_json_file(path: str | os.PathLike[str], what: str, limit: int) -> Any:
    """The JSON document in the regular file ``path``, at most ``limit`` bytes.

    Checked before a byte is read: a FIFO would block for ever, ``/dev/zero``
    would never end, a directory is a mistake; each is refused in one line
    (ConfigError) that names ``what`` and the path.
    """
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{what} {shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {shown} is not a regular file")
        if info.st_size > limit:
            raise ConfigError(
                f"{what} {shown} is {info.st_size} bytes; at most {limit} are accepted"
            )
        chunks = []
        remaining = limit + 1
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 16))):
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise ConfigError(f"{what} {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # grew while being read
        raise ConfigError(f"{what} {shown} is larger than {limit} bytes")
    try:
        return loads_strict(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {shown} is not valid JSON: {exc}") from None
