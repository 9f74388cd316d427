"""``pyvmm-jailer`` + ``pyvmm-firecracker`` on the host's /dev/kvm (modelled on Firecracker's
test_jail.py): the jail's layout and modes, the jailed process's credentials, capabilities,
rlimits, seccomp and root, pid namespaces and kill-by-pid, cgroups v1, network namespaces,
and the exact sequence Kata Containers' Firecracker driver runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import UnixHTTPConnection
from tests.kvm.test_seccomp import thread_modes

pytestmark = requires_kvm

UID, GID = 10123, 10124
DIR_STATS = stat.S_IFDIR | 0o700
CHAR_STATS = stat.S_IFCHR | 0o600


def make_exec_file(directory: Path) -> Path:
    """A ``pyvmm-firecracker`` console script, as pip writes it (shebang + entry point)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "pyvmm-firecracker"
    entry = "import sys\nfrom pyvmm.firecracker_cli import main\nsys.exit(main())\n"
    script.write_text(f"#!{sys.executable}\n{entry}")
    script.chmod(0o755)
    return script


class Jailed:
    """One ``pyvmm-jailer`` run and the jail it builds under ``base``."""

    def __init__(self, tmp_path: Path, vm_id: str = "vm-1") -> None:
        # A Unix socket path is at most 107 bytes: the jails live under a short base.
        self.base = Path(tempfile.mkdtemp(prefix="pj", dir="/tmp"))
        self.id = vm_id
        self.exec_file = make_exec_file(tmp_path / "bin")
        self.root = self.base / "pyvmm-firecracker" / vm_id / "root"
        self.root.mkdir(parents=True)
        self.out = tmp_path / f"{vm_id}.out"
        self.err = tmp_path / f"{vm_id}.err"
        self.process: subprocess.Popen | None = None

    def provide(self, source: Path, name: str) -> str:
        """Put a file in the jail for the VMM (as users hard-link kernels in); its jailed path."""
        target = self.root / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o644)
        return f"/{name}"

    def command(self, *flags: str, vmm_args: tuple[str, ...] = ()) -> list[str]:
        return [sys.executable, "-m", "pyvmm.jail.jailer", "--id", self.id,
                "--exec-file", str(self.exec_file), "--uid", str(UID), "--gid", str(GID),
                "--chroot-base-dir", str(self.base), *flags, "--", *vmm_args]  # fmt: skip

    def start(self, *flags: str, vmm_args: tuple[str, ...] = ()) -> Jailed:
        self.process = subprocess.Popen(
            self.command(*flags, vmm_args=vmm_args),
            stdin=subprocess.DEVNULL,
            stdout=self.out.open("wb"),
            stderr=self.err.open("wb"),
        )
        return self

    @property
    def socket(self) -> Path:
        return self.root / "run" / "firecracker.socket"

    def pid(self, timeout: float = 30) -> int:
        pid_file = self.root / "pyvmm-firecracker.pid"
        deadline = time.monotonic() + timeout
        while True:
            text = pid_file.read_text() if pid_file.exists() else ""
            if text.isdigit():
                return int(text)
            assert time.monotonic() < deadline, f"no pid file; stderr: {self.err.read_text()}"
            time.sleep(0.02)

    def api(self, method: str, path: str, body: object = None, timeout: float = 30) -> object:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            assert time.monotonic() < deadline, f"no API socket; stderr: {self.err.read_text()}"
            time.sleep(0.02)
        conn = UnixHTTPConnection(self.socket)
        while True:  # the socket exists from bind(); it answers from listen() on
            try:
                conn.connect()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the API socket never listened"
                time.sleep(0.02)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})  # fmt: skip
            response = conn.getresponse()
            raw = response.read()
            assert response.status in (200, 204), (response.status, raw)
            return json.loads(raw) if raw else None
        finally:
            conn.close()

    def serial(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_serial(self, pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while re.search(pattern, self.serial()) is None:
            assert time.monotonic() < deadline, f"{pattern!r} not in {self.serial()[-300:]!r}"
            time.sleep(0.05)

    def owns(self, pid: int) -> bool:
        """True if ``pid`` still runs in this jail (a pid number can be reused)."""
        try:
            seen = os.stat(f"/proc/{pid}/root/")
        except OSError:
            return False
        mine = os.stat(self.root)
        return (seen.st_dev, seen.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        """Kill the jailer and the VMM (a daemon in its own pid namespace is not our child)."""
        pid_file = self.root / "pyvmm-firecracker.pid"
        text = pid_file.read_text() if pid_file.exists() else ""
        if text.isdigit() and self.owns(int(text)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(text), signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def jailed(tmp_path: Path):
    jail = Jailed(tmp_path)
    yield jail
    jail.close()


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def check_stats(path: Path, mode: int, uid: int, gid: int) -> None:
    info = os.lstat(path)
    assert (info.st_mode, info.st_uid, info.st_gid) == (mode, uid, gid), path


def gone(pid: int, timeout: float = 20) -> bool:
    """True once ``pid`` has exited (it may not be our child: poll /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = status(pid).get("State", "")
        except FileNotFoundError:
            return True
        if state.startswith("Z"):
            return True
        time.sleep(0.05)
    return False


def test_the_jail_layout_and_the_confined_process(jailed: Jailed, probe_elf: Path) -> None:
    kernel = jailed.provide(probe_elf, "probe.elf")
    jailed.start()
    pid = jailed.pid()
    jailed.api("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "counter"})
    jailed.api("PUT", "/actions", {"action_type": "InstanceStart"})
    jailed.wait_serial(r"counter: 2\b")
    assert jailed.api("GET", "/")["id"] == "vm-1"

    root = jailed.root
    for directory in (root, root / "dev", root / "dev/net", root / "run"):
        check_stats(directory, DIR_STATS, UID, GID)
    check_stats(root / "dev/kvm", CHAR_STATS, UID, GID)
    check_stats(root / "dev/net/tun", CHAR_STATS, UID, GID)
    assert os.lstat(root / "dev/kvm").st_rdev == os.makedev(10, 232)
    assert os.lstat(root / "dev/net/tun").st_rdev == os.makedev(10, 200)
    assert stat.S_ISSOCK(os.lstat(jailed.socket).st_mode)
    assert sorted(os.listdir(root)) == sorted(
        ["dev", "run", "probe.elf", "pyvmm-firecracker.pid"]
    )  # no interpreter, no site-packages: the VMM runs in the jailer's process

    # The process: its root is the jail, its ids are dropped, it can gain nothing.
    seen_root = os.stat(f"/proc/{pid}/root/")
    assert (seen_root.st_dev, seen_root.st_ino) == (os.stat(root).st_dev, os.stat(root).st_ino)
    fields = status(pid)
    assert fields["Uid"].split() == [str(UID)] * 4
    assert fields["Gid"].split() == [str(GID)] * 4
    assert fields["Groups"] == ""
    assert fields["NoNewPrivs"] == "1"
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, capabilities
    modes = thread_modes(pid)
    assert set(modes.values()) == {2}, modes
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"Max open files\s+2048\s+2048", limits)
    assert re.search(r"Max file size\s+unlimited\s+unlimited", limits)
    assert len(os.listdir(f"/proc/{pid}/fd")) < 40

    os.kill(pid, signal.SIGTERM)
    assert jailed.process.wait(20) == 143


def test_an_fsize_limit_ends_a_large_snapshot_with_sigxfsz(jailed: Jailed, probe_elf: Path) -> None:
    kernel = jailed.provide(probe_elf, "probe.elf")
    jailed.start("--resource-limit", "fsize=1048576")
    jailed.api("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "counter"})
    jailed.api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    jailed.api("PUT", "/actions", {"action_type": "InstanceStart"})
    jailed.wait_serial(r"counter: 1\b")
    pid = jailed.pid()
    assert re.search(r"Max file size\s+1048576\s+1048576", Path(f"/proc/{pid}/limits").read_text())
    jailed.api("PATCH", "/vm", {"state": "Paused"})
    with contextlib.suppress(Exception):  # the process dies before it answers
        jailed.api("PUT", "/snapshot/create",
                   {"snapshot_path": "/vm.state", "mem_file_path": "/vm.mem"})  # fmt: skip
    assert jailed.process.wait(20) == -signal.SIGXFSZ


def test_too_few_file_descriptors_is_a_clear_error(jailed: Jailed) -> None:
    result = subprocess.run(
        jailed.command("--resource-limit", "no-file=3"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pyvmm-jailer: error: --resource-limit no-file=3: the VMM cannot run with fewer "
        "than 16 file descriptors"
    ]
    assert os.listdir(jailed.root) == []  # nothing was built


@pytest.mark.parametrize("daemonize", [False, True], ids=["foreground", "daemonize"])
@pytest.mark.parametrize("new_pid_ns", [False, True], ids=["same-pid-ns", "new-pid-ns"])
def test_kill_by_pid_file(jailed: Jailed, daemonize: bool, new_pid_ns: bool) -> None:
    flags = [flag for flag, on in (("--daemonize", daemonize), ("--new-pid-ns", new_pid_ns)) if on]
    jailed.start(*flags)
    pid = jailed.pid()
    jailed.api("GET", "/")
    ns_pids = status(pid)["NSpid"].split()
    if new_pid_ns:
        assert ns_pids == [str(pid), "1"]  # the VMM is init of its pid namespace
        assert jailed.process.wait(10) == 0  # the jailer itself has left
    else:
        assert ns_pids == [str(pid)] and pid == jailed.process.pid
    if daemonize:  # the jailer's own session (set before any fork), no terminal
        assert os.getsid(pid) == jailed.process.pid != os.getsid(0)
    os.kill(pid, signal.SIGTERM)
    assert gone(pid), f"{pid} is still running"


@pytest.fixture
def netns():
    name = f"pyvmm-jail-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield Path("/var/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_kata_containers_sequence(tmp_path: Path, probe_elf: Path, netns: Path) -> None:
    """``jailer --id --exec-file --uid --gid --chroot-base-dir --daemonize --netns P --
    --config-file /fcConfig.json``, then ``GET /`` on ``<root>/run/firecracker.socket``."""
    jail = Jailed(tmp_path, "4a6f6b65-b0b0")
    try:
        kernel = jail.provide(probe_elf, "vmlinux")
        config = {
            "boot-source": {"kernel_image_path": kernel, "boot_args": "counter"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        }
        (jail.root / "fcConfig.json").write_text(json.dumps(config))
        jail.start("--daemonize", "--netns", str(netns),
                   vmm_args=("--config-file", "/fcConfig.json"))  # fmt: skip
        info = jail.api("GET", "/")
        assert info["id"] == "4a6f6b65-b0b0" and info["state"] == "Running"
        pid = jail.pid()
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
        assert status(pid)["Uid"].split()[0] == str(UID)
        os.kill(pid, signal.SIGTERM)
        assert gone(pid)
    finally:
        jail.close()


# --- cgroups v1 (this host); v2 is tested in the nested host (tests/e2e) -------------------
def v1_controller(name: str) -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup" and name in fields[3].split(","):
            return Path(fields[1])
    pytest.skip(f"this host has no cgroup v1 {name} controller mounted")


def remove_cgroups(controller: Path, relative: str) -> None:
    """rmdir ``controller/relative`` and its empty parents, deepest first."""
    parts = Path(relative).parts
    for depth in range(len(parts), 0, -1):
        with contextlib.suppress(OSError):  # busy or shared with another test: left alone
            controller.joinpath(*parts[:depth]).rmdir()


@pytest.mark.parametrize("parent", [None, "pyvmm-test/group2"])
def test_cgroup_v1_membership_and_values(jailed: Jailed, parent: str | None) -> None:
    cpu, cpuset = v1_controller("cpu"), v1_controller("cpuset")
    flags = ["--cgroup", "cpu.shares=2", "--cgroup", "cpu.cfs_period_us=200000",
             "--cgroup", "cpuset.mems=0"]  # fmt: skip
    if parent:
        flags += ["--parent-cgroup", parent]
    jailed.start(*flags)
    pid = jailed.pid()
    parent_path = parent or "pyvmm-firecracker"
    cpu_group, cpuset_group = cpu / parent_path / "vm-1", cpuset / parent_path / "vm-1"
    try:
        jailed.api("GET", "/")
        assert (cpu_group / "cpu.shares").read_text().strip() == "2"
        assert (cpu_group / "cpu.cfs_period_us").read_text().strip() == "200000"
        assert str(pid) in (cpu_group / "tasks").read_text().split()
        assert (cpuset_group / "cpuset.mems").read_text().strip() == "0"
        # cpuset.cpus was empty in the new cgroups and is inherited from above.
        root_cpus = (cpuset / "cpuset.cpus").read_text().strip()
        assert (cpuset_group / "cpuset.cpus").read_text().strip() == root_cpus
        assert str(pid) in (cpuset_group / "tasks").read_text().split()
        memberships = Path(f"/proc/{pid}/cgroup").read_text()
        assert f":cpu:/{parent_path}/vm-1" in memberships
        assert f":cpuset:/{parent_path}/vm-1" in memberships
    finally:
        jailed.close()
        for controller in (cpu, cpuset):
            remove_cgroups(controller, f"{parent_path}/vm-1")


def test_cgroup_v1_parent_alone_moves_nothing(jailed: Jailed) -> None:
    """v1 with only --parent-cgroup names no controller: the process stays where it was."""
    before = Path("/proc/self/cgroup").read_text()
    jailed.start("--parent-cgroup", "pyvmm-test-alone")
    pid = jailed.pid()
    jailed.api("GET", "/")
    assert Path(f"/proc/{pid}/cgroup").read_text() == before
    assert not (v1_controller("cpu") / "pyvmm-test-alone").exists()


CONFINED_RUN = r"""
import os, sys
from pathlib import Path
from pyvmm.jail.confine import Confinement, confine
setup = confine(Confinement(jail=Path(sys.argv[1]), uid=int(sys.argv[2]), gid=int(sys.argv[3]),
                            vm_id="confined", cgroups=("cpu.shares=3",)))
from pyvmm.config import MachineConfig
from pyvmm.vmm.machine import Machine
out = bytearray()
with Machine(MachineConfig(kernel="/probe.elf", cmdline="hello", mem_size=32 << 20),
             serial_out=out.extend) as machine:
    machine.start()
    reason = machine.wait(60)
print(out.decode(errors="replace"))
print("ROOT", sorted(os.listdir("/")))
print("REASON", reason, flush=True)
sys.stdin.read()  # the test reads /proc/PID/status meanwhile (the jail has no /proc)
"""


def test_confine_runs_a_vm_in_a_jail_without_the_jailer(tmp_path: Path, probe_elf: Path) -> None:
    """What ``pyvmm run --jail DIR --uid --gid --cgroup`` will do: one process, confined."""
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "probe.elf").write_bytes(probe_elf.read_bytes())
    (jail / "probe.elf").chmod(0o644)
    cpu = v1_controller("cpu")
    child = subprocess.Popen(
        [sys.executable, "-c", CONFINED_RUN, str(jail), str(UID), str(GID)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        output = ""
        while "REASON" not in output:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            output += line
        fields = status(child.pid)
        memberships = Path(f"/proc/{child.pid}/cgroup").read_text()
        child.stdin.close()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        remove_cgroups(cpu, "pyvmm-firecracker/confined")
    assert "hello from probe" in output
    assert "REASON reset: guest reset" in output
    assert "ROOT ['dev', 'probe.elf', 'run']" in output
    assert fields["Uid"].split() == [str(UID)] * 4
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
    assert ":cpu:/pyvmm-firecracker/confined" in memberships


STATIC_VMM = r"""
#include <dirent.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("ARG %s\n", argv[i]);
    printf("IDS %d %d\n", (int)getuid(), (int)getgid());
    DIR *root = opendir("/");
    for (struct dirent *e; root && (e = readdir(root));) printf("ENTRY %s\n", e->d_name);
    return 7;
}
"""


def test_a_static_exec_file_is_copied_into_the_jail_and_execed(tmp_path: Path) -> None:
    """Any other VMM binary is handled as Firecracker's jailer does (copy, then exec)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (it builds the static stand-in VMM)")
    source = tmp_path / "vmm.c"
    source.write_text(STATIC_VMM)
    binary = tmp_path / "bin" / "fake-firecracker"
    binary.parent.mkdir()
    subprocess.run([gcc, "-static", "-O2", "-o", str(binary), str(source)], check=True)
    jail = Jailed(tmp_path)
    jail.exec_file = binary
    jail.root = jail.base / "fake-firecracker" / jail.id / "root"
    try:
        result = subprocess.run(
            jail.command(vmm_args=("--extra", "arg")), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 7, result.stderr
        lines = result.stdout.splitlines()
        args = [line[4:] for line in lines if line.startswith("ARG ")]
        assert args[:3] == ["fake-firecracker", "--id", "vm-1"]
        assert args[3] == "--start-time-us" and args[5] == "--start-time-cpu-us"
        assert args[4].isdigit() and args[6].isdigit()
        assert args[7:] == ["--extra", "arg"]
        assert f"IDS {UID} {GID}" in lines
        entries = {line[6:] for line in lines if line.startswith("ENTRY ")} - {".", ".."}
        assert entries == {"dev", "run", "fake-firecracker", "fake-firecracker.pid"}
        copied = os.stat(jail.root / "fake-firecracker")
        assert (copied.st_mode, copied.st_uid, copied.st_gid) == (stat.S_IFREG | 0o755, 0, 0)
    finally:
        jail.close()


def test_a_bad_netns_fails_before_anything_is_made(jailed: Jailed) -> None:
    result = subprocess.run(
        jailed.command("--netns", "/var/run/netns/none-such", "--cgroup", "cpu.shares=5"),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pyvmm-jailer: error: --netns '/var/run/netns/none-such': No such file or directory"
    ]
    assert os.listdir(jailed.root) == []
    assert not (v1_controller("cpu") / "pyvmm-firecracker" / "vm-1").exists()


def test_snapshot_and_restore_between_two_jails(tmp_path: Path, probe_elf: Path) -> None:
    """Everything a lifecycle needs was imported before pivoting: nothing is missing inside."""
    first, second = Jailed(tmp_path, "snap-a"), Jailed(tmp_path, "snap-b")
    try:
        kernel = first.provide(probe_elf, "probe.elf")
        first.start()
        first.api("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "counter"})
        first.api("PUT", "/actions", {"action_type": "InstanceStart"})
        first.wait_serial(r"counter: 2\b")
        first.api("PATCH", "/vm", {"state": "Paused"})
        first.api("PUT", "/snapshot/create",
                  {"snapshot_path": "/vm.state", "mem_file_path": "/vm.mem"})  # fmt: skip
        first.api("PATCH", "/vm", {"state": "Resumed"})
        first.wait_serial(r"counter: 4\b")
        for name in ("vm.state", "vm.mem"):
            assert os.stat(first.root / name).st_uid == UID
            second.provide(first.root / name, name)
        second.provide(probe_elf, "probe.elf")
        second.start()
        memory = {"backend_type": "File", "backend_path": "/vm.mem"}
        load = {"snapshot_path": "/vm.state", "mem_backend": memory, "resume_vm": True}
        second.api("PUT", "/snapshot/load", load)
        second.wait_serial(r"counter: \d+")
        assert second.api("GET", "/")["state"] == "Running"
    finally:
        first.close()
        second.close()


LANDLOCKED_RUN = r"""
import sys
from pathlib import Path
from pyvmm.config import MachineConfig
from pyvmm.vmm.machine import Machine
import pyvmm.boot.elf  # what the run imports lazily
from pyvmm.jail.confine import Confinement, LandlockPaths, confine
kernel = Path(sys.argv[1])
confine(Confinement(landlock=LandlockPaths(read_only=(kernel,))))
try:
    open("/etc/hostname").read()
    print("OPENED /etc/hostname")
except PermissionError:
    print("DENIED /etc/hostname")
out = bytearray()
with Machine(MachineConfig(kernel=kernel, cmdline="hello", mem_size=32 << 20),
             serial_out=out.extend) as machine:
    machine.start()
    print("REASON", machine.wait(60))
print(out.decode(errors="replace"))
"""


def test_a_landlocked_and_filtered_vmm_runs_the_probe(probe_elf: Path) -> None:
    """``pyvmm run --landlock`` (no jail): only the kernel and the devices stay openable."""
    result = subprocess.run(
        [sys.executable, "-c", LANDLOCKED_RUN, str(probe_elf)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "DENIED /etc/hostname" in result.stdout
    assert "REASON reset: guest reset" in result.stdout
    assert "hello from probe" in result.stdout
