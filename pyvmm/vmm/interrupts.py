"""Interrupt lines handed to devices.

An :class:`EventFdIrq` is an eventfd registered with ``KVM_IRQFD``: writing
it injects an edge on the GSI from any thread, with no vCPU exit and no
ioctl. Device models only see its one method, ``trigger()``.
"""

from __future__ import annotations

import os


class EventFdIrq:
    """An irqfd-backed edge-triggered interrupt line."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
