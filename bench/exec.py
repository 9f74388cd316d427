#!/usr/bin/env python3
"""Sandboxes: how fast a fresh one is, how many fit, and QEMU microvm beside it.

Two levels, as the machine allows (ENVIRONMENT.md):

``--level probe`` (this host's /dev/kvm, the CPL3 probe guest; no agent, "ready" is
its console line): the restore machinery alone.

* ``template``: boot the probe, snapshot it into the cache (what a first sandbox pays);
* ``restore``: one clone restored and running (in-process; and jailed, as root);
* ``fork``: N clones restored at once (threads), clones per second;
* ``memory``: host memory per running clone (process RSS growth / N; PSS of each
  jailed VMM process).

``--level linux`` (a real Linux guest: run in a nested host on a PVM machine, as the
e2e tests are; ``--inside`` is that inner run):

* ``pyvmm exec -- true`` wall time, as a user runs it (a new process each time):
  with ``--fresh-boot`` (cold boot), and from the snapshot (unconfined, and confined
  the default way);
* library: ``Sandbox()`` from the snapshot, time to the first byte of a command's
  output, ``exec(["true"])``, ``fork(N)`` (sandboxes per second), memory per
  sandbox, ``SandboxPool.acquire()``;
* QEMU microvm booting the same kernel and initramfs to run ``true`` and power off
  (QEMU has no agent transport here: L1 has no vhost-vsock module; the comparison
  is the cold path, boot + command).

The machine is shared: the load average and the busiest other processes are recorded
with the results. Prints a table; writes JSON under bench/results/ (``--json``).
``--quick`` runs each measurement once or twice (CI-sized).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parents[1]
EXEC = [sys.executable, "-m", "pyvmm.cli_exec"]
MARKER = "EXEC-BENCH "


def load() -> dict[str, object]:
    """Load average and the three busiest other processes (the machine is shared)."""
    top = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True, text=True, check=False,
    ).stdout.splitlines()[:3]  # fmt: skip
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "top": [t.strip() for t in top]}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else float("nan")


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


# --- probe level -----------------------------------------------------------------------------


def probe_level(rounds: int, clones: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from pyvmm.guestkit.probe import build_probe
    from pyvmm.sandbox.runners import InProcessRunner
    from tests.kvm.test_sandbox_clones import (  # the same machinery the KVM tests check
        close_all,
        probe_entry,
        probe_spec,
        restore_clones,
        wait_counter,
    )

    probe = build_probe()
    results: dict[str, object] = {}
    runners = [("in-process", InProcessRunner())]
    if os.geteuid() == 0:
        from pyvmm.sandbox.jailed import JailedRunner

        runners.append(("jailed", None))  # made per spec below
    for name, runner in runners:
        with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
            spec = probe_spec(probe, Path(tmp))
            if runner is None:
                runner = JailedRunner(spec.config)
            started = time.perf_counter()
            entry, _ = probe_entry(spec, runner, Path(tmp) / "cache")
            template = time.perf_counter() - started
            singles = []
            for _ in range(rounds):
                started = time.perf_counter()
                (clone,) = restore_clones(entry, runner, 1)
                wait_counter(clone[0], above=2)
                singles.append(time.perf_counter() - started)
                close_all([clone])
            before = rss_kib()
            started = time.perf_counter()
            many = restore_clones(entry, runner, clones)
            for clone in many:
                wait_counter(clone[0], above=2)
            fork = time.perf_counter() - started
            if name == "jailed":
                memory = median([pss_kib(c[0].pid) for c in many])  # type: ignore[attr-defined]
            else:
                memory = (rss_kib() - before) / clones
            close_all(many)
        results[name] = {
            "template_s": round(template, 4),
            "restore_to_running_s": median(singles),
            f"fork{clones}_s": round(fork, 4),
            "clones_per_s": round(clones / fork, 1),
            "memory_per_clone_kib": round(memory),
        }
    return results


# --- linux level -----------------------------------------------------------------------------


def timed_exec(args: list[str], cache: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([*EXEC, "--cache-dir", cache, *args], capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"pyvmm exec {args} failed: {proc.stderr.decode()[-2000:]}")
    return seconds


def linux_inside(rounds: int, clones: int) -> dict[str, object]:
    """The Linux measurements, where Linux guests boot (see the module docstring)."""
    from pyvmm.sandbox import Sandbox, SandboxPool

    cache = tempfile.mkdtemp(prefix="bench-exec-cache-")
    results: dict[str, object] = {"load_before": load()}
    cold = [timed_exec(["--fresh-boot", "--no-confine", "--", "true"], cache)
            for _ in range(rounds)]  # fmt: skip
    first = timed_exec(["--no-confine", "--", "true"], cache)  # builds the snapshot
    warm = [timed_exec(["--no-confine", "--", "true"], cache) for _ in range(rounds)]
    confined = [timed_exec(["--", "true"], cache) for _ in range(rounds + 1)][1:]
    results["pyvmm_exec_true_s"] = {
        "fresh_boot": median(cold), "first_from_empty_cache": round(first, 3),
        "snapshot": median(warm), "snapshot_confined": median(confined),
    }  # fmt: skip
    creates, first_bytes, trues = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        box = Sandbox(cache_dir=cache, confine=False)
        creates.append(time.perf_counter() - started)
        seen: list[float] = []
        started = time.perf_counter()

        def first_byte(data: bytes, seen: list[float] = seen, started: float = started) -> None:
            seen.append(time.perf_counter() - started)

        box.exec(["echo", "x"], on_stdout=first_byte)
        first_bytes.append(seen[0])
        started = time.perf_counter()
        box.exec(["true"])
        trues.append(time.perf_counter() - started)
        if len(creates) == rounds:
            before = rss_kib()
            started = time.perf_counter()
            forks = box.fork(clones)
            fork = time.perf_counter() - started
            per_sandbox = (rss_kib() - before) / clones
            for clone in forks:
                clone.close()
        box.close()
    with SandboxPool(2, cache_dir=cache, confine=False) as pool:
        pool.wait_ready(timeout=900)
        acquires = []
        for _ in range(2):
            started = time.perf_counter()
            box = pool.acquire(timeout=900)
            acquires.append(time.perf_counter() - started)
            box.close()
    results["library"] = {
        "sandbox_from_snapshot_s": median(creates), "first_byte_s": median(first_bytes),
        "exec_true_s": median(trues), f"fork{clones}_s": round(fork, 3),
        "sandboxes_per_s": round(clones / fork, 2), "memory_per_sandbox_kib": round(per_sandbox),
        "pool_acquire_s": median(acquires),
    }  # fmt: skip
    results["qemu_microvm_true_s"] = qemu_true(rounds)
    results["load_after"] = load()
    return results


def qemu_true(rounds: int) -> float | str:
    """QEMU microvm boots the same guest, runs `true` through the init, powers off."""
    import shutil

    from pyvmm.sandbox.guest import command_arg, default_guest

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not os.access("/dev/kvm", os.W_OK):
        return "not measured: no qemu-system-x86_64 or /dev/kvm"
    kernel, initrd = default_guest()
    cmdline = f"console=ttyS0 reboot=t panic=-1 loglevel=3 {command_arg('true')}"
    argv = [qemu, "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-m", "256", "-smp",
            "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel",
            str(kernel), "-initrd", str(initrd), "-append", cmdline, "-no-reboot"]  # fmt: skip
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, timeout=900, check=False)
        times.append(time.perf_counter() - started)
        if b"PYVMM-CMD-EXIT=0" not in proc.stdout:
            return f"not measured: QEMU's guest did not run the command ({proc.stdout[-300:]!r})"
    return median(times)


def linux_level(rounds: int, clones: int, quick: bool) -> dict[str, object]:
    """Run :func:`linux_inside` where Linux boots: here, or in a nested host."""
    sys.path.insert(0, str(ROOT))
    from pyvmm.sandbox.guest import default_guest
    from tests.support.nested_fixture import linux_host_mode

    default_guest()  # built here: a nested host sees the guest kit's cache read-only
    argv = [sys.executable, __file__, "--level", "linux", "--inside", "--rounds", str(rounds),
            "--clones", str(clones)] + (["--quick"] if quick else [])  # fmt: skip
    if linux_host_mode() == "direct":
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        stdout, stderr = proc.stdout, proc.stderr
    else:
        from pyvmm.nested.host import NestedHost

        with NestedHost(cwd=ROOT) as host:
            result = host.run(argv, 3600)
            stdout, stderr = result.stdout, result.stderr
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise SystemExit(f"the Linux measurements failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return {"where": linux_host_mode(), **json.loads(lines[-1][len(MARKER) :])}


def table(results: dict[str, object], prefix: str = "") -> None:
    for key, value in results.items():
        if isinstance(value, dict) and key not in ("load_before", "load_after"):
            table(value, f"{prefix}{key}.")
        else:
            print(f"  {prefix + key:<52} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=["probe", "linux", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="one or two rounds (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clones", type=int, default=8)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    if args.inside:
        print(MARKER + json.dumps(linux_inside(rounds, args.clones)), flush=True)
        return 0
    results: dict[str, object] = {"load_before": load()}
    if args.level in ("probe", "all"):
        results["probe"] = probe_level(rounds, args.clones)
    if args.level in ("linux", "all"):
        results["linux"] = linux_level(rounds, args.clones, args.quick)
    results["load_after"] = load()
    print("pyvmm sandboxes (seconds unless named)")
    table(results)
    name = "exec-quick.json" if args.quick else "exec.json"
    write_report(args.json or ROOT / "bench" / "results" / name, "exec", results,
                 rounds=rounds, clones=args.clones)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
