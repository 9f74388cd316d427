#!/usr/bin/env python3
"""Cost of one port-I/O exit and one MMIO exit: pyvmm vs a bare loop vs QEMU.

The probe guest runs ``pioloop=N`` (N ``out`` to the UART scratch register)
and ``mmioloop=N`` (N 4-byte stores to the boot-timer window). Each VMM runs
the guest with a small and a large N; the time difference divided by the
difference in N is the cost of one exit round trip, with boot time and
process start-up cancelled out. Three VMMs on the same guest, same run:

* ``bare``: a Python loop on pyvmm's KVM bindings that only answers the
  UART status register: the floor a Python VMM cannot go below.
* ``pyvmm``: the full machine (vCPU thread, ``handle_exit``, buses, devices).
* ``qemu``: ``qemu-system-x86_64 -M microvm -enable-kvm`` (if installed).

Prints a table and writes JSON (``--json``, default bench/results/exit_cost.json).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_report

from pyvmm import layout
from pyvmm.boot.configure import setup_boot
from pyvmm.config import MachineConfig
from pyvmm.guestkit.probe import build_probe
from pyvmm.kvm import Kvm, exits
from pyvmm.memory import GuestMemory
from pyvmm.vmm.cpuid import resolve_template
from pyvmm.vmm.machine import Machine
from pyvmm.vmm.vcpu_setup import configure_vcpu, set_boot_state

MEM_SIZE = 64 << 20
LSR_OFFSET = 5
LSR_IDLE = 0x60  # THR empty, transmitter empty


def run_pyvmm(probe: Path, cmdline: str) -> float:
    config = MachineConfig(kernel=probe, cmdline=cmdline, mem_size=MEM_SIZE)
    output = bytearray()
    start = time.perf_counter()
    reason = Machine(config, serial_out=output.extend).run(timeout=300)
    elapsed = time.perf_counter() - start
    _check(reason.clean and b"PROBE RESULT: PASS" in output, "pyvmm", cmdline, output)
    return elapsed


def run_bare(probe: Path, cmdline: str) -> float:
    """Only KVM_RUN, decode, and the two answers the probe needs."""
    start = time.perf_counter()
    output = bytearray()
    with Kvm() as kvm, GuestMemory.with_size(MEM_SIZE) as memory:
        boot = setup_boot(memory, probe, None, cmdline, 1)
        vm = kvm.create_vm()
        vm.set_tss_address(layout.KVM_TSS_ADDR)
        vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        for slot, region in enumerate(memory):
            vm.set_user_memory_region(slot, region.guest_addr, region.mapping)
        vcpu = vm.create_vcpu(0)
        template = resolve_template("auto")
        configure_vcpu(vcpu, kvm.supported_cpuid(), set(kvm.msr_index_list()), 1, template)
        set_boot_state(vcpu, boot.cpu)
        run = vcpu.run
        com1_thr, com1_lsr = layout.COM1_PORT, layout.COM1_PORT + LSR_OFFSET
        while True:
            exit = run()
            if type(exit) is exits.IoOut:
                if exit.port == com1_thr:
                    output += exit.data
                elif exit.port == layout.I8042_COMMAND_PORT and exit.data[0] == 0xFE:
                    break
            elif type(exit) is exits.IoIn:
                exit.data[0] = LSR_IDLE if exit.port == com1_lsr else 0
            elif type(exit) is exits.MmioRead:
                exit.data[:] = bytes(len(exit.data))
            elif type(exit) is not exits.MmioWrite:
                raise RuntimeError(f"bare loop: unexpected exit {exit}")
        vcpu.close()
        vm.close()
    elapsed = time.perf_counter() - start
    _check(b"PROBE RESULT: PASS" in output, "bare", cmdline, output)
    return elapsed


def run_qemu(probe: Path, cmdline: str) -> float:
    command = [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
        "-cpu", "host,-arch-capabilities", "-m", "64", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-no-reboot", "-kernel", str(probe), "-append", cmdline,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, timeout=600, check=False
    )
    elapsed = time.perf_counter() - start
    _check(b"PROBE RESULT: PASS" in result.stdout, "qemu", cmdline, result.stdout + result.stderr)
    return elapsed


def _check(ok: bool, vmm: str, cmdline: str, output: bytes) -> None:
    if not ok:
        tail = bytes(output[-400:]).decode(errors="replace")
        raise RuntimeError(f"{vmm} failed to run the probe with {cmdline!r}: {tail}")


def per_exit_us(runner, probe: Path, program: str, small: int, large: int, repeat: int) -> float:
    """Median over ``repeat`` pairs of (t(large) - t(small)) / (large - small), in us."""
    costs = []
    for _ in range(repeat):
        t_small = runner(probe, f"{program}={small}")
        t_large = runner(probe, f"{program}={large}")
        costs.append((t_large - t_small) / (large - small) * 1e6)
    return statistics.median(costs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=100_000, help="exits in the large run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/exit_cost.json"))
    args = parser.parse_args()

    probe = build_probe()
    small, large = 1_000, 1_000 + args.exits
    runners = {"bare": run_bare, "pyvmm": run_pyvmm}
    if shutil.which("qemu-system-x86_64"):
        runners["qemu"] = run_qemu
    else:
        print("qemu-system-x86_64 not installed: QEMU column left out", file=sys.stderr)
    results: dict[str, dict[str, float]] = {}
    for name, runner in runners.items():
        results[name] = {
            program: per_exit_us(runner, probe, program, small, large, args.repeat)
            for program in ("pioloop", "mmioloop")
        }

    print(f"{'exit kind':<12}" + "".join(f"{name + ' (us)':>14}" for name in results), end="")
    print(f"{'pyvmm/bare':>12}" + (f"{'pyvmm/qemu':>12}" if "qemu" in results else ""))
    for program, label in (("pioloop", "port I/O"), ("mmioloop", "MMIO")):
        row = f"{label:<12}" + "".join(f"{results[n][program]:>14.2f}" for n in results)
        row += f"{results['pyvmm'][program] / results['bare'][program]:>12.2f}"
        if "qemu" in results:
            row += f"{results['pyvmm'][program] / results['qemu'][program]:>12.2f}"
        print(row)

    write_report(
        args.json,
        "exit_cost",
        results,
        unit="microseconds per exit round trip",
        exits_per_run=args.exits,
        repeat=args.repeat,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
