"""Seccomp filters on real threads and a real VMM (modelled on Firecracker's test_seccomp*.py).

- every default rule with argument checks: the allowed arguments pass, a
  mutated argument is denied (a harness thread makes the raw syscalls under
  its role's filter; Firecracker's ``test_seccomp_validate`` idea);
- a served VMM (``pyvmm-firecracker``) runs a probe VM with blk, net, vsock
  and rng through boot, pause, resume, snapshot, restore and a metrics
  flush with every thread at ``Seccomp: 2`` (0 with ``--no-seccomp``);
- a custom filter that denies what a thread needs ends a served VMM with
  status 148, one log line naming the syscall and the thread, and
  ``seccomp.num_faults == 1`` in the metrics;
- in library mode a denied call stops only the confined thread's work.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import http.client
import json
import os
import re
import socket
from pathlib import Path

import pytest

from pyvmm.jail import faults
from pyvmm.jail.default_filters import DEFAULT_FILTERS, VCPU_IOCTLS, VM_IOCTLS
from pyvmm.jail.filter_file import parse_filters
from pyvmm.jail.install import seccomp_mode
from pyvmm.jail.libseccomp import syscall_number
from pyvmm.jail.seccomp import FaultPolicy, make_setup
from pyvmm.jail.thread_setup import SeccompSetup
from pyvmm.vmm.threads import ThreadRole, spawn
from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm
from tests.kvm.test_probe_virtio import requires_tap, tap, write_pattern_image  # noqa: F401

pytestmark = requires_kvm

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def library_setup() -> SeccompSetup:
    """The default filters, with the library fault policy (a fault fails the call)."""
    return make_setup(None, FaultPolicy.STOP_VM)


def run_confined(setup: SeccompSetup, role: ThreadRole, work) -> object:
    """``work()`` on a new pyvmm thread confined to ``role``; its result or the error line."""
    result: list[object] = []
    errors: list[str] = []
    thread = spawn(role, f"check-{role.value}", lambda: result.append(work()),
                   on_error=errors.append, setup=setup)  # fmt: skip
    thread.join(30)
    assert not thread.is_alive()
    return result[0] if result else errors


def raw_syscall(number: int, args: list[int]) -> tuple[int, int]:
    ctypes.set_errno(0)
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & _U64) for a in args))
    return result, ctypes.get_errno()


# --- the validation harness -----------------------------------------------------------------
def conditioned_rules(role: str) -> list[dict]:
    return [rule for rule in DEFAULT_FILTERS[role]["filter"] if rule.get("args")]


def allowed_values(role: str, syscall: str, index: int) -> set[int]:
    return {
        arg["val"]
        for rule in conditioned_rules(role)
        if rule["syscall"] == syscall
        for arg in rule["args"]
        if arg["arg_index"] == index
    }


def call_for(rule: dict, mutate: int | None) -> tuple[int, list[int]]:
    """Harmless arguments (fd -1, NULL pointers, zero lengths) with the rule's values set."""
    args = [-1, 0, 0, 0, 0, 0]
    for n, condition in enumerate(rule["args"]):
        args[condition["arg_index"]] = condition["val"] if n != 0 or mutate is None else mutate
    if rule["syscall"] in ("mmap", "mprotect", "madvise"):
        args[1] = 0  # zero length: EINVAL after the filter, never a mapping
    number = syscall_number(rule["syscall"])
    assert number is not None
    return number, args


def mutation(role: str, rule: dict) -> int:
    first = rule["args"][0]
    allowed = allowed_values(role, rule["syscall"], first["arg_index"])
    for flip in (1 << 30, 1 << 13, 1 << 7, 1 << 1):
        candidate = first["val"] ^ flip
        if candidate not in allowed:
            return candidate
    raise AssertionError(f"no value outside the allowed set for {rule}")


