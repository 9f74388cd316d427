"""Initramfs builds from a fake module tree and a fake busybox: contents, order, cache."""

from __future__ import annotations

import base64
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError, KernelImageError
from pyvmm.guestkit.cpio import read_cpio
from pyvmm.guestkit.debian import KernelPackage
from pyvmm.guestkit.initramfs import (
    APPLETS,
    COMMAND_FILE,
    DEFAULT_INIT,
    MARKER_CMD_BEGIN,
    MARKER_CMD_EXIT,
    MARKER_INIT_OK,
    MAX_COMMAND_ARG,
    SHELL_BANNER,
    build_initramfs,
    command_arg,
    insmod_lines,
    module_load_order,
    module_name,
    read_modinfo,
    scan_module_deps,
    write_modules_dep,
)

RELEASE = "6.1.0-99-cloud-amd64"
BUSYBOX = b"\x7fELF fake static busybox"

_V = "kernel/drivers/virtio"
_K = "kernel/arch/x86/kvm"
MODULES_DEP = "".join(
    line + "\n"
    for line in (
        f"{_V}/virtio_ring.ko:",
        f"{_V}/virtio.ko: {_V}/virtio_ring.ko",
        f"kernel/drivers/block/virtio_blk.ko: {_V}/virtio.ko {_V}/virtio_ring.ko",
        f"{_V}/virtio_mmio.ko: {_V}/virtio.ko {_V}/virtio_ring.ko",
        f"{_K}/kvm-amd.ko.xz: {_K}/kvm.ko kernel/virt/lib/irqbypass.ko",
        f"{_K}/kvm.ko: kernel/virt/lib/irqbypass.ko",
        "kernel/virt/lib/irqbypass.ko:",
    )
)


