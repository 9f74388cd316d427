"""Sandbox machinery on the host's /dev/kvm with the probe guest: the snapshot cache, clones
of one snapshot restored at once (own CIDs, sockets, disks, VM generation ids), seccomp on
an in-process clone, and jailed clones (uid, cgroup limits) driven over the API.

The probe has no agent (it is a CPL3 test kernel, see guest/probe): "ready" here is its
``counter`` line on the console, where a Linux guest's is its agent's answer. The
agent-side steps run in tests/e2e/test_sandbox.py on a real Linux guest.
These tests print the probe-level numbers the sandbox benchmark reports (restore and fork
times on this host).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import pytest

from pyvmm.config import MachineConfig
from pyvmm.sandbox.cache import SnapshotCache
from pyvmm.sandbox.config import sandbox_config
from pyvmm.sandbox.identity import Identity, new_identity
from pyvmm.sandbox.launch import clone_drives
from pyvmm.sandbox.runners import InProcessRunner, Runner, seccomp_setup
from pyvmm.sandbox.template import GuestSpec, build_template
from pyvmm.sandbox.vm import SandboxVm
from pyvmm.sandbox.workdir import Workdir
from pyvmm.vmm.threads import ThreadRole, spawn
from tests.conftest import requires_kvm

pytestmark = requires_kvm

COUNTER = re.compile(r"counter: (\d+)")
CLONES = 8


def counters(vm: SandboxVm) -> list[int]:
    return [int(n) for n in COUNTER.findall(vm.console_tail(8000))]


def wait_counter(vm: SandboxVm, above: int = -1, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        seen = counters(vm)
        if seen and seen[-1] > above:
            return seen[-1]
        assert vm.alive(), vm.failure()
        assert time.monotonic() < deadline, vm.console_tail()
        time.sleep(0.05)


def probe_spec(probe_elf: Path, tmp_path: Path) -> GuestSpec:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"template disk " * 4096)
    config = sandbox_config(kernel=probe_elf, cmdline="counter", memory="32M",
                            drives=[f"path={disk}"], confine=False)  # fmt: skip
    return GuestSpec(config, probe_elf, None, "counter")


def probe_entry(spec: GuestSpec, runner: Runner, cache_dir: Path):
    def boot_and_wait(config: MachineConfig, workdir: Workdir, identity: Identity) -> SandboxVm:
        vm = runner.boot(config, workdir, identity)
        wait_counter(vm, 2)
        return vm

    return SnapshotCache(cache_dir).get_or_create(
        spec.key(runner.kind),
        lambda staging: build_template(spec, runner.kind, staging, boot_and_wait),
    )


def restore_clones(
    entry, runner: Runner, n: int
) -> list[tuple[SandboxVm, Identity, Workdir, float]]:
    """``n`` clones restored concurrently (one thread each, as Sandbox.fork does)."""
    results: list = [None] * n
    errors: list[str] = []

    def one(index: int) -> None:
        identity = new_identity()
        workdir = Workdir(identity.name)
        started = time.monotonic()
        drives = clone_drives(entry, workdir)
        vm = runner.restore(entry, workdir, identity, drives, resume=True)
        results[index] = (vm, identity, workdir, time.monotonic() - started)

    threads = [spawn(ThreadRole.VMM, f"clone{i}", lambda i=i: one(i), on_error=errors.append)
               for i in range(n)]  # fmt: skip
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def close_all(clones) -> None:
    for vm, _, workdir, _ in clones:
        vm.close()
        workdir.remove()


def test_clones_of_one_snapshot_each_have_their_own_everything(
    probe_elf: Path, tmp_path: Path
) -> None:
    runner = InProcessRunner()
    spec = probe_spec(probe_elf, tmp_path)
    started = time.monotonic()
    entry, built = probe_entry(spec, runner, tmp_path / "cache")
    template_s = time.monotonic() - started
    assert built and entry.meta.disks == {"drive0": "drive0.img"}
    assert probe_entry(spec, runner, tmp_path / "cache")[1] is False  # found, not built again
    assert entry.mem_extents(), "the entry says where its memory file holds data"
    started = time.monotonic()
    clones = restore_clones(entry, runner, CLONES)
    fork_s = time.monotonic() - started
    try:
        cids, generations, sockets = set(), set(), set()
        for vm, identity, workdir, _ in clones:
            devices = vm.machine.devices  # type: ignore[attr-defined]
            vsock = devices.virtio["vsock"].device
            config_space = bytearray(8)
            vsock.read_config(0, memoryview(config_space))
            assert int.from_bytes(config_space, "little") == identity.cid  # what the guest re-reads
            cids.add(identity.cid)
            generations.add(devices.vmgenid.generation)
            assert vm.vsock_uds.is_socket() and vm.vsock_uds.parent == workdir.path
            sockets.add(vm.vsock_uds)
            assert devices.virtio["drive0"].device.backend.path == str(workdir.disk("drive0"))
        assert len(cids) == len(generations) == len(sockets) == CLONES
        first = clones[0]
        resumed_at = wait_counter(first[0], above=2)  # each carries on counting from the snapshot
        assert resumed_at >= 3
        for vm, *_ in clones:
            wait_counter(vm, above=2)
        # One clone writing its disk changes neither the others' nor the cached one.
        with open(clones[0][2].disk("drive0"), "r+b") as f:
            f.write(b"clone 0 was here")
        assert clones[1][2].disk("drive0").read_bytes()[:8] == b"template"
        assert entry.disk("drive0").read_bytes()[:8] == b"template"
    finally:
        close_all(clones)
    restores = [seconds for *_, seconds in clones]
    print(f"\nprobe sandbox: template {template_s * 1000:.0f} ms, {CLONES} clones restored "
          f"concurrently in {fork_s * 1000:.0f} ms (each {statistics.median(restores) * 1000:.1f} "
          f"ms median, {max(restores) * 1000:.1f} max), data in memory file "
          f"{sum(e - s for s, e in entry.mem_extents()) >> 10} KiB")  # fmt: skip


def test_an_in_process_clone_runs_under_seccomp(probe_elf: Path, tmp_path: Path) -> None:
    runner = InProcessRunner(seccomp_setup(), confined=True)
    entry, _ = probe_entry(probe_spec(probe_elf, tmp_path), runner, tmp_path / "cache")
    clones = restore_clones(entry, runner, 1)
    try:
        vm = clones[0][0]
        wait_counter(vm, above=2)
        modes = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue  # a thread that just ended
            modes[name] = re.search(r"Seccomp:\s+(\d)", status).group(1)
        vcpus = [mode for name, mode in modes.items() if name.startswith("vcpu")]
        assert vcpus and set(vcpus) == {"2"}, modes
        assert modes.get("MainThread", modes.get("pytest", "0")) == "0"  # the caller is not
    finally:
        close_all(clones)


@pytest.mark.skipif(os.geteuid() != 0, reason="a jailed sandbox needs root (uid change, cgroups)")
def test_jailed_clones_run_as_their_own_uid_in_limited_cgroups(
    probe_elf: Path, tmp_path: Path
) -> None:
    from pyvmm.sandbox.jailed import PIDS_MAX, JailedRunner

    spec = probe_spec(probe_elf, tmp_path)
    runner = JailedRunner(spec.config)
    started = time.monotonic()
    entry, built = probe_entry(spec, runner, tmp_path / "cache")
    template_s = time.monotonic() - started
    assert built and entry.meta.runner == "jailed"
    assert oct(entry.mem_file.stat().st_mode & 0o777) == "0o644"
    started = time.monotonic()
    clones = restore_clones(entry, runner, 2)
    fork_s = time.monotonic() - started
    try:
        uids = set()
        for vm, identity, _, _ in clones:
            wait_counter(vm, above=2)
            status = Path(f"/proc/{vm.pid}/status").read_text()  # type: ignore[attr-defined]
            uid = int(re.search(r"Uid:\s+(\d+)", status).group(1))
            assert uid != 0 and re.search(r"Seccomp:\s+2", status), status
            uids.add(uid)
            cgroups = Path(f"/proc/{vm.pid}/cgroup").read_text()  # type: ignore[attr-defined]
            assert f"sandbox-firecracker/{identity.name}" in cgroups, cgroups
            pids = Path("/sys/fs/cgroup/pids/sandbox-firecracker") / identity.name / "pids.max"
            if pids.exists():  # cgroup v1 (this host); v2 in a nested host
                assert pids.read_text().strip() == str(PIDS_MAX)
        assert len(uids) == 2
    finally:
        close_all(clones)
    for _, identity, _, _ in clones:  # the VMs' cgroups go with them
        assert not (Path("/sys/fs/cgroup/pids/sandbox-firecracker") / identity.name).exists()
    print(f"\nprobe jailed sandbox: template {template_s * 1000:.0f} ms, 2 clones in "
          f"{fork_s * 1000:.0f} ms")  # fmt: skip
