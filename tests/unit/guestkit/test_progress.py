"""Progress lines: one live line on a terminal, one line per task elsewhere."""

from __future__ import annotations

import io

import pytest

from pyvmm.guestkit.progress import task


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_task_whatever_happens_inside() -> None:
    log = io.StringIO()
    with task("downloading linux-image-x", total=27_100_000, stream=log) as progress:
        for done in range(0, 27_100_000, 1_000_000):
            progress.advance_to(done)
        progress.stage("unpacking")
    with task("building an initramfs", stream=log):
        pass
    assert log.getvalue() == (
        "pyvmm: downloading linux-image-x (27.1 MB)...\npyvmm: building an initramfs...\n"
    )


def test_a_terminal_gets_a_live_line_that_is_erased_at_the_end() -> None:
    tty = Terminal()
    with task("downloading k", total=2_000_000, stream=tty) as progress:
        progress.advance_to(1_500_000)
        progress._drawn = 0.0  # let the next update draw at once
        progress.advance_to(2_000_000)
    text = tty.getvalue()
    assert "\n" not in text
    assert "pyvmm: downloading k: 1.5 MB of 2.0 MB" in text or "2.0 MB of 2.0 MB" in text
    assert text.endswith("\r\x1b[K")


def test_the_line_is_erased_when_the_task_fails() -> None:
    tty = Terminal()
    with pytest.raises(RuntimeError), task("booting", stream=tty) as progress:
        progress.stage("Run /init as init process")
        raise RuntimeError("stalled")
    assert tty.getvalue().endswith("\r\x1b[K")


def test_pyvmm_progress_0_silences(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PYVMM_PROGRESS", "0")
    with task("downloading k", total=10):
        pass
    assert capsys.readouterr().err == ""
