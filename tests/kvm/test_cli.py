"""Bad input on the command line: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_kvm


def pyvmm(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
        **kwargs,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyvmm: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def elf_header(machine: int, elf_class: int = 2) -> bytes:
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    if elf_class == 2:
        return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 56, 0, 64, 0, 0)
    return ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 52, 32, 0, 40, 0, 0)


def old_bzimage() -> bytes:
    image = bytearray(0x1000)
    image[0x1F1] = 4  # setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x200:0x202] = b"\xeb\x66"  # jmp over the header: it is 0x66 bytes long
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x0209)
    return bytes(image)


@pytest.fixture
def kernel(tmp_path: Path, probe_elf: Path) -> Path:
    return probe_elf


@pytest.mark.parametrize(
    ("contents", "needles"),
    [
        (None, ("kernel",)),
        (b"", ("empty",)),
        (b"just some text, not a kernel" * 40, ("not a kernel",)),
        (elf_header(183), ("AArch64",)),
        (elf_header(3, elf_class=1), ("x86_64",)),
        (old_bzimage(), ("2.09", "2.12")),
    ],
    ids=["missing", "empty", "text", "arm-elf", "i386-elf", "old-bzimage"],
)
def test_bad_kernel(tmp_path: Path, contents: bytes | None, needles: tuple[str, ...]) -> None:
    path = tmp_path / "kernel"
    if contents is not None:
        path.write_bytes(contents)
    assert_one_line_error(pyvmm("run", "--kernel", str(path)), *needles)


def test_kernel_is_directory(tmp_path: Path) -> None:
    assert_one_line_error(pyvmm("run", "--kernel", str(tmp_path)), str(tmp_path))


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--cpus", "0"], "cpus must be between 1 and 32"),
        (["--cpus", "33"], "cpus must be between 1 and 32"),
        (["--cpus", "two"], "cpus must be a whole number"),
        (["--memory", "4"], "too small"),
        (["--memory", "100T"], "too large"),
        (["--memory", "65537K"], "not a multiple"),
        (["--memory", "lots"], "not a size"),
    ],
)
def test_bad_machine_flags(tmp_path: Path, flags: list[str], needle: str) -> None:
    assert_one_line_error(pyvmm("run", "--kernel", str(tmp_path / "k"), *flags), needle)


def test_cmdline_too_long(probe_elf: Path) -> None:
    result = pyvmm("run", "--kernel", str(probe_elf), "--cmdline", "x" * 5000)
    assert_one_line_error(result, "command line")


def test_missing_initrd(probe_elf: Path, tmp_path: Path) -> None:
    result = pyvmm("run", "--kernel", str(probe_elf), "--initrd", str(tmp_path / "nope"))
    assert_one_line_error(result, "initrd")


def test_initrd_too_large(probe_elf: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "big.img"
    with initrd.open("wb") as handle:
        handle.truncate(40 << 20)  # sparse: 40 MiB into a 32 MiB guest
    result = pyvmm("run", "--kernel", str(probe_elf), "--initrd", str(initrd), "--memory", "32")
    assert_one_line_error(result, "initrd", "does not fit")


@requires_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_no_permission_on_dev_kvm(probe_elf: Path) -> None:
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pyvmm-perm-", dir="/tmp"))
    shared.chmod(0o755)
    kernel = shared / "probe.elf"
    shutil.copy(probe_elf, kernel)
    kernel.chmod(0o644)
    # Import everything first, then become 'nobody', then run the CLI.
    script = (
        "import os, sys, pyvmm.cli, pyvmm.vmm.machine, pyvmm.host.terminal, pyvmm.config;"
        "import pyvmm.boot.elf, pyvmm.cli_confinement, pyvmm.jail.confine, pyvmm.jail.seccomp;"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
        f"sys.argv = ['pyvmm', 'run', '--kernel', {str(kernel)!r}];"
        "pyvmm.cli.main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    shutil.rmtree(shared)
    assert_one_line_error(result, "no permission", "/dev/kvm")


def test_help_lists_commands() -> None:
    result = pyvmm("--help")
    assert result.returncode == 0
    for command in ("run", "doctor", "guest"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--net", "tap=x,rx_bw=abc"], ("rx_bw='abc'", "expected SIZE")),
        (["--net", "tap=x,tx_ops=1/1h"], ("tx_ops='1/1h'",)),
        (["--net", "tap=x,rx_speed=1"], ("rx_speed=1", "rx_bw=RATE")),
        (["--net", "tap=x,tx_bw=1K,tx_bw=2K"], ("tx_bw= is given twice",)),
        (["--rng-rate", "bw=abc"], ("rng rate", "expected SIZE")),
        (["--rng", "--rng-rate", "ops=0"], ("rng rate", "must be positive")),
    ],
)
def test_bad_rate_limit_flags(tmp_path: Path, flags: list[str], needles: tuple[str, ...]) -> None:
    assert_one_line_error(pyvmm("run", "--kernel", str(tmp_path / "k"), *flags), *needles)


def test_good_rate_limit_flags_pass_validation(tmp_path: Path) -> None:
    """Valid limits get past the config check: what fails is the missing kernel (or,
    without root, opening the TAP, which comes first)."""
    result = pyvmm(
        "run",
        "--kernel",
        str(tmp_path / "k"),
        "--net",
        f"tap=pyvc{os.getpid() % 100000},rx_bw=10M/1s,rx_ops=1000/100ms,tx_bw=1G,tx_ops=10K",
        "--rng-rate",
        "bw=1K/1s,ops=100",
    )
    assert_one_line_error(result)
    assert str(tmp_path / "k") in result.stderr or "TAP" in result.stderr
    assert "rate limit" not in result.stderr and "option" not in result.stderr
    help_text = pyvmm("run", "--help").stdout
    assert "--rng-rate" in help_text and "rx_bw" in help_text


@pytest.mark.parametrize(
    ("vsock", "needles"),
    [
        ("cid=3", ("has no uds=PATH",)),
        ("uds=/tmp/x.sock", ("has no cid=N",)),
        ("cid=two,uds=/tmp/x.sock", ("cid='two' is not a number",)),
        ("cid=2,uds=/tmp/x.sock", ("guest CID 2 is out of range",)),
        ("cid=3,uds=/no/such/dir/v.sock", ("directory", "missing")),
        ("cid=3,uds=/tmp/" + "x" * 120, ("at most 107",)),
        ("cid=3,port=5", ("'port=5' is not one of cid=N, uds=PATH",)),
    ],
)
def test_bad_vsock_flags(tmp_path: Path, vsock: str, needles: tuple[str, ...]) -> None:
    assert_one_line_error(pyvmm("run", "--kernel", str(tmp_path / "k"), "--vsock", vsock), *needles)


def test_vsock_socket_path_that_exists_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    result = pyvmm("run", "--kernel", str(tmp_path / "k"), "--vsock", f"cid=3,uds={taken}")
    assert_one_line_error(result, "already exists")
    assert taken.read_text() == ""


def test_run_help_documents_nested() -> None:
    result = pyvmm("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--nested [auto|always|never]" in text
    assert "(PVM, see `pyvmm doctor`)" in text


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--net", "tap=pyvmm-test0"], "--net: a TAP device for a VM in the nested host"),
        (["--vsock", "cid=3,uds=/tmp/pyvmm-test-never.sock"], "--vsock: the Unix socket"),
    ],
)
def test_nested_refuses_what_this_host_could_not_reach(
    tmp_path: Path, flags: list[str], needle: str
) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(old_bzimage())  # looks like Linux: refused before anything boots
    result = pyvmm("run", "--nested", "always", "--kernel", str(kernel), *flags)
    assert_one_line_error(result, needle, "--nested never")


def test_nested_checks_the_kernel_before_booting_a_nested_host(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(old_bzimage())
    result = pyvmm("run", "--nested", "always", "--kernel", str(kernel))
    assert_one_line_error(result, "2.09", "2.12")


def test_never_on_a_pvm_host_says_why_a_linux_guest_is_slow(tmp_path: Path) -> None:
    from pyvmm.doctor import virtualization_kind

    kind = virtualization_kind()
    if kind != "pvm":
        pytest.skip(f"the warning is for PVM hosts; this host's KVM is {kind}")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(old_bzimage())
    result = pyvmm("run", "--nested", "never", "--kernel", str(kernel))
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("pyvmm: warning: this host's KVM (pvm) emulates guest kernel code")
    assert lines[1].startswith("pyvmm: error: ") and "2.09" in lines[1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--bogus"], "No such option '--bogus'"),
        (["bogus"], "No such command 'bogus'"),
        (["run", "--kernel"], "'--kernel' requires an argument"),
        (["run", "--cpus"], "'--cpus' requires an argument"),
    ],
)
def test_usage_mistakes_are_one_line_too(args: list[str], needle: str) -> None:
    assert_one_line_error(pyvmm(*args), needle)
