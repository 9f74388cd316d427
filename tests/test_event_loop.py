from __future__ import annotations

import os
import threading

from pyvmm.event_loop import EventLoop


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


def test_errors_in_callbacks_are_kept_not_lost() -> None:
    loop = EventLoop()
    loop.start()

    def fail() -> None:
        raise RuntimeError("boom")

    loop.call_soon(fail)
    loop.stop()
    loop.close()
    assert isinstance(loop.error, RuntimeError)


def test_stop_is_idempotent() -> None:
    loop = EventLoop()
    loop.start()
    loop.stop()
    loop.stop()
    loop.close()
