from __future__ import annotations

import os
import threading

from pyvmm.vmm.event_loop import EventLoop


def test_reader_timer_and_call_soon_run_on_loop_thread() -> None:
    loop = EventLoop("test-loop")
    seen: list[tuple[str, str]] = []
    done = threading.Event()
    read_fd, write_fd = os.pipe()

    def on_readable(events: int) -> None:
        seen.append(("read", threading.current_thread().name))
        os.read(read_fd, 100)
        loop.remove_reader(read_fd)
        loop.call_later(0.01, lambda: (seen.append(("timer", "")), done.set()))

    loop.add_reader(read_fd, on_readable)
    loop.start()
    loop.call_soon(lambda: seen.append(("soon", threading.current_thread().name)))
    os.write(write_fd, b"x")
    assert done.wait(5)
    loop.close()
    os.close(read_fd)
    os.close(write_fd)
    assert ("read", "test-loop") in seen
    assert ("soon", "test-loop") in seen
    assert seen[-1][0] == "timer"


def test_an_error_in_a_callback_reaches_the_owner_naming_the_thread() -> None:
    reported: list[str] = []
    done = threading.Event()

    def on_error(message: str) -> None:
        reported.append(message)
        done.set()

    loop = EventLoop(on_error=on_error)
    loop.start()

    def fail() -> None:
        raise RuntimeError("boom")

    loop.call_soon(fail)
    assert done.wait(5)
    loop.close()
    assert reported == ["thread 'pyvmm-io' (io) failed: RuntimeError: boom"]


def test_stop_is_idempotent() -> None:
    loop = EventLoop()
    loop.start()
    loop.stop()
    loop.stop()
    loop.close()


def test_pause_holds_callbacks_until_resume() -> None:
    loop = EventLoop()
    read_fd, write_fd = os.pipe()
    seen: list[bytes] = []
    got = threading.Event()

    def on_readable(events: int) -> None:
        seen.append(os.read(read_fd, 100))
        got.set()

    loop.add_reader(read_fd, on_readable)
    loop.start()
    loop.pause()
    os.write(write_fd, b"while paused")
    loop.call_soon(lambda: seen.append(b"soon"))
    assert not got.wait(0.2)
    assert seen == []
    loop.resume()
    assert got.wait(5)
    loop.close()
    os.close(read_fd)
    os.close(write_fd)
    assert b"while paused" in seen and b"soon" in seen


def test_pause_times_out_on_a_busy_callback_and_close_wakes_a_paused_loop() -> None:
    loop = EventLoop()
    release = threading.Event()
    loop.start()
    loop.call_soon(lambda: release.wait(5))
    try:
        loop.pause(timeout=0.1)
    except TimeoutError as exc:
        assert "did not pause within 0.1 s" in str(exc)
    else:
        raise AssertionError("pause returned while a callback was busy")
    release.set()
    loop.pause()
    closer = threading.Thread(target=loop.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()


def test_pause_right_after_resume_parks_again() -> None:
    """A resume immediately followed by a pause: the first park must let go
    even though the loop is paused again before it wakes."""
    loop = EventLoop()
    loop.start()
    for _ in range(200):
        loop.pause(timeout=2)
        loop.resume()
    loop.close()
