"""Assertions the tests share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pyvmm.errors import ConfigError


def error_of(parse: Callable[[Any], object], value: Any) -> str:
    """The one-line ConfigError message ``parse(value)`` raises (it must raise one)."""
    with pytest.raises(ConfigError) as info:
        parse(value)
    message = str(info.value)
    assert "\n" not in message
    return message
