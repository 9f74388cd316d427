#!/usr/bin/env python3
"""virtio-blk throughput: pyvmm vs QEMU microvm, the same probe guest, same run.

The probe guest (guest/probe, CPL3 at native speed, polling, no interrupts)
drives the disk and times itself with the TSC, so boot time is excluded:

* sequential 64 KiB reads and writes (MiB/s) at queue depth 1 and 32;
* random 4 KiB reads (IOPS) at queue depth 1 and 32.

Reads are checked in the guest against a pattern image; the write image is
checked on the host afterwards. Both VMMs go through the host page cache
(pyvmm: buffered preadv/pwritev; QEMU: cache=writeback, aio=threads), and
the pattern image was just written, so reads come from the page cache.
Writes end with a flush (fdatasync), counted in the time.

Prints a table (medians of ``--repeat`` runs) and writes JSON
(``--json``, default bench/results/virtio_blk.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from probe_vm import (
    Drive,
    count_written_blocks,
    fields,
    filesystem_of,
    median_of,
    print_table,
    run,
    tsc_line,
    vmms,
    write_pattern_image,
)
from report import write_report

from pyvmm.guestkit.probe import build_probe

ROWS = [
    ("read_qd1_mibs", "seq read 64K qd1 (MiB/s)"),
    ("read_qd32_mibs", "seq read 64K qd32 (MiB/s)"),
    ("write_qd1_mibs", "seq write 64K qd1 (MiB/s)"),
    ("write_qd32_mibs", "seq write 64K qd32 (MiB/s)"),
    ("write_qd1_noflush_mibs", "seq write 64K qd1 no flush (MiB/s)"),
    ("write_qd32_noflush_mibs", "seq write 64K qd32 no flush (MiB/s)"),
    ("rand_qd1_iops", "rand read 4K qd1 (IOPS)"),
    ("rand_qd32_iops", "rand read 4K qd32 (IOPS)"),
]
# Each VM first runs a short warm-up of what it measures (not counted).
WARM_UP_MIB = 16


def _results(lines: list[str], name: str) -> list[dict[str, float]]:
    return [fields(line) for line in lines if line.startswith(f"{name}: ")]


def zero_image(path: Path, size: int) -> None:
    """Allocated zeros on disk (writes then overwrite, never fill holes)."""
    with path.open("wb") as f:
        chunk = bytes(4 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        os.fsync(f.fileno())


def measure(vmm: str, probe: Path, read_image: Path, write_image: Path, args) -> dict:
    """One read VM and one write VM; the figures of both."""
    reads = run(
        vmm,
        probe,
        f"tsc qd=32 blkread={WARM_UP_MIB} qd=1 blkread={args.read_mib} qd=32 "
        f"blkread={args.read_mib} qd=1 blkrand={args.random} qd=32 blkrand={args.random}",
        drives=(Drive(read_image, read_only=True),),
        qemu_cache=args.qemu_cache,
    )
    writes = run(
        vmm,
        probe,
        f"qd=32 blkwrite={WARM_UP_MIB} qd=1 blkwrite={args.write_mib} "
        f"qd=32 blkwrite={args.write_mib}",
        drives=(Drive(write_image),),
        qemu_cache=args.qemu_cache,
    )
    seq = _results(reads, "blkread")[1:]
    rand = _results(reads, "blkrand")
    wr = _results(writes, "blkwrite")[1:]
    # "..., 312654 us (flush 162133 us), ...": fields() keeps the first "us".
    flush_us = [float(line.split("(flush ")[1].split()[0]) for line in writes if "(flush " in line]
    flush_us = flush_us[1:]

    def mibs(r: dict[str, float], minus_us: float = 0.0) -> float:
        return r["bytes"] / (1 << 20) / ((r["us"] - minus_us) / 1e6)

    def iops(r: dict[str, float]) -> float:
        return r["requests"] / (r["us"] / 1e6)

    return {
        "read_qd1_mibs": mibs(seq[0]),
        "read_qd32_mibs": mibs(seq[1]),
        "write_qd1_mibs": mibs(wr[0]),
        "write_qd32_mibs": mibs(wr[1]),
        "write_qd1_noflush_mibs": mibs(wr[0], flush_us[0]),
        "write_qd32_noflush_mibs": mibs(wr[1], flush_us[1]),
        "write_qd1_flush_us": flush_us[0],
        "write_qd32_flush_us": flush_us[1],
        "rand_qd1_iops": iops(rand[0]),
        "rand_qd32_iops": iops(rand[1]),
        "read_qd32_kicks": seq[1]["kicks"],
        "rand_qd32_kicks": rand[1]["kicks"],
        "tsc": tsc_line(reads),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the images go")
    parser.add_argument("--image-mib", type=int, default=256)
    parser.add_argument("--read-mib", type=int, default=256, help="per sequential read run")
    parser.add_argument("--write-mib", type=int, default=128, help="per sequential write run")
    parser.add_argument("--random", type=int, default=20000, help="4 KiB reads per random run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--qemu-cache", default="writeback", choices=["writeback", "none"])
    parser.add_argument("--json", type=Path, default=Path("bench/results/virtio_blk.json"))
    args = parser.parse_args()
    if args.write_mib > args.image_mib:
        parser.error("--write-mib must not exceed --image-mib")

    probe = build_probe()
    args.dir.mkdir(parents=True, exist_ok=True)
    read_image = args.dir / "pyvmm-bench-read.img"
    write_image = args.dir / "pyvmm-bench-write.img"
    fs = filesystem_of(args.dir)
    print(f"images: {read_image}, {write_image} ({args.image_mib} MiB each, on {fs})")
    start = time.monotonic()
    write_pattern_image(read_image, args.image_mib << 20)
    zero_image(write_image, args.image_mib << 20)

    names = vmms()
    samples: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for _ in range(args.repeat):
            for name in names:  # interleaved, so drift hits both alike
                samples[name].append(measure(name, probe, read_image, write_image, args))
                blocks = args.write_mib << 20 >> 12
                good = count_written_blocks(write_image, blocks)
                if good != blocks:
                    raise RuntimeError(f"{name}: only {good} of {blocks} written blocks are right")
                zero_image(write_image, args.image_mib << 20)
    finally:
        read_image.unlink(missing_ok=True)
        write_image.unlink(missing_ok=True)

    results = {}
    for name in names:
        numeric = [{k: v for k, v in s.items() if k != "tsc"} for s in samples[name]]
        results[name] = median_of(numeric)
        results[name]["tsc"] = samples[name][0]["tsc"]
        print(f"{name}: {results[name]['tsc']}")
    print_table(
        f"virtio-blk, medians of {args.repeat} (guest-timed; page cache; {fs} image)",
        ROWS,
        results,
    )
    print(f"\ntotal {time.monotonic() - start:.0f} s")
    write_report(
        args.json,
        "virtio_blk",
        results,
        units={key: label.rsplit("(", 1)[1].rstrip(")") for key, label in ROWS},
        image=f"{args.dir} ({fs}), {args.image_mib} MiB",
        read_mib=args.read_mib,
        write_mib=args.write_mib,
        random_reads=args.random,
        repeat=args.repeat,
        qemu_drive=f"cache={args.qemu_cache},aio=threads",
        samples=samples,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
