"""The version pyvmm reports where Firecracker reports its own.

``<API>+pyvmm.<version>``: ``<API>`` is the Firecracker API level pyvmm
serves (the ``info.version`` of the ``firecracker.yaml`` its conformance
tests replay, 1.17.0-dev, without the pre-release tag), and
``+pyvmm.<version>`` is semver build metadata naming pyvmm's own release.
Tools that compare Firecracker versions as semver (Kata Containers needs at
least 0.21.1) accept it; build metadata does not change the comparison,
and a person still reads that it is pyvmm.
"""

from __future__ import annotations

import functools
import os
import sys

FIRECRACKER_API_VERSION = "1.17.0"
#: What the metadata of an installed distribution is called (PEP 376, and eggs).
_NAMES, _METADATA = ("pyvmm-", "pyvmm."), (".dist-info", ".egg-info", ".egg")


@functools.cache
def pyvmm_version() -> str:
    """pyvmm's installed version (0.0.0 when run from a source tree without metadata)."""
    found = _dist_info_version()
    if found is not None:
        return found
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyvmm")
    except PackageNotFoundError:
        return "0.0.0"


def _dist_info_version() -> str | None:
    """The ``Version:`` in the first ``pyvmm-*.dist-info`` on ``sys.path``, as
    :mod:`importlib.metadata` finds it, without importing that (20-40 ms of imports
    here: too long for the first ``GET /``); None (ask importlib.metadata) otherwise,
    e.g. for an ``.egg-info``."""
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        found = [n for n in names if n.lower().startswith(_NAMES) and n.lower().endswith(_METADATA)]
        infos = [n for n in found if n.lower().startswith("pyvmm-") and n.endswith(".dist-info")]
        if len(infos) == 1:
            try:
                with open(os.path.join(entry, infos[0], "METADATA"), encoding="utf-8") as meta:
                    for line in meta:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():
                            return None  # the headers end without a version
            except OSError:
                return None
        if found:
            return None  # several, or an egg: importlib.metadata decides
    return None


def vmm_version() -> str:
    """``1.17.0+pyvmm.0.1.0``: ``GET /version``, ``GET /``'s ``vmm_version``."""
    return f"{FIRECRACKER_API_VERSION}+pyvmm.{pyvmm_version()}"
