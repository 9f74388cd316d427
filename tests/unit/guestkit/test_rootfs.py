"""ext4 rootfs images from a fake busybox, a directory or a tar, read back with debugfs."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pyvmm.errors import ConfigError, HostError
from pyvmm.guestkit import rootfs
from pyvmm.guestkit.initramfs import APPLETS, MARKER_CMD_BEGIN, MARKER_CMD_EXIT
from pyvmm.guestkit.rootfs import (
    MARKER_ROOTFS_OK,
    MIB,
    ROOTFS_INIT,
    build_rootfs,
    default_size_mib,
)

_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DEBUGFS = shutil.which("debugfs", path=_SBIN)
E2FSCK = shutil.which("e2fsck", path=_SBIN)
requires_e2fsprogs = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path=_SBIN) is None or DEBUGFS is None,
    reason="e2fsprogs (mkfs.ext4, debugfs) is not installed",
)

BUSYBOX = b"\x7fELF fake static busybox"
AGENT = b"\x7fELF fake static pyvmm-agent"


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(BUSYBOX)
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "pyvmm-agent"
    path.write_bytes(AGENT)
    return path


def cat(image: Path, path: str) -> bytes:
    assert DEBUGFS is not None
    result = subprocess.run(
        [DEBUGFS, "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    return result.stdout


def inode(image: Path, path: str) -> dict[str, str]:
    """Type, Mode, User, Group (and the symlink target) of ``path`` in the image."""
    assert DEBUGFS is not None
    out = subprocess.run(
        [DEBUGFS, "-R", f'stat "{path}"', str(image)], capture_output=True, text=True, check=True
    ).stdout
    if not out:
        raise FileNotFoundError(path)
    info = dict(re.findall(r"(Type|Mode|User|Group):\s+(\S+)", out))
    link = re.search(r'Fast link dest: "(.*)"', out)
    if link:
        info["link"] = link.group(1)
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", out)
    if dev:
        info["dev"] = f"{int(dev.group(1))}:{int(dev.group(2))}"
    return info


def fsck_clean(image: Path) -> None:
    if E2FSCK is not None:
        result = subprocess.run([E2FSCK, "-fn", str(image)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_600_000_000
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_tar(path: Path, *members: tuple[str, bytes, dict[str, object]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data, fields in members:
            add(tar, name, data, **fields)
    return path


DIR = {"type": tarfile.DIRTYPE, "mode": 0o755}


# --- the minimal tree ----------------------------------------------------------------


@requires_e2fsprogs
def test_minimal_image_has_busybox_our_init_and_devices(
    tmp_path: Path, busybox: Path, agent: Path
) -> None:
    image = build_rootfs(cache_dir=tmp_path / "cache", busybox=busybox, agent=agent)
    assert image.parent == tmp_path / "cache" / "rootfs" and image.suffix == ".ext4"
    fsck_clean(image)
    init = cat(image, "/sbin/init").decode()
    assert init == ROOTFS_INIT
    for marker in (MARKER_ROOTFS_OK, MARKER_CMD_BEGIN, MARKER_CMD_EXIT, "pyvmm.cmd="):
        assert marker in init
    assert init.rstrip().endswith("finish poweroff")
    assert inode(image, "/sbin/init")["Mode"] == "0755"
    assert cat(image, "/bin/busybox") == BUSYBOX
    for applet in APPLETS:
        assert inode(image, f"/bin/{applet}")["link"] == "busybox"
    assert inode(image, "/usr/bin")["link"] == "../bin"
    console = inode(image, "/dev/console")
    assert (console["Type"], console["Mode"], console["dev"]) == ("character", "0600", "5:1")
    assert inode(image, "/tmp")["Mode"] == "01777"
    assert inode(image, "/bin/busybox")["User"] == "0"
    assert cat(image, "/etc/passwd").startswith(b"root:x:0:0:")
    assert cat(image, "/bin/pyvmm-agent") == AGENT  # where the sandbox guest has it
    assert inode(image, "/bin/pyvmm-agent")["Mode"] == "0755"
    assert "pyvmm-agent" not in init  # present, not started


@requires_e2fsprogs
def test_the_agent_changes_the_key_and_can_be_left_out(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyvmm.guestkit import agent_tool

    first = build_rootfs(cache_dir=tmp_path / "c", busybox=busybox, agent=agent)
    agent.write_bytes(AGENT + b" rebuilt")
    second = build_rootfs(cache_dir=tmp_path / "c", busybox=busybox, agent=agent)
    assert second != first and cat(second, "/bin/pyvmm-agent") == AGENT + b" rebuilt"
    bare = build_rootfs(cache_dir=tmp_path / "c", busybox=busybox, agent=False)
    assert bare not in (first, second)
    with pytest.raises(FileNotFoundError):
        inode(bare, "/bin/pyvmm-agent")
    # the default (what `pyvmm guest rootfs` builds): the guest kit's agent build
    monkeypatch.setattr(agent_tool, "build_agent", lambda cache_dir=None: agent)
    assert build_rootfs(cache_dir=tmp_path / "c", busybox=busybox) == second
    monkeypatch.setattr(agent_tool, "build_agent", lambda cache_dir=None: tmp_path / "none")
    with pytest.raises(HostError, match="cannot read the guest agent"):
        build_rootfs(cache_dir=tmp_path / "d", busybox=busybox)


@requires_e2fsprogs
def test_default_init_is_valid_shell(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(ROOTFS_INIT)
    subprocess.run(["sh", "-n", str(script)], check=True)


@requires_e2fsprogs
def test_custom_init_script(tmp_path: Path, busybox: Path, agent: Path) -> None:
    image = build_rootfs(
        cache_dir=tmp_path, init_script="#!/bin/sh\necho hi\n", busybox=busybox, agent=agent
    )
    assert cat(image, "/sbin/init") == b"#!/bin/sh\necho hi\n"


@requires_e2fsprogs
def test_images_are_cached_and_reproducible(
    tmp_path: Path, busybox: Path, agent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_rootfs(cache_dir=tmp_path / "a", busybox=busybox, agent=agent)
    other = build_rootfs(cache_dir=tmp_path / "b", busybox=busybox, agent=agent)
    assert first.name == other.name
    assert first.read_bytes() == other.read_bytes()  # UUID, hash seed and times are fixed

    def no_mkfs(*args: object) -> None:
        raise AssertionError("the cached image should have been reused")

    monkeypatch.setattr(rootfs, "_run_mkfs", no_mkfs)
    assert build_rootfs(cache_dir=tmp_path / "a", busybox=busybox, agent=agent) == first
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(AssertionError):  # a different input is a different image
        build_rootfs(cache_dir=tmp_path / "a", busybox=busybox, agent=agent, size_mib=40)


# --- size ------------------------------------------------------------------------------


def test_size_rule() -> None:
    assert default_size_mib(0) == 32
    assert default_size_mib(MIB) == 34  # 1.5 MiB + 32, rounded up
    assert default_size_mib(100 * MIB) == 182


@requires_e2fsprogs
def test_image_size_default_and_explicit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(b"x" * (10 * MIB))
    image = build_rootfs(src, cache_dir=tmp_path / "cache")
    # 10 MiB + 4 KiB each for the root, /sbin and /sbin/init
    assert image.stat().st_size == default_size_mib(10 * MIB + 3 * 4096) * MIB == 48 * MIB
    assert build_rootfs(src, 64, cache_dir=tmp_path / "cache").stat().st_size == 64 * MIB
    with pytest.raises(ConfigError, match="cannot hold"):
        build_rootfs(src, 5, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="positive"):
        build_rootfs(src, 0, cache_dir=tmp_path / "cache")


# --- from a directory --------------------------------------------------------------------


@requires_e2fsprogs
def test_from_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    (src / "etc" / "link").symlink_to("/etc/motd")
    os.link(src / "etc" / "motd", src / "etc" / "hard")
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o4755)
    os.mkfifo(src / "fifo")
    image = build_rootfs(src, cache_dir=tmp_path / "cache")
    fsck_clean(image)
    assert cat(image, "/etc/motd") == b"hello\n"
    assert inode(image, "/etc/link")["link"] == "/etc/motd"
    assert cat(image, "/etc/hard") == b"hello\n"
    assert inode(image, "/tool")["Mode"] == "04755"
    assert inode(image, "/fifo")["Type"] == "FIFO"
    me = inode(image, "/etc/motd")
    assert (me["User"], me["Group"]) == (str(os.getuid()), str(os.getgid()))
    assert cat(image, "/sbin/init").decode() == ROOTFS_INIT  # the tree had none
    with pytest.raises(FileNotFoundError):  # a source tree is copied as it is: no agent
        inode(image, "/bin/pyvmm-agent")


@requires_e2fsprogs
def test_directory_keeps_its_own_init(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sbin").mkdir(parents=True)
    (src / "sbin" / "init").write_text("#!/bin/sh\nmine\n")
    image = build_rootfs(src, cache_dir=tmp_path / "cache")
    assert cat(image, "/sbin/init") == b"#!/bin/sh\nmine\n"
    image = build_rootfs(src, cache_dir=tmp_path / "cache", init_script="#!/bin/sh\nours\n")
    assert cat(image, "/sbin/init") == b"#!/bin/sh\nours\n"


@requires_e2fsprogs
def test_directory_content_change_is_a_new_image(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one")
    first = build_rootfs(src, cache_dir=tmp_path / "cache")
    (src / "f").write_text("two")
    second = build_rootfs(src, cache_dir=tmp_path / "cache")
    assert first != second
    assert cat(second, "/f") == b"two"


# --- from a tar ------------------------------------------------------------------------


@requires_e2fsprogs
def test_from_tar_keeps_owners_modes_links_and_devices(tmp_path: Path) -> None:
    tar = make_tar(
        tmp_path / "export.tar",
        ("./", b"", DIR),
        ("./bin/", b"", DIR),
        ("./bin/sh", b"#!shell", {"mode": 0o755}),
        ("./bin/su", b"su", {"mode": 0o4755}),
        ("./bin/ash", b"", {"type": tarfile.SYMTYPE, "linkname": "/bin/sh"}),
        ("./bin/hard", b"", {"type": tarfile.LNKTYPE, "linkname": "./bin/sh"}),
        ("./home/user/notes", b"notes", {"uid": 1000, "gid": 1001}),  # no dir entries
        ("./dev/null", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
        ("./etc/x", b"old", {}),
        ("./etc/x", b"new", {}),  # a later member replaces an earlier one
    )
    image = build_rootfs(tar, cache_dir=tmp_path / "cache")
    fsck_clean(image)
    assert cat(image, "/bin/sh") == b"#!shell"
    assert inode(image, "/bin/su")["Mode"] == "04755"
    assert inode(image, "/bin/ash")["link"] == "/bin/sh"
    assert cat(image, "/bin/hard") == b"#!shell"
    notes = inode(image, "/home/user/notes")
    assert (notes["User"], notes["Group"]) == ("1000", "1001")
    assert inode(image, "/dev/null")["dev"] == "1:3"
    assert cat(image, "/etc/x") == b"new"
    assert cat(image, "/sbin/init").decode() == ROOTFS_INIT


@requires_e2fsprogs
def test_tar_init_goes_through_a_usrmerge_sbin_and_keeps_systemd(tmp_path: Path) -> None:
    usrmerge = (
        ("usr/sbin/", b"", DIR),
        ("sbin", b"", {"type": tarfile.SYMTYPE, "linkname": "usr/sbin"}),
    )
    tar = make_tar(tmp_path / "a.tar", *usrmerge)
    image = build_rootfs(tar, cache_dir=tmp_path / "cache")
    assert inode(image, "/sbin")["link"] == "usr/sbin"
    assert cat(image, "/usr/sbin/init").decode() == ROOTFS_INIT

    tar = make_tar(
        tmp_path / "b.tar",
        *usrmerge,
        ("usr/lib/systemd/systemd", b"systemd", {"mode": 0o755}),
        ("usr/sbin/init", b"", {"type": tarfile.SYMTYPE, "linkname": "/usr/lib/systemd/systemd"}),
    )
    image = build_rootfs(tar, cache_dir=tmp_path / "cache")
    assert inode(image, "/usr/sbin/init")["link"] == "/usr/lib/systemd/systemd"


@requires_e2fsprogs
def test_gzipped_tar(tmp_path: Path) -> None:
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "hello", b"hi")
    assert cat(build_rootfs(path, cache_dir=tmp_path / "cache"), "/hello") == b"hi"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ((("../evil", b"x", {}),), r"'\.\./evil' has a '\.\.' component"),
        ((("a/../../evil", b"x", {}),), r"'\.\.' component"),
        ((("/etc/passwd", b"x", {}),), r"'/etc/passwd' has an absolute path"),
        (
            (("ok", b"x", {}), ("h", b"", {"type": tarfile.LNKTYPE, "linkname": "../../x"})),
            r"'\.\.' component",
        ),
        (
            (("h", b"", {"type": tarfile.LNKTYPE, "linkname": "/etc/shadow"}),),
            r"absolute path",
        ),
        (
            (("h", b"", {"type": tarfile.LNKTYPE, "linkname": "missing"}),),
            r"not an earlier regular file",
        ),
        (
            (
                ("out", b"", {"type": tarfile.SYMTYPE, "linkname": "/tmp"}),
                ("out/evil", b"x", {}),
            ),
            r"goes through the symlink /out",
        ),
    ],
)
def test_unsafe_tar_is_refused(
    tmp_path: Path, members: tuple[tuple[str, bytes, dict[str, object]], ...], message: str
) -> None:
    if shutil.which("mkfs.ext4", path=_SBIN) is None:
        pytest.skip("e2fsprogs is not installed")
    tar = make_tar(tmp_path / "bad.tar", *members)
    with pytest.raises(ConfigError, match=message):
        build_rootfs(tar, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil").exists()
    assert not list((tmp_path / "cache" / "rootfs").iterdir())  # staging cleaned up


def test_bad_sources(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4", path=_SBIN) is None:
        pytest.skip("e2fsprogs is not installed")
    with pytest.raises(ConfigError, match="does not exist"):
        build_rootfs(tmp_path / "nope", cache_dir=tmp_path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ConfigError, match="not a readable tar file"):
        build_rootfs(junk, cache_dir=tmp_path)


# --- host checks ----------------------------------------------------------------------


def test_missing_mkfs_is_a_host_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs.shutil, "which", lambda name, path=None: None)
    with pytest.raises(HostError, match=r"mkfs\.ext4 is not installed.*e2fsprogs"):
        build_rootfs(tmp_path, cache_dir=tmp_path)


def test_old_mkfs_is_a_host_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs.shutil, "which", lambda name, path=None: f"/sbin/{name}")

    def old_version(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 0, "", "mke2fs 1.42.9 (28-Dec-2013)\n")

    monkeypatch.setattr(rootfs.subprocess, "run", old_version)
    with pytest.raises(HostError, match=r"mke2fs 1\.42.*>= 1\.43.*-d"):
        build_rootfs(tmp_path, cache_dir=tmp_path)


# --- the command -------------------------------------------------------------------------


def test_rootfs_command_prints_the_path(
    group: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    def fake_build(source: Path | None, size_mib: int | None, **kwargs: object) -> Path:
        seen.append((source, size_mib, kwargs))
        return tmp_path / "x.ext4"

    monkeypatch.setattr(rootfs, "build_rootfs", fake_build)
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\n")
    result = CliRunner().invoke(
        group, ["rootfs", "--from", str(tmp_path), "--size", "64", "--init", str(init)]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"{tmp_path / 'x.ext4'}\n"
    assert seen == [(tmp_path, 64, {"init_script": "#!/bin/sh\n"})]
    result = CliRunner().invoke(group, ["rootfs"])
    assert result.exit_code == 0 and seen[-1] == (None, None, {"init_script": None})


def test_rootfs_command_errors_are_one_line(
    group: click.Group, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> Path:
        raise ConfigError("tar member '../evil' has a '..' component; refusing to extract it")

    monkeypatch.setattr(rootfs, "build_rootfs", failing)
    result = CliRunner().invoke(group, ["rootfs", "--from", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "pyvmm: error: tar member '../evil' has a '..' component; refusing to extract it"
    ]
    result = CliRunner().invoke(group, ["rootfs", "--from", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(group, ["rootfs", "--init", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "init script" in result.output
