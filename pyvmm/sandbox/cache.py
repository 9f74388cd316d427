"""The sandbox snapshot cache: one booted, agent-ready snapshot per guest configuration.

The first sandbox of a configuration boots its guest, waits for the agent
and snapshots it (:mod:`pyvmm.sandbox.template`); every later one restores
that snapshot (memory mapped copy-on-write, disks copied per sandbox). The
cache key (:func:`template_key`) hashes everything that changes what the
guest is at that moment:

- pyvmm's version and snapshot format, this cache's layout version;
- the kernel, initrd and every drive image by *identity*: resolved path,
  size, modification time and inode (hashing their content would cost more
  than the restore it saves; an image replaced or edited in place changes
  its mtime), the drives' modes and ids;
- the kernel command line, vCPUs, memory, CPU template, devices (rng,
  number of interfaces and their rate limits - not TAP names or MACs, which
  each sandbox gets anew), and how the VMM runs (in-process or jailed:
  their snapshots name files differently);
- this host: CPU model and flags, and KVM's kind (a snapshot restores only
  where its vCPU state makes sense).

The agent binary is inside the initrd (or the root drive), so it is covered
by their identities; the default guest's initrd is itself named by a hash of
its content (the guest kit's cache).

Layout, under ``<cache root>/sandbox/`` (``$PYVMM_CACHE`` or
``~/.cache/pyvmm``)::

    <key>/meta.json        what the entry is (:class:`EntryMeta`)
    <key>/vm.state         the snapshot's state file
    <key>/vm.mem           its memory file (sparse)
    <key>/vm.mem.extents   where vm.mem holds data (JSON [start, end] pairs)
    <key>/disks/<id>.img   the writable drives as they were at the snapshot
    <key>.lock             held while an entry is being made

An entry is built in a ``.tmp-*`` directory and renamed into place, so a
reader sees a whole entry or none. A ``flock`` on ``<key>.lock`` makes a
second process wait for the first one's boot instead of booting too; where
locks do not work (some network filesystems), both boot and the loser's
rename fails harmlessly. An entry that cannot be restored (a snapshot from
an older pyvmm, damage) is removed and built again once (:meth:`discard`).
Nothing evicts entries: remove ``<cache root>/sandbox`` to reclaim space.

A cache on a network filesystem (9p, NFS, CIFS, FUSE) is slow to restore
from: every page the guest touches is a round trip. :func:`local_entry`
then copies the entry once into the temporary directory (``$TMPDIR``) and
restores from that copy. Measured in a nested host, whose cache is a 9p
share of the host's: a 97 MiB (data) memory file copies in 2.9 s; after
that, a restored guest's first command took 0.1-0.3 s instead of 2-6.5 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyvmm.errors import HostError
from pyvmm.snapshot.files import SnapshotError

#: Bumped when the entry layout or the meaning of the key changes.
CACHE_FORMAT = 1
STATE_FILE = "vm.state"
MEM_FILE = "vm.mem"
EXTENTS_FILE = "vm.mem.extents"
#: An extents file lists at most one pair per 64 KiB block of RAM; far beyond any guest's.
MAX_EXTENTS_BYTES = 16 << 20
META_FILE = "meta.json"
DISK_DIR = "disks"
#: meta.json is a few hundred bytes; anything far larger is not ours.
MAX_META_BYTES = 64 * 1024


@dataclass(frozen=True)
class EntryMeta:
    """What a cache entry holds besides its snapshot files.

    ``disks``: {drive id: file name under ``disks/``} for the writable drives;
    ``shared``: {drive id: host path} for the read-only drives, used as they are;
    ``macs``: the MAC of each interface in the snapshot (clones change them);
    ``taps``: the TAP names the snapshot saved (clones rename them);
    ``runner``: ``in-process`` or ``jailed``; ``boot_seconds`` and
    ``snapshot_seconds``: what making it cost.
    """

    key: str
    runner: str
    disks: Mapping[str, str] = field(default_factory=dict)
    shared: Mapping[str, str] = field(default_factory=dict)
    macs: tuple[str, ...] = ()
    taps: tuple[str, ...] = ()
    boot_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    format: int = CACHE_FORMAT

    def to_json(self) -> str:
        data = asdict(self)
        data["disks"] = dict(self.disks)
        data["shared"] = dict(self.shared)
        data["macs"] = list(self.macs)
        data["taps"] = list(self.taps)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> EntryMeta:
        """Parse and type-check ``meta.json``; :class:`SnapshotError` naming ``where``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SnapshotError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise SnapshotError(
                f"{where} is not a pyvmm sandbox cache entry of format {CACHE_FORMAT}"
            )
        try:
            meta = cls(
                key=_typed(data, "key", str),
                runner=_typed(data, "runner", str),
                disks=_typed(data, "disks", dict),
                shared=_typed(data, "shared", dict),
                macs=tuple(_typed(data, "macs", list)),
                taps=tuple(_typed(data, "taps", list)),
                boot_seconds=float(_typed(data, "boot_seconds", (int, float))),
                snapshot_seconds=float(_typed(data, "snapshot_seconds", (int, float))),
            )
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"{where}: {exc}") from None
        names = [*meta.disks, *meta.disks.values(), *meta.macs, *meta.taps]
        if not all(
            isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names
        ):
            raise SnapshotError(f"{where} names a disk, MAC or TAP that is not a plain string")
        paths = [*meta.shared.values(), *meta.shared]
        if not all(isinstance(p, str) and p for p in paths) or not all(
            p.startswith("/") for p in meta.shared.values()
        ):
            raise SnapshotError(f"{where} names a shared drive that is not an absolute path")
        return meta