@pytest.mark.parametrize("role", ["vcpu", "io", "api", "vmm"])
def test_each_argument_rule_allows_its_values_and_denies_a_mutation(
    library_setup: SeccompSetup, role: str
) -> None:
    rules = conditioned_rules(role)
    assert rules, f"the {role} filter checks no arguments"

    def check() -> list[tuple[str, str, int, int]]:
        outcomes = []
        for rule in rules:
            for mutate in (None, mutation(role, rule)):
                before = faults.num_faults()
                result, err = raw_syscall(*call_for(rule, mutate))
                if result >= 0 and rule["syscall"] == "socket":
                    os.close(result)
                denied = faults.num_faults() - before
                outcomes.append((rule["syscall"], rule.get("comment", ""), mutate is None, denied))
                assert (err == errno.EPERM) if denied else True
        return outcomes

    outcomes = run_confined(library_setup, ThreadRole(role), check)
    assert isinstance(outcomes, list) and outcomes and isinstance(outcomes[0], tuple), outcomes
    wrong = [o for o in outcomes if o[3] != (0 if o[2] else 1)]
    assert not wrong, f"{role}: (syscall, rule, allowed-args?, faults) that went wrong: {wrong}"


def test_the_default_ioctl_numbers_are_the_kernel_headers() -> None:
    import fcntl
    import termios

    from pyvmm.kvm._kvm_cffi import lib

    for name, value in {**VCPU_IOCTLS, **VM_IOCTLS}.items():
        if name.startswith("KVM_"):
            assert getattr(lib, name) == value, name
        elif hasattr(termios, name):
            assert getattr(termios, name) == value, name
    from pyvmm.host import tap as tap_module

    assert VM_IOCTLS["TUNSETIFF"] == tap_module.TUNSETIFF
    assert VCPU_IOCTLS["TUNSETOFFLOAD"] == tap_module.TUNSETOFFLOAD
    assert VM_IOCTLS["TUNSETVNETHDRSZ"] == tap_module.TUNSETVNETHDRSZ
    assert fcntl.F_DUPFD_CLOEXEC == 1030
    from pyvmm.host import block_file
    from pyvmm.jail import default_filters

    keep, punch, zero = (block_file.FALLOC_FL_KEEP_SIZE, block_file.FALLOC_FL_PUNCH_HOLE,
                         block_file.FALLOC_FL_ZERO_RANGE)  # fmt: skip
    assert punch | keep == default_filters.FALLOC_PUNCH_HOLE_KEEP_SIZE
    assert zero | keep == default_filters.FALLOC_ZERO_RANGE_KEEP_SIZE


def test_every_block_request_runs_on_a_confined_io_thread(
    library_setup: SeccompSetup, tmp_path: Path
) -> None:
    """What virtio-blk does with a real image on the io thread: read, write, flush,
    discard and write zeroes (ext4 in a Linux guest discards) pass the io filter."""
    from pyvmm.host.block_file import BlockFile

    image = tmp_path / "disk.img"
    image.write_bytes(b"\xab" * (1 << 20))
    with BlockFile(str(image), read_only=False) as disk:

        def requests() -> bytes:
            disk.write_from(4096, [memoryview(b"\x01" * 4096)])
            disk.flush()
            disk.discard(0, 4096)
            disk.write_zeroes(8192, 8192)
            back = bytearray(16384)
            disk.read_into(0, [memoryview(back)])
            return bytes(back)

        back = run_confined(library_setup, ThreadRole.IO, requests)
    assert isinstance(back, bytes), back  # an error line if a call was denied
    assert back == bytes(4096) + b"\x01" * 4096 + bytes(8192)
    assert image.stat().st_size == 1 << 20


def test_rules_per_role_and_what_vcpu_may_not_do(library_setup: SeccompSetup) -> None:
    filters = parse_filters(DEFAULT_FILTERS, "defaults")
    counts = {role: len(f.rules) for role, f in filters.items()}
    # The vmm thread does everything (it is the only thread of a VMM before it boots);
    # the API threads only serve HTTP and hand actions to it.
    assert counts["vcpu"] < counts["io"] < counts["vmm"]
    assert counts["api"] < counts["vmm"]

    def forbidden() -> dict[str, int]:
        out = {}
        for name, args in {
            "openat": [-100, 0, 0, 0],  # AT_FDCWD, NULL path
            "execve": [0, 0, 0],
            "socket": [2, 1, 0],  # AF_INET
            "mmap": [0, 4096, 0x7, 0x22, -1, 0],  # PROT_READ|WRITE|EXEC, private anonymous
            "ioctl": [-1, VM_IOCTLS["KVM_CREATE_VM"], 0],
            "seccomp": [1, 1, 0],  # SECCOMP_FILTER_FLAG_TSYNC
        }.items():
            before = faults.num_faults()
            raw_syscall(syscall_number(name), args)
            out[name] = faults.num_faults() - before
        return out

    assert run_confined(library_setup, ThreadRole.VCPU, forbidden) == {
        "openat": 1, "execve": 1, "socket": 1, "mmap": 1, "ioctl": 1, "seccomp": 1,
    }  # fmt: skip


