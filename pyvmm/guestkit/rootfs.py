"""Build an ext4 root filesystem image, without root and without loop mounts.

``mkfs.ext4 -d <staging dir>`` (e2fsprogs >= 1.43) copies a directory tree
into a new filesystem image; ``debugfs -w`` then sets what a non-root user
cannot stage: owners, setuid bits, device nodes, and fixed timestamps.

What goes in
------------
- ``source`` a directory: copied (regular files, directories, symlinks,
  hard links; device nodes and FIFOs are recreated in the image; sockets are
  skipped), keeping modes, owners and mtimes;
- ``source`` a tar file (any compression ``tarfile`` reads, e.g. a
  ``docker export``): extracted by our own loop, not ``extractall``: the
  ``data`` filter would drop device nodes and setuid bits, and the ``tar``
  filter refuses absolute symlinks, which real root trees are full of. We
  refuse (:class:`ConfigError`) a member whose name is absolute or has a
  ``..`` component, a hard link whose target is, and a member whose path
  goes *through* a symlink (it could land outside the staging directory).
  Symlinks may point anywhere: they are stored, never followed. Owners,
  modes (setuid included) and mtimes come from the tar headers; a later
  member replaces an earlier one, as with GNU tar;
- no ``source``: a minimal tree: ``/bin/busybox`` (Debian's
  ``busybox-static``, see :func:`pyvmm.guestkit.debian.fetch_busybox`) with
  a symlink per applet in :data:`~pyvmm.guestkit.initramfs.APPLETS`,
  ``/usr/bin`` and ``/usr/sbin`` -> ``/bin``, ``/dev`` with ``console`` and
  ``null``, empty ``/proc /sys /tmp /run /root /mnt``, ``/etc/passwd``,
  ``/etc/group``, ``/etc/hostname``, and ``/bin/pyvmm-agent``, the guest
  agent (:mod:`pyvmm.guestkit.agent_tool`), not started: a sandbox starts it
  with ``pyvmm.cmd`` once an initramfs loaded vsock and switched here.
  A ``source`` tree is copied as it is, with no agent added.

``/sbin/init`` is ``init_script`` when given (replacing the tree's own,
which may be a symlink to systemd), else the tree's own if it has one, else
:data:`ROOTFS_INIT` (which then runs with the tree's ``/bin/sh`` and tools).

The default ``/sbin/init`` (the contract e2e tests rely on)
---------------------------------------------------------------
Exactly the initramfs contract (:mod:`pyvmm.guestkit.initramfs`), with
``PYVMM-ROOTFS-OK`` in place of ``PYVMM-INIT-OK``:

1. mounts proc, sysfs, devtmpfs (unless the kernel already did) and a tmpfs
   on ``/tmp`` and ``/run``, and sends its output to ``/dev/console``;
   the root filesystem stays as the kernel mounted it (add ``rw`` to the
   kernel command line to write to it);
2. loads the modules listed in ``/etc/modules-load.order``, if any;
3. prints ``PYVMM-ROOTFS-OK`` on a line of its own;
4. runs ``pyvmm.cmd=<base64>`` from ``/proc/cmdline`` (build it with
   :func:`pyvmm.guestkit.initramfs.command_arg`), else
   ``/etc/pyvmm/cmd.sh``, between ``PYVMM-CMD-BEGIN`` and
   ``PYVMM-CMD-EXIT=<status>`` (``PYVMM-CMD-ERROR`` on bad base64);
   ``pyvmm.shell`` with no command starts a shell on the console;
5. ends with ``sync`` and ``poweroff -f``.

Boot it with ``root=/dev/vda`` (or wherever the disk appears) and
``rootfstype=ext4``; the kernel needs ext4 and the disk driver built in or
in an initramfs.

Size, cache, reproducibility
----------------------------
The default size is the content size (each regular file rounded up to 4 KiB,
plus 4 KiB per directory and per long symlink) * 1.5 + 32 MiB, rounded up to
a MiB; enough inodes are requested for big trees. The image is cached under
``<cache>/rootfs/<key>.ext4``, the key being a hash of the inputs (the tar
file's bytes, or every path, mode, owner, mtime and content of a source
directory, or the busybox and agent binaries; the init script; the size).
The build is deterministic on a given e2fsprogs version and
``/etc/mke2fs.conf``: the UUID and directory hash seed derive from the key,
``E2FSPROGS_FAKE_TIME`` fixes the superblock times, and debugfs sets every
inode's atime, ctime and mtime (the tree's mtime; :data:`FIXED_TIME` for
what we add). Reserved blocks are 0 (``-m 0``): nothing in a VM disk needs them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pyvmm.errors import ConfigError, HostError
from pyvmm.guestkit.agent_tool import GUEST_PATH, agent_bytes
from pyvmm.guestkit.cache import cache_root, ensure_dir
from pyvmm.guestkit.initramfs import APPLETS, init_script
from pyvmm.guestkit.progress import task

#: Bumped when the image layout changes in a way the inputs do not show.
_FORMAT = "1"
MIB = 1 << 20
#: mtime (and atime, ctime) of what we add; e2fsprogs' fake "now".
FIXED_TIME = 946684800  # 2000-01-01T00:00:00Z
MIN_E2FSPROGS = (1, 43)
LABEL = "pyvmm-rootfs"
_BLOCK = 4096
_TIMEOUT_S = 600

MARKER_ROOTFS_OK = "PYVMM-ROOTFS-OK"

ROOTFS_INIT = init_script(
    "pyvmm's default rootfs /sbin/init",
    "mount -t proc -o nosuid,nodev,noexec proc /proc\n"
    "mount -t sysfs -o nosuid,nodev,noexec sysfs /sys\n"
    "grep -q '^[^ ]* /dev ' /proc/mounts"
    " || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev\n"
    "mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp\n"
    "mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run\n",
    MARKER_ROOTFS_OK,
)

_DIR, _FILE, _LINK, _HARD, _CHR, _BLK, _FIFO = "dir", "file", "symlink", "hard", "c", "b", "p"


@dataclass
class _Entry:
    """One path of the tree as it must end up in the image."""

    kind: str
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_TIME
    size: int = 0  # regular files: bytes; symlinks: target length
    rdev: tuple[int, int] = (0, 0)


_TYPE_BITS = {
    _DIR: stat.S_IFDIR,
    _FILE: stat.S_IFREG,
    _LINK: stat.S_IFLNK,
    _CHR: stat.S_IFCHR,
    _BLK: stat.S_IFBLK,
    _FIFO: stat.S_IFIFO,
}


# --- the entry point --------------------------------------------------------------


def build_rootfs(
    source: Path | None = None,
    size_mib: int | None = None,
    cache_dir: Path | None = None,
    init_script: str | None = None,
    *,
    busybox: Path | None = None,
    agent: Path | bool = True,
) -> Path:
    """Build (or find in the cache) an ext4 image and return its path.

    ``source`` is a directory or a tar file; None builds the minimal busybox
    tree (``busybox`` overrides the binary, default :func:`fetch_busybox`;
    ``agent``: see :func:`~pyvmm.guestkit.agent_tool.agent_bytes`).
    ``size_mib`` overrides the default size (see the module doc).
    """
    if size_mib is not None and (isinstance(size_mib, bool) or size_mib <= 0):
        raise ConfigError(f"rootfs size must be a positive number of MiB, got {size_mib}")
    mkfs, debugfs = _tools()
    root = cache_root(cache_dir)
    if source is None and busybox is None:
        from pyvmm.guestkit.debian import fetch_busybox

        busybox = fetch_busybox(root)
    key_hash = hashlib.sha256(f"pyvmm-rootfs-{_FORMAT}\0{size_mib}\0".encode())
    key_hash.update(b"init\0" + (init_script.encode() if init_script is not None else b"-"))
    if source is None:
        busybox_bytes = _read(Path(busybox), "busybox")  # type: ignore[arg-type]
        key_hash.update(b"\0busybox\0" + hashlib.sha256(busybox_bytes).digest())
        agent_data = agent_bytes(agent, root)
        if agent_data is not None:
            key_hash.update(b"\0agent\0" + hashlib.sha256(agent_data).digest())
    else:
        source = Path(source)
        key_hash.update(b"\0source\0" + _source_digest(source))
    digest = key_hash.digest()
    key = digest.hex()[:20]
    out_dir = ensure_dir(root / "rootfs")
    out = out_dir / f"{key}.ext4"
    if out.is_file():
        return out

    with (
        task(f"building a root filesystem image from {source or 'busybox'}") as progress,
        tempfile.TemporaryDirectory(prefix=f".tmp-{key}-", dir=out_dir) as tmp,
    ):
        progress.stage("staging files")
        staging = Path(tmp) / "tree"
        staging.mkdir()
        if source is None:
            entries = _stage_minimal(staging, busybox_bytes, agent_data)
        elif source.is_dir():
            entries = _stage_directory(source, staging)
        else:
            entries = _stage_tar(source, staging)
        _install_init(staging, entries, init_script)
        content = _content_bytes(entries)
        size = size_mib if size_mib is not None else _default_size_mib(content)
        if size * MIB < content:
            raise ConfigError(
                f"a {size} MiB rootfs cannot hold {math.ceil(content / MIB)} MiB of content "
                "(leave the size out for a fitting default)"
            )
        image = Path(tmp) / "image.ext4"
        fs_uuid = str(uuid.UUID(bytes=digest[:16], version=4))
        progress.stage("mkfs.ext4")
        _run_mkfs(mkfs, staging, image, size, fs_uuid, len(entries) + 1)
        progress.stage("debugfs")
        _run_debugfs(debugfs, image, _fixup_script(entries), Path(tmp) / "fixup.debugfs")
        os.chmod(image, 0o644)
        try:
            os.replace(image, out)
        except OSError as exc:
            raise HostError(f"cannot store {out}: {exc.strerror or exc}") from exc
    return out


def default_size_mib(content_bytes: int) -> int:
    """The size rule: content * 1.5 + 32 MiB, rounded up to a MiB."""
    return _default_size_mib(content_bytes)


def _default_size_mib(content: int) -> int:
    return math.ceil((content * 3 // 2 + 32 * MIB) / MIB)


def _content_bytes(entries: dict[str, _Entry]) -> int:
    total = 0
    for entry in entries.values():
        if entry.kind == _FILE:
            total += -(-entry.size // _BLOCK) * _BLOCK
        elif entry.kind == _DIR or (entry.kind == _LINK and entry.size > 59):
            total += _BLOCK
    return total


# --- staging: the minimal tree ----------------------------------------------------------


def _stage_minimal(staging: Path, busybox: bytes, agent: bytes | None) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {"": _Entry(_DIR, 0o755)}
    for name in ("bin", "dev", "etc", "lib", "mnt", "proc", "run", "sbin", "sys", "usr"):
        _mkdir(staging, entries, name, 0o755)
    _mkdir(staging, entries, "root", 0o700)
    _mkdir(staging, entries, "tmp", 0o1777)
    _write(staging, entries, "bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        _symlink(staging, entries, f"bin/{applet}", "busybox")
    if agent is not None:
        _write(staging, entries, GUEST_PATH, agent, 0o755)
    _symlink(staging, entries, "usr/bin", "../bin")
    _symlink(staging, entries, "usr/sbin", "../bin")
    entries["dev/console"] = _Entry(_CHR, 0o600, rdev=(5, 1))
    entries["dev/null"] = _Entry(_CHR, 0o666, rdev=(1, 3))
    _write(staging, entries, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    _write(staging, entries, "etc/group", b"root:x:0:\n", 0o644)
    _write(staging, entries, "etc/hostname", b"pyvmm\n", 0o644)
    return entries


def _mkdir(staging: Path, entries: dict[str, _Entry], rel: str, mode: int) -> None:
    (staging / rel).mkdir()
    entries[rel] = _Entry(_DIR, mode)


def _write(staging: Path, entries: dict[str, _Entry], rel: str, data: bytes, mode: int) -> None:
    (staging / rel).write_bytes(data)
    entries[rel] = _Entry(_FILE, mode, size=len(data))


def _symlink(staging: Path, entries: dict[str, _Entry], rel: str, target: str) -> None:
    os.symlink(target, staging / rel)
    entries[rel] = _Entry(_LINK, 0o777, size=len(target))


# --- staging: a directory ----------------------------------------------------------------


def _walk(top: Path) -> Iterable[tuple[str, os.stat_result]]:
    """(relative path, lstat) of ``top`` and everything under it, sorted, parents first."""
    yield "", os.stat(top)
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = sorted(os.listdir(top / rel) if rel else os.listdir(top))
        except OSError as exc:
            raise HostError(f"cannot read {top / rel}: {exc.strerror}") from None
        subdirs = []
        for name in names:
            child = f"{rel}/{name}" if rel else name
            st = os.lstat(top / child)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(child)
        stack.extend(reversed(subdirs))


def _source_digest(source: Path) -> bytes:
    h = hashlib.sha256()
    if source.is_dir():
        for rel, st in _walk(source):
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode())
            h.update(f"{int(st.st_mtime)}\0{st.st_rdev}\0".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(_file_digest(source / rel))
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(source / rel)))
            h.update(b"\n")
        return b"dir\0" + h.digest()
    if not source.exists():
        raise ConfigError(f"rootfs source {source} does not exist")
    if not source.is_file():
        raise ConfigError(f"rootfs source {source} is neither a directory nor a tar file")
    return b"tar\0" + _file_digest(source)


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}") from None
    return h.digest()


def _stage_directory(source: Path, staging: Path) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    inodes: dict[tuple[int, int], str] = {}
    for rel, st in _walk(source):
        entry = _Entry(
            _DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime), st.st_size
        )
        src, dst = source / rel, staging / rel
        mode = st.st_mode
        try:
            if stat.S_ISDIR(mode):
                if rel:
                    dst.mkdir()
                os.chmod(dst, 0o755)
            elif stat.S_ISREG(mode):
                first = inodes.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
                if first is not None:
                    os.link(staging / first, dst)
                    entry.kind = _HARD
                else:
                    shutil.copyfile(src, dst)
                    os.chmod(dst, 0o644)
                    entry.kind = _FILE
                    inodes[(st.st_dev, st.st_ino)] = rel
            elif stat.S_ISLNK(mode):
                target = os.readlink(src)
                os.symlink(target, dst)
                entry.kind, entry.size = _LINK, len(os.fsencode(target))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                entry.kind = _CHR if stat.S_ISCHR(mode) else _BLK if stat.S_ISBLK(mode) else _FIFO
                entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:  # sockets mean nothing in an image
                continue
        except OSError as exc:
            raise HostError(f"cannot copy {src}: {exc.strerror or exc}") from None
        entries[rel] = entry
    return entries


# --- staging: a tar file -------------------------------------------------------------------


def _member_name(name: str, what: str = "tar member") -> str:
    """The member's path relative to the root ('' for the root), or ConfigError."""
    if name.startswith("/"):
        raise ConfigError(f"{what} {name!r} has an absolute path; refusing to extract it")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise ConfigError(f"{what} {name!r} has a '..' component; refusing to extract it")
    rel = "/".join(parts)
    if "\n" in rel or '"' in rel:
        raise ConfigError(f"{what} {name!r}: newlines and double quotes are not supported")
    return rel


