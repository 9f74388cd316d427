"""Tar streams a hostile guest agent might send, made with Python's tarfile (GNU format).

tarfile is independent of pyvmm's own tar code, so these also check that
pyvmm reads what a standard writer produces.
"""

from __future__ import annotations

import io
import tarfile

MTIME = 1_000_000_000


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    link: str = "",
    mode: int = 0o644,
):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar(*members, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """The archive of ``members`` (from :func:`member`), with its end-of-archive blocks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def d(name: str, mode: int = 0o755):
    return member(name, tarfile.DIRTYPE, mode=mode)


def f(name: str, data: bytes = b"", mode: int = 0o644):
    return member(name, data=data, mode=mode)


def s(name: str, target: str):
    return member(name, tarfile.SYMTYPE, link=target, mode=0o777)


#: name -> (archive, the reason the host must give). Each one is refused whole.
HOSTILE: dict[str, tuple[bytes, str]] = {
    "dotdot": (tar(d("top"), f("top/../evil", b"x")), "'..' component"),
    "dotdot-top": (tar(f("../evil", b"x")), "'..' component"),
    "absolute": (tar(d("top"), f("/tmp/pyvmm-tarsafe-evil", b"x")), "absolute path"),
    "absolute-top": (tar(f("/evil", b"x")), "absolute path"),
    "symlink-absolute": (tar(d("top"), s("top/l", "/etc/passwd")), "points to the absolute path"),
    "symlink-dotdot": (tar(d("top"), d("top/a"), s("top/a/l", "../../x")), "points outside"),
    "symlink-to-top-parent": (tar(d("top"), s("top/l", "..")), "points outside"),
    # Each symlink stays inside when checked alone; together, q/../.. escapes:
    # top/a/b/q -> ../.. is top, so top/a/b/p -> q/../.. is top/.. (outside).
    "symlink-chain": (
        tar(d("top"), d("top/a"), d("top/a/b"), s("top/a/b/p", "q/../.."), s("top/a/b/q", "../..")),
        "points outside",
    ),
    "symlink-loop": (tar(d("top"), s("top/a", "b"), s("top/b", "a")), "loops"),
    "symlink-then-file-through-it": (
        tar(d("top"), s("top/l", "."), f("top/l/evil", b"x")),
        "goes through a symlink",
    ),
    "symlink-top": (tar(s("top", "/etc")), "the top entry"),
    "file-then-file-through-it": (tar(d("top"), f("top/f"), f("top/f/x")), "goes through a file"),
    "hardlink": (tar(d("top"), member("top/h", tarfile.LNKTYPE, link="/etc/passwd")), "hard link"),
    "hardlink-inside": (
        tar(d("top"), f("top/a", b"x"), member("top/h", tarfile.LNKTYPE, link="top/a")),
        "hard link",
    ),
    "char-device": (tar(d("top"), member("top/null", tarfile.CHRTYPE)), "character device"),
    "block-device": (tar(d("top"), member("top/sda", tarfile.BLKTYPE)), "block device"),
    "fifo": (tar(d("top"), member("top/p", tarfile.FIFOTYPE)), "FIFO"),
    "pax": (tar(d("top"), f("top/" + "ü" * 10, b"x"), fmt=tarfile.PAX_FORMAT), "pax header"),
    "before-its-dir": (tar(d("top"), f("top/sub/x", b"x")), "before its directory"),
    "two-tops": (tar(d("top"), d("other")), "not under the top entry"),
    "top-not-single": (tar(f("a/b", b"x")), "not a single top entry"),
    "duplicate": (tar(d("top"), f("top/x", b"1"), f("top/x", b"2")), "appears twice"),
    "empty-name": (tar(f("./", b"x")), "empty name"),
}