def test_library_mode_a_denied_call_fails_only_that_thread(library_setup: SeccompSetup) -> None:
    """The caller's threads stay unfiltered; the confined one gets EPERM and a note."""
    errors: list[str] = []

    def work() -> None:
        os.open("/etc/hostname", os.O_RDONLY)  # a vCPU thread may not open files

    thread = spawn(ThreadRole.VCPU, "vcpu-lib", work, on_error=errors.append, setup=library_setup)
    thread.join(10)
    assert len(errors) == 1 and "PermissionError" in errors[0], errors
    assert "thread 'vcpu-lib' (vcpu) failed" in errors[0]
    assert errors[0].endswith("made a denied system call 257 (openat))"), errors  # the reason
    assert seccomp_mode() == 0  # this (the caller's) thread
    assert os.open("/etc/hostname", os.O_RDONLY) >= 0  # and the caller still can
    notes = [note for note in faults._state.notes.values() if "'vcpu-lib'" in note]
    assert notes == ["seccomp: thread 'vcpu-lib' (vcpu) made a denied system call 257 (openat)"]


# --- a served VMM --------------------------------------------------------------------------
def thread_modes(pid: int) -> dict[str, int]:
    """``Seccomp:`` of each of the process's threads (those that end meanwhile drop out)."""
    modes = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if not comm.startswith("kvm-"):  # KVM's kernel workers are not ours
                modes[f"{comm}/{tid}"] = seccomp_mode(pid, tid)
        except FileNotFoundError:
            continue
    return modes


def boot_all_devices(vmm: Vmm, probe: Path, tmp_path: Path, tap_name: str) -> None:
    disk = tmp_path / "disk.img"
    write_pattern_image(disk, 4 << 20)
    cmdline = "blkread=1 nettx=5 rngread=4096 counter"
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": cmdline})
    vmm.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    vmm.ok("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": str(disk),
                                 "is_root_device": False, "is_read_only": False})  # fmt: skip
    vmm.ok("PUT", "/network-interfaces/n0", {"iface_id": "n0", "host_dev_name": tap_name})
    vmm.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})
    vmm.ok("PUT", "/entropy", {})
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    vmm.wait_serial(r"counter: 2\b", timeout=30)


