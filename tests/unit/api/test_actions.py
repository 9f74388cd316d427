"""The hand-off from API threads to the VMM thread: results, errors, cancellation."""

from __future__ import annotations

import threading

import pytest

from pyvmm.api.actions import ActionCancelledError, ActionQueue, InlineActions


def call_in_thread(actions: ActionQueue, action) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = actions.call(action)
        except BaseException as error:  # the test looks at whatever came back
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_actions_run_on_the_thread_that_serves_the_queue() -> None:
    actions = ActionQueue()
    ran_on: list[str] = []
    thread, outcome = call_in_thread(
        actions, lambda: ran_on.append(threading.current_thread().name) or 42
    )
    while not actions.run_pending(0.05):
        pass
    thread.join(5)
    assert outcome == {"result": 42}
    assert ran_on == [threading.current_thread().name]  # the "VMM" thread, not the caller


def test_an_action_error_goes_back_to_its_caller_and_the_queue_goes_on() -> None:
    actions = ActionQueue()
    thread, outcome = call_in_thread(actions, lambda: 1 / 0)
    while not actions.run_pending(0.05):
        pass
    thread.join(5)
    assert isinstance(outcome["error"], ZeroDivisionError)
    assert not actions.run_pending(0.01)  # nothing left, nothing raised


def test_a_cancellation_reaches_the_caller_and_stops_the_serving_loop() -> None:
    actions = ActionQueue()

    def interrupted() -> None:
        raise ActionCancelledError("received SIGTERM")  # what the signal handler raises

    thread, outcome = call_in_thread(actions, interrupted)
    with pytest.raises(ActionCancelledError):
        while not actions.run_pending(0.05):
            pass
    thread.join(5)
    assert isinstance(outcome["error"], ActionCancelledError)
    assert actions.running is None


def test_close_fails_queued_and_later_actions() -> None:
    actions = ActionQueue()
    thread, outcome = call_in_thread(actions, lambda: "never")
    while thread.is_alive() and not actions._queue.qsize():  # queued, not yet run
        thread.join(0.01)
    actions.close()
    thread.join(5)
    assert isinstance(outcome["error"], ActionCancelledError)
    with pytest.raises(ActionCancelledError):
        actions.call(lambda: "late")


def test_inline_actions_run_at_once_one_at_a_time() -> None:
    assert InlineActions().call(lambda: "now") == "now"
