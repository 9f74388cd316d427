"""The kernel command line: validated, then written NUL-terminated.

The kernel reads a C string, so an embedded NUL would silently cut the
line short: it is rejected. Any other UTF-8 is passed through (the kernel
treats the line as bytes). The length limit is the kernel's own
(``cmdline_size`` of a bzImage, COMMAND_LINE_SIZE - 1 otherwise), further
capped by the room pyvmm reserves at ``layout.CMDLINE_START``.
"""

from __future__ import annotations

from pyvmm import layout
from pyvmm.errors import KernelImageError
from pyvmm.memory import GuestMemory


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The command line as the bytes to write, NUL included.

    ``limit`` is the most bytes the kernel accepts, not counting the NUL.
    """
    if "\0" in cmdline:
        raise KernelImageError(
            f"kernel command line contains a NUL character at position {cmdline.index(chr(0))}"
        )
    try:
        data = cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from undecodable argv bytes
        raise KernelImageError(
            f"kernel command line is not valid text at position {exc.start}"
        ) from None
    limit = min(limit, layout.CMDLINE_AREA_SIZE - 1)
    if len(data) > limit:
        raise KernelImageError(f"kernel command line is {len(data)} bytes; the limit is {limit}")
    return data + b"\0"


def write_cmdline(mem: GuestMemory, data: bytes, addr: int = layout.CMDLINE_START) -> None:
    """Write the output of :func:`encode_cmdline` at ``addr``."""
    mem.write(addr, data)
