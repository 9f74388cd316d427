"""What a host back end may ask of the event loop it is subscribed to.

The VMM's :class:`~pyvmm.vmm.event_loop.EventLoop` has these methods; back
ends see only this protocol (rust-vmm's event-manager idea: a subscriber
registers its own fds), so they can be tested with any loop and never
reach into the VMM core.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Protocol

FdCallback = Callable[[int], None]  # receives the epoll event mask
Wake = Callable[[], None]


class EventOps(Protocol):
    def add_reader(self, fd: int, callback: FdCallback, events: int = select.EPOLLIN) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...


class Backend(Protocol):
    """A device's host side, as the device manager wires it.

    ``subscribe(ops, wake)`` registers the back end's fds (if any) on the
    loop; ``wake()`` asks the device to look at its back end again (e.g. a
    TAP has frames for the guest). ``close()`` releases everything.
    """

    def subscribe(self, ops: EventOps, wake: Wake) -> None: ...

    def close(self) -> None: ...
