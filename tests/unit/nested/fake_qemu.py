"""A stand-in for qemu-system-x86_64 that plays L1's part, for NestedHost's tests.

It reads what NestedHost passes (the console log, the console socket, the
work share), writes console lines, and then follows the steps in
``$FAKE_QEMU_PLAN`` (comma separated, one per boot, counted in the work
directory): ``stall`` prints one line and hangs (a stuck L1), ``ok`` writes
the agent's ``ready`` and then serves commands the way pyvmm/nested/agent.py
does, running them here with ``sh``; ``die`` exits with status 3.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def option(name: str) -> list[str]:
    return [sys.argv[i + 1] for i, arg in enumerate(sys.argv[:-1]) if arg == name]


def main() -> int:
    log = Path(next(v for v in option("-serial") if v.startswith("file:"))[5:])
    sock_path = None
    for value in option("-chardev"):
        for part in value.split(","):
            if part.startswith("path="):
                sock_path = part[5:]
    work = None
    fsdevs = {}
    for value in option("-fsdev"):
        fields = dict(p.split("=", 1) for p in value.split(",")[1:] if "=" in p)
        fsdevs[fields["id"]] = fields["path"]
    for value in option("-device"):
        if "mount_tag=work" in value:
            work = Path(fsdevs[value.split("fsdev=")[1].split(",")[0]])
    assert work is not None and sock_path is not None
    counter = work / "fake-boots"
    boots = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(boots + 1))
    plan = os.environ.get("FAKE_QEMU_PLAN", "ok").split(",")
    step = plan[min(boots, len(plan) - 1)]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    with open(log, "a") as console:
        console.write("[    0.000000] Linux version fake\n")
        console.flush()
        if step == "stall":
            console.write("[    0.880000] Loading compiled-in X.509 certificates\n")
            console.flush()
            signal.pause()
        if step == "die":
            return 3
        conn, _ = server.accept()
        agent = work / "agent"
        (agent / "ready").write_text("0.5\n")
        console.write("pyvmm-nested: agent ready at 0.5 s\n")
        console.flush()
        n = 0
        while not (agent / "shutdown").exists():
            if not (agent / f"cmd-{n}.ready").exists():
                time.sleep(0.02)
                continue
            serve(agent, n, conn)
            n += 1
    return 0


def serve(agent: Path, n: int, conn: socket.socket) -> None:
    c = agent / f"cmd-{n}"
    console = Path(f"{c}.console").exists()
    with open(f"{c}.err", "wb") as err, open(os.devnull if console else f"{c}.out", "wb") as out:
        proc = subprocess.Popen(
            ["sh", f"{c}.sh"],
            stdin=conn.fileno() if console else subprocess.DEVNULL,
            stdout=conn.fileno() if console else out,
            stderr=err,
            env={"PATH": os.environ["PATH"]},
            start_new_session=True,
        )
        while proc.poll() is None:
            if Path(f"{c}.cancel").exists() or (agent / "shutdown").exists():
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    Path(f"{c}.status.tmp").write_text(f"{status}\n")
    os.rename(f"{c}.status.tmp", f"{c}.status")


if __name__ == "__main__":
    sys.exit(main())