def fake_module(name: str, depends: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """A minimal ELF64 relocatable with a .modinfo section, as depmod reads it."""
    modinfo = f"license=GPL\0depends={','.join(depends)}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    off_modinfo = 64
    off_shstr = off_modinfo + len(modinfo)
    shoff = (off_shstr + len(shstrtab) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sh = struct.Struct("<IIQQQQIIQQ")
    sections = (
        sh.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        + sh.pack(1, 1, 2, 0, off_modinfo, len(modinfo), 0, 0, 1, 0)
        + sh.pack(10, 3, 0, 0, off_shstr, len(shstrtab), 0, 0, 1, 0)
    )
    body = header + modinfo + shstrtab
    return body + bytes(shoff - len(body)) + sections


def make_tree(root: Path, with_dep: bool = True) -> Path:
    """A fake lib/modules/<release> tree; file contents name the module."""
    mods = root / "lib" / "modules" / RELEASE
    deps = {
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/drivers/virtio/virtio.ko": ["virtio_ring"],
        "kernel/drivers/block/virtio_blk.ko": ["virtio", "virtio_ring"],
        "kernel/drivers/virtio/virtio_mmio.ko": ["virtio", "virtio_ring"],
        "kernel/arch/x86/kvm/kvm-amd.ko.xz": ["kvm"],
        "kernel/arch/x86/kvm/kvm.ko": ["irqbypass"],
        "kernel/virt/lib/irqbypass.ko": [],
    }
    for rel, dep_names in deps.items():
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = fake_module(module_name(rel), dep_names)
        path.write_bytes(lzma.compress(data) if rel.endswith(".xz") else data)
    if with_dep:
        (mods / "modules.dep").write_text(MODULES_DEP)
    (mods / "modules.builtin").write_text(
        "kernel/fs/ext4/ext4.ko\nkernel/drivers/tty/serial/8250.ko\n"
    )
    return mods


def fake_kernel(root: Path, with_dep: bool = True) -> KernelPackage:
    mods = make_tree(root, with_dep)
    return KernelPackage(
        flavor="cloud",
        package=f"linux-image-{RELEASE}-unsigned",
        deb_version="6.1.999-1",
        version=RELEASE,
        root=root,
        vmlinuz=root / "boot" / f"vmlinuz-{RELEASE}",
        modules_dir=mods,
    )


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(BUSYBOX)
    return path


def entries_of(path: Path) -> dict:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return {e.name: e for e in read_cpio(data)}


# --- module resolution ------------------------------------------------------------


def test_module_name_normalizes_like_the_kernel() -> None:
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz") == "kvm_amd"
    assert module_name("kvm-amd") == "kvm_amd"
    assert module_name("a/b/virtio_blk.ko") == "virtio_blk"


def test_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    order = module_load_order(mods, ["virtio_blk", "kvm-amd", "virtio_mmio", "ext4"])
    assert order == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/virt/lib/irqbypass.ko",
        "kernel/arch/x86/kvm/kvm.ko",
        "kernel/arch/x86/kvm/kvm-amd.ko.xz",
        "kernel/drivers/virtio/virtio_mmio.ko",
    ]


def test_load_order_ignores_the_order_within_a_dep_line(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    # depmod lists the first module to load last; reverse it to make sure the
    # order comes from the graph, not from the line.
    swapped = MODULES_DEP.replace(
        f"virtio_blk.ko: {_V}/virtio.ko {_V}/virtio_ring.ko",
        f"virtio_blk.ko: {_V}/virtio_ring.ko {_V}/virtio.ko",
    )
    assert swapped != MODULES_DEP
    (mods / "modules.dep").write_text(swapped)
    assert module_load_order(mods, ["virtio_blk"])[:2] == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
    ]


def test_unknown_module_suggests_close_names(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    with pytest.raises(ConfigError, match="did you mean virtio_blk"):
        module_load_order(mods, ["virtio_blkk"])


def test_dependency_cycle_is_reported(tmp_path: Path) -> None:
    mods = make_tree(tmp_path)
    (mods / "modules.dep").write_text("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(KernelImageError, match="cycle"):
        module_load_order(mods, ["a"])


def test_read_modinfo() -> None:
    info = read_modinfo(fake_module("kvm_amd", ["kvm", "ccp"]))
    assert info["name"] == ["kvm_amd"]
    assert info["depends"] == ["kvm,ccp"]
    assert info["license"] == ["GPL"]
    with pytest.raises(KernelImageError):
        read_modinfo(b"not an elf at all, no no no, not at all, definitely not one" * 2)


def test_dependencies_from_modinfo_when_modules_dep_is_missing(tmp_path: Path) -> None:
    mods = make_tree(tmp_path, with_dep=False)
    deps = scan_module_deps(mods)
    assert deps["kernel/arch/x86/kvm/kvm-amd.ko.xz"] == ["kernel/arch/x86/kvm/kvm.ko"]
    assert module_load_order(mods, ["kvm_amd"]) == [
        "kernel/virt/lib/irqbypass.ko",
        "kernel/arch/x86/kvm/kvm.ko",
        "kernel/arch/x86/kvm/kvm-amd.ko.xz",
    ]


def test_write_modules_dep_matches_depmod_format(tmp_path: Path) -> None:
    mods = make_tree(tmp_path, with_dep=False)
    write_modules_dep(mods)
    lines = dict(line.split(":", 1) for line in (mods / "modules.dep").read_text().splitlines())
    # The full closure, the module to load first listed last (as depmod does).
    assert lines["kernel/arch/x86/kvm/kvm-amd.ko.xz"].split() == [
        "kernel/arch/x86/kvm/kvm.ko",
        "kernel/virt/lib/irqbypass.ko",
    ]
    assert lines["kernel/virt/lib/irqbypass.ko"] == ""
    assert module_load_order(mods, ["virtio_blk"]) == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/block/virtio_blk.ko",
    ]


def test_missing_dependency_in_modinfo(tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "x.ko").write_bytes(fake_module("x", ["nowhere"]))
    with pytest.raises(KernelImageError, match="depends on nowhere"):
        scan_module_deps(mods)


# --- the archive ---------------------------------------------------------------------


def test_initramfs_contents(tmp_path: Path, busybox: Path) -> None:
    kernel = fake_kernel(tmp_path / "k")
    out = build_initramfs(
        kernel,
        ["virtio_blk", "kvm_amd"],
        "#!/bin/sh\necho custom\n",
        cache_dir=tmp_path / "cache",
        extra_files={"etc/motd": b"hello\n", "/usr/local/bin/tool": b"#!/bin/sh\ntrue\n"},
        busybox=busybox,
    )
    assert out.parent == tmp_path / "cache" / "initramfs"
    assert out.name.endswith(".cpio.gz")
    entries = entries_of(out)

    bb = entries["bin/busybox"]
    assert bb.data == BUSYBOX and bb.permissions == 0o755
    for applet in ("sh", "mount", "insmod", "poweroff", "reboot", "base64", "cat", "dmesg"):
        assert applet in APPLETS
        assert entries[f"bin/{applet}"].is_symlink
        assert entries[f"bin/{applet}"].data == b"busybox"
    assert entries["sbin"].data == b"bin"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert (entries["dev/null"].rdevmajor, entries["dev/null"].rdevminor) == (1, 3)
    for directory in ("proc", "sys", "tmp", "run", "root", "mnt"):
        assert entries[directory].is_dir
    assert entries["tmp"].permissions == 0o1777
    init = entries["init"]
    assert init.data == b"#!/bin/sh\necho custom\n" and init.permissions == 0o755

    base = f"/lib/modules/{RELEASE}/kernel"
    expected_order = [
        f"{base}/drivers/virtio/virtio_ring.ko",
        f"{base}/drivers/virtio/virtio.ko",
        f"{base}/drivers/block/virtio_blk.ko",
        f"{base}/virt/lib/irqbypass.ko",
        f"{base}/arch/x86/kvm/kvm.ko",
        f"{base}/arch/x86/kvm/kvm-amd.ko",  # decompressed from .ko.xz
    ]
    assert entries["etc/modules-load.order"].data.decode().splitlines() == expected_order
    for path in expected_order:
        info = read_modinfo(entries[path.lstrip("/")].data)
        assert module_name(path) == info["name"][0]
    assert f"lib/modules/{RELEASE}/kernel/drivers/virtio/virtio_mmio.ko" not in entries
    guest_dep = entries[f"lib/modules/{RELEASE}/modules.dep"].data.decode()
    assert (
        "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n"
        in guest_dep
    )

    assert entries["etc/motd"].data == b"hello\n" and entries["etc/motd"].permissions == 0o644
    assert entries["usr/local/bin/tool"].permissions == 0o755


def test_builds_are_reproducible_and_cached(tmp_path: Path, busybox: Path) -> None:
    kernel = fake_kernel(tmp_path / "k")
    a = build_initramfs(kernel, ["virtio_mmio"], cache_dir=tmp_path / "c1", busybox=busybox)
    b = build_initramfs(kernel, ["virtio_mmio"], cache_dir=tmp_path / "c2", busybox=busybox)
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip MTIME
    mtime = a.stat().st_mtime_ns
    assert build_initramfs(kernel, ["virtio_mmio"], cache_dir=tmp_path / "c1", busybox=busybox) == a
    assert a.stat().st_mtime_ns == mtime  # found in the cache, not rewritten
    other = build_initramfs(
        kernel, ["virtio_mmio"], "#!/bin/sh\n", cache_dir=tmp_path / "c1", busybox=busybox
    )
    assert other != a
    assert all(e.mtime == 0 for e in entries_of(a).values())


def test_uncompressed_build(tmp_path: Path, busybox: Path) -> None:
    out = build_initramfs(None, cache_dir=tmp_path, busybox=busybox, compress=False)
    assert out.name.endswith(".cpio") and out.read_bytes().startswith(b"070701")
    entries = entries_of(out)
    assert entries["init"].data == DEFAULT_INIT.encode()
    assert "etc/modules-load.order" not in entries


def test_modules_without_kernel_is_a_config_error(tmp_path: Path, busybox: Path) -> None:
    with pytest.raises(ConfigError, match="no kernel"):
        build_initramfs(None, ["virtio_blk"], cache_dir=tmp_path, busybox=busybox)


def test_extra_files_cannot_replace_the_kit(tmp_path: Path, busybox: Path) -> None:
    for name in ("bin/busybox", "/init", "sbin/x", "../escape"):
        with pytest.raises(ConfigError):
            build_initramfs(None, cache_dir=tmp_path, busybox=busybox, extra_files={name: b"x"})


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_gnu_cpio_extracts_the_image(tmp_path: Path, busybox: Path) -> None:
    kernel = fake_kernel(tmp_path / "k")
    out = build_initramfs(kernel, ["virtio_blk"], cache_dir=tmp_path, busybox=busybox)
    listing = (
        subprocess.run(
            ["cpio", "-t", "--quiet"],
            input=gzip.decompress(out.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    assert "init" in listing and "dev/console" in listing


# --- the /init contract ----------------------------------------------------------------


def test_default_init_is_valid_shell_with_the_markers() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    subprocess.run([sh, "-n", "-c", DEFAULT_INIT], check=True)
    assert f"printf '\\n%s\\n' {MARKER_INIT_OK}" in DEFAULT_INIT
    assert MARKER_CMD_BEGIN in DEFAULT_INIT and MARKER_CMD_EXIT in DEFAULT_INIT
    assert "pyvmm.cmd=" in DEFAULT_INIT and f"/{COMMAND_FILE}" in DEFAULT_INIT
    assert DEFAULT_INIT.rstrip().endswith("finish poweroff")
    assert '"$1" -f' in DEFAULT_INIT


def test_default_init_shell_modes() -> None:
    """The behaviour is tested on real guests in tests/e2e/test_first_run.py."""
    assert SHELL_BANNER in DEFAULT_INIT.replace("'\"'\"'", "'")
    assert '[ "$shell" = batch ] || printf' in DEFAULT_INIT  # batch output: commands only
    # busybox's plain poweroff/reboot signal PID 1: the init acts on those signals
    # while it waits for the shell, which therefore runs in the background.
    assert "trap 'finish poweroff' USR2" in DEFAULT_INIT
    assert "trap 'finish reboot' TERM" in DEFAULT_INIT
    assert "setsid cttyhack sh -l </dev/console >/dev/console 2>&1 &\n    wait $!" in DEFAULT_INIT


def test_command_arg_round_trip() -> None:
    script = "cat /proc/cpuinfo\ndmesg | grep -i acpi\necho 'done' > /dev/console\n"
    arg = command_arg(script)
    key, _, value = arg.partition("=")
    assert key == "pyvmm.cmd"
    assert " " not in arg and "\n" not in arg
    assert base64.b64decode(value).decode() == script


def test_command_arg_too_long() -> None:
    with pytest.raises(ConfigError, match="too long"):
        command_arg("x" * MAX_COMMAND_ARG)


def test_insmod_lines() -> None:
    text = insmod_lines(["/lib/modules/v/a.ko", "/lib/modules/v/it's.ko"])
    lines = text.splitlines()
    assert lines[0].startswith("insmod '/lib/modules/v/a.ko' ||")
    assert "'/lib/modules/v/it'\\''s.ko'" in lines[1]
    subprocess.run(["sh", "-n", "-c", text], check=True)


# --- the guest agent -------------------------------------------------------------------

AGENT = b"\x7fELF fake static pyvmm-agent"


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "pyvmm-agent"
    path.write_bytes(AGENT)
    return path


def test_the_agent_is_added_executable_at_the_sandbox_path(
    tmp_path: Path, busybox: Path, agent: Path
) -> None:
    from pyvmm.guestkit.agent_tool import GUEST_PATH

    without = build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox)
    assert GUEST_PATH not in entries_of(without)  # only when asked for (not in L1's)
    out = build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox, agent=agent)
    entry = entries_of(out)[GUEST_PATH]
    assert GUEST_PATH == "bin/pyvmm-agent"
    assert entry.data == AGENT and stat.S_ISREG(entry.mode) and entry.permissions == 0o755
    assert out != without


def test_the_cache_key_follows_the_agent(tmp_path: Path, busybox: Path, agent: Path) -> None:
    first = build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox, agent=agent)
    assert build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox, agent=agent) == first
    agent.write_bytes(AGENT + b" rebuilt")
    second = build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox, agent=agent)
    assert second != first
    assert entries_of(second)["bin/pyvmm-agent"].data == AGENT + b" rebuilt"


