#!/usr/bin/env python3
"""Start-up, memory and density: pyvmm vs QEMU ``-M microvm``, side by side in one run.

Figures (medians; each pyvmm run is paired with a QEMU run right after it):

* ``cold_start``: spawn -> a 20-instruction PVH guest (``bench/guest/tiny.S``)
  prints 4 bytes and ends its VMM -> process exit: wall time and peak RSS
  (the kernel's accounting of the finished process, ``wait4``, taken by a
  tiny C launcher: a process spawned from this Python process would start
  with this process's RSS as its peak, since exec keeps the largest RSS the
  task had, and even ``/bin/true`` would show ~20 MiB); also through
  the fork server (``pyvmm forkserver``, already up; ``PYVMM_FORKSERVER`` set):
  the client's spawn -> exit, and the client's own peak RSS;
* ``api``: spawn -> the API socket exists, and -> it answers (``GET /`` for
  ``pyvmm-firecracker``, the QMP greeting for QEMU), next to the floor: a bare
  ``python -c`` from the same interpreter that binds and listens on a Unix socket;
* ``instance_start``: the start request (``PUT /actions InstanceStart``, QMP
  ``cont``) -> the guest's first console byte (the tiny guest, halting);
* ``idle_pss``: one idle VM (the tiny guest, halted, 64 MiB), proportional set
  size of the VMM process, and that minus the guest RAM it touched;
* ``density``: N idle VMs (10, 30, 60; ``--quick``: 10) as N processes of each
  VMM, as N ``MicroVM`` objects in one pyvmm process, and as N ``pyvmm run``
  through the fork server: VMs started per second, total PSS and PSS per
  (extra) VM; for the fork server, the VM processes plus the server's PSS
  counted once, and apart from that the N waiting clients' PSS.

Run from the repository root: ``python3 bench/startup.py [--quick]``; prints a
table and writes ``bench/results/startup.json``. Needs /dev/kvm, gcc and
QEMU (without QEMU only pyvmm's column is filled). Start-up figures need
``.pyc`` files: run it once before quoting it (with ``PYTHONDONTWRITEBYTECODE``
set, as in this project's development environment, every start compiles).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import Http, Qmp, _wait_output, _wait_socket
from bench.report import write_report

QEMU = "qemu-system-x86_64"
QEMU_BASE = [
    QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64",
    "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
]  # fmt: skip
GUEST_SOURCE = Path(__file__).resolve().parent / "guest"
MEM_MIB = 64
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the guest -------------------------------------------------------------------------


def build_tiny(work: Path, stay: bool) -> Path:
    """The tiny PVH guest, built with gcc (``stay``: it halts instead of ending the VMM)."""
    out = work / ("tiny-idle.elf" if stay else "tiny.elf")
    command = [
        "gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
        f"-Wl,-T,{GUEST_SOURCE / 'tiny.ld'}", "-o", str(out), str(GUEST_SOURCE / "tiny.S"),
    ]  # fmt: skip
    if stay:
        command.insert(1, "-DSTAY")
    subprocess.run(command, check=True)
    return out


# --- processes -------------------------------------------------------------------------


def entry_point(name: str) -> list[str]:
    """The installed command ``name`` next to this interpreter (what users run), else -c."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module = "pyvmm.cli" if name == "pyvmm" else "pyvmm.firecracker_cli"
    return [sys.executable, "-c", f"from {module} import main; main()"]


def pyvmm_run(kernel: Path) -> list[str]:
    return [*entry_point("pyvmm"), "run", "--kernel", str(kernel), "--memory", str(MEM_MIB)]


