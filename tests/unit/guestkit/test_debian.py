"""Debian package fetching against fake apt-cache/apt-get/dpkg-deb tools.

The fakes are one Python script under three names on PATH. They keep their
state in a directory: ``lists`` exists once "apt-get update" ran,
``kernel`` holds the ABI number the metapackages point at, ``available``
lists the downloadable packages, and every call is appended to ``log``. A
fake .deb is JSON describing the files dpkg-deb -x creates.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError, HostError
from pyvmm.guestkit import debian
from pyvmm.guestkit.debian import fetch_busybox, fetch_kernel, kernel_package_at
from tests.unit.guestkit.test_initramfs import fake_module

FAKE_TOOL = r"""
import base64, json, os, sys
from pathlib import Path

state = Path(os.environ["FAKE_APT_STATE"])
tool = Path(sys.argv[0]).name
args = sys.argv[1:]
with open(state / "log", "a") as log:
    log.write(" ".join([tool, *args]) + "\n")
available = (state / "available").read_text().split()
abi = (state / "kernel").read_text().strip()
lists = (state / "lists").exists()

def fail(message):
    sys.stderr.write("W: some warning first\n" + message + "\n")
    sys.exit(100)

if tool == "apt-cache":
    if not lists:
        fail("E: No packages found")
    if args[0] == "depends":
        meta = args[1]
        suffix = "cloud-amd64" if "cloud" in meta else "amd64"
        print(meta)
        print(f"  Depends: linux-image-6.1.0-{abi}-{suffix}")
        print("  Recommends: irqbalance")
    elif args[0] == "show":
        if args[-1] not in available:
            fail(f"E: No packages found")
        print(f"Package: {args[-1]}")
    elif args[0] == "policy":
        print(f"{args[1]}:\n  Installed: (none)\n  Candidate: 1:1.35.0-4\n")
elif tool == "apt-get":
    if args[0] == "update":
        if (state / "update-fails").exists():
            fail("E: Failed to fetch http://mirror/InRelease  Could not resolve host")
        (state / "lists").touch()
    elif args[0] == "download" and "--print-uris" in args:
        if lists and args[-1] in available:
            print(f"'http://mirror/{args[-1]}.deb' {args[-1]}_9.9_amd64.deb 1142 SHA256:00")
    elif args[0] == "download":
        package = args[-1]
        if not lists or package not in available or (state / "download-fails").exists():
            fail(f"E: Can't find a source to download version of '{package}'")
        files = json.loads((state / "files.json").read_text())
        (Path.cwd() / f"{package}_9.9-{abi}_amd64.deb").write_text(
            json.dumps({"package": package, "version": f"9.9-{abi}", "files": files})
        )
elif tool == "dpkg-deb":
    deb = json.loads(Path(args[1]).read_text())
    if args[0] == "-f":
        print(deb["version"] if args[2] == "Version" else deb["package"])
    elif args[0] == "-x":
        for name, data in deb["files"].items():
            name = name.replace("ABI", abi)
            path = Path(args[2]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(data))