def test_agent_true_builds_it_with_the_guest_kit(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvmm.errors import HostError
    from pyvmm.guestkit import agent_tool

    seen = []

    def fake_build(cache_dir: Path | None = None) -> Path:
        seen.append(cache_dir)
        return agent

    monkeypatch.setattr(agent_tool, "build_agent", fake_build)
    out = build_initramfs(None, cache_dir=tmp_path / "c", busybox=busybox, agent=True)
    assert seen == [tmp_path / "c"]
    assert entries_of(out)["bin/pyvmm-agent"].data == AGENT

    def no_gcc(cache_dir: Path | None = None) -> Path:
        raise HostError("gcc not found on PATH: it is needed to build pyvmm-agent")

    monkeypatch.setattr(agent_tool, "build_agent", no_gcc)
    with pytest.raises(HostError, match="gcc not found"):
        build_initramfs(None, cache_dir=tmp_path / "c2", busybox=busybox, agent=True)


def test_a_bad_agent_or_one_in_extra_files_is_refused(
    tmp_path: Path, busybox: Path, agent: Path
) -> None:
    with pytest.raises(ConfigError, match="would replace the agent"):
        build_initramfs(
            None,
            cache_dir=tmp_path,
            busybox=busybox,
            agent=agent,
            extra_files={"/bin/pyvmm-agent": b"\x7fELF other"},
        )
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(ConfigError, match="not an ELF"):
        build_initramfs(None, cache_dir=tmp_path, busybox=busybox, agent=script)


def _fake_guest_kit(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch
) -> KernelPackage:
    from pyvmm.guestkit import agent_tool, debian

    kernel = fake_kernel(tmp_path / "k")
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "fetch_kernel", lambda flavor, cache_dir=None: kernel)
    monkeypatch.setattr(debian, "fetch_busybox", lambda root: busybox)
    monkeypatch.setattr(agent_tool, "build_agent", lambda cache_dir=None: agent)
    return kernel


