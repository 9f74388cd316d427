"""Boot the probe guest under QEMU ``-M microvm``: the reference the VMM is held to.

QEMU gives the same COM1/IOAPIC/LAPIC the probe expects from pyvmm, plus ACPI
(or, with ``acpi=off``, an MP table from its qboot firmware). An
``isa-debug-exit`` device turns the probe's result into QEMU's exit status:
99 for PASS, 103 for FAIL; a triple fault ends QEMU with 0 (``-no-reboot``).

Accelerator: KVM when it works, else TCG. On this PVM host ``-cpu host`` and
``-cpu max`` abort on MSR 0x10a (IA32_ARCH_CAPABILITIES); with
``-arch-capabilities`` they work, so the first working entry of
``_ACCEL_CANDIDATES`` is picked once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm.guestkit.probe import build_probe

QEMU = shutil.which("qemu-system-x86_64")
TIMEOUT_S = 60
EXIT_PASS = (0x31 << 1) | 1
EXIT_FAIL = (0x33 << 1) | 1

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

_ACCEL_CANDIDATES: list[tuple[str, ...]] = [
    ("-enable-kvm", "-cpu", "host"),
    ("-enable-kvm", "-cpu", "host,-arch-capabilities"),
    ("-enable-kvm", "-cpu", "max,-arch-capabilities"),
    ("-accel", "tcg", "-cpu", "max"),
]


@dataclass
class Run:
    returncode: int
    lines: list[str]
    stderr: str

    @property
    def result(self) -> str | None:
        found = [ln for ln in self.lines if ln.startswith("PROBE RESULT:")]
        return found[-1] if found else None

    def __str__(self) -> str:
        return f"rc={self.returncode}\n" + "\n".join(self.lines) + "\n" + self.stderr


def _qemu(
    elf: Path,
    accel: tuple[str, ...],
    append: str,
    smp: int = 1,
    stdin: bytes = b"",
    machine: str = "microvm",
) -> Run:
    assert QEMU is not None
    cmd = [
        QEMU,
        "-M", machine,
        *accel,
        "-m", "128",
        "-smp", str(smp),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial", "stdio",
        "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(elf),
        "-append", append,
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT_S, check=False)
    text = proc.stdout.decode("utf-8", "replace")
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return Run(proc.returncode, lines, proc.stderr.decode("utf-8", "replace"))


@pytest.fixture(scope="session")
def probe_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build_probe(cache_dir=tmp_path_factory.mktemp("probe-cache"))


@pytest.fixture(scope="session")
def accel(probe_elf: Path) -> tuple[str, ...]:
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    tried = []
    for cand in _ACCEL_CANDIDATES:
        if "-enable-kvm" in cand and not kvm_ok:
            continue
        run = _qemu(probe_elf, cand, "hello")
        if run.returncode == EXIT_PASS:
            return cand
        tried.append(f"{' '.join(cand)}: {run}")
    pytest.fail("no QEMU accelerator boots the probe:\n" + "\n".join(tried))


@pytest.fixture
def run(probe_elf: Path, accel: tuple[str, ...]):
    def _run(append: str, **kw) -> Run:
        return _qemu(probe_elf, accel, append, **kw)

    return _run


def _assert_pass(r: Run) -> None:
    assert r.result == "PROBE RESULT: PASS", str(r)
    assert r.returncode == EXIT_PASS, str(r)


def test_hello(run) -> None:
    r = run("hello")
    _assert_pass(r)
    assert r.lines[:3] == ["probe: start", "probe: cmdline 'hello'", "hello from probe"]


def test_echo(run) -> None:
    long_line = "y" * 300
    feed = f"first line\r\nsecond\n\n{long_line}\nend\n".encode()
    r = run("echo hello", stdin=feed)
    _assert_pass(r)
    echoed = [ln for ln in r.lines if ln.startswith("echo:")]
    assert echoed == [
        "echo: first line",
        "echo: second",
        "echo: ",
        "echo: " + "y" * 256,
        "echo: end",
    ]
    assert r.lines[-2] == "hello from probe"  # programs after echo still run


@pytest.mark.parametrize("smp", [1, 4])
def test_selftest(run, smp: int) -> None:
    r = run("", smp=smp)
    _assert_pass(r)
    assert "probe: cmdline ''" in r.lines
    for line in (
        "hello from probe",
        "boottimer: written",
        "irq: int80 ok",
        "irq: uart 3 interrupts",
        f"cpus: {smp}",
        f"cpus online: {smp}",
    ):
        assert line in r.lines, str(r)
    assert "apic ids: " + " ".join(str(i) for i in range(smp)) in r.lines


def test_cpus_from_mp_table(run) -> None:
    """acpi=off: QEMU's qboot writes an MP table (with an entry count of 0)."""
    r = run("cpus", smp=2, machine="microvm,acpi=off")
    _assert_pass(r)
    assert r.lines[2:5] == ["cpus: 2", "apic ids: 0 1", "cpus online: 2"]


def test_irq(run) -> None:
    r = run("irq")
    _assert_pass(r)
    assert r.lines[2:4] == ["irq: int80 ok", "irq: uart 3 interrupts"]


def test_loops(run) -> None:
    r = run("pioloop=1000 mmioloop=1000 spin3=1000000 spin0=1000 boottimer")
    _assert_pass(r)
    assert r.lines[2:7] == [
        "pioloop: 1000 done",
        "mmioloop: 1000 done",
        "spin3: 1000000 done",
        "spin0: 1000 done",
        "boottimer: written",
    ]


def test_fault_triple_faults(run) -> None:
    r = run("fault hello")
    assert r.lines[-1] == "fault: now", str(r)
    assert r.result is None
    assert r.returncode == 0, str(r)  # shutdown, not isa-debug-exit


@pytest.mark.parametrize(
    ("append", "reason"),
    [
        ("hello bogus", "unknown program 'bogus'"),
        ("pioloop", "pioloop needs an argument: pioloop=N"),
        ("hello=1", "hello takes no argument"),
        ("spin3=12x", "spin3: bad number '12x'"),
    ],
)
def test_bad_command_lines_fail_before_running(run, append: str, reason: str) -> None:
    r = run(append)
    assert r.returncode == EXIT_FAIL, str(r)
    assert r.lines[2:] == [f"PROBE RESULT: FAIL {reason}"]
