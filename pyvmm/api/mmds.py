"""The MMDS data store: the JSON document behind ``/mmds``, with a size cap.

Firecracker's rules: ``PUT`` replaces the document, ``PATCH`` merges into
it as a JSON Merge Patch (RFC 7396: objects merge key by key, ``null``
deletes a key, anything else replaces) and is refused until a first
``PUT``; ``GET`` returns the document (``{}`` before any ``PUT``). A change
whose result, serialized compactly, exceeds ``limit`` bytes is refused
whole with :class:`MmdsLimitError` (HTTP 413), so the store never holds
more than the limit even though each request body is capped separately.

The store is shared by reference between the API thread and whoever
serves the metadata to the guest, hence the lock; readers get a deep copy.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

from pyvmm.errors import ConfigError

#: Firecracker's default data store limit (``--mmds-size-limit``), in bytes.
DEFAULT_MMDS_SIZE_LIMIT = 51200


class MmdsLimitError(ConfigError):
    """A PUT or PATCH would make the data store larger than its limit."""


class MmdsNotInitializedError(ConfigError):
    """A PATCH came before any PUT."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch of ``patch`` onto ``target`` (neither is modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def serialized_size(document: Any) -> int:
    """Bytes of ``document`` as compact JSON: what the limit is measured in."""
    return len(json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode())


class MmdsStore:
    """One metadata document; see the module docstring."""

    def __init__(self, limit: int = DEFAULT_MMDS_SIZE_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._initialized = False

    @property
    def initialized(self) -> bool:
        return self._initialized

    def get(self) -> dict[str, Any]:
        """A copy of the document (``{}`` before the first PUT)."""
        with self._lock:
            return copy.deepcopy(self._data)

    def put(self, document: dict[str, Any]) -> None:
        """Replace the document."""
        self._check_size(document)
        with self._lock:
            self._data = copy.deepcopy(document)
            self._initialized = True

    def patch(self, patch: dict[str, Any]) -> None:
        """Merge ``patch`` into the document (RFC 7396)."""
        with self._lock:
            if not self._initialized:
                raise MmdsNotInitializedError("MMDS error: The MMDS data store is not initialized.")
            merged = merge_patch(self._data, patch)
            self._check_size(merged)
            self._data = merged

    def _check_size(self, document: Any) -> None:
        size = serialized_size(document)
        if size > self.limit:
            raise MmdsLimitError(
                f"MMDS limit exceeded error: the data store would hold {size} bytes, "
                f"more than its limit of {self.limit}"
            )
