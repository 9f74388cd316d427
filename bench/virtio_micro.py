#!/usr/bin/env python3
"""Host-side cost per request of virtio-blk and virtio-net, without KVM.

The guest benches (``virtio_blk.py``, ``virtio_net.py``) measure the whole
path; this one isolates the device model: a mock driver (the test suite's)
keeps ``--qd`` requests posted in guest memory, and the device serves them
the way the event loop would after one kick. It prints microseconds per
request spent inside ``process_queue`` (the driver's side is not counted):
what the device code costs the event-loop thread.

* blk: 64 KiB sequential reads and writes, 4 KiB random reads, on an image
  in the page cache (``--dir``);
* net: 1514-byte TX frames into, and RX frames out of, a datagram
  socketpair standing in for the TAP.

``--profile NAME`` runs one workload under cProfile and prints the top
functions. No root, no KVM: use it to iterate, then confirm with the guest
benches.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.devices.virtio.block import (
    VirtioBlock,
)
from pyvmm.devices.virtio.block_request import (
    REQ_HEADER,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from pyvmm.devices.virtio.device import VirtioInterrupt
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.queue import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from pyvmm.host.block_file import BlockFile
from pyvmm.memory import GuestMemory
from tests.support.virtio_driver import MockDriver

MEM = 64 << 20
SIZE = 256
DATA = 0x100_0000  # request buffers from 16 MiB on
MIB = 1 << 20


class _Irq:
    def trigger(self) -> None:
        pass


class Ring:
    """Fixed 3-descriptor (header, data, status) slots as the probe guest posts them."""

    def __init__(self, mem: GuestMemory, qd: int, data_len: int) -> None:
        self.mem = mem
        self.driver = MockDriver(mem, SIZE)
        self.qd = qd
        self.data_len = data_len
        self.kicks = 0
        for slot in range(qd):
            base = DATA + slot * (data_len + 4096)
            d = 3 * slot
            self.driver.write_desc(d, base, 16, VIRTQ_DESC_F_NEXT, d + 1)
            self.driver.write_desc(d + 1, base + 4096, data_len, VIRTQ_DESC_F_NEXT, d + 2)
            self.driver.write_desc(d + 2, base + 16, 1, VIRTQ_DESC_F_WRITE, 0)

    def post(self, slot: int, req_type: int, sector: int) -> None:
        base = DATA + slot * (self.data_len + 4096)
        self.mem.write(base, REQ_HEADER.pack(req_type, 0, sector))
        write = VIRTQ_DESC_F_WRITE if req_type == VIRTIO_BLK_T_IN else 0
        self.driver.write_desc(
            3 * slot + 1, base + 4096, self.data_len, VIRTQ_DESC_F_NEXT | write, 3 * slot + 2
        )
        self.driver.publish(3 * slot)

    def kick_wanted(self) -> bool:
        wanted = not self.driver.used_flags() & VIRTQ_USED_F_NO_NOTIFY
        self.kicks += wanted
        return wanted


def bench_blk(args, kind: str) -> tuple[float, float]:
    """(µs per request, kicks per request) for one blk workload."""
    image = Path(args.dir) / "pyvmm-micro.img"
    size = 256 * MIB
    if not image.exists() or image.stat().st_size != size:
        with image.open("wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
    data_len = 4096 if kind == "rand" else 65536
    req_type = VIRTIO_BLK_T_OUT if kind == "write" else VIRTIO_BLK_T_IN
    with GuestMemory([(0, MEM)]) as mem, BlockFile(image) as backend:
        ring = Ring(mem, args.qd, data_len)
        dev = VirtioBlock(backend)
        queue = ring.driver.queue()
        dev.activate(mem, [queue], VirtioInterrupt(_Irq()), 0)
        rng = random.Random(1)
        blocks = size // data_len
        nxt = 0

        def sector() -> int:
            nonlocal nxt
            block = rng.randrange(blocks) if kind == "rand" else nxt % blocks
            nxt += 1
            return block * (data_len >> 9)

        done = 0
        used = 0
        for slot in range(args.qd):
            ring.post(slot, req_type, sector())
        ring.kick_wanted()
        busy = 0.0
        clock = time.perf_counter
        while done < args.requests:
            t0 = clock()
            dev.process_queue(0)
            busy += clock() - t0
            new = ring.driver.used_idx()
            n = (new - used) & 0xFFFF
            for i in range(n):
                head, _length = ring.driver.used_elem(used + i)
                ring.post(head // 3, req_type, sector())
            used = new
            done += n
            ring.kick_wanted()
    return busy / done * 1e6, ring.kicks / done


class PairBackend:
    """A datagram socketpair standing in for a TAP with vnet_hdr."""

    vnet_hdr = True

    def __init__(self) -> None:
        self.dev_end, self.host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.dev_end, self.host_end):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.fd = self.dev_end.fileno()

    def readv(self, buffers):
        return os.readv(self.fd, buffers)

    def writev(self, buffers):
        return os.writev(self.fd, buffers)

    def set_offload(self, flags: int) -> None:
        pass


def bench_net(args, kind: str) -> tuple[float, float]:
    frame = 1514
    mrg = 1 << 15
    version_1 = 1 << 32
    with GuestMemory([(0, MEM)]) as mem:
        backend = PairBackend()
        rx = MockDriver(mem, SIZE, desc_table=0x10_000)
        tx = MockDriver(mem, SIZE, desc_table=0x20_000)
        dev = VirtioNet(backend, b"\x02\0\0\0\0\1")
        queues = [rx.queue(), tx.queue()]
        dev.activate(mem, queues, VirtioInterrupt(_Irq()), mrg | version_1)
        bufs = [DATA + i * 4096 for i in range(SIZE)]
        kicks = 0
        done = 0
        busy = 0.0
        clock = time.perf_counter
        if kind == "tx":
            for i, addr in enumerate(bufs[: args.qd]):
                tx.write_desc(i, addr, 12 + frame, 0, 0)
                tx.publish(i)
            used = 0
            while done < args.requests:
                t0 = clock()
                dev.process_queue(1)
                busy += clock() - t0
                new = tx.used_idx()
                n = (new - used) & 0xFFFF
                for i in range(n):
                    head, _ = tx.used_elem(used + i)
                    tx.publish(head)
                used = new
                done += n
                kicks += not tx.used_flags() & VIRTQ_USED_F_NO_NOTIFY
                while True:  # the host side drains
                    try:
                        backend.host_end.recv(65536)
                    except BlockingIOError:
                        break
        else:
            payload = bytes(12 + frame)
            for i, addr in enumerate(bufs):
                rx.write_desc(i, addr, 4096, VIRTQ_DESC_F_WRITE, 0)
                rx.publish(i)
            used = 0
            batch = 64
            while done < args.requests:
                for _ in range(batch):
                    backend.host_end.send(payload)
                t0 = clock()
                dev.process_queue(0)
                busy += clock() - t0
                new = rx.used_idx()
                n = (new - used) & 0xFFFF
                for i in range(n):
                    head, _ = rx.used_elem(used + i)
                    rx.publish(head)
                used = new
                done += n
    return busy / done * 1e6, kicks / done


WORKLOADS = {
    "blk-seqread": lambda a: bench_blk(a, "seq"),
    "blk-seqwrite": lambda a: bench_blk(a, "write"),
    "blk-randread": lambda a: bench_blk(a, "rand"),
    "net-tx": lambda a: bench_net(a, "tx"),
    "net-rx": lambda a: bench_net(a, "rx"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qd", type=int, default=32)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--profile", choices=sorted(WORKLOADS))
    parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS))
    args = parser.parse_args()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        WORKLOADS[args.profile](args)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return 0
    for name in args.only or WORKLOADS:
        us, kicks = WORKLOADS[name](args)
        print(f"{name:14} qd{args.qd:<3} {us:7.2f} us/request  {kicks:5.3f} kicks/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
