"""Extract a tar stream from the agent (GET) as if every byte of it were hostile.

:class:`SafeExtractor` is fed the stream as it arrives and writes into a
fresh staging directory beside the destination; only when the stream is
complete and every check has passed is its top entry renamed onto the
destination. On any refusal, or any error at all, :meth:`~SafeExtractor.close`
removes the staging directory: nothing half-written stays behind.

What is refused (with :class:`~pyvmm.sandbox.errors.UnsafeArchiveError`,
one line naming the member):

- absolute names, ``..`` components, empty names, names over 4096 bytes or
  with a component over 255 bytes;
- more than one top entry, or a member that is not under the first one;
- a member whose parent did not come before it as a directory (so nothing is
  ever written *through* a symlink or a file: "a symlink, then a file
  through it" fails here);
- the same name twice;
- hard links, device nodes, FIFOs, pax headers and every other member type
  that is not a regular file, directory or symlink;
- a symlink whose target is absolute, or that resolves (through the other
  symlinks of the final tree, as the kernel would) to a place outside the
  top entry; checked when it arrives and again when the stream is complete,
  because a later symlink can change where an earlier one leads;
- more than ``max_files`` entries or ``max_bytes`` bytes of file content
  (checked from each header, before its data is written);
- bad checksums, malformed numbers, data after the end-of-archive blocks,
  and a stream that ends before them.

Files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in directories this
extractor made itself, and get their permission bits with setuid, setgid and
sticky removed (a hostile guest must not plant a setuid file on the host),
and their mtimes. Owners in the stream are ignored: everything belongs to
the user running pyvmm.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import ConfigError, HostError, PyvmmError
from pyvmm.sandbox.errors import UnsafeArchiveError
from pyvmm.sandbox.tarformat import (
    BLOCK,
    DIRECTORY,
    LONG_LINK,
    LONG_NAME,
    REGULAR,
    SYMLINK,
    Header,
    parse_header,
)

MAX_NAME = 4096
MAX_COMPONENT = 255
#: Symlinks followed while resolving one target (Linux's MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: Zero bytes accepted after the end-of-archive blocks (tar pads to 10 KiB records).
MAX_TRAILER = 64 * 1024
#: mtimes are clamped to 0 .. 2**33 - 1 (year 2242): nanoseconds must fit 64 bits.
MAX_MTIME = 2**33 - 1
_STAGING_PREFIX = ".pyvmm-get-"

_TYPE_NAMES = {
    b"1": "a hard link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax header",
    b"g": "a pax global header",
}


@dataclass(frozen=True)
class ExtractStats:
    """What a finished extraction holds."""

    entries: int
    content_bytes: int


@dataclass
class _Entry:
    kind: bytes
    link: bytes = b""


def check_destination(dest: Path) -> None:
    """ConfigError unless ``dest`` can receive a GET: its parent is a directory, and it
    does not exist or is a file or symlink (which only a single file replaces)."""
    parent = dest.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot get into {dest}: {parent} is not an existing directory")
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise ConfigError(
            f"cannot get into {dest}: it is an existing directory "
            "(get writes a new path: remove it, or name one that does not exist)"
        )


def make_staging(dest: Path) -> Path:
    """A fresh private directory beside ``dest`` (same filesystem: the final rename is atomic)."""
    try:
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=dest.parent))
    except OSError as exc:
        raise ConfigError(f"cannot get into {dest}: {exc.strerror}") from None


class SafeExtractor:
    """Streaming, checked extraction of one tar stream into ``staging``."""

    def __init__(self, staging: Path, *, max_files: int, max_bytes: int) -> None:
        self._staging = staging
        self._root = os.fsencode(staging)
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._entries: dict[bytes, _Entry] = {}
        self._dirs: list[tuple[bytes, int, int]] = []
        self._top: bytes | None = None
        self._block = bytearray()
        self._fd: int | None = None
        self._file: tuple[bytes, int, int] | None = None  # path, mode, mtime
        self._left = 0  # data bytes of the member still to come
        self._pad = 0  # padding bytes still to come
        self._long: bytes | None = None  # LONG_NAME or LONG_LINK being read
        self._long_buf = bytearray()
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._ended = False
        self._trailer = 0
        self._failed: PyvmmError | None = None
        self._placed = False
        self.content_bytes = 0

    # --- feeding ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """The next bytes of the stream; UnsafeArchiveError if they are refused."""
        if self._failed:
            raise self._failed
        view = memoryview(data)
        try:
            while view:
                view = view[self._step(view) :]
        except PyvmmError as exc:
            self._failed = exc
            raise

    def _step(self, view: memoryview) -> int:
        """Consume a prefix of ``view``; return its length."""
        if self._ended:
            if any(view):
                self._refuse("data follows the end-of-archive blocks")
            self._trailer += len(view)
            if self._trailer > MAX_TRAILER:
                self._refuse(f"more than {MAX_TRAILER} bytes follow the end-of-archive blocks")
            return len(view)
        if self._left:
            take = min(self._left, len(view))
            if self._long is not None:
                self._long_buf += view[:take]
            else:
                self._write(view[:take])
            self._left -= take
            if not self._left:
                self._member_data_done()
            return take
        if self._pad:
            take = min(self._pad, len(view))
            self._pad -= take
            return take
        take = min(BLOCK - len(self._block), len(view))
        self._block += view[:take]
        if len(self._block) == BLOCK:
            block = bytes(self._block)
            self._block.clear()
            try:
                header = parse_header(block)
            except ValueError as exc:
                self._refuse(f"corrupt tar header: {exc}")
            if header is None:
                self._end_of_archive()
            else:
                self._header(header)
        return take

    def _end_of_archive(self) -> None:
        if self._long_name is not None or self._long_link is not None:
            self._refuse("the archive ends after a long name with no member")
        self._ended = True

    def _member_data_done(self) -> None:
        if self._long is not None:
            text = bytes(self._long_buf).split(b"\0", 1)[0]
            if self._long == LONG_NAME:
                self._long_name = text
            else:
                self._long_link = text
            self._long = None
            self._long_buf.clear()
        else:
            self._close_file()

    # --- members ---------------------------------------------------------------------

    def _header(self, header: Header) -> None:
        size = header.size
        self._pad = -size % BLOCK
        if header.kind in (LONG_NAME, LONG_LINK):
            if size > MAX_NAME + 1:
                self._refuse(f"a long name of {size} bytes (at most {MAX_NAME})")
            self._long = header.kind
            self._left = size
            if not size:
                self._member_data_done()
            return
        name = self._long_name
        if name is None:
            name = header.name
            if header.posix_prefix:
                name = header.posix_prefix + b"/" + name
        link = self._long_link if self._long_link is not None else header.link
        self._long_name = self._long_link = None
        kind = REGULAR if header.kind == b"\0" else header.kind
        shown = _show(name)
        if kind not in (REGULAR, DIRECTORY, SYMLINK):
            what = _TYPE_NAMES.get(kind, f"of unknown type {kind!r}")
            self._refuse(f"member {shown} is {what}")
        if kind != REGULAR and size:
            self._refuse(f"member {shown} is not a file but carries {size} bytes of data")
        path = self._place(name, kind)
        mtime = min(max(header.mtime, 0), MAX_MTIME)
        mode = header.mode & 0o777  # no setuid, setgid or sticky bit from a guest
        if kind == DIRECTORY:
            self._mkdir(path, mode, mtime)
        elif kind == SYMLINK:
            self._symlink(name, path, link, mtime)
        else:
            self.content_bytes += size
            if self.content_bytes > self._max_bytes:
                self._refuse(
                    f"member {shown} takes the files over {self._max_bytes} bytes (max_bytes)"
                )
            self._create(path, mode, mtime)
            self._left = size
            if not size:
                self._close_file()

    def _place(self, name: bytes, kind: bytes) -> bytes:
        """Check where ``name`` goes; record it; return its host path (bytes)."""
        shown = _show(name)
        parts = self._name_parts(name, shown)
        self._check_position(parts, kind, shown)
        key = b"/".join(parts)
        if key in self._entries:
            self._refuse(f"member {shown} appears twice")
        if len(self._entries) >= self._max_files:
            self._refuse(f"more than {self._max_files} entries (max_files)")
        self._entries[key] = _Entry(kind)
        return self._root + b"/" + key

    def _name_parts(self, name: bytes, shown: str) -> list[bytes]:
        """The components of a relative name with no ``..``, each of a sane length."""
        if len(name) > MAX_NAME:
            self._refuse(f"member name of {len(name)} bytes (at most {MAX_NAME})")
        if name.startswith(b"/"):
            self._refuse(f"member {shown} has an absolute path")
        parts = [p for p in name.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            self._refuse(f"member {shown} has a '..' component")
        if not parts:
            self._refuse(f"member {shown} has an empty name")
        if any(len(p) > MAX_COMPONENT for p in parts):
            self._refuse(f"member {shown} has a name component over {MAX_COMPONENT} bytes")
        return parts

    def _check_position(self, parts: list[bytes], kind: bytes, shown: str) -> None:
        """The first member is the top entry; every other lies in a directory already made."""
        if self._top is None:
            if len(parts) != 1:
                self._refuse(f"the first member {shown} is not a single top entry")
            if kind == SYMLINK:
                self._refuse(f"the top entry {shown} is a symlink")
            self._top = parts[0]
            return
        if parts[0] != self._top or len(parts) == 1:
            self._refuse(f"member {shown} is not under the top entry {_show(self._top)}")
        parent = self._entries.get(b"/".join(parts[:-1]))
        if parent is None:
            self._refuse(f"member {shown} comes before its directory")
        if parent.kind == SYMLINK:
            self._refuse(f"member {shown} goes through a symlink")
        if parent.kind != DIRECTORY:
            self._refuse(f"member {shown} goes through a file")

    def _mkdir(self, path: bytes, mode: int, mtime: int) -> None:
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            self._host_failure(path, exc)
        self._dirs.append((path, mode, mtime))  # mode and mtime once its children are in

    def _symlink(self, name: bytes, path: bytes, target: bytes, mtime: int) -> None:
        self._check_target(name, target)
        key = path[len(self._root) + 1 :]
        self._entries[key].link = target
        try:
            os.symlink(target, path)
            os.utime(path, ns=(mtime * 10**9, mtime * 10**9), follow_symlinks=False)
        except OSError as exc:
            self._host_failure(path, exc)

    def _check_target(self, name: bytes, target: bytes) -> None:
        shown = _show(name)
        if not target:
            self._refuse(f"symlink {shown} has an empty target")
        if target.startswith(b"/"):
            self._refuse(f"symlink {shown} points to the absolute path {_show(target)}")
        if len(target) > MAX_NAME:
            self._refuse(f"symlink {shown} has a target of {len(target)} bytes")
        parent = name.rstrip(b"/").rsplit(b"/", 1)[0]
        parts = [p for p in parent.split(b"/") if p not in (b"", b".")]
        problem = self._resolve(parts, target)
        if problem:
            self._refuse(f"symlink {shown} {problem} ({_show(target)})")

    def _resolve(self, parent: list[bytes], target: bytes) -> str | None:
        """Resolve ``target`` from ``parent`` through the tree's symlinks, as the kernel
        would; what is wrong with where it leads, or None if it stays under the top."""
        stack = list(parent)
        pending = list(reversed(target.split(b"/")))
        hops = 0
        while pending:
            part = pending.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if len(stack) <= 1:
                    return "points outside the destination"
                stack.pop()
                continue
            stack.append(part)
            entry = self._entries.get(b"/".join(stack))
            if entry is not None and entry.kind == SYMLINK and entry.link:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return "loops through too many symlinks"
                if entry.link.startswith(b"/"):
                    return "leads through an absolute symlink"
                stack.pop()
                pending.extend(reversed(entry.link.split(b"/")))
        return None

    def _create(self, path: bytes, mode: int, mtime: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            self._host_failure(path, exc)
        self._file = (path, mode, mtime)

    def _write(self, data: memoryview) -> None:
        assert self._fd is not None and self._file is not None
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            self._host_failure(self._file[0], exc)

    def _close_file(self) -> None:
        assert self._fd is not None and self._file is not None
        fd, (path, mode, mtime) = self._fd, self._file
        self._fd = self._file = None
        try:
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime * 10**9, mtime * 10**9))
        except OSError as exc:
            self._host_failure(path, exc)
        finally:
            os.close(fd)

    # --- the end ---------------------------------------------------------------------

    def finish(self) -> ExtractStats:
        """Check the whole stream arrived and its symlinks stay inside; set directory modes."""
        if self._failed:
            raise self._failed
        try:
            if not self._ended:
                self._refuse("the tar stream ended before its end-of-archive blocks")
            if self._top is None:
                self._refuse("the tar stream holds no member")
            for key, entry in self._entries.items():
                if entry.kind == SYMLINK:
                    self._check_target(key, entry.link)
        except UnsafeArchiveError as exc:
            self._failed = exc
            raise
        for path, mode, mtime in reversed(self._dirs):
            try:
                os.chmod(path, mode)
                os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
            except OSError as exc:
                self._host_failure(path, exc)
        return ExtractStats(len(self._entries), self.content_bytes)

    def place(self, dest: Path) -> None:
        """Rename the finished top entry onto ``dest`` (see :func:`check_destination`)."""
        assert self._top is not None and not self._failed
        check_destination(dest)
        is_file = self._entries[self._top].kind == REGULAR
        if os.path.lexists(dest) and not is_file:
            raise ConfigError(f"cannot get a directory into {dest}: it exists")
        try:
            if is_file:
                os.replace(self._root + b"/" + self._top, dest)
            else:
                os.rename(self._root + b"/" + self._top, dest)
        except OSError as exc:
            raise ConfigError(f"cannot get into {dest}: {exc.strerror}") from None
        self._placed = True

    def close(self) -> None:
        """Remove the staging directory (and whatever was extracted, unless placed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with suppress(OSError):  # best effort: the original error matters more than this one
            remove_tree(self._staging)

    # --- errors ----------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        raise UnsafeArchiveError(f"refused the guest's tar stream: {reason}")

    def _host_failure(self, path: bytes, exc: OSError) -> None:
        where = os.fsdecode(path[len(self._root) + 1 :])
        raise HostError(f"cannot write {where!r} under {self._staging}: {exc.strerror}") from None


def remove_tree(path: Path) -> None:
    """``rm -rf`` that never follows a symlink and gets through directories whose
    mode forbids it (a hostile archive may make its directories read-only)."""
    stack = [os.fsencode(path)]
    while stack:
        current = stack[-1]
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            stack.pop()
            continue
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(current)
            stack.pop()
            continue
        if st.st_mode & 0o700 != 0o700:
            os.chmod(current, 0o700)
        with os.scandir(current) as it:
            children = [entry.path for entry in it]
        if children:
            stack.extend(children)  # current is visited again once they are gone
        else:
            os.rmdir(current)
            stack.pop()


def _show(name: bytes) -> str:
    """A member name for a one-line message: quoted, escaped, at most 200 characters."""
    text = name.decode("utf-8", "backslashreplace")
    if len(text) > 200:
        text = text[:200] + "..."
    return repr(text)
