"""virtio-rng (virtio 1.2, section 5.4): entropy for the guest's hwrng.

One request queue. The driver posts chains of device-writable buffers; the
device fills them with random bytes and returns each chain with the number
of bytes written. A chain without writable buffers comes back with 0. There
is no config space and there are no device feature bits.

Host resources stay bounded: each chain gets at most
``MAX_BYTES_PER_CHAIN`` bytes (the driver reads the used length and simply
asks again), and one of two optional limits applies:

* ``rate_limiter`` (a :class:`~pyvmm.devices.rate_limiter.RateLimiter`, as
  Firecracker's entropy device ``rate_limiter``): each chain costs the bytes
  it will get (bandwidth bucket) and one op, all or nothing; a chain larger
  than the bucket goes through once the bucket is full and leaves it in debt.
  ``retry_after`` is the limiter's own answer.
* ``budget(n) -> granted``, a callable that may give fewer bytes or none; it
  cannot say when it refills, so ``retry_after`` is :data:`BUDGET_RETRY_S`.

When the limit gives nothing, the chain stays in the avail ring,
:attr:`VirtioRng.throttled` is set, and the owner calls
:meth:`VirtioRng.process_queue` again after :attr:`VirtioRng.retry_after`
seconds (through the transport's ``process_queue``, for example from a timer
on the event loop). Chains without writable buffers cost nothing.

``entropy(n)`` is injected (the VMM passes ``os.getrandom``) and may return fewer
than ``n`` bytes; the device writes what it got and reports that length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.rate_limiter import RateLimiter, RateLimiterState, restore_limiter
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.ids import VIRTIO_ID_RNG

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import DescriptorChain

RNG_QUEUE_SIZE = 256
#: The budget callable cannot say when it refills: poll it this often.
BUDGET_RETRY_S = 0.01
MAX_BYTES_PER_CHAIN = 64 * 1024


@dataclass(frozen=True)
class VirtioRngState:
    bytes_served: int
    rate_limiter: RateLimiterState | None = None


class VirtioRng(VirtioDevice):
    """The virtio entropy device; see the module docstring."""

    device_type = VIRTIO_ID_RNG
    queue_max_sizes = (RNG_QUEUE_SIZE,)
    avail_features = 0

    def __init__(
        self,
        entropy: Callable[[int], bytes],
        *,
        budget: Callable[[int], int] | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        if budget is not None and rate_limiter is not None:
            raise ValueError("give virtio-rng a budget or a rate_limiter, not both")
        self._entropy = entropy
        self._budget = budget
        self.rate_limiter = rate_limiter
        self.bytes_served = 0
        self.throttled = False
        self.retry_after = 0.0

    def process_queue(self, index: int) -> None:
        """Serve every available chain of queue ``index`` (0); may raise QueueError."""
        self.throttled = False
        if self.mem is None or self.interrupt is None or index != 0:
            return
        # _fill returns None when the limit is reached: the chain stays in the ring
        # (and _fill has set retry_after).
        self.throttled = self.serve_queue(0, self._fill)
        if not self.throttled:
            self.retry_after = 0.0

    def _fill(self, chain: DescriptorChain) -> int | None:
        """Write entropy into the chain's writable buffers; None if the limit is reached."""
        wanted = min(chain.writable_bytes, MAX_BYTES_PER_CHAIN)
        if wanted and self._budget is not None:
            wanted = max(0, min(wanted, self._budget(wanted)))
            if wanted == 0:
                self.retry_after = BUDGET_RETRY_S
                return None
        limiter = self.rate_limiter
        if wanted and limiter is not None and not limiter.consume(wanted, 1):
            self.retry_after = limiter.retry_after(wanted, 1)
            return None
        mem = self.mem
        assert mem is not None
        written = 0
        for desc in chain.writable():
            if written == wanted:
                break
            want = min(desc.length, wanted - written)
            data = self._entropy(want)[:want]
            mem.write(desc.addr, data)
            written += len(data)
            if len(data) < want:
                break
        if limiter is not None and written < wanted:
            limiter.replenish(wanted - written, 0)  # charge only what the guest got
        self.bytes_served += written
        return written

    def reset(self) -> None:
        super().reset()
        self.throttled = False

    def save(self) -> VirtioRngState:
        limiter = self.rate_limiter.save() if self.rate_limiter is not None else None
        return VirtioRngState(bytes_served=self.bytes_served, rate_limiter=limiter)

    def restore(self, state: VirtioRngState) -> None:
        if not isinstance(state.bytes_served, int) or state.bytes_served < 0:
            raise ValueError(f"virtio-rng state: bytes_served={state.bytes_served!r}")
        self.bytes_served = state.bytes_served
        if self._budget is None:
            self.rate_limiter = restore_limiter(state.rate_limiter)