def _typed(data: dict, name: str, kind: type | tuple[type, ...]) -> object:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"field {name!r} is {type(value).__name__}, not what it should be")
    return value


@dataclass(frozen=True)
class CacheEntry:
    """A usable entry: its directory and what :file:`meta.json` says."""

    path: Path
    meta: EntryMeta

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def mem_file(self) -> Path:
        return self.path / MEM_FILE

    def disk(self, drive_id: str) -> Path:
        return self.path / DISK_DIR / self.meta.disks[drive_id]

    def mem_extents(self) -> list[tuple[int, int]] | None:
        """Where the memory file holds data (None if the entry does not say)."""
        path = self.path / EXTENTS_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"cannot read {path}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SnapshotError(f"{path} is not a regular file")
            raw = _read_up_to(fd, MAX_EXTENTS_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_EXTENTS_BYTES:
            raise SnapshotError(f"{path} is larger than {MAX_EXTENTS_BYTES} bytes")
        try:
            data = json.loads(raw)
            extents = [(int(a), int(b)) for a, b in data]
        except (ValueError, TypeError) as exc:
            raise SnapshotError(f"{path} is not a list of [start, end] pairs: {exc}") from None
        if any(not 0 <= a <= b for a, b in extents) or extents != sorted(extents):
            raise SnapshotError(f"{path} lists extents out of order or inverted")
        return extents


def record_extents(entry_dir: Path) -> None:
    """Write ``vm.mem.extents`` for the memory file in ``entry_dir`` (see the module doc)."""
    from pyvmm.sandbox.disks import data_extents, scan_extents

    mem = entry_dir / MEM_FILE
    if filesystem_type(entry_dir) in NETWORK_FILESYSTEMS:
        extents = scan_extents(mem)
    else:
        extents = data_extents(mem)
    (entry_dir / EXTENTS_FILE).write_text(json.dumps(extents))


def file_identity(path: Path) -> dict[str, object]:
    """What names a file's version without reading it: path, size, mtime, inode."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}") from None
    return {
        "path": str(Path(path).resolve()),
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ino": info.st_ino,
        "dev": info.st_dev,
    }


def host_identity() -> dict[str, object]:
    """The CPU (model and flags) and KVM kind a snapshot's vCPU state belongs to."""
    from pyvmm.doctor import virtualization_kind

    model, flags = "", ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="ascii", errors="replace") as f,
    ):
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
            if model and flags:
                break
    return {"cpu": model, "flags": flags, "kvm": virtualization_kind(), "arch": platform.machine()}