def poke_vsock(path: Path) -> bytes:
    """A host-initiated vsock connection (the probe listens on no port: the VMM answers)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"CONNECT 52\n")
        try:
            return sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            return b""


@requires_tap
def test_a_served_vm_with_every_device_runs_its_lifecycle_under_the_filters(
    probe_elf: Path,
    tmp_path: Path,
    tap: str,  # noqa: F811
) -> None:
    metrics = tmp_path / "metrics"
    vmm = Vmm(tmp_path, "--id", "filtered", "--metrics-path", str(metrics))
    try:
        boot_all_devices(vmm, probe_elf, tmp_path, tap)
        serial = vmm.serial()
        assert "blkread: " in serial and "nettx: 5 frames" in serial, serial[-800:]
        assert "rngread: 4096 bytes" in serial
        poke_vsock(tmp_path / "v.sock")
        modes = thread_modes(vmm.process.pid)
        assert len(modes) >= 5 and set(modes.values()) == {2}, modes
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "vm.state"),
                                           "mem_file_path": str(tmp_path / "vm.mem")})  # fmt: skip
        vmm.ok("PATCH", "/vm", {"state": "Resumed"})
        seen = int(re.findall(r"counter: (\d+)", vmm.serial())[-1])
        vmm.wait_serial(rf"counter: {seen + 2}\b")
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        assert vmm.process.poll() is None
        assert set(thread_modes(vmm.process.pid).values()) == {2}
    finally:
        assert vmm.close() == 143  # SIGTERM, not a seccomp fault (148)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sum(line["vcpu"]["exit_io_out"] for line in lines) > 10

    (tmp_path / "r").mkdir()
    restored = Vmm(tmp_path / "r", "--id", "restored")
    try:
        memory = {"backend_type": "File", "backend_path": str(tmp_path / "vm.mem")}
        load = {"snapshot_path": str(tmp_path / "vm.state"), "mem_backend": memory}
        restored.ok("PUT", "/snapshot/load", {**load, "resume_vm": True})
        restored.wait_serial(r"counter: \d+", timeout=30)
        assert set(thread_modes(restored.process.pid).values()) == {2}
    finally:
        assert restored.close() == 143


def test_no_seccomp_leaves_every_thread_unfiltered(probe_elf: Path, tmp_path: Path) -> None:
    vmm = Vmm(tmp_path, "--id", "open", "--no-seccomp")
    try:
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        vmm.wait_serial(r"counter: 1\b")
        modes = thread_modes(vmm.process.pid)
        assert len(modes) >= 4 and set(modes.values()) == {0}, modes
    finally:
        vmm.close()


def write_filter(path: Path, change) -> Path:
    document = copy.deepcopy(DEFAULT_FILTERS)
    change(document)
    path.write_text(json.dumps(document))
    return path


def start_and_expect_the_end(vmm: Vmm) -> None:
    """InstanceStart; the process may die before it answers."""
    with contextlib.suppress(http.client.HTTPException, ConnectionError):
        vmm.request("PUT", "/actions", {"action_type": "InstanceStart"})
    assert vmm.process.wait(30) == 148


def test_a_denied_call_ends_a_served_vmm_with_148_a_line_and_a_metric(
    probe_elf: Path, tmp_path: Path
) -> None:
    """The vmm filter (every thread inherits it) without KVM_RUN: the first vCPU entry faults."""

    def deny_kvm_run(document: dict) -> None:
        for role in ("vmm", "api"):
            document[role]["filter"] = [
                rule for rule in document[role]["filter"] if rule.get("comment") != "KVM_RUN"
            ]

    custom = write_filter(tmp_path / "filter.json", deny_kvm_run)
    metrics = tmp_path / "metrics"
    vmm = Vmm(tmp_path, "--id", "denied", "--seccomp-filter", str(custom),
              "--metrics-path", str(metrics))  # fmt: skip
    try:
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
        start_and_expect_the_end(vmm)
        stderr = vmm.process.stderr.read().decode()
    finally:
        vmm.close()
    lines = [line for line in stderr.splitlines() if "seccomp" in line]
    assert len(lines) == 1, stderr
    assert re.search(r"thread 'vcpu\d' \(\w+\) made a denied system call 16 \(ioctl\)", lines[0])
    assert "exiting with status 148" in lines[0]
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["seccomp"]["num_faults"] == 1


def test_a_vcpu_filter_without_ioctl_ends_the_vmm_with_148(probe_elf: Path, tmp_path: Path) -> None:
    def deny_ioctl_on_vcpus(document: dict) -> None:
        document["vcpu"]["filter"] = [
            rule for rule in document["vcpu"]["filter"] if rule["syscall"] != "ioctl"
        ]

    custom = write_filter(tmp_path / "filter.json", deny_ioctl_on_vcpus)
    vmm = Vmm(tmp_path, "--id", "vcpu-denied", "--seccomp-filter", str(custom))
    try:
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
        start_and_expect_the_end(vmm)
    finally:
        vmm.close()


def test_a_bad_filter_file_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vcpu": {"default_action": "trap", "filter_action": "allow",
                                        "filter": [{"syscall": "no_such_call"}]}}))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()",
         "--api-sock", str(tmp_path / "s"), "--seccomp-filter", str(bad)],
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pyvmm: error: {str(bad)!r}: no filter for thread role(s) vmm, api, io "
        "(a 'vmm' filter stands in for roles a file does not name)"
    ]
    assert not (tmp_path / "s").exists()
