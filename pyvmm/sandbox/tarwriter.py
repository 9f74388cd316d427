"""The tar stream of a PUT: a host file or directory tree, walked lazily.

The source itself is ``stat``-ed (a symlink given as the source is followed,
as ``cp`` does); inside a directory nothing is followed: symlinks go as
symlinks. Entries are sent in sorted order, parents before children, with
their permission bits (setuid/setgid/sticky included: the guest is where
they are meant to apply) and mtimes; owners are not sent (the agent makes
everything root's, or the uid/gid of the request).

Every file is checked before it is read: a regular file opened with
``O_NOFOLLOW`` and ``fstat``-ed again, its size read exactly (a file that
shrinks while being read is an error, one that grows is cut at its size
when it was opened). Sockets, FIFOs and device nodes are refused with a
:class:`~pyvmm.errors.ConfigError`, as are trees over the caller's caps.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pyvmm.errors import ConfigError
from pyvmm.sandbox.tarformat import (
    DIRECTORY,
    END_OF_ARCHIVE,
    REGULAR,
    SYMLINK,
    encode_member,
    padding,
)

#: Bytes handed on at a time (a few DATA frames' worth).
CHUNK = 256 * 1024
_KINDS = {
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class TarWriter:
    """The tar stream of ``source``, from :meth:`chunks`, in pieces of about :data:`CHUNK` bytes.

    The top entry is named after ``source``'s last component. :meth:`chunks`
    raises ConfigError (possibly after some chunks) when the source is
    missing, is not a file or directory, holds something that cannot be
    sent, or goes over ``max_files`` entries or ``max_bytes`` bytes of file
    content. ``entries`` and ``content_bytes`` count what was sent.
    """

    def __init__(self, source: Path, *, max_files: int, max_bytes: int) -> None:
        self.source = source
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.entries = 0
        self.content_bytes = 0
        self._pending = bytearray()

    def chunks(self) -> Iterator[bytes]:
        try:
            st = os.stat(self.source)
        except OSError as exc:
            raise ConfigError(f"cannot put {self.source}: {exc.strerror}") from None
        top = os.fsencode(Path(os.path.abspath(self.source)).name) or b"root"
        if stat.S_ISREG(st.st_mode):
            yield from self._file(self.source, top, follow=True)
        elif stat.S_ISDIR(st.st_mode):
            yield from self._tree(self.source, top, st)
        else:
            raise ConfigError(f"cannot put {self.source}: {_kind(st.st_mode)}")
        self._pending += END_OF_ARCHIVE
        yield bytes(self._pending)

    def _count(self, path: Path, size: int = 0) -> None:
        self.entries += 1
        self.content_bytes += size
        if self.entries > self.max_files:
            raise ConfigError(
                f"cannot put {self.source}: more than {self.max_files} entries (max_files)"
            )
        if self.content_bytes > self.max_bytes:
            raise ConfigError(
                f"cannot put {self.source}: more than {self.max_bytes} bytes of files "
                f"(max_bytes), at {path}"
            )

    def _flush(self) -> Iterator[bytes]:
        if len(self._pending) >= CHUNK:
            yield bytes(self._pending)
            self._pending.clear()

    def _tree(self, root: Path, name: bytes, st: os.stat_result) -> Iterator[bytes]:
        """Depth first with an explicit stack: a deep tree must not hit Python's recursion limit."""
        self._count(root)
        self._pending += encode_member(name, DIRECTORY, st.st_mode, 0, int(st.st_mtime))
        stack: list[tuple[Path, bytes, Iterator[os.DirEntry[str]]]] = [
            (root, name, self._children(root))
        ]
        while stack:
            directory, dir_name, children = stack[-1]
            entry = next(children, None)
            if entry is None:
                stack.pop()
                continue
            path = directory / entry.name
            member = dir_name + b"/" + os.fsencode(entry.name)
            try:
                child = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise ConfigError(f"cannot put {path}: {exc.strerror}") from None
            if stat.S_ISDIR(child.st_mode):
                self._count(path)
                self._pending += encode_member(
                    member, DIRECTORY, child.st_mode, 0, int(child.st_mtime)
                )
                stack.append((path, member, self._children(path)))
            elif stat.S_ISREG(child.st_mode):
                yield from self._file(path, member, follow=False)
            elif stat.S_ISLNK(child.st_mode):
                self._count(path)
                target = os.fsencode(os.readlink(path))
                self._pending += encode_member(
                    member, SYMLINK, child.st_mode, 0, int(child.st_mtime), target
                )
            else:
                raise ConfigError(f"cannot put {path}: {_kind(child.st_mode)}")
            yield from self._flush()

    @staticmethod
    def _children(directory: Path) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(f"cannot put {directory}: {exc.strerror}") from None
        return iter(entries)

    def _file(self, path: Path, name: bytes, *, follow: bool) -> Iterator[bytes]:
        flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ConfigError(f"cannot put {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"cannot put {path}: it changed into {_kind(st.st_mode)}")
            self._count(path, st.st_size)
            self._pending += encode_member(name, REGULAR, st.st_mode, st.st_size, int(st.st_mtime))
            left = st.st_size
            while left:
                data = f.read(min(left, CHUNK))
                if not data:
                    raise ConfigError(f"cannot put {path}: it shrank while being read")
                left -= len(data)
                self._pending += data
                yield from self._flush()
            self._pending += padding(st.st_size)
        yield from self._flush()


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file, directory or symlink")