def template_key(inputs: Mapping[str, object]) -> str:
    """The key of a configuration: a hash of ``inputs`` with the versions added."""
    from pyvmm.snapshot.state import FORMAT_VERSION, pyvmm_version

    payload = {
        "cache_format": CACHE_FORMAT,
        "snapshot_format": FORMAT_VERSION,
        "pyvmm": pyvmm_version(),
        **inputs,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class SnapshotCache:
    """The entries under one cache root (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls, cache_dir: Path | None = None) -> SnapshotCache:
        """``cache_dir``, or ``sandbox/`` in the guest kit's cache root."""
        if cache_dir is not None:
            return cls(cache_dir)
        return cls(default_cache_dir())

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry for ``key``, or None; a damaged entry raises :class:`SnapshotError`."""
        if not (self.root / key / META_FILE).exists():
            return None
        entry = read_entry(self.root / key)
        if entry.meta.key != key:
            raise SnapshotError(f"{entry.path} holds key {entry.meta.key[:40]!r}, not {key}")
        return entry

    def get_or_create(
        self, key: str, build: Callable[[Path], EntryMeta]
    ) -> tuple[CacheEntry, bool]:
        """The entry for ``key``; ``build(staging_dir)`` makes it when there is none.

        Returns the entry and whether this call built it. ``build`` fills the
        staging directory (snapshot files, ``disks/``) and returns the meta;
        on any exception nothing is left behind.
        """
        entry = self._lookup_or_discard(key)
        if entry is not None:
            return entry, False
        with self._locked(key):
            entry = self._lookup_or_discard(key)  # made while we waited for the lock
            if entry is not None:
                return entry, False
            return self._build(key, build), True

    def discard(self, key: str) -> None:
        """Remove an entry (it could not be restored); the next sandbox builds it again."""
        path = self.root / key
        trash = self.root / f".tmp-discard-{key}-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _lookup_or_discard(self, key: str) -> CacheEntry | None:
        try:
            return self.lookup(key)
        except SnapshotError:
            self.discard(key)
            return None

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        _make_dir(self.root)
        lock_path = self.root / f"{key}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostError(f"cannot create {lock_path}: {exc.strerror}") from None
        try:
            with contextlib.suppress(OSError):  # no locks here: both may build (see the docstring)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _build(self, key: str, build: Callable[[Path], EntryMeta]) -> CacheEntry:
        staging = self.root / f".tmp-{key}-{secrets.token_hex(4)}"
        try:
            _cache_io(staging, lambda: (staging.mkdir(mode=0o755), (staging / DISK_DIR).mkdir()))
            meta = build(staging)
            _cache_io(staging, lambda: (staging / META_FILE).write_text(meta.to_json()))
            try:
                os.rename(staging, self.root / key)
            except OSError as exc:
                existing = self.lookup(key)  # another process made it first
                if existing is None:
                    raise HostError(
                        f"cannot move {staging.name} into place in {self.root}: {exc.strerror}"
                    ) from None
                shutil.rmtree(staging, ignore_errors=True)
                return existing
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return CacheEntry(self.root / key, meta)


#: Filesystems whose pages are fetched over a wire (``/proc/mounts`` names).
NETWORK_FILESYSTEMS = frozenset({"9p", "nfs", "nfs4", "cifs", "smb3", "fuse", "fuse.sshfs"})
LOCAL_COPIES = "pyvmm-sandbox-cache"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (from ``/proc/mounts``; "" if unknown)."""
    target = str(Path(path).resolve())
    best, kind = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def local_entry(entry: CacheEntry) -> CacheEntry:
    """``entry`` itself, or a copy in the temporary directory if it is on a network
    filesystem (see the module docstring); the copy is made once per entry version."""
    if filesystem_type(entry.path) not in NETWORK_FILESYSTEMS:
        return entry
    try:
        version = os.stat(entry.state_file).st_mtime_ns
    except OSError as exc:
        raise SnapshotError(f"cannot read {entry.state_file}: {exc.strerror}") from None
    copies = SnapshotCache(Path(tempfile.gettempdir()) / LOCAL_COPIES)
    local_key = f"{entry.meta.key}-{version}"

    def copy(staging: Path) -> EntryMeta:
        from pyvmm.sandbox.disks import clone_file

        # 0644: a jailed VMM (another uid) maps these through a bind mount.
        clone_file(entry.state_file, staging / STATE_FILE, mode=0o644)
        clone_file(entry.mem_file, staging / MEM_FILE, entry.mem_extents(), mode=0o644)
        for disk in entry.meta.disks.values():
            clone_file(entry.path / DISK_DIR / disk, staging / DISK_DIR / disk)
        return dataclasses.replace(entry.meta, key=local_key)

    local, _ = copies.get_or_create(local_key, copy)
    return local


def default_cache_dir() -> Path:
    """``sandbox/`` in pyvmm's cache root: ``$PYVMM_CACHE``, else ``~/.cache/pyvmm`` (the
    guest kit's root; not imported from it: the runtime does not import the tooling)."""
    root = os.environ.get("PYVMM_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "pyvmm") / "sandbox"


def _cache_io(where: Path, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as exc:
        raise HostError(f"cannot write the sandbox cache entry {where}: {exc.strerror}") from None


def read_entry(path: Path) -> CacheEntry:
    """The entry (or :meth:`Sandbox.snapshot` directory) at ``path``, its meta checked."""
    meta_path = Path(path) / META_FILE
    try:
        fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SnapshotError(
            f"{path} is not a sandbox snapshot: cannot read {META_FILE}: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_META_BYTES:
            raise SnapshotError(f"{meta_path} is not a small regular file")
        text = _read_up_to(fd, MAX_META_BYTES + 1).decode("utf-8", "replace")
    finally:
        os.close(fd)
    return CacheEntry(Path(path), EntryMeta.from_json(text, str(meta_path)))


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < limit:
        data = os.read(fd, limit - len(chunks))
        if not data:
            break
        chunks += data
    return bytes(chunks)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise HostError(f"cannot create the sandbox cache {path}: {exc.strerror}") from None