#: Forks, execs its arguments, waits, and writes "<wait status> <peak RSS KiB>" to fd argv[1].
PEAK_RSS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int out = atoi(argv[1]), status;
    struct rusage usage;
    pid_t pid = fork();
    if (pid == 0) { close(out); execvp(argv[2], argv + 2); _exit(127); }
    if (pid < 0 || wait4(pid, &status, 0, &usage) < 0) return 1;
    dprintf(out, "%d %ld\n", status, usage.ru_maxrss);
    return 0;
}
"""


def build_peak_launcher(work: Path) -> Path:
    source, binary = work / "peak.c", work / "peak"
    source.write_text(PEAK_RSS_C)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def run_to_exit(
    launcher: Path, argv: list[str], env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a process run to its end (see ``cold_start``)."""
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(launcher), str(write_end), *argv], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, pass_fds=(write_end,),
    )  # fmt: skip
    os.close(write_end)
    process.wait()
    wall = time.perf_counter() - start
    with os.fdopen(read_end) as report:
        status, peak_kib = (int(word) for word in report.read().split())
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 99):  # 99: QEMU's isa-debug-exit with the guest's 0x31
        raise RuntimeError(f"{argv[0]} exited with {code}")
    return wall, peak_kib / 1024


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def guest_ram_rss_kib(pid: int, mem_mib: int) -> int:
    """Resident pages of the guest-RAM mapping(s) of ``pid`` (mappings of exactly its size)."""
    total, size, in_ram = 0, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:
            lo, hi = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
            size = (hi - lo) // 1024
            in_ram = size == mem_mib * 1024
        elif in_ram and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (the fork server's VM processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@contextmanager
def fork_server(work: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A ``pyvmm forkserver`` for the run; its pid and the environment that uses it."""
    path, log = work / "forkserver.sock", work / "forkserver.log"
    process = subprocess.Popen(
        [*entry_point("pyvmm"), "forkserver", "--socket", str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        wait_for(lambda: b"listening on" in log.read_bytes(), timeout=120, step=0.01)
        yield process.pid, {**os.environ, "PYVMM_FORKSERVER": str(path)}
    finally:
        process.terminate()
        process.wait(60)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.0002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(step)


# --- figures ------------------------------------------------------------------------------


def cold_start(
    tiny: Path, rounds: int, server_env: dict[str, str], launcher: Path
) -> dict[str, dict[str, float]]:
    pyvmm = pyvmm_run(tiny)
    qemu = [*QEMU_BASE, "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(tiny)]
    runs: dict[str, list[tuple[float, float]]] = {"pyvmm": [], "pyvmm_forkserver": [], "qemu": []}
    run_to_exit(launcher, pyvmm)  # warm-up: page cache, .pyc files
    run_to_exit(launcher, pyvmm, server_env)
    for _ in range(rounds):
        runs["pyvmm"].append(run_to_exit(launcher, pyvmm))
        runs["pyvmm_forkserver"].append(run_to_exit(launcher, pyvmm, server_env))
        if shutil.which(QEMU):
            runs["qemu"].append(run_to_exit(launcher, qemu))
    return {
        name: {
            "wall_ms": statistics.median(w for w, _ in samples) * 1e3,
            "peak_rss_mib": statistics.median(r for _, r in samples),
        }
        for name, samples in runs.items()
        if samples
    }


FLOOR = (
    "import socket,sys;s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen();"
    "c,_=s.accept();c.recv(64);c.sendall(b'x')"
)


def api_ready(tiny_idle: Path, rounds: int, work: Path) -> dict[str, dict[str, float]]:
    """Spawn -> socket file, and -> first answer; for the floor, pyvmm and QEMU."""

    def measure(argv: list[str], path: Path, ask: Callable[[socket.socket], object]) -> tuple:
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(path.exists)
            present = time.perf_counter() - start
            sock = _wait_socket(path, process)
            ask(sock)
            answered = time.perf_counter() - start
            sock.close()
        finally:
            process.terminate()
            process.wait(20)
        return present, answered

    def hello(sock: socket.socket) -> None:
        sock.sendall(b"?")
        sock.recv(1)

    sock_path = work / "api.sock"
    pyvmm = [*entry_point("pyvmm-firecracker"), "--api-sock", str(sock_path)]
    qemu = [*QEMU_BASE, "-S", "-qmp", f"unix:{sock_path},server=on,wait=off",
            "-kernel", str(tiny_idle)]  # fmt: skip
    kinds: dict[str, tuple[list[str], Callable[[socket.socket], object]]] = {
        "floor": ([sys.executable, "-c", FLOOR, str(sock_path)], hello),
        "pyvmm": (pyvmm, lambda sock: Http(sock).call("GET", "/")),
    }
    if shutil.which(QEMU):
        kinds["qemu"] = (qemu, Qmp)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    for argv, ask in kinds.values():
        measure(argv, sock_path, ask)  # warm-up
    for _ in range(rounds):
        for name, (argv, ask) in kinds.items():
            samples[name].append(measure(argv, sock_path, ask))
    return {
        name: {
            "socket_present_ms": statistics.median(p for p, _ in values) * 1e3,
            "answers_ms": statistics.median(a for _, a in values) * 1e3,
        }
        for name, values in samples.items()
    }


def instance_start(tiny_idle: Path, rounds: int, work: Path) -> dict[str, dict[str, float]]:
    """Start request -> the guest's first byte on the console (VMM already up and configured)."""
    out, sock_path = work / "serial.out", work / "api.sock"

    def pyvmm_round() -> float:
        sock_path.unlink(missing_ok=True)
        process = subprocess.Popen(
            [*entry_point("pyvmm-firecracker"), "--api-sock", str(sock_path)],
            stdin=subprocess.DEVNULL, stdout=out.open("wb"), stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            http = Http(_wait_socket(sock_path, process))
            http.call("PUT", "/boot-source", {"kernel_image_path": str(tiny_idle)})
            http.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB})
            time.sleep(0.5)  # the VM machinery is imported in the background meanwhile
            start = time.perf_counter()
            http.call("PUT", "/actions", {"action_type": "InstanceStart"})
            _wait_output(out, b"p")
            return time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(20)

    def qemu_round() -> float:
        sock_path.unlink(missing_ok=True)
        process = subprocess.Popen(
            [*QEMU_BASE, "-S", "-qmp", f"unix:{sock_path},server=on,wait=off",
             "-serial", f"file:{out}", "-kernel", str(tiny_idle)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            qmp = Qmp(_wait_socket(sock_path, process))
            time.sleep(0.5)
            start = time.perf_counter()
            qmp.call("cont")
            _wait_output(out, b"p")
            return time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(20)

    runners = {"pyvmm": pyvmm_round}
    if shutil.which(QEMU):
        runners["qemu"] = qemu_round
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].append(runner())
    return {
        name: {"start_to_first_output_ms": statistics.median(v) * 1e3}
        for name, v in samples.items()
    }


def spawn_idle(argv: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=out.open("wb"), stderr=subprocess.DEVNULL, env=env
    )
    wait_for(lambda: out.exists() and b"pyvm" in out.read_bytes(), step=0.002)
    return process


def idle_pss(tiny_idle: Path, work: Path) -> dict[str, dict[str, float]]:
    argvs = {"pyvmm": pyvmm_run(tiny_idle)}
    if shutil.which(QEMU):
        argvs["qemu"] = [*QEMU_BASE, "-serial", "stdio", "-kernel", str(tiny_idle)]
    results = {}
    for name, argv in argvs.items():
        process = spawn_idle(argv, work / f"{name}.out")
        try:
            time.sleep(0.3)
            pss = pss_kib(process.pid)
            guest = guest_ram_rss_kib(process.pid, MEM_MIB)
        finally:
            process.terminate()
            process.wait(20)
        results[name] = {"pss_mib": pss / 1024, "vmm_overhead_mib": (pss - guest) / 1024}
    return results


IN_PROCESS = """
import sys, time
from pyvmm import MicroVM
kernel, count, mem = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vms, start = [], time.perf_counter()
for _ in range(count):
    vm = MicroVM(kernel=kernel, memory=mem, cmdline="")
    vm.start()
    vm.console.wait_for(b"pyvm", timeout=60)
    vms.append(vm)
print(f"started {time.perf_counter() - start:.6f}", flush=True)
sys.stdin.read()
"""


def density(
    tiny_idle: Path, counts: list[int], work: Path, server: tuple[int, dict[str, str]]
) -> dict[str, dict[str, dict]]:
    """N idle VMs at once: as N processes of each VMM, as N MicroVMs in one process, and
    through the fork server."""
    results: dict[str, dict[str, dict]] = {}
    commands = {"pyvmm": pyvmm_run(tiny_idle)}
    if shutil.which(QEMU):
        commands["qemu"] = [*QEMU_BASE, "-serial", "stdio", "-kernel", str(tiny_idle)]
    for count in counts:
        row: dict[str, dict] = {}
        for name, argv in commands.items():
            processes = []
            start = time.perf_counter()
            try:
                for index in range(count):
                    processes.append(spawn_idle(argv, work / f"{name}-{index}.out"))
                elapsed = time.perf_counter() - start
                pss = sum(pss_kib(p.pid) for p in processes) / 1024
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(30)
            row[f"{name}_processes"] = {
                "vms_per_s": count / elapsed,
                "total_pss_mib": pss,
                "pss_per_vm_mib": pss / count,
            }
        row["pyvmm_one_process"] = one_process(tiny_idle, count)
        row["pyvmm_forkserver"] = through_fork_server(tiny_idle, count, work, server)
        results[str(count)] = row
    return results


def through_fork_server(
    tiny_idle: Path, count: int, work: Path, server: tuple[int, dict[str, str]]
) -> dict[str, float]:
    """``count`` ``pyvmm run`` clients of the fork server: start rate; the VM processes'
    PSS plus the server's (once), per VM; and the waiting clients' PSS, per VM."""
    server_pid, env = server
    clients = []
    start = time.perf_counter()
    try:
        for index in range(count):
            clients.append(spawn_idle(pyvmm_run(tiny_idle), work / f"fs-{index}.out", env))
        elapsed = time.perf_counter() - start
        vms = children_of(server_pid)
        if len(vms) != count:
            raise RuntimeError(f"the fork server runs {len(vms)} VM processes, not {count}")
        vm_pss = (sum(pss_kib(pid) for pid in vms) + pss_kib(server_pid)) / 1024
        client_pss = sum(pss_kib(p.pid) for p in clients) / 1024
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            client.wait(30)
    return {
        "vms_per_s": count / elapsed,
        "total_pss_mib": vm_pss,
        "pss_per_vm_mib": vm_pss / count,
        "client_pss_per_vm_mib": client_pss / count,
    }


def one_process(tiny_idle: Path, count: int) -> dict[str, float]:
    """``count`` MicroVMs in one interpreter: start rate, PSS, and PSS per extra VM."""
    first = _microvms(tiny_idle, 1)
    many = _microvms(tiny_idle, count)
    per_extra = (many["pss_mib"] - first["pss_mib"]) / (count - 1) if count > 1 else 0.0
    return {
        "vms_per_s": count / many["seconds"],
        "total_pss_mib": many["pss_mib"],
        "pss_per_extra_vm_mib": per_extra,
    }


def _microvms(tiny_idle: Path, count: int) -> dict[str, float]:
    process = subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS, str(tiny_idle), str(count), str(MEM_MIB)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        if not line.startswith("started"):
            raise RuntimeError(f"the MicroVM process said {line!r}")
        time.sleep(0.3)
        return {"seconds": float(line.split()[1]), "pss_mib": pss_kib(process.pid) / 1024}
    finally:
        process.stdin.close()
        process.wait(60)


# --- report ---------------------------------------------------------------------------


def print_table(results: dict) -> None:
    def row(label: str, ours: float | None, theirs: float | None) -> None:
        ratio = f"{ours / theirs:8.2f}" if ours and theirs else f"{'':>8}"
        mine = f"{ours:10.1f}" if ours is not None else f"{'-':>10}"
        qemu = f"{theirs:10.1f}" if theirs is not None else f"{'-':>10}"
        print(f"{label:<48}{mine}{qemu}{ratio}")

    print(f"{'figure':<48}{'pyvmm':>10}{'qemu':>10}{'ratio':>8}")
    cold = results["cold_start"]
    for key, label in (("wall_ms", "tiny guest spawn -> exit (ms)"),
                       ("peak_rss_mib", "tiny guest peak RSS (MiB)")):  # fmt: skip
        row(label, cold["pyvmm"][key], cold.get("qemu", {}).get(key))
    served = cold["pyvmm_forkserver"]
    row("  through the fork server: spawn -> exit (ms)", served["wall_ms"],
        cold.get("qemu", {}).get("wall_ms"))  # fmt: skip
    row("  through the fork server: client peak RSS (MiB)", served["peak_rss_mib"], None)
    api = results["api"]
    floor = api["floor"]
    label = "  floor: python -c binding a Unix socket (ms)"
    print(f"{label:<48}{floor['socket_present_ms']:10.1f} / {floor['answers_ms']:.1f}")
    for key, label in (("socket_present_ms", "spawn -> API socket present (ms)"),
                       ("answers_ms", "spawn -> API answers (ms)")):  # fmt: skip
        row(label, api["pyvmm"][key], api.get("qemu", {}).get(key))
    start = results["instance_start"]
    row("InstanceStart/cont -> first output (ms)", start["pyvmm"]["start_to_first_output_ms"],
        start.get("qemu", {}).get("start_to_first_output_ms"))  # fmt: skip
    idle = results["idle_pss"]
    for key, label in (("pss_mib", "idle VM, PSS (MiB)"),
                       ("vmm_overhead_mib", "idle VM, PSS minus guest RAM (MiB)")):  # fmt: skip
        row(label, idle["pyvmm"][key], idle.get("qemu", {}).get(key))
    for count, row_data in results["density"].items():
        ours, theirs = row_data["pyvmm_processes"], row_data.get("qemu_processes", {})
        row(f"{count} VMs as processes: VMs started/s", ours["vms_per_s"], theirs.get("vms_per_s"))
        row(f"{count} VMs as processes: PSS per VM (MiB)", ours["pss_per_vm_mib"],
            theirs.get("pss_per_vm_mib"))  # fmt: skip
        inproc = row_data["pyvmm_one_process"]
        row(f"{count} MicroVMs in one process: VMs started/s", inproc["vms_per_s"], None)
        row(f"{count} MicroVMs in one process: MiB per extra VM",
            inproc["pss_per_extra_vm_mib"], None)  # fmt: skip
        served = row_data["pyvmm_forkserver"]
        row(f"{count} VMs through the fork server: VMs started/s", served["vms_per_s"],
            theirs.get("vms_per_s"))  # fmt: skip
        row(f"{count} VMs through the fork server: PSS per VM (MiB)", served["pss_per_vm_mib"],
            theirs.get("pss_per_vm_mib"))  # fmt: skip
        row("  + each waiting client's PSS (MiB)", served["client_pss_per_vm_mib"], None)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, 10 VMs (CI-sized)")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    counts = [10] if args.quick else [10, 30, 60]
    with tempfile.TemporaryDirectory(prefix="pyvmm-startup-") as tmp:
        work = Path(tmp)
        tiny, idle = build_tiny(work, stay=False), build_tiny(work, stay=True)
        with fork_server(work) as server:
            results = {
                "cold_start": cold_start(tiny, rounds, server[1], build_peak_launcher(work)),
                "api": api_ready(idle, rounds, work),
                "instance_start": instance_start(idle, rounds, work),
                "idle_pss": idle_pss(idle, work),
                "density": density(idle, counts, work, server),
            }
    print_table(results)
    write_report(
        Path(__file__).parent / "results" / "startup.json",
        "startup",
        results,
        rounds=rounds,
        guest_memory_mib=MEM_MIB,
        bytecode_cached=os.environ.get("PYTHONDONTWRITEBYTECODE") is None,
        load_average=os.getloadavg(),
    )


if __name__ == "__main__":
    main()
