"""The machine's lifecycle: its states, and the one table of what may happen in each.

Every front end (the CLI, the library, the API) asks the machine to act and
reads :class:`VmState` from it; none keeps its own copy of these rules
(h11's rule: everything that changes the state machine lives in one file).

==============  ==========================================================
``Not started`` configured, nothing built yet: start (boot) or restore
``Running``     vCPUs in the guest: pause, update devices, stop
``Paused``      nothing runs guest code or touches guest memory: resume,
                snapshot, update devices, stop
``Stopped``     the guest or the host ended it; only close remains
==============  ==========================================================

Pausing a paused VM and resuming a running one change nothing and are not
errors (Firecracker answers both with success).
"""

from __future__ import annotations

import enum
import threading

from pyvmm.errors import VmStateError

# How long pausing (or parking freshly restored vCPUs) may take before it is a host error.
PAUSE_TIMEOUT = 5.0


class VmState(enum.Enum):
    """Where a machine is in its lifecycle (Firecracker's names, for its API)."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"


class Action(enum.Enum):
    """What a front end may ask a machine to do."""

    START = "start"
    RESTORE = "restore"
    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT = "snapshot"
    UPDATE = "update devices of"
    STOP = "stop"


_NOT_STARTED, _RUNNING, _PAUSED, _STOPPED = VmState

#: (state, action) -> the state after it. Pairs missing here are refused.
TRANSITIONS: dict[tuple[VmState, Action], VmState] = {
    (_NOT_STARTED, Action.START): _RUNNING,
    (_NOT_STARTED, Action.RESTORE): _PAUSED,
    (_RUNNING, Action.PAUSE): _PAUSED,
    (_PAUSED, Action.PAUSE): _PAUSED,
    (_PAUSED, Action.RESUME): _RUNNING,
    (_RUNNING, Action.RESUME): _RUNNING,
    (_PAUSED, Action.SNAPSHOT): _PAUSED,
    (_RUNNING, Action.UPDATE): _RUNNING,
    (_PAUSED, Action.UPDATE): _PAUSED,
    (_NOT_STARTED, Action.STOP): _STOPPED,
    (_RUNNING, Action.STOP): _STOPPED,
    (_PAUSED, Action.STOP): _STOPPED,
    (_STOPPED, Action.STOP): _STOPPED,
}

_HINTS = {Action.SNAPSHOT: "; pause it first", Action.UPDATE: "; start it first"}


class Lifecycle:
    """The current :class:`VmState`, changed only along :data:`TRANSITIONS`.

    ``lock`` serializes the actions themselves: hold it across
    :meth:`check` and :meth:`advance` (the machine does, for the whole
    action), so two front-end threads never interleave a pause and a
    snapshot. Reading :attr:`state` needs no lock.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._state = VmState.NOT_STARTED

    @property
    def state(self) -> VmState:
        return self._state

    def check(self, action: Action) -> VmState:
        """The state ``action`` leads to; VmStateError (one line) if it is not allowed now."""
        after = TRANSITIONS.get((self._state, action))
        if after is None:
            hint = _HINTS.get(action, "") if self._state is not VmState.STOPPED else ""
            raise VmStateError(
                f"the VM cannot {action.value}: it is {self._state.value.lower()}{hint}"
            )
        return after

    def is_noop(self, action: Action) -> bool:
        """True when ``action`` is allowed and leaves the state as it is (pause while paused)."""
        return TRANSITIONS.get((self._state, action)) is self._state and action in (
            Action.PAUSE,
            Action.RESUME,
        )

    def advance(self, action: Action) -> VmState:
        """Move along the table (after the action succeeded); returns the new state."""
        self._state = self.check(action)
        return self._state

    def stopped(self) -> None:
        """The VM ended on its own (guest, error, signal): from any state, to Stopped."""
        self._state = VmState.STOPPED
