"""The default sandbox guest for the e2e tests, built on this host before a nested host needs it.

A nested host sees this host's files (the guest kit's cache included) read-only,
so the sandbox guest (kernel and agent initramfs) is fetched and built here first.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sandbox_guest() -> None:
    """Fetch and build the default sandbox guest once per test session."""
    from pyvmm.sandbox.guest import default_guest

    default_guest()
