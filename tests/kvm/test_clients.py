"""Three Firecracker clients from PyPI drive ``pyvmm-firecracker``, unchanged.

Each client finds "Firecracker" as it always does (a ``firecracker``
executable, which here is pyvmm's console script) and talks to it through
its own code; the tests fake only what lies outside pyvmm: ``sudo``
(these tests run as root, it just runs the command), ``ssh`` and
``iptables`` (microheart reaches its guest by SSH and NATs it; the probe
guest has no SSH server, so the fake ``ssh`` answers "reachable" once the
guest's console shows it is up). Clients that change the host's network
run in a network namespace of their own.

- ``firecracker-python`` 0.0.5: its ``Api`` client boots and pauses a VM
  (tests/kvm/test_api_server.py).
- ``pyrecracker`` 0.6.4: ``VMManager`` spawns ``sudo firecracker --api-sock``
  and sends its first request 20-40 ms later, after creating a TAP, with no
  retry: ``firecracker`` is pyvmm's C launcher (:mod:`pyvmm.api.launcher`),
  which has the socket listening before Python starts; configure, start,
  pause, snapshot, resume, stop.
- ``microheart`` 0.3.0: ``MicroVM.start`` launches ``firecracker --api-sock S
  --config-file C --enable-pci``, waits for SSH, reads ``GET
  /machine-config``, then stops the VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import requires_kvm

pytestmark = requires_kvm

FIRECRACKER = Path(sys.executable).parent / "pyvmm-firecracker"
#: New network, PID and mount namespaces: the client's TAPs, routes and processes stay
#: in them and die with them.
UNSHARE = ("unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")


def fake_bin(tmp_path: Path, firecracker: Path = FIRECRACKER) -> Path:
    """A directory with ``firecracker`` (pyvmm's) and the fakes of what is outside pyvmm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "firecracker").symlink_to(firecracker)
    scripts = {
        "sudo": 'exec "$@"\n',  # root already
        "iptables": "exit 0\n",  # NAT for the guest: there is no network beyond this netns
        # Reachable once the probe's console shows it came up (and stays up).
        "ssh": 'grep -q "probe: idle" "$FAKE_SSH_CONSOLE" 2>/dev/null || exit 255\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return bin_dir


def run_in_netns(script: str, tmp_path: Path, env: dict[str, str], timeout: float) -> str:
    """Run ``script`` with this Python in new network and PID namespaces (lo up, a default
    route); whatever it leaves running dies with it."""
    setup = (
        "ip link set lo up && ip link add uplink type veth peer name uplink1 && "
        "ip link set uplink up && ip link set uplink1 up && "
        "ip addr add 192.0.2.2/24 dev uplink && ip route add default via 192.0.2.1"
    )
    (tmp_path / "client.py").write_text(textwrap.dedent(script))
    command = f'{setup} && exec "{sys.executable}" "{tmp_path / "client.py"}"'
    result = subprocess.run(
        [*UNSHARE, "sh", "-c", command],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


PYRECRACKER = """
    import json, time
    from pathlib import Path
    from pyrecracker.vm import VMManager

    sock, kernel, disk, work = {args}
    vm = VMManager(sock, kernel, firecracker_logs_path=work + "/fc.log")
    vm.host_ip, vm.guest_ip = "172.16.0.1", "172.16.0.2"
    vm.path_on_host = disk
    vm.mem_size_mib = 64
    vm.boot_args = "console=ttyS0 reboot=k panic=1 pci=off"  # its own default, for a kernel
    steps = []
    vm.configure(); steps.append("configure")
    vm.start(); steps.append("start")
    deadline = time.monotonic() + 30
    while "probe: idle" not in Path(work, "fc.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, Path(work, "fc.log").read_text()
        time.sleep(0.05)
    vm.pause(); steps.append("pause")
    vm.create_snapshot(work + "/snap", work + "/mem"); steps.append("create_snapshot")
    vm.resume(); steps.append("resume")
    vm.host_env_cleanup_pause = 0
    vm.stop(); steps.append("stop")
    print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pyvmm.api.launcher import build_launcher

    return build_launcher(tmp_path_factory.mktemp("launcher"))


def test_pyrecracker_drives_pyvmm_firecracker(
    tmp_path: Path, probe_elf: Path, launcher: Path
) -> None:
    pytest.importorskip(
        "pyrecracker",
        reason="pyrecracker 0.6.4 declares Python >= 3.12: on older Pythons pip needs "
        "--ignore-requires-python to install it (it runs on 3.11)",
    )
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(bytes(1 << 20))
    args = [str(tmp_path / "fc.sock"), str(probe_elf), str(disk), str(tmp_path)]
    env = {"PATH": f"{fake_bin(tmp_path, launcher)}:{os.environ['PATH']}"}
    out = run_in_netns(PYRECRACKER.format(args=args), tmp_path, env, timeout=120)
    assert out.strip().splitlines()[-1] == (
        '["configure", "start", "pause", "create_snapshot", "resume", "stop"]'
    )
    log = (tmp_path / "fc.log").read_text(errors="replace")
    # Its kernel command line, plus the virtio-mmio and root= words pyvmm adds.
    assert "probe: skipped 8 kernel parameters" in log and "hello from probe" in log
    assert (tmp_path / "snap").stat().st_size > 0 and (tmp_path / "mem").stat().st_size > 0


MICROHEART = """
    import json, os
    from microheart.vm import MicroVM

    def alive(pid):
        try:
            status = open(f"/proc/{{pid}}/status").read()
        except FileNotFoundError:
            return False
        return "State:\tZ" not in status  # a zombie nobody reaped has exited

    vm = MicroVM("pyvmm1", rootfs={rootfs!r}, key={key!r}, vcpu=1, mem_mib=64)
    seconds = vm.start(wait=60)
    config = vm.machine_config()
    console = vm.console.read_text(errors="replace")
    pid = vm.pid()
    cmdline = open(f"/proc/{{pid}}/cmdline", "rb").read().split(b"\\0")
    vm.clean()
    print(json.dumps({{"seconds": seconds, "config": config, "console": console,
                      "argv": [a.decode() for a in cmdline if a],
                      "alive_after_clean": alive(pid)}}))
"""


def test_microheart_drives_pyvmm_firecracker(tmp_path: Path, probe_elf: Path) -> None:
    pytest.importorskip("microheart", reason="microheart 0.3.0 is installed with the test extra")
    import json

    home = tmp_path / "home"
    home.mkdir()
    (home / "firecracker").symlink_to(FIRECRACKER)  # where microheart looks for its binary
    (home / "vmlinux-probe").write_bytes(probe_elf.read_bytes())  # ... and for a kernel
    rootfs, key = tmp_path / "rootfs.ext4", tmp_path / "id_ed25519"
    rootfs.write_bytes(bytes(1 << 20))
    key.write_text("not a key: the fake ssh never reads it\n")
    console = home / "vms" / "pyvmm1" / "console.log"
    env = {
        "PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}",
        "MICROHEART_HOME": str(home),
        "FAKE_SSH_CONSOLE": str(console),
    }
    out = run_in_netns(
        MICROHEART.format(rootfs=str(rootfs), key=str(key)), tmp_path, env, timeout=180
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["seconds"] is not None and result["seconds"] < 60
    assert result["config"]["vcpu_count"] == 1 and result["config"]["mem_size_mib"] == 64
    assert "--enable-pci" in result["argv"] and "--config-file" in result["argv"], result
    assert "microheart.ip=172.16.0.2/30" in result["console"]  # its own kernel command line
    assert "probe: idle" in result["console"]
    assert not result["alive_after_clean"]
