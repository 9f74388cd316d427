#!/usr/bin/env python3
"""Where pyvmm spends its time in the virtio benchmarks: py-spy on `pyvmm run`.

Runs one probe workload per device path (blk sequential qd32, blk random
qd32, net TX, net RX) under ``py-spy record`` (``pip install py-spy``),
then prints, for the thread that does the device work (the event loop) and
for the vCPU thread, the functions with the most samples: self (the
function itself) and total (with what it calls). Needs root (py-spy, TAP).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

from probe_vm import (
    Drive,
    GuestRun,
    HostTap,
    command,
    probe_frame,
    write_pattern_image,
)

from pyvmm.guestkit.probe import build_probe

TAP = "pvprof0"


def _pyspy(out: Path, rate: int) -> list[str]:
    return [
        "py-spy", "record", "--nonblocking", "--threads", "--format", "raw",
        "-r", str(rate), "-o", str(out),
    ]  # fmt: skip


def profile(name: str, cmd: list[str], out: Path, rate: int, feed=None) -> None:
    """Record ``cmd`` (a pyvmm command) under py-spy into ``out``."""
    run = GuestRun("pyvmm", [*_pyspy(out, rate), "--", *cmd]).start()
    if feed is not None:
        feed(run)
    lines = run.finish()
    print(f"{name}: " + next(line for line in lines if line.startswith(name.split()[0])))


def summarize(out: Path, top: int) -> None:
    """Self and total samples per function, per thread, from py-spy's raw output."""
    self_count: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total_count: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    threads: collections.Counter = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        count = int(count_text)
        threads[thread] += count
        if frames:
            self_count[thread][_short(frames[-1])] += count
            for frame in set(map(_short, frames)):
                total_count[thread][frame] += count
    for thread, samples in threads.most_common(2):
        print(f"  thread {thread}: {samples} samples")
        print(f"    {'self %':>7} {'total %':>8}  function")
        ranked = sorted(total_count[thread], key=lambda f: -self_count[thread][f])[:top]
        for frame in ranked:
            s = 100 * self_count[thread][frame] / samples
            t = 100 * total_count[thread][frame] / samples
            print(f"    {s:7.1f} {t:8.1f}  {frame}")


def _short(frame: str) -> str:
    """``serve_queue (pyvmm/virtio/device.py:212)`` -> ``serve_queue (device.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    if os.geteuid() != 0:
        parser.error("needs root (py-spy attaches to its child, TAP devices)")

    probe = build_probe()
    image = args.dir / "pyvmm-profile.img"
    write_pattern_image(image, 256 << 20)
    workdir = Path(tempfile.mkdtemp(prefix="pyvmm-profile-"))
    drive = (Drive(image, read_only=True),)
    try:
        jobs = [
            ("blkread qd32", "qd=32 blkread=4096", {"drives": drive}),
            ("blkrand qd32", "qd=32 blkrand=200000", {"drives": drive}),
        ]
        for name, cmdline, devices in jobs:
            out = workdir / f"{name.replace(' ', '-')}.txt"
            profile(name, command("pyvmm", probe, cmdline, **devices), out, args.rate)
            summarize(out, args.top)
        with HostTap(TAP) as tap:
            out = workdir / "nettx.txt"
            cmd = command("pyvmm", probe, "nettx=300000", tap=tap.name)
            profile("nettx 1514 B", cmd, out, args.rate)
            summarize(out, args.top)
        frames = 100000
        with HostTap(TAP, txqueuelen=frames + 1024) as tap:
            out = workdir / "netrx.txt"
            sock = tap.socket()

            def feed(run: GuestRun) -> None:
                run.read_until("netrx: ready")
                tap.wait_up()
                frame = probe_frame(0, 1514)
                for seq in range(frames):
                    sock.send(frame[:18] + seq.to_bytes(4, "little") + frame[22:])
                assert run.proc is not None and run.proc.stdin is not None
                run.proc.stdin.write(b"go\n")
                run.proc.stdin.flush()

            cmd = command("pyvmm", probe, f"netrx={frames}", tap=tap.name)
            profile("netrx 1514 B", cmd, out, args.rate, feed)
            sock.close()
            summarize(out, args.top)
    finally:
        image.unlink(missing_ok=True)
    print(f"raw profiles in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