def test_pyvmm_run_default_initramfs_has_the_agent(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvmm.cli import _default_guest

    kernel = _fake_guest_kit(tmp_path, busybox, agent, monkeypatch)
    vmlinuz, initrd = _default_guest(None)
    assert vmlinuz == str(kernel.vmlinuz)
    entries = entries_of(Path(initrd))
    assert entries["bin/pyvmm-agent"].data == AGENT
    assert entries["bin/pyvmm-agent"].permissions == 0o755
    assert entries["init"].data == DEFAULT_INIT.encode()  # it does not start the agent
    assert "pyvmm-agent" not in DEFAULT_INIT


def test_pyvmm_guest_initramfs_has_the_agent(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch, group
) -> None:
    from click.testing import CliRunner

    _fake_guest_kit(tmp_path, busybox, agent, monkeypatch)
    for args in ([], ["--module", "virtio_blk", "--no-compress"]):
        result = CliRunner().invoke(group, ["initramfs", *args])
        assert result.exit_code == 0, result.output
        out = Path(result.output.strip().splitlines()[-1])
        assert out.parent == tmp_path / "cache" / "initramfs"
        entry = entries_of(out)["bin/pyvmm-agent"]
        assert entry.data == AGENT and entry.permissions == 0o755


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_gnu_cpio_lists_the_agent_executable(tmp_path: Path, busybox: Path, agent: Path) -> None:
    out = build_initramfs(None, cache_dir=tmp_path, busybox=busybox, agent=agent)
    listing = subprocess.run(
        ["cpio", "-tv", "--quiet"],
        input=gzip.decompress(out.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    line = next(line for line in listing.splitlines() if line.endswith(" bin/pyvmm-agent"))
    assert line.startswith("-rwxr-xr-x "), line
