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

FIRECRACKER_API_VERSION = "1.17.0"


def pyvmm_version() -> str:
    """pyvmm's installed version (0.0.0 when run from a source tree without metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyvmm")
    except PackageNotFoundError:
        return "0.0.0"


def vmm_version() -> str:
    """``1.17.0+pyvmm.0.1.0``: ``GET /version``, ``GET /``'s ``vmm_version``."""
    return f"{FIRECRACKER_API_VERSION}+pyvmm.{pyvmm_version()}"
