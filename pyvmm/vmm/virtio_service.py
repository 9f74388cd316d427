"""How a machine's event loop drives its virtio devices.

Every reason to process a queue (a driver kick through its ioeventfd, a
back end becoming ready, a rate limiter's retry timer) ends in one
``serve(index)`` per transport, on the event-loop thread; changes from
other threads (a new rate limiter) go through the transport lock.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyvmm.devices.rate_limiter import LimiterPatch
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.mmio import MmioTransport
from pyvmm.vmm.event_loop import EventLoop


def patch_limiter(transport: MmioTransport, attribute: str, patch: LimiterPatch) -> None:
    """Apply ``patch`` to the device's limiter ``attribute``, under the transport lock."""

    def apply(device: VirtioDevice) -> None:
        setattr(device, attribute, patch.apply(getattr(device, attribute)))

    transport.run_locked(apply)


def queue_server(
    loop: EventLoop, transport: MmioTransport, device: VirtioDevice
) -> Callable[[int], None]:
    """``serve(index)``: process one queue of ``transport`` on the event loop thread.

    Every reason to process a queue goes through it: a driver kick (see
    :func:`queue_kick_handler`), a back end becoming ready (the TAP fd of
    virtio-net, for queue 0), and the retry timer below.

    Right after ``process_queue(index)`` a rate-limited device reports, for
    that queue, ``throttled`` (it left work undone) and ``retry_after``
    (seconds until its limiter has tokens); one timer per queue then serves
    the queue again. A device that is no longer active (reset meanwhile) is
    not retried: its next activation starts afresh.
    """
    retry_pending: set[int] = set()

    def serve(index: int) -> None:
        transport.process_queue(index)
        if device.activated and device.throttled and index not in retry_pending:
            retry_pending.add(index)
            loop.call_later(device.retry_after, lambda: retry(index))

    def retry(index: int) -> None:
        retry_pending.discard(index)
        serve(index)

    return serve


def queue_kick_handler(
    notify: int, serve: Callable[[int], None], index: int
) -> Callable[[int], None]:
    """Event-loop callback for a queue's kick eventfd: drain it, then ``serve(index)``."""

    def on_kick(events: int) -> None:
        try:
            os.eventfd_read(notify)
        except BlockingIOError:
            return
        serve(index)

    return on_kick
