"""The fork server on the host's /dev/kvm with the probe guest: ``pyvmm run`` directly and
through ``pyvmm forkserver`` must be indistinguishable to whoever runs it.

Each comparison runs the same command line both ways (the installed entry,
``python -m pyvmm``, with and without ``PYVMM_FORKSERVER``) and compares
exit status, stdout and stderr byte for byte. Then what only a server has:
lifetime rules (a killed client, a stopped or killed server), many clients
at once, the socket's mode and the peer's uid, bad requests.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pty
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.forkserver.protocol import (
    MAX_CONTROL_BYTES,
    FrameReader,
    Request,
    frame,
    parse_reply,
    request_frame,
)
from tests.conftest import requires_kvm

pytestmark = requires_kvm

PYVMM = [sys.executable, "-m", "pyvmm"]


class Server:
    """A ``pyvmm forkserver`` process serving ``directory/fs.sock``."""

    def __init__(self, directory: Path, max_fds: int | None = None, nohup: bool = False) -> None:
        self.path = directory / "fs.sock"
        self.log = directory / "server.log"

        def limit_fds() -> None:
            if max_fds is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, hard))
            if nohup:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)

        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*PYVMM, "forkserver", "--socket", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=limit_fds,
            )
        deadline = time.monotonic() + 120
        while b"listening on" not in self.log.read_bytes():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the fork server did not start"
            time.sleep(0.05)

    def children(self) -> set[int]:
        """Pids of the server's child processes (the VM processes)."""
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == self.process.pid:
                        found.add(int(entry))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("forkserver"))
    yield running
    assert running.stop() == 0, running.log.read_text()
    assert not running.path.exists()


def environment(server: Server | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYVMM_FORKSERVER"}
    if server is not None:
        env["PYVMM_FORKSERVER"] = str(server.path)
    return {**env, **extra}


def pyvmm(
    server: Server | None, *args: str, stdin: bytes | None = None, **kwargs: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*PYVMM, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        timeout=120,
        check=False,
        env=environment(server),
        **kwargs,
    )


def start(
    server: Server | None,
    *args: str,
    stdin: int = subprocess.PIPE,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A ``pyvmm`` that keeps running (stdin a pipe left open, by default); output piped."""
    return subprocess.Popen(
        [*PYVMM, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(server, **(extra_env or {})),
    )


@pytest.fixture(params=["c-waiter", "python-waiter"])
def waiting(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """How the client waits for its VM: the server's C waiter (found in the cache
    directory), or in Python (a cache directory without it)."""
    if request.param == "c-waiter":
        return {}
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    return {"XDG_CACHE_HOME": str(empty)}


def wait_for_output(process: subprocess.Popen[bytes], needle: bytes, timeout: float = 60) -> bytes:
    """Read ``process``'s stdout until ``needle``; what was read."""
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {seen!r}"
        ready, _, _ = select.select([process.stdout], [], [], left)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"stdout ended before {needle!r}: {seen!r}"
            seen += chunk
    return seen


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # ended; its parent has not reaped it yet
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.05)


