#!/usr/bin/env python3
"""virtio-net throughput: pyvmm vs QEMU microvm, the same probe guest, same run.

The probe guest (guest/probe, CPL3 at native speed, polling, no interrupts)
counts and times frames with the TSC, so boot time is excluded:

* guest -> host: ``nettx`` sends N broadcast frames through a host TAP; an
  AF_PACKET socket on the TAP (drained after the run, so it takes no CPU
  while the VMM works) counts what arrived. Time: first post to last
  completion, so it is the VMM's rate of moving frames into the TAP.
* host -> guest: the host queues N frames on the TAP (txqueuelen raised)
  while the probe waits, then tells it to post its 256 RX buffers; time:
  posting to the last frame, so it is the VMM's rate of draining the TAP,
  with no sender competing for the host's CPUs.

Frames of 1514 bytes (MiB/s) and 60 bytes (packets/s). Needs root (TAP).
Prints a table (medians of ``--repeat`` runs) and writes JSON
(``--json``, default bench/results/virtio_net.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from probe_vm import (
    GuestRun,
    HostTap,
    command,
    count_probe_frames,
    fields,
    median_of,
    print_table,
    probe_frame,
    run,
    tsc_line,
    vmms,
)
from report import write_report

from pyvmm.guestkit.probe import build_probe

TAP = "pvbench0"
SIZES = (1514, 60)


def rows() -> list[tuple[str, str]]:
    out = []
    for direction, label in (("tx", "guest->host"), ("rx", "host->guest")):
        for size in SIZES:
            out.append((f"{direction}_{size}_pps", f"{label} {size} B (packets/s)"))
            out.append((f"{direction}_{size}_mibs", f"{label} {size} B (MiB/s)"))
    return out


def _rates(line: str) -> tuple[float, float, float]:
    found = fields(line)
    seconds = found["us"] / 1e6
    frames = found["of"] if line.startswith("netrx") else found["frames"]
    return frames, frames / seconds, found["bytes"] / (1 << 20) / seconds


def measure_tx(vmm: str, probe: Path, frames: int, size: int) -> dict[str, float]:
    with HostTap(TAP) as tap:
        sock = tap.socket()
        lines = run(vmm, probe, f"tsc len={size} nettx={frames}", tap=tap.name)
        delivered = count_probe_frames(sock)
        sock.close()
    line = next(line for line in lines if line.startswith("nettx: "))
    sent, pps, mibs = _rates(line)
    return {"pps": pps, "mibs": mibs, "delivered": delivered / sent, "tsc": tsc_line(lines)}


def measure_rx(vmm: str, probe: Path, frames: int, size: int) -> dict[str, float]:
    with HostTap(TAP, txqueuelen=frames + 1024) as tap:
        sock = tap.socket()
        guest = GuestRun(vmm, command(vmm, probe, f"netrx={frames}", tap=tap.name)).start()
        try:
            guest.read_until("netrx: ready")
            tap.wait_up()
            base = probe_frame(0, size)
            for seq in range(frames):
                sock.send(base[:18] + seq.to_bytes(4, "little") + base[22:])
            dropped = tap.stat("tx_dropped")
            if dropped:
                raise RuntimeError(f"{vmm}: the TAP dropped {dropped} frames while queueing")
            lines = guest.finish(b"go\n")
        finally:
            if guest.proc is not None and guest.proc.poll() is None:
                guest.proc.kill()
            sock.close()
    line = next(line for line in lines if line.startswith("netrx: ") and " of " in line)
    got, pps, mibs = _rates(line)
    return {"pps": pps, "mibs": mibs, "delivered": got / frames}


def measure(vmm: str, probe: Path, frames: int) -> dict[str, float]:
    result: dict[str, float] = {}
    for size in SIZES:
        for direction, fn in (("tx", measure_tx), ("rx", measure_rx)):
            sample = fn(vmm, probe, frames, size)
            result[f"{direction}_{size}_pps"] = sample["pps"]
            result[f"{direction}_{size}_mibs"] = sample["mibs"]
            result[f"{direction}_{size}_delivered"] = sample["delivered"]
            if "tsc" in sample:
                result["tsc"] = sample["tsc"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000, help="frames per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/virtio_net.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it creates TAP devices")

    probe = build_probe()
    start = time.monotonic()
    names = vmms()
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # interleaved, so drift hits both alike
            samples[name].append(measure(name, probe, args.frames))

    results = {}
    for name in names:
        numeric = [{k: v for k, v in s.items() if k != "tsc"} for s in samples[name]]
        results[name] = median_of(numeric)
        results[name]["tsc"] = samples[name][0]["tsc"]
        print(f"{name}: {results[name]['tsc']}")
        lossy = {k: v for k, v in results[name].items() if k.endswith("_delivered") and v < 1}
        if lossy:
            print(f"{name}: not every frame arrived: {lossy}")
    print_table(
        f"virtio-net, {args.frames} frames per run, medians of {args.repeat} (guest-timed)",
        rows(),
        results,
    )
    print(f"\ntotal {time.monotonic() - start:.0f} s")
    write_report(
        args.json,
        "virtio_net",
        results,
        units={key: label.rsplit("(", 1)[1].rstrip(")") for key, label in rows()},
        frames=args.frames,
        repeat=args.repeat,
        tap=f"{TAP}, AF_PACKET reader/sender; netrx frames queued before the guest starts",
        samples=samples,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
