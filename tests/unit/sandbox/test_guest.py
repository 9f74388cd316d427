"""The default guest is the guest kit's, asked for through a child process (never imported)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import HostError
from pyvmm.guestkit import initramfs
from pyvmm.sandbox import guest


def test_the_agent_argument_is_the_guest_kits_init_contract() -> None:
    assert guest.COMMAND_PARAM == initramfs.COMMAND_PARAM
    assert guest.command_arg(guest.AGENT_SCRIPT) == initramfs.command_arg(guest.AGENT_SCRIPT)
    assert guest.agent_cmdline().endswith(initramfs.command_arg(guest.AGENT_SCRIPT))


@pytest.mark.parametrize(
    ("code", "stdout", "expected"),
    [
        (0, '{"kernel": "/k", "initrd": "/i"}\n', (Path("/k"), Path("/i"))),
        (1, '{"error": "read-only file system"}\n', "guest: read-only file system$"),
        (1, "", "the guest kit exited 1"),
        (0, "not json\n", "the guest kit exited 0"),
    ],
)
def test_the_guest_kits_answer(
    monkeypatch: pytest.MonkeyPatch, code: int, stdout: str, expected: object
) -> None:
    def run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert argv[1:] == ["-m", "pyvmm.guestkit.sandbox_guest", "--cache-dir", "/c"]
        return subprocess.CompletedProcess(argv, code, stdout=stdout)

    monkeypatch.setattr(guest.subprocess, "run", run)
    guest.default_guest.cache_clear()
    try:
        if isinstance(expected, tuple):
            assert guest.default_guest(Path("/c")) == expected
        else:
            with pytest.raises(HostError, match=str(expected)):
                guest.default_guest(Path("/c"))
    finally:
        guest.default_guest.cache_clear()