def ask(path: Path, data: bytes, fds: list[int] | None = None) -> list[dict[str, object]]:
    """Send raw bytes (and fds) to the server; every reply frame until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock.sendmsg([data], ancillary)
        reader, replies = FrameReader(MAX_CONTROL_BYTES), []
        while chunk := sock.recv(4096):
            reader.feed(chunk)
            while (message := reader.next_frame()) is not None:
                replies.append(message)
        return replies


# --- the same result both ways ---------------------------------------------------------


CASES = {
    "reset": (["--cmdline", "hello", "--memory", "32"], 0),
    "triple-fault": (["--cmdline", "fault", "--memory", "32"], 1),
    "timeout": (["--cmdline", "echo", "--memory", "32", "--timeout", "1"], 1),
    "bad-flag": (["--bogus"], 2),
    "bad-cpus": (["--cpus", "0"], 2),
    "help": (["--help"], 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_status_stdout_and_stderr_directly_and_through_the_server(
    server: Server, probe_elf: Path, case: str
) -> None:
    flags, status = CASES[case]
    args = ["run", "--kernel", str(probe_elf), *flags]
    direct = pyvmm(None, *args)
    relayed = pyvmm(server, *args)
    assert direct.returncode == status, direct.stderr
    assert (relayed.returncode, relayed.stdout, relayed.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    )


def test_a_missing_kernel_is_the_same_one_line_error(server: Server, tmp_path: Path) -> None:
    args = ["run", "--kernel", str(tmp_path / "nope.elf")]
    direct, relayed = pyvmm(None, *args), pyvmm(server, *args)
    assert relayed.returncode == direct.returncode == 2
    assert relayed.stderr == direct.stderr
    assert relayed.stderr.decode().count("\n") == 1 and b"nope.elf" in relayed.stderr


def test_piped_stdin_reaches_the_guest(server: Server, probe_elf: Path) -> None:
    payload = b"".join(b"line %03d %s\n" % (i, b"x" * 50) for i in range(100)) + b"end\n"
    args = ["run", "--kernel", str(probe_elf), "--cmdline", "echo", "--memory", "32"]
    relayed = pyvmm(server, *args, stdin=payload)
    assert relayed.returncode == 0, relayed.stderr
    echoed = [line[6:] for line in relayed.stdout.decode().splitlines() if line.startswith("echo:")]
    assert [line.rstrip("\r") for line in echoed] == payload.decode().splitlines()
    assert relayed.stdout == pyvmm(None, *args, stdin=payload).stdout


def test_relative_paths_and_the_umask_are_the_client_s(
    server: Server, probe_elf: Path, tmp_path: Path
) -> None:
    """--serial-out with a relative path lands in the client's directory, made under its umask."""
    modes = {}
    for name, via in (("direct", None), ("relayed", server)):
        work = tmp_path / name
        work.mkdir()
        result = subprocess.run(
            [*PYVMM, "run", "--kernel", str(probe_elf), "--cmdline", "hello", "--memory", "32",
             "--serial-out", "serial.txt"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False, cwd=work,
            env=environment(via), preexec_fn=lambda: os.umask(0o027),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b"hello from probe" in (work / "serial.txt").read_bytes()
        modes[name] = stat.S_IMODE((work / "serial.txt").stat().st_mode)
    assert modes["relayed"] == modes["direct"]
    assert modes["direct"] & 0o027 == 0


def test_a_terminal_is_the_console_as_in_a_direct_run(server: Server, probe_elf: Path) -> None:
    """A pty as stdin and stdout: raw mode while the VM runs, typed lines reach the guest,
    Ctrl-A X quits, and the terminal's settings come back (the VM process is in another
    session, where the pty is not its controlling terminal: nothing may depend on that)."""
    ends = {}
    for name, via in (("direct", None), ("relayed", server)):
        leader, follower = pty.openpty()
        original = termios.tcgetattr(follower)
        process = subprocess.Popen(
            [*PYVMM, *echo_args(probe_elf)],
            stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=environment(via),
        )  # fmt: skip
        try:
            seen = b""
            while b"cmdline 'echo'" not in seen:
                assert select.select([leader], [], [], 60)[0], seen
                seen += os.read(leader, 4096)
            raw = termios.tcgetattr(follower)
            os.write(leader, b"typed at a terminal\n")
            while b"echo: typed at a terminal" not in seen:
                assert select.select([leader], [], [], 60)[0], seen
                seen += os.read(leader, 4096)
            os.write(leader, b"\x01x")  # Ctrl-A X
            _, err = process.communicate(timeout=60)
            ends[name] = (process.returncode, err, raw[3] & termios.ICANON)
            assert termios.tcgetattr(follower) == original
        finally:
            process.kill()
            os.close(leader)
            os.close(follower)
    assert ends["relayed"] == ends["direct"]
    assert ends["direct"][2] == 0  # raw: no canonical line editing while it ran


# --- signals and lifetimes ---------------------------------------------------------------


def echo_args(probe_elf: Path) -> list[str]:
    return ["run", "--kernel", str(probe_elf), "--cmdline", "echo", "--memory", "32"]


def test_sigterm_to_the_client_stops_the_vm_as_a_direct_run(
    server: Server, probe_elf: Path, waiting: dict[str, str]
) -> None:
    ends = {}
    for name, via in (("direct", None), ("relayed", server)):
        process = start(via, *echo_args(probe_elf), extra_env=waiting)
        wait_for_output(process, b"probe: cmdline 'echo'")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        ends[name] = (process.returncode, err)
    assert ends["relayed"] == ends["direct"]
    assert b"SIGTERM" in ends["direct"][1]


def test_the_vm_process_is_a_fresh_session_with_no_server_fds(
    server: Server, probe_elf: Path
) -> None:
    before = server.children()
    process = start(server, *echo_args(probe_elf))
    try:
        wait_for_output(process, b"probe: cmdline 'echo'")
        (child,) = server.children() - before
        assert os.getsid(child) == child and os.getpgid(child) == child
        status = Path(f"/proc/{child}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        targets = [os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")]
        assert not [t for t in targets if t.startswith(("socket:", "pidfd", "anon_inode:[pidfd]"))]
        for fd in (0, 1, 2):  # the client's pipes
            assert os.readlink(f"/proc/{child}/fd/{fd}").startswith("pipe:")
    finally:
        process.kill()
        process.wait(30)


def thread_confinement(pid: int) -> list[tuple[str, str]]:
    """(thread name, seccomp mode) of every thread of ``pid``."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        fields = dict(line.split(":\t", 1) for line in status if ":\t" in line)
        found.append((fields["Name"], fields["Seccomp"]))
    return sorted(found)


def test_the_vm_process_confines_its_threads_as_a_direct_run(
    server: Server, probe_elf: Path
) -> None:
    """Each thread of a VM process has the same seccomp mode as in a direct ``pyvmm run``:
    the server adds no filter of its own, the VM process installs the run's."""
    seen = {}
    for name, via in (("direct", None), ("relayed", server)):
        before = server.children()
        process = start(via, *echo_args(probe_elf))
        try:
            wait_for_output(process, b"probe: cmdline 'echo'")
            (pid,) = (server.children() - before) if via else (process.pid,)
            seen[name] = thread_confinement(pid)
        finally:
            process.kill()
            process.wait(30)
    assert seen["relayed"] == seen["direct"]
    assert len(seen["direct"]) >= 3  # main, vCPU, I/O (and the stdin relay)
    ((_, server_mode),) = thread_confinement(server.process.pid)  # one thread, unfiltered
    assert server_mode == "0"


def test_a_killed_client_s_vm_process_is_stopped(
    server: Server, probe_elf: Path, waiting: dict[str, str]
) -> None:
    before = server.children()
    process = start(server, *echo_args(probe_elf), extra_env=waiting)
    wait_for_output(process, b"probe: cmdline 'echo'")
    (child,) = server.children() - before
    process.kill()
    process.wait(30)
    wait_gone(child)
    assert pyvmm(server, "run", "--kernel", str(probe_elf), "--cmdline", "hello").returncode == 0


def test_many_clients_at_once(server: Server, probe_elf: Path) -> None:
    args = ["run", "--kernel", str(probe_elf), "--cmdline", "hello", "--memory", "32"]
    processes = [start(server, *args, stdin=subprocess.DEVNULL) for _ in range(12)]
    results = [(p.communicate(timeout=180), p.returncode) for p in processes]
    for (out, err), code in results:
        assert code == 0, err
        assert b"hello from probe" in out and out.rstrip().endswith(b"PROBE RESULT: PASS")
        assert err == b"pyvmm: reset: guest reset (i8042)\n"


def test_stopping_the_server_stops_its_vms_and_removes_the_socket(
    tmp_path: Path, probe_elf: Path
) -> None:
    own = Server(tmp_path)
    process = start(own, *echo_args(probe_elf))
    wait_for_output(process, b"probe: cmdline 'echo'")
    assert own.stop() == 0
    _, err = process.communicate(timeout=60)
    direct = start(None, *echo_args(probe_elf))
    wait_for_output(direct, b"probe: cmdline 'echo'")
    direct.send_signal(signal.SIGTERM)
    _, direct_err = direct.communicate(timeout=60)
    assert (process.returncode, err) == (direct.returncode, direct_err)  # the VM got SIGTERM
    assert not own.path.exists()
    assert b"SIGTERM: stopping (1 VM processes running)" in own.log.read_bytes()


def test_a_killed_server_takes_its_vms_with_it(
    tmp_path: Path, probe_elf: Path, waiting: dict[str, str]
) -> None:
    own = Server(tmp_path)
    process = start(own, *echo_args(probe_elf), extra_env=waiting)
    wait_for_output(process, b"probe: cmdline 'echo'")
    (child,) = own.children()
    own.process.kill()
    own.process.wait(30)
    wait_gone(child)  # PR_SET_PDEATHSIG
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    # Two lines on the client's stderr: its own, and the VM's (it has the same stderr).
    assert sorted(err.decode().splitlines()) == [
        f"pyvmm: error: fork server {own.path}: the connection closed before the VM ended",
        "pyvmm: host-signal: received SIGTERM",
    ]


# --- who may ask, and what -----------------------------------------------------------------


def test_no_server_is_one_line_naming_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    result = subprocess.run(
        [*PYVMM, "run", "--kernel", "k"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
        env={**environment(None), "PYVMM_FORKSERVER": str(missing)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("pyvmm: error: no fork server at")
    assert f"pyvmm forkserver --socket {missing}" in result.stderr


def test_other_commands_never_go_through_the_server(tmp_path: Path) -> None:
    env = {**environment(None), "PYVMM_FORKSERVER": str(tmp_path / "none.sock")}
    for args in (["--version"], ["--help"], ["doctor", "--help"]):
        result = subprocess.run(
            [*PYVMM, *args], capture_output=True, timeout=60, check=False, env=env
        )
        assert result.returncode == 0, result.stderr


#: Runs the client in this interpreter and lists what it imported, at its exit.
CLIENT_IMPORTS = """
import atexit, sys
listing = sys.argv[1]
def report():
    with open(listing, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
atexit.register(report)
sys.argv = ["pyvmm", *sys.argv[2:]]
from pyvmm.entry import main
main()
"""


def test_a_waiting_client_is_the_small_c_waiter(server: Server, probe_elf: Path) -> None:
    from pyvmm.forkserver.waiter import waiter_path

    process = start(server, *echo_args(probe_elf))
    try:
        wait_for_output(process, b"probe: cmdline 'echo'")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{process.pid}/exe") != waiter_path():
            assert time.monotonic() < deadline, os.readlink(f"/proc/{process.pid}/exe")
            time.sleep(0.05)
        rollup = Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines()
        pss_kib = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
        assert pss_kib < 1024, pss_kib
    finally:
        process.kill()
        process.wait(30)


def test_the_client_imports_no_vm_machinery(
    server: Server, probe_elf: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "modules.txt"
    (tmp_path / "empty-cache").mkdir()  # no C waiter: the client waits, then exits, in Python
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_IMPORTS, str(listing), "run", "--kernel", str(probe_elf),
         "--cmdline", "hello", "--memory", "32"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
        env=environment(server, XDG_CACHE_HOME=str(tmp_path / "empty-cache")),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"hello from probe" in result.stdout
    modules = set(listing.read_text().split())
    ours = sorted(m for m in modules if m == "pyvmm" or m.startswith("pyvmm."))
    assert ours == [
        "pyvmm", "pyvmm.entry", "pyvmm.forkserver", "pyvmm.forkserver.client",
        "pyvmm.forkserver.protocol", "pyvmm.forkserver.waiter",
    ]  # fmt: skip
    assert "click" not in modules and "cffi" not in modules


#: What a VM process runs after the server's preload: nothing may be imported then.
RUN_AFTER_PRELOAD = """
import sys
from pyvmm.forkserver.preload import preload
preload()
before = set(sys.modules)
from pyvmm.cli import main
try:
    main(args=sys.argv[2:], prog_name="pyvmm")
except SystemExit as stop:
    code = stop.code
with open(sys.argv[1], "w") as out:
    out.write(f"{code}\\n" + "\\n".join(sorted(set(sys.modules) - before)))
"""


def test_the_preload_holds_everything_a_run_imports(probe_elf: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = tmp_path / "vm.json"
    boot = {"kernel_image_path": str(probe_elf), "boot_args": "hello"}
    machine = {"vcpu_count": 2, "mem_size_mib": 32}
    config.write_text(json.dumps({"boot-source": boot, "machine-config": machine, "entropy": {}}))
    runs = {
        "devices": ["--kernel", str(probe_elf), "--cmdline", "hello", "--memory", "32", "--rng",
                    "--drive", f"path={disk}", "--vsock", f"cid=3,uds={tmp_path / 'v.sock'}"],
        "config": ["--config", str(config)],
    }  # fmt: skip
    for name, flags in runs.items():
        listing = tmp_path / f"{name}.txt"
        result = subprocess.run(
            [sys.executable, "-c", RUN_AFTER_PRELOAD, str(listing), "run", *flags],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        code, *imported = listing.read_text().splitlines()
        assert code == "0", result.stderr
        assert imported == [], name


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pyvmm-fs-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


#: Connect as uid 65534 (imports first, as root, then drop): what happened.
AS_NOBODY = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit()
sock.settimeout(30)
print(sock.recv(4096)[4:].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid needs root")
def test_the_socket_is_0600_and_another_uid_is_refused(shared_dir: Path, probe_elf: Path) -> None:
    own = Server(shared_dir)
    try:
        mode = own.path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

        def as_nobody() -> str:
            result = subprocess.run(
                [sys.executable, "-c", AS_NOBODY, str(own.path)],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            return result.stdout.strip()

        assert as_nobody() == "EACCES"
        own.path.chmod(0o666)  # as if the mode were wider: SO_PEERCRED still says no
        assert as_nobody() == '{"error":"refused: uid 65534 is not the fork server\'s uid 0"}'
        result = pyvmm(own, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
        assert result.returncode == 0, result.stderr
        assert b"refused: uid 65534" in own.log.read_bytes()
    finally:
        assert own.stop() == 0


def a_request(argv: tuple[str, ...] = ("run", "--help"), fds: tuple[int, ...] = (0, 1, 2)):
    return request_frame(Request(argv, "pyvmm", "/", 0o22, {}, fds))


def test_bad_requests_get_one_error_and_the_server_carries_on(
    server: Server, probe_elf: Path
) -> None:
    null = [os.open(os.devnull, os.O_RDWR) for _ in range(4)]
    try:
        cases = {
            "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, "over the limit"),
            "not-json": (struct.pack(">I", 5) + b"hello", None, "not JSON"),
            "oversized": (struct.pack(">I", 1 << 30), None, "over the limit of 65536"),
            "no-fds": (a_request(), None, "names 3 standard fds but 0"),
            "two-fds": (a_request(), null[:2], "names 3 standard fds but 2"),
            "four-fds": (a_request(), null, "more than 3 file descriptors"),
            "not-run": (a_request(("doctor",)), null[:3], "only 'pyvmm run'"),
            "bad-env": (frame({"argv": ["run"], "prog": "p", "cwd": "/", "umask": 0,
                               "env": {"LD_PRELOAD": "x"}, "fds": []}), None, "LD_PRELOAD"),
        }  # fmt: skip
        before = server.children()
        for name, (data, fds, needle) in cases.items():
            replies = ask(server.path, data, fds)
            assert len(replies) == 1, name
            reply = parse_reply(replies[0])
            assert reply.kind == "error" and needle in str(reply.value), (name, reply.value)
        assert server.children() == before
    finally:
        for fd in null:
            os.close(fd)
    assert server.process.poll() is None
    result = pyvmm(server, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
    assert result.returncode == 0, result.stderr


def test_a_client_that_breaks_the_protocol_mid_run_loses_its_vm(
    server: Server, probe_elf: Path
) -> None:
    before = server.children()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(os.devnull, "rb") as null:
        sock.settimeout(30)
        sock.connect(str(server.path))
        request = a_request(tuple(echo_args(probe_elf)))
        stdio = array.array("i", [null.fileno(), null.fileno(), null.fileno()])
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, stdio)])
        reader = FrameReader(MAX_CONTROL_BYTES)
        reader.feed(sock.recv(4096))
        pid = parse_reply(reader.next_frame() or {}).value
        assert pid in server.children() - before
        sock.sendall(frame({"signal": int(signal.SIGKILL)}))  # not one a client may forward
        reader.feed(sock.recv(4096))
        reply = parse_reply(reader.next_frame() or {})
        assert (reply.kind, reply.value) == ("error", "signal 9 is not one a client forwards")
    wait_gone(int(pid))


def test_a_silent_client_is_dropped_after_10_s(server: Server, probe_elf: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(server.path))
        start_time = time.monotonic()
        result = pyvmm(server, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
        assert result.returncode == 0, result.stderr  # served meanwhile
        silent.settimeout(30)
        reply = silent.recv(4096)
        assert 9 < time.monotonic() - start_time < 20
        assert b"no whole request within 10 s" in reply


def test_a_full_server_says_busy_and_serves_again(tmp_path: Path, probe_elf: Path) -> None:
    """With 40 fds the server budgets for two waiting clients: a third is told, not hung."""
    own = Server(tmp_path, max_fds=40)
    try:
        waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for sock in waiting:
            sock.connect(str(own.path))
        replies = ask(own.path, a_request())
        assert len(replies) == 1 and "busy" in str(parse_reply(replies[0]).value)
        for sock in waiting:
            sock.close()
        time.sleep(0.5)
        result = pyvmm(own, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
        assert result.returncode == 0, result.stderr
    finally:
        assert own.stop() == 0


def test_a_working_directory_that_is_gone_is_one_line(server: Server) -> None:
    read_end, write_end = os.pipe()
    with open(os.devnull, "rb") as null:
        request = request_frame(
            Request(("run", "--help"), "pyvmm", "/no/such/dir", 0o22, {}, (0, 1, 2))
        )
        replies = ask(server.path, request, [null.fileno(), null.fileno(), write_end])
    os.close(write_end)
    with os.fdopen(read_end, "rb") as err:
        assert (
            err.read() == b"pyvmm: error: cannot enter the working directory '/no/such/dir': "
            b"No such file or directory\n"
        )
    assert [parse_reply(r).kind for r in replies] == ["pid", "exit"]
    assert parse_reply(replies[1]).value == 2


def test_a_second_server_on_a_live_socket_is_one_line_and_a_stale_one_is_replaced(
    tmp_path: Path, probe_elf: Path
) -> None:
    own = Server(tmp_path)
    second = subprocess.run(
        [*PYVMM, "forkserver", "--socket", str(own.path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert second.stderr.splitlines()[-1] == (
        f"pyvmm: error: fork server socket {str(own.path)!r} is in use: another process "
        "listens on it"
    )
    own.process.kill()  # leaves its socket file behind
    own.process.wait(30)
    assert own.path.exists()
    again = Server(tmp_path)
    try:
        result = pyvmm(again, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
        assert result.returncode == 0, result.stderr
        assert b"removed the stale socket" in again.log.read_bytes()
    finally:
        assert again.stop() == 0


def test_a_server_started_under_nohup_ignores_sighup(tmp_path: Path, probe_elf: Path) -> None:
    own = Server(tmp_path, nohup=True)
    try:
        own.process.send_signal(signal.SIGHUP)
        result = pyvmm(own, "run", "--kernel", str(probe_elf), "--cmdline", "hello")
        assert result.returncode == 0, result.stderr
        assert own.process.poll() is None
    finally:
        assert own.stop() == 0