def _stage_tar(source: Path, staging: Path) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {"": _Entry(_DIR, 0o755)}
    try:
        archive = tarfile.open(source, "r:*")  # noqa: SIM115 (closed below)
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"rootfs source {source} is not a readable tar file: {exc}") from None
    with archive:
        try:
            for member in archive:
                _extract_member(archive, member, staging, entries)
        except (tarfile.TarError, EOFError) as exc:
            raise ConfigError(f"rootfs source {source} is corrupt: {exc}") from None
        except OSError as exc:
            raise HostError(f"cannot extract {source}: {exc.strerror or exc}") from None
    return entries


def _extract_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, entries: dict[str, _Entry]
) -> None:
    rel = _member_name(member.name)
    entry = _Entry(_DIR, member.mode & 0o7777, member.uid, member.gid, int(member.mtime))
    if not rel:
        if member.isdir():
            entries[""] = entry
        return
    _ensure_parents(staging, entries, rel)
    dst = staging / rel
    if member.isdir():
        if dst.is_dir() and not dst.is_symlink():
            entries[rel] = entry
            return
        _remove(staging, entries, rel)
        dst.mkdir()
    else:
        _remove(staging, entries, rel)
        if member.isreg():
            source = archive.extractfile(member)
            assert source is not None
            with source, open(dst, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            entry.kind, entry.size = _FILE, member.size
        elif member.issym():
            os.symlink(member.linkname, dst)
            entry.kind, entry.size = _LINK, len(os.fsencode(member.linkname))
        elif member.islnk():
            target = _member_name(member.linkname, f"hard link {member.name!r} ->")
            if entries.get(target, _Entry(_DIR, 0)).kind not in (_FILE, _HARD):
                raise ConfigError(
                    f"tar member {member.name!r} links to {member.linkname!r}, "
                    "which is not an earlier regular file"
                )
            os.link(staging / target, dst)
            entry.kind = _HARD
        elif member.ischr() or member.isblk() or member.isfifo():
            entry.kind = _CHR if member.ischr() else _BLK if member.isblk() else _FIFO
            entry.rdev = (member.devmajor, member.devminor)
        else:
            return  # other GNU/POSIX oddities carry nothing an image needs
    entries[rel] = entry


def _ensure_parents(staging: Path, entries: dict[str, _Entry], rel: str) -> None:
    """Make the parent directories of ``rel``, refusing to go through a symlink."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        parent = "/".join(parts[:i])
        path = staging / parent
        if path.is_symlink():
            raise ConfigError(
                f"tar member {rel!r} goes through the symlink /{parent}; refusing to extract it"
            )
        if not path.exists():
            path.mkdir()
            entries[parent] = _Entry(_DIR, 0o755)
        elif not path.is_dir():
            raise ConfigError(f"tar member {rel!r} is under /{parent}, which is not a directory")


def _remove(staging: Path, entries: dict[str, _Entry], rel: str) -> None:
    """Drop what an earlier member put at ``rel`` (a later member replaces it)."""
    path = staging / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        for other in [p for p in entries if p.startswith(rel + "/")]:
            del entries[other]
    elif path.is_symlink() or path.exists():
        path.unlink()
    entries.pop(rel, None)


# --- /sbin/init ---------------------------------------------------------------------------


def _resolve_dir(staging: Path, rel: str) -> str | None:
    """Follow ``rel`` (a directory path) inside the guest tree: absolute links are
    relative to its root, and nothing may leave it. None if it does not exist."""
    todo = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        path = staging.joinpath(*done, part)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        if not path.is_dir():
            return None
        done.append(part)
    return "/".join(done)


def _install_init(staging: Path, entries: dict[str, _Entry], script: str | None) -> None:
    sbin = _resolve_dir(staging, "sbin")
    if sbin is None:
        if (staging / "sbin").is_symlink() or (staging / "sbin").exists():
            raise ConfigError("the rootfs source's /sbin is not a directory")
        (staging / "sbin").mkdir()
        entries["sbin"] = _Entry(_DIR, 0o755)
        sbin = "sbin"
    rel = f"{sbin}/init" if sbin else "init"
    path = staging / rel
    if script is None:
        if path.is_symlink():
            # the tree's own init (e.g. -> /lib/systemd/systemd), if its target is there;
            # one level is checked, inside the tree (the host's files must not count)
            target = os.readlink(path)
            head, _, name = f"{'' if target.startswith('/') else sbin}/{target}".rpartition("/")
            resolved = _resolve_dir(staging, head)
            if resolved is not None and os.path.lexists(staging / resolved / name):
                return
        elif path.is_file():
            return
        script = ROOTFS_INIT
    _remove(staging, entries, rel)
    path.write_text(script, encoding="utf-8")
    entries[rel] = _Entry(_FILE, 0o755, size=len(script.encode()))


# --- e2fsprogs ---------------------------------------------------------------------------


def _tools() -> tuple[str, str]:
    """Paths of mkfs.ext4 and debugfs, checked to be new enough for ``-d``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = []
    for tool in ("mkfs.ext4", "debugfs"):
        exe = shutil.which(tool, path=path)
        if exe is None:
            raise HostError(
                f"{tool} is not installed; building a rootfs needs e2fsprogs >= "
                f"{'.'.join(map(str, MIN_E2FSPROGS))} (apt-get install e2fsprogs)"
            )
        found.append(exe)
    try:
        result = subprocess.run(
            [found[0], "-V"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise HostError(f"cannot run {found[0]}: {exc.strerror}") from None
    match = re.search(r"mke2fs (\d+)\.(\d+)", result.stdout + result.stderr)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_E2FSPROGS:
        version = match.group(0) if match else "an unknown version"
        raise HostError(
            f"{found[0]} is {version}; building a rootfs needs e2fsprogs >= "
            f"{'.'.join(map(str, MIN_E2FSPROGS))} for mkfs.ext4 -d"
        )
    return found[0], found[1]


def _e2fs_env() -> dict[str, str]:
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME), "LC_ALL": "C"}


def _run_mkfs(mkfs: str, staging: Path, image: Path, size_mib: int, fs_uuid: str, n: int) -> None:
    cmd = [mkfs, "-q", "-F", "-L", LABEL, "-m", "0", "-U", fs_uuid]
    cmd += ["-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", str(staging)]
    wanted_inodes = n + n // 4 + 64
    if wanted_inodes > size_mib * MIB // 16384:  # more than a default ratio may give
        cmd += ["-N", str(wanted_inodes)]
    cmd += [str(image), f"{size_mib}M"]
    result = _run(cmd)
    if result.returncode != 0:
        message = _last_line(result.stderr or result.stdout)
        if re.search(r"allocate|No space|too small|inode", message, re.IGNORECASE):
            raise ConfigError(
                f"a {size_mib} MiB rootfs is too small for the content ({message}); "
                "leave the size out for a fitting default"
            )
        raise HostError(f"mkfs.ext4 failed: {message}")


def _fixup_script(entries: dict[str, _Entry]) -> str:
    """debugfs commands that set what staging cannot: nodes, owners, modes, times."""
    lines = []
    for rel in sorted(entries):
        entry = entries[rel]
        if entry.kind == _HARD:
            continue  # the inode is set through its first name
        path = f'"/{rel}"'
        if entry.kind in (_CHR, _BLK, _FIFO):
            parent, _, name = rel.rpartition("/")
            node = "p" if entry.kind == _FIFO else f"{entry.kind} {entry.rdev[0]} {entry.rdev[1]}"
            lines += [f'cd "/{parent}"', f'mknod "{name}" {node}', "cd /"]
        mode = _TYPE_BITS[entry.kind] | entry.mode
        lines += [
            f"sif {path} mode 0{mode:o}",
            f"sif {path} uid {entry.uid}",
            f"sif {path} gid {entry.gid}",
        ]
        lines += [f"sif {path} {field} @{entry.mtime}" for field in ("atime", "ctime", "mtime")]
    lines += [f'sif "/lost+found" {field} @{FIXED_TIME}' for field in ("atime", "ctime", "mtime")]
    return "".join(line + "\n" for line in lines)


def _run_debugfs(debugfs: str, image: Path, script: str, script_path: Path) -> None:
    script_path.write_text(script, encoding="utf-8")
    result = _run([debugfs, "-w", "-f", str(script_path), str(image)])
    errors = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if result.returncode != 0 or errors:
        raise HostError(f"debugfs could not finish the image: {_last_line(' '.join(errors))}")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, env=_e2fs_env(), check=False
        )
    except subprocess.TimeoutExpired:
        raise HostError(f"{cmd[0]} took more than {_TIMEOUT_S} s") from None
    except OSError as exc:
        raise HostError(f"cannot run {cmd[0]}: {exc.strerror}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read {what} {path}: {exc.strerror}") from None
