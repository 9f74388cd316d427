"""The real pyvmm-agent (built with gcc) and the real AgentClient, over a Unix socket.

No VM: the agent's ``--unix`` mode serves the same protocol on a Unix socket,
so its C code is exercised here at full speed, on this machine: commands it
runs are real host processes, files it writes land in a temporary "guest"
directory. The end-to-end test over vsock in a Linux guest is
tests/e2e/test_agent.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox import AgentClient
from pyvmm.sandbox import messages as m
from pyvmm.sandbox import protocol as p
from pyvmm.sandbox.errors import (
    GuestFileNotFoundError,
    GuestOperationError,
    UnsafeArchiveError,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    from pyvmm.guestkit.agent_tool import build_agent

    cache = os.environ.get("PYVMM_CACHE")
    return build_agent(Path(cache) if cache else tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def agent_socket(agent_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("agent") / "agent.sock"
    errors = (path.parent / "agent.stderr").open("wb")  # not a pipe nobody reads
    proc = subprocess.Popen(
        [str(agent_binary), "--unix", str(path)], stdout=subprocess.PIPE, stderr=errors
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"PYVMM-AGENT-READY unix:{path}\n".encode()
        yield path
    finally:
        proc.terminate()
        proc.wait(10)
        errors.close()


def connect(path: Path) -> AgentClient:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return AgentClient(sock, timeout=10)


@pytest.fixture
def agent(agent_socket: Path) -> Iterator[AgentClient]:
    client = connect(agent_socket)
    yield client
    client.close()


def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


# --- exec -------------------------------------------------------------------------------


def test_hello(agent: AgentClient) -> None:
    hello = agent.hello
    assert hello.version_min == hello.version_max == 1
    assert hello.caps & (p.Cap.EXEC | p.Cap.PUT | p.Cap.GET | p.Cap.SIGNAL) == 0xF
    assert hello.agent.startswith("pyvmm-agent pid ")
    assert agent.ping() < 1


@pytest.mark.parametrize(
    ("argv", "code", "signal"),
    [
        (["true"], 0, None),
        (["sh", "-c", "exit 7"], 7, None),
        (["sh", "-c", "kill -TERM $$"], 143, 15),
        (["sh", "-c", "kill -KILL $$"], 137, 9),
        (["pyvmm-no-such-command"], 127, None),
        (["/no/such/path"], 127, None),
        (["/"], 126, None),  # a directory: EACCES
    ],
)
def test_exit_codes(agent: AgentClient, argv: list[str], code: int, signal) -> None:
    result = agent.exec(argv)
    assert (result.exit_code, result.signal) == (code, signal)
    if code in (126, 127):
        assert result.error is not None and argv[0] in result.error
        assert result.guest_duration is None
    else:
        assert result.error is None and result.guest_duration is not None


def test_not_executable_file(agent: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    result = agent.exec([str(script)])
    assert result.exit_code == 126
    assert "Permission denied" in result.error
    script.chmod(0o755)
    assert agent.exec([str(script)]).stdout == b"ran\n"


def test_stdout_and_stderr_are_separate(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert (result.stdout, result.stderr) == (b"out\nout2\n", b"err\n")


def test_cwd_env_and_home(agent: AgentClient, tmp_path: Path) -> None:
    result = agent.exec(
        ["sh", "-c", 'pwd; echo "$HOME $FOO $PATH"'], cwd=str(tmp_path), env={"FOO": "bar"}
    )
    lines = result.stdout.decode().splitlines()
    assert lines[0] == str(tmp_path)
    assert lines[1] == "/root bar /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    missing = agent.exec(["true"], cwd="/no/such/dir")
    assert missing.exit_code == 126
    assert missing.error == "cannot enter /no/such/dir: No such file or directory"


@needs_root
def test_uid_and_gid(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "id -u; id -g; id -G; echo $HOME"], uid=65534)
    assert result.stdout == b"65534\n65534\n65534\n/\n"
    assert agent.exec(["id", "-g"], uid=65534, gid=100).stdout == b"100\n"


def test_stdin_bytes_large(agent: AgentClient) -> None:
    data = os.urandom(5 << 20)
    result = agent.exec(["sha256sum"], stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_from_a_pipe_and_a_file_object(agent: AgentClient) -> None:
    read_end, write_end = os.pipe()

    def writer() -> None:
        with os.fdopen(write_end, "wb") as f:
            for i in range(100):
                f.write(b"line %d\n" % i)

    thread = threading.Thread(target=writer)
    thread.start()
    with os.fdopen(read_end, "rb", buffering=0) as source:
        result = agent.exec(["wc", "-l"], stdin=source)
    thread.join()
    assert result.stdout.strip() == b"100"
    assert agent.exec(["cat"], stdin=io.BytesIO(b"from BytesIO")).stdout == b"from BytesIO"


def test_text_stdin_is_refused_before_anything_is_sent(agent: AgentClient) -> None:
    with pytest.raises(ConfigError, match="stdin must be bytes or a binary file, not StringIO"):
        agent.exec(["cat"], stdin=io.StringIO("text"))
    assert agent.ping() < 1


def test_no_stdin_is_dev_null(agent: AgentClient) -> None:
    result = agent.exec(["cat"], timeout=10)
    assert (result.exit_code, result.stdout) == (0, b"")


def test_stdin_the_command_never_reads(agent: AgentClient) -> None:
    result = agent.exec(["true"], stdin=bytes(3 << 20))
    assert result.exit_code == 0
    assert agent.exec(["echo", "next"]).stdout == b"next\n"  # the leftover frames were dropped


def test_output_is_streamed(agent: AgentClient) -> None:
    seen: list[tuple[float, bytes]] = []
    result = agent.exec(
        ["sh", "-c", "echo first; sleep 1; echo second >&2"],
        on_stdout=lambda data: seen.append((time.monotonic(), data)),
        on_stderr=lambda data: seen.append((time.monotonic(), data)),
    )
    ended = time.monotonic()
    assert [data for _, data in seen] == [b"first\n", b"second\n"]
    assert ended - seen[0][0] > 0.7  # the first line came a second before the end
    assert (result.stdout, result.stderr) == (b"", b"")  # given to the callbacks instead


def test_large_output(agent: AgentClient) -> None:
    total = 0

    def count(data: bytes) -> None:
        nonlocal total
        total += len(data)

    assert agent.exec(["head", "-c", str(64 << 20), "/dev/zero"], on_stdout=count).exit_code == 0
    assert total == 64 << 20


def test_timeout_kills_the_process_group(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "sleep 100 & echo $!; wait"], timeout=0.5)
    assert (result.exit_code, result.signal, result.timed_out) == (124, 9, True)
    assert 0.4 < result.duration < 5
    assert gone(int(result.stdout))


def test_leftover_background_processes_are_killed(agent: AgentClient) -> None:
    result = agent.exec(["sh", "-c", "sleep 100 & echo $!"], timeout=10)
    assert result.exit_code == 0
    assert gone(int(result.stdout))


def test_closing_the_connection_kills_the_command(agent_socket: Path) -> None:
    client = connect(agent_socket)
    pids: list[int] = []

    def first_line(data: bytes) -> None:
        pids.append(int(data))
        raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the command

    with pytest.raises(KeyboardInterrupt):
        client.exec(["sh", "-c", "echo $$; exec sleep 100"], on_stdout=first_line)
    assert client.closed
    assert gone(pids[0])


def test_signals_reach_the_command(agent: AgentClient) -> None:
    script = 'trap "echo got INT; exit 3" INT; echo ready; while :; do sleep 0.05; done'

    def on_ready(data: bytes) -> None:
        if b"ready" in data:
            agent.send_signal(2)  # from a callback, as from a CLI's SIGINT handler

    result = agent.exec(["sh", "-c", script], on_stdout=on_ready, timeout=20)
    assert result.exit_code == 3
    # From another thread, while the command runs; SIGTERM to the whole group.
    timer = threading.Timer(0.5, agent.send_signal, args=(15,))
    timer.start()
    result = agent.exec(["sh", "-c", "sleep 100 & wait"], timeout=20)
    timer.join()
    assert (result.exit_code, result.signal) == (143, 15)
    agent.send_signal(9)  # no command runs: nothing happens, nothing is left queued
    assert agent.exec(["echo", "fine"]).stdout == b"fine\n"
    with pytest.raises(ConfigError, match="from 1 to 127"):
        agent.send_signal(0)


def test_concurrent_commands_on_separate_connections(agent_socket: Path) -> None:
    clients = [connect(agent_socket) for _ in range(4)]
    results: list = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda c=c: results.append(c.exec(["sleep", "0.5"])))
        for c in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [r.exit_code for r in results] == [0, 0, 0, 0]
    assert time.monotonic() - started < 1.5  # not 2 s one after the other
    for client in clients:
        client.close()


def test_many_commands_in_one_connection(agent: AgentClient) -> None:
    for i in range(50):
        assert agent.exec(["echo", str(i)]).stdout == f"{i}\n".encode()


# --- put and get ----------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o750)
    (root / "sub" / "data.bin").write_bytes(os.urandom(1 << 20))
    (root / "sub" / "data.bin").chmod(0o600)
    (root / "sub" / "zero").write_bytes(b"")
    (root / "sub" / "link").symlink_to("../run.sh")
    (root / ("long" * 40)).write_bytes(b"a long name")
    (root / "sub" / "empty").chmod(0o700)
    os.utime(root / "sub" / "data.bin", (1_000_000_000, 1_000_000_000))
    os.utime(root / "sub", (1_100_000_000, 1_100_000_000))
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry's kind, mode, mtime (seconds) and content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            out[str(path.relative_to(root))] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                int(st.st_mtime),
                content,
            )
    return out


def test_put_and_get_a_tree(agent: AgentClient, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    guest = tmp_path / "guest"
    guest.mkdir()
    put = agent.put(src, str(guest / "deep" / "placed"))
    assert (put.entries, put.content_bytes) == (8, 18 + (1 << 20) + 11)
    assert snapshot(guest / "deep" / "placed") == snapshot(src)
    got = agent.get(str(guest / "deep" / "placed"), tmp_path / "back")
    assert (got.entries, got.content_bytes, got.skipped) == (8, put.content_bytes, 0)
    assert snapshot(tmp_path / "back") == snapshot(src)
    assert [n for n in os.listdir(guest / "deep") if n.startswith(".pyvmm")] == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(".pyvmm")] == []


def test_put_and_get_a_single_file(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "one").write_bytes(b"single")
    (tmp_path / "one").chmod(0o4711)
    agent.put(host_path=tmp_path / "one", guest_path=str(tmp_path / "guest-one"))
    assert (tmp_path / "guest-one").read_bytes() == b"single"
    assert stat.S_IMODE((tmp_path / "guest-one").stat().st_mode) == 0o4711  # the guest keeps setuid
    (tmp_path / "host-one").write_bytes(b"old content")
    agent.get(guest_path=str(tmp_path / "guest-one"), host_path=tmp_path / "host-one")
    assert (tmp_path / "host-one").read_bytes() == b"single"
    assert stat.S_IMODE((tmp_path / "host-one").stat().st_mode) == 0o711  # the host does not


@needs_root
def test_put_with_an_owner(agent: AgentClient, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    agent.put(src, str(tmp_path / "owned"), uid=1234, gid=4321)
    for path in [tmp_path / "owned", *(tmp_path / "owned").rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (1234, 4321), path
    assert stat.S_IMODE((tmp_path / "owned" / "run.sh").stat().st_mode) == 0o750


def test_put_onto_a_non_empty_directory(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"keep")
    (tmp_path / "src").mkdir()
    with pytest.raises(GuestOperationError, match="Directory not empty"):
        agent.put(tmp_path / "src", str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["x"]
    assert sorted(os.listdir(tmp_path)) == ["src", "taken"]  # no staging directory left
    assert agent.ping() < 1


def test_put_without_its_parent(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(GuestFileNotFoundError):
        agent.put(tmp_path / "f", str(tmp_path / "missing" / "f"), mkdirs=False)
    assert not (tmp_path / "missing").exists()


def test_put_abandoned_places_nothing(agent: AgentClient, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    guest = tmp_path / "guest"
    guest.mkdir()
    with pytest.raises(ConfigError, match="max_files"):
        agent.put(src, str(guest / "dst"), max_files=4)
    assert os.listdir(guest) == []
    assert agent.exec(["true"]).exit_code == 0


def test_get_skips_special_files(agent: AgentClient, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mkfifo(tree / "fifo")
    (tree / "file").write_bytes(b"x")
    stats = agent.get(str(tree), tmp_path / "out")
    assert (stats.entries, stats.skipped) == (2, 1)
    assert os.listdir(tmp_path / "out") == ["file"]


def test_get_refuses_an_escaping_symlink_from_the_real_agent(
    agent: AgentClient, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "passwd").symlink_to("/etc/passwd")
    (tmp_path / "box").mkdir()
    with pytest.raises(UnsafeArchiveError, match="points to the absolute path '/etc/passwd'"):
        agent.get(str(tree), tmp_path / "box" / "out")
    assert os.listdir(tmp_path / "box") == []


def test_get_failures(agent: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(GuestFileNotFoundError, match="stat /no/such: No such file or directory"):
        agent.get("/no/such", tmp_path / "x")
    with pytest.raises(GuestOperationError, match="not a regular file or directory"):
        agent.get("/dev/null", tmp_path / "x")
    assert os.listdir(tmp_path) == []
    assert agent.ping() < 1


# --- what the agent does with a broken host ---------------------------------------------


def raw_session(path: Path) -> tuple[socket.socket, p.FrameDecoder]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock, p.FrameDecoder(p.AGENT_LIMITS)


def read_all(sock: socket.socket, decoder: p.FrameDecoder) -> list:
    """Every message until the agent closes the connection."""
    messages = []
    while data := sock.recv(65536):
        decoder.feed(data)
        while (frame := decoder.next_frame()) is not None:
            messages.append(m.decode_agent_message(*frame))
    return messages


def test_agent_refuses_a_request_before_hello(agent_socket: Path) -> None:
    sock, decoder = raw_session(agent_socket)
    sock.sendall(m.encode_message(m.Ping(b"x")))
    messages = read_all(sock, decoder)
    assert isinstance(messages[0], m.Hello)
    assert messages[1].kind is p.ErrorKind.BAD_REQUEST
    assert messages[1].message == "the first frame must be HELLO"
    sock.close()


def test_agent_refuses_a_version_outside_its_range(agent_socket: Path) -> None:
    sock, decoder = raw_session(agent_socket)
    sock.sendall(m.encode_message(m.HostHello(2)))
    messages = read_all(sock, decoder)
    assert messages[-1].message == "protocol version 2 is not 1..1"
    sock.close()


def test_agent_refuses_a_bad_header_and_ends_the_session(agent_socket: Path) -> None:
    sock, decoder = raw_session(agent_socket)
    sock.sendall(m.encode_message(m.HostHello(1)) + p.HEADER.pack(0, p.HostType.PING, b"\0\1\0"))
    messages = read_all(sock, decoder)
    assert messages[-1].kind is p.ErrorKind.BAD_REQUEST
    assert "bad frame header" in messages[-1].message
    sock.close()


def test_agent_refuses_a_bad_exec_but_goes_on(agent_socket: Path) -> None:
    sock, decoder = raw_session(agent_socket)
    bad = p.encode_frame(
        p.HostType.EXEC, p.encode_fields([(p.Field.ARG, b"x"), (p.Field.PATH, b"/")])
    )
    sock.sendall(m.encode_message(m.HostHello(1)) + bad + m.encode_message(m.Ping(b"still here")))
    sock.shutdown(socket.SHUT_WR)
    messages = read_all(sock, decoder)
    assert [type(m).__name__ for m in messages] == ["Hello", "Failure", "Pong"]
    assert messages[1].message == "EXEC has an unknown field"
    assert messages[2].payload == b"still here"
    sock.close()
