"""The signal that kicks a vCPU thread out of ``KVM_RUN``.

The handler is installed in C with ``sigaction`` and no ``SA_RESTART`` so
``KVM_RUN`` returns EINTR; Python's ``signal.signal`` would not do here (it
only works on the main thread and wakes Python's own machinery).
"""

from __future__ import annotations

import signal
import threading

from pyvmm.errors import HostError
from pyvmm.kvm._kvm_cffi import ffi, lib

VCPU_KICK_SIGNAL = signal.SIGRTMIN
_installed = threading.Lock()
_done = False


def install_kick_handler() -> int:
    """Install the no-op kick handler once per process; returns the signal number."""
    global _done
    with _installed:
        if not _done:
            if lib.pyvmm_install_kick_handler(VCPU_KICK_SIGNAL) != 0:
                raise HostError(f"cannot install the vCPU kick signal handler: errno {ffi.errno}")
            _done = True
    return VCPU_KICK_SIGNAL