"""


class FakeApt:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = root / "state"
        self.bin = root / "bin"
        self.state.mkdir()
        self.bin.mkdir()
        script = self.bin / "fake-apt"
        script.write_text(f"#!{sys.executable}\n{FAKE_TOOL}")
        script.chmod(0o755)
        for tool in ("apt-cache", "apt-get", "dpkg-deb"):
            (self.bin / tool).symlink_to(script)
        monkeypatch.setenv("FAKE_APT_STATE", str(self.state))
        monkeypatch.setenv("PATH", f"{self.bin}:{os.environ.get('PATH', '')}")
        monkeypatch.setattr(debian.os, "geteuid", lambda: 0)
        (self.state / "lists").touch()
        self.set_kernel("42")
        self.set_available("cloud-unsigned", "generic-unsigned", "busybox")
        self.set_files(
            {
                "boot/vmlinuz-6.1.0-ABI-cloud-amd64": b"bzImage",
                "lib/modules/6.1.0-ABI-cloud-amd64/kernel/a/virtio.ko": fake_module("virtio"),
                "lib/modules/6.1.0-ABI-cloud-amd64/kernel/b/virtio_blk.ko": fake_module(
                    "virtio_blk", ["virtio"]
                ),
                "usr/share/doc/readme": b"doc",
            }
        )

    def set_kernel(self, abi: str) -> None:
        (self.state / "kernel").write_text(abi)

    def set_available(self, *which: str) -> None:
        abi = (self.state / "kernel").read_text()
        names = {
            "cloud": f"linux-image-6.1.0-{abi}-cloud-amd64",
            "cloud-unsigned": f"linux-image-6.1.0-{abi}-cloud-amd64-unsigned",
            "generic-unsigned": f"linux-image-6.1.0-{abi}-amd64-unsigned",
            "busybox": "busybox-static",
        }
        (self.state / "available").write_text("\n".join(names[w] for w in which))

    def set_files(self, files: dict[str, bytes]) -> None:
        encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
        (self.state / "files.json").write_text(json.dumps(encoded))

    def calls(self) -> list[str]:
        log = self.state / "log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    return FakeApt(tmp_path, monkeypatch)


def test_fetch_kernel_prefers_unsigned_and_caches(
    apt: FakeApt, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYVMM_PROGRESS", raising=False)
    cache = tmp_path / "cache"
    pkg = fetch_kernel("cloud", cache)
    # Not a terminal: one line per slow step (the size comes from --print-uris).
    assert capsys.readouterr().err.splitlines() == [
        "pyvmm: downloading linux-image-6.1.0-42-cloud-amd64-unsigned (1 kB)...",
        "pyvmm: unpacking linux-image-6.1.0-42-cloud-amd64-unsigned...",
    ]
    assert pkg.package == "linux-image-6.1.0-42-cloud-amd64-unsigned"
    assert pkg.version == "6.1.0-42-cloud-amd64"
    assert pkg.deb_version == "9.9-42"
    assert pkg.flavor == "cloud"
    assert pkg.root == cache / "kernels" / pkg.package
    assert pkg.vmlinuz.read_bytes() == b"bzImage"
    assert pkg.modules_dir == pkg.root / "lib" / "modules" / "6.1.0-42-cloud-amd64"
    # No depmod ran: the tree gets a modules.dep generated from .modinfo.
    dep = (pkg.modules_dir / "modules.dep").read_text()
    assert "kernel/b/virtio_blk.ko: kernel/a/virtio.ko\n" in dep
    assert not list(pkg.root.glob("*.deb"))
    assert (cache / "kernels" / "cloud.current").read_text().strip() == pkg.package
    assert kernel_package_at(pkg.root) == pkg
    assert [c.split()[0:3] for c in apt.calls()] == [
        ["apt-cache", "depends", "linux-image-cloud-amd64"],
        ["apt-cache", "show", "--no-all-versions"],
        ["apt-get", "download", "--print-uris"],  # the size, for the progress line
        ["apt-get", "download", "-q"],
        ["dpkg-deb", "-f", apt.calls()[4].split()[2]],
        ["dpkg-deb", "-x", apt.calls()[5].split()[2]],
    ]
    assert "APT::Sandbox::User=root" in apt.calls()[3]

    calls = len(apt.calls())
    assert fetch_kernel("cloud", cache) == pkg
    assert len(apt.calls()) == calls  # cached: no apt call at all
    assert capsys.readouterr().err == ""  # and no progress line


def test_generic_flavor(apt: FakeApt, tmp_path: Path) -> None:
    apt.set_files({"boot/vmlinuz-6.1.0-ABI-amd64": b"g", "lib/modules/6.1.0-ABI-amd64/x": b""})
    pkg = fetch_kernel("generic", tmp_path / "cache")
    assert pkg.package == "linux-image-6.1.0-42-amd64-unsigned"
    assert pkg.version == "6.1.0-42-amd64"
    assert "depends linux-image-amd64" in apt.calls()[0]


def test_signed_package_when_there_is_no_unsigned_one(apt: FakeApt, tmp_path: Path) -> None:
    apt.set_available("cloud")
    pkg = fetch_kernel("cloud", tmp_path / "cache")
    assert pkg.package == "linux-image-6.1.0-42-cloud-amd64"


def test_missing_lists_trigger_one_update(apt: FakeApt, tmp_path: Path) -> None:
    (apt.state / "lists").unlink()
    pkg = fetch_kernel("cloud", tmp_path / "cache")
    assert pkg.version == "6.1.0-42-cloud-amd64"
    assert [c for c in apt.calls() if c.startswith("apt-get update")] == ["apt-get update -q"]


def test_download_failure_after_update_is_a_host_error(apt: FakeApt, tmp_path: Path) -> None:
    (apt.state / "download-fails").touch()
    with pytest.raises(HostError) as info:
        fetch_kernel("cloud", tmp_path / "cache")
    message = str(info.value)
    assert "apt-get download linux-image-6.1.0-42-cloud-amd64-unsigned failed" in message
    assert "E: Can't find a source to download" in message  # the tool's own last error
    assert "W: some warning" not in message
    assert "after apt-get update" in message
    assert sum(c.startswith("apt-get update") for c in apt.calls()) == 1
    kernels = tmp_path / "cache" / "kernels"
    assert not [p for p in kernels.iterdir() if p.name.startswith(".tmp-")]
    assert not (kernels / "cloud.current").exists()


def test_failed_update_is_reported(apt: FakeApt, tmp_path: Path) -> None:
    (apt.state / "lists").unlink()
    (apt.state / "update-fails").touch()
    with pytest.raises(HostError, match="apt-get update failed too: E: Failed to fetch"):
        fetch_kernel("cloud", tmp_path / "cache")


def test_update_needs_root(apt: FakeApt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (apt.state / "lists").unlink()
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(HostError, match="needs root"):
        fetch_kernel("cloud", tmp_path / "cache")


def test_refresh_follows_the_metapackage(apt: FakeApt, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = fetch_kernel("cloud", cache)
    apt.set_kernel("43")
    apt.set_available("cloud-unsigned")
    assert fetch_kernel("cloud", cache) == old  # no refresh: the cached one
    new = fetch_kernel("cloud", cache, refresh=True)
    assert new.version == "6.1.0-43-cloud-amd64"
    assert fetch_kernel("cloud", cache) == new
    assert old.root.is_dir()  # the old one stays until removed by hand


def test_tools_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(HostError, match="apt-cache not found"):
        fetch_kernel("cloud", tmp_path / "cache")


def test_unknown_flavor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown kernel flavor"):
        fetch_kernel("rt", tmp_path)


def test_fetch_busybox(apt: FakeApt, tmp_path: Path) -> None:
    apt.set_files({"bin/busybox": b"\x7fELF busybox", "usr/share/doc/x": b""})
    cache = tmp_path / "cache"
    path = fetch_busybox(cache)
    assert path == cache / "busybox" / "1_1.35.0-4" / "bin" / "busybox"
    assert path.read_bytes() == b"\x7fELF busybox"
    assert (cache / "busybox" / "current").read_text().strip() == "1_1.35.0-4"
    calls = len(apt.calls())
    assert fetch_busybox(cache) == path
    assert len(apt.calls()) == calls


def test_busybox_package_without_binary(apt: FakeApt, tmp_path: Path) -> None:
    apt.set_files({"usr/share/doc/x": b""})
    with pytest.raises(HostError, match="has no bin/busybox"):
        fetch_busybox(tmp_path / "cache")


def test_incomplete_cache_entry_is_fetched_again(apt: FakeApt, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pkg = fetch_kernel("cloud", cache)
    (pkg.root / debian.METADATA_NAME).unlink()
    again = fetch_kernel("cloud", cache)
    assert again.version == pkg.version
    assert any(c.startswith("apt-get download") for c in apt.calls()[5:])
