"""``pyvmm-jailer --cgroup-version 2`` for real, in a host whose cgroup2 has its controllers.

This host is hybrid (v2 at /sys/fs/cgroup/unified with no controllers), so
the v2 path runs in the ``linux_host`` (the nested host mounts cgroup2 with
every controller at /sys/fs/cgroup). One helper process there runs three
jailers and reports what the cgroup tree looked like while each VMM ran:

- ``--cgroup cpu.weight=50 --cgroup pids.max=64 --cgroup cpuset.mems=0``:
  the VM's cgroup under ``pyvmm-firecracker/``, controllers enabled in every
  ancestor's ``cgroup.subtree_control``, ``cpuset.cpus`` copied from the
  parent, the values written, the pid in ``cgroup.procs``;
- ``--parent-cgroup outer/inner`` with a ``--cgroup``: the same, nested;
- ``--parent-cgroup existing`` and no ``--cgroup``: the process moves into the
  existing parent and no cgroup of its own is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.linux

HELPER = r"""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path

exec_dir = Path(sys.argv[1])
script = exec_dir / "pyvmm-firecracker"
script.write_text(f"#!{sys.executable}\nimport sys\nfrom pyvmm.firecracker_cli import main\n"
                  "sys.exit(main())\n")
script.chmod(0o755)
base = Path("/run/pyvmm-jail-test")
base.mkdir(exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)  # no nodev: /dev/kvm
cg = Path("/sys/fs/cgroup")
report = {"controllers": (cg / "cgroup.controllers").read_text().split()}

def jail(vm_id, *flags):
    root = base / "pyvmm-firecracker" / vm_id / "root"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm.jail.jailer", "--id", vm_id,
                             "--exec-file", str(script), "--uid", "4321", "--gid", "4321",
                             "--chroot-base-dir", str(base), "--cgroup-version", "2", *flags],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    pid_file = root / "pyvmm-firecracker.pid"
    deadline = time.monotonic() + 240
    while not (pid_file.exists() and pid_file.read_text().isdigit()):
        if proc.poll() is not None or time.monotonic() > deadline:
            return {"error": proc.stderr.read().decode() if proc.poll() is not None else "timeout"}
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    seen = {"pid": pid, "cgroup": Path(f"/proc/{pid}/cgroup").read_text().strip()}
    group = seen["cgroup"].split("::", 1)[1]
    seen["procs"] = (cg / group.lstrip("/") / "cgroup.procs").read_text().split()
    files = {}
    for rel in ("cgroup.subtree_control", "pyvmm-firecracker/cgroup.subtree_control",
                "pyvmm-firecracker/vm-a/cpu.weight", "pyvmm-firecracker/vm-a/pids.max",
                "pyvmm-firecracker/vm-a/cpuset.mems", "pyvmm-firecracker/vm-a/cpuset.cpus",
                "cpuset.cpus.effective", "outer/cgroup.subtree_control",
                "outer/inner/cgroup.subtree_control", "outer/inner/vm-b/cpu.weight"):
        if (cg / rel).exists():
            files[rel] = (cg / rel).read_text().strip()
    seen["files"] = files
    seen["made"] = sorted(p.name for p in (cg / "existing").iterdir() if p.is_dir()) \
        if (cg / "existing").is_dir() else None
    os.kill(pid, signal.SIGKILL)
    proc.wait(30)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return seen

report["own"] = jail("vm-a", "--cgroup", "cpu.weight=50", "--cgroup", "pids.max=64",
                     "--cgroup", "cpuset.mems=0")
report["nested"] = jail("vm-b", "--parent-cgroup", "outer/inner", "--cgroup", "cpu.weight=20")
(cg / "existing").mkdir(exist_ok=True)
report["parent_only"] = jail("vm-c", "--parent-cgroup", "existing")
for rel in ("pyvmm-firecracker/vm-a", "pyvmm-firecracker", "outer/inner/vm-b", "outer/inner",
            "outer", "existing"):
    try:
        (cg / rel).rmdir()
    except OSError:
        pass
subprocess.run(["umount", str(base)])
print("REPORT " + json.dumps(report))
"""


def test_cgroup_v2_as_firecrackers_jailer_does_it(linux_host, tmp_path: Path) -> None:
    result = linux_host.run(["python3", "-c", HELPER, str(tmp_path)], timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(lines[0][len("REPORT ") :])
    assert {"cpu", "pids", "cpuset"} <= set(report["controllers"])

    own = report["own"]
    assert "error" not in own, own
    assert own["cgroup"] == "0::/pyvmm-firecracker/vm-a"
    assert own["procs"] == [str(own["pid"])]
    files = own["files"]
    for control in ("cgroup.subtree_control", "pyvmm-firecracker/cgroup.subtree_control"):
        assert {"cpu", "pids", "cpuset"} <= set(files[control].split()), files
    assert files["pyvmm-firecracker/vm-a/cpu.weight"] == "50"
    assert files["pyvmm-firecracker/vm-a/pids.max"] == "64"
    assert files["pyvmm-firecracker/vm-a/cpuset.mems"] == "0"
    assert files["pyvmm-firecracker/vm-a/cpuset.cpus"] == files["cpuset.cpus.effective"]

    nested = report["nested"]
    assert "error" not in nested, nested
    assert nested["cgroup"] == "0::/outer/inner/vm-b"
    assert nested["files"]["outer/inner/vm-b/cpu.weight"] == "20"
    assert "cpu" in nested["files"]["outer/cgroup.subtree_control"].split()
    assert "cpu" in nested["files"]["outer/inner/cgroup.subtree_control"].split()

    parent_only = report["parent_only"]
    assert "error" not in parent_only, parent_only
    assert parent_only["cgroup"] == "0::/existing"
    assert parent_only["procs"] == [str(parent_only["pid"])]
    assert parent_only["made"] == []  # no cgroup of its own
