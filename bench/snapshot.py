#!/usr/bin/env python3
"""Snapshot create and restore-to-running latency for 128 MiB and 1 GiB probe guests.

The probe runs ``counter`` (a line every ~100 ms). For each guest size and
memory fill:

* ``create``: ``Machine.snapshot()`` of the paused guest (state + memory
  file, both fsynced and renamed into place);
* ``diff``: a diff snapshot after the guest ran ~0.3 s more (dirty-page
  tracking on);
* ``restore``: in a fresh process, ``Machine.restore(..., resume=True)``
  until it returns with the vCPUs running (imports excluded);
* ``first line``: from the start of that call to the guest's next counter
  line on the console (the guest visibly running again);
* ``process``: from spawning the restoring Python process to that line.

Fill ``probe`` is the probe's own memory (mostly untouched: the memory file
is sparse); ``full`` first writes a non-zero byte into every guest page from
the host, the worst case for a full snapshot. Restores map the memory file
copy-on-write, so their cost does not grow with the file. Snapshots go to
``--dir`` (default: a temporary directory on /tmp).

Prints a table and writes JSON (``--json``, default bench/results/snapshot.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report

from pyvmm.config import MachineConfig
from pyvmm.guestkit.probe import build_probe
from pyvmm.vmm.machine import Machine

SIZES = {"128 MiB": 128 << 20, "1 GiB": 1 << 30}
COUNTER = re.compile(rb"counter: (\d+)\r?\n")

CHILD = r"""
import json, re, sys, time
started = time.perf_counter()
from pyvmm.vmm.machine import Machine
out = bytearray()
t0 = time.perf_counter()
machine = Machine.restore(sys.argv[1], sys.argv[2], serial_out=out.extend, resume=True)
t1 = time.perf_counter()
while not re.search(rb"counter: \d+\r?\n", bytes(out)):
    time.sleep(0.0005)
t2 = time.perf_counter()
machine.close()
print(json.dumps({"restore": t1 - t0, "first_line": t2 - t0, "imports": t0 - started}))
"""


def wait_for(output: bytearray, pattern: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, bytes(output)):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {pattern!r} in the probe's output: {bytes(output)[-200:]!r}")
        time.sleep(0.005)


def one_round(probe: Path, mem_size: int, fill: bool, directory: Path) -> dict[str, float]:
    output = bytearray()
    config = MachineConfig(kernel=probe, cmdline="counter", mem_size=mem_size)
    machine = Machine(dataclasses.replace(config, track_dirty_pages=True), serial_out=output.extend)
    state, mem = directory / "vm.state", directory / "vm.mem"
    try:
        machine.start()
        wait_for(output, rb"counter: 1\r?\n")
        machine.pause()
        if fill:
            for region in machine.vmm.memory:
                for offset in range(0, region.size, 4096):
                    if region.mapping[offset + 4095] == 0:
                        region.mapping[offset + 4095] = 0xA5
        started = time.perf_counter()
        machine.snapshot(state, mem)
        create = time.perf_counter() - started
        machine.resume()
        time.sleep(0.3)
        machine.pause()
        started = time.perf_counter()
        machine.snapshot(directory / "diff.state", directory / "diff.mem", diff=True)
        diff = time.perf_counter() - started
    finally:
        machine.close()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(state), str(mem)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    process = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"restore failed: {result.stderr}")
    child = json.loads(result.stdout.splitlines()[-1])
    return {
        "create_s": create,
        "diff_s": diff,
        "restore_s": child["restore"],
        "first_line_s": child["first_line"],
        "process_s": process,
        "mem_file_allocated_mib": mem.stat().st_blocks * 512 / (1 << 20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where snapshots are written")
    parser.add_argument("--json", type=Path, default=Path("bench/results/snapshot.json"))
    args = parser.parse_args()
    probe = build_probe(Path(tempfile.gettempdir()) / "pyvmm-bench-cache")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size_name, size in SIZES.items():
            for fill in (False, True):
                rounds = [one_round(probe, size, fill, Path(tmp)) for _ in range(args.repeat)]
                key = f"{size_name}, {'full' if fill else 'probe'}"
                results[key] = {
                    name: statistics.median(r[name] for r in rounds) for name in rounds[0]
                }
    columns = [
        ("create_s", "create ms"),
        ("diff_s", "diff ms"),
        ("restore_s", "restore ms"),
        ("first_line_s", "1st line ms"),
        ("process_s", "process ms"),
    ]
    print(f"{'guest, fill':<18}" + "".join(f"{title:>13}" for _, title in columns) + "   file MiB")
    for key, row in results.items():
        cells = "".join(f"{row[name] * 1000:>13.1f}" for name, _ in columns)
        print(f"{key:<18}{cells}{row['mem_file_allocated_mib']:>11.1f}")
    write_report(
        args.json,
        "snapshot",
        results,
        repeat=args.repeat,
        unit="seconds (medians); mem_file_allocated_mib: disk blocks of the full memory file",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
