"""Logging as Firecracker's ``--log-path``/``--level``/``PUT /logger`` set it up.

Every line carries the instance id, as Firecracker's do:
``2026-11-23T02:40:01.123456Z [my-vm:main] message``, with the level
(``show_level``) and the origin ``module:line`` (``show_log_origin``) added
inside the brackets when asked. Levels are Firecracker's names (Error,
Warning, Info, Debug, Trace, Off), case-insensitive.

Python's logging is per process, and so is a Firecracker-style VMM (one
VM per process), so this configures the ``pyvmm`` logger; the library API
(:mod:`pyvmm.microvm`) never calls it.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm.errors import ConfigError

LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


def parse_level(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        choices = ", ".join(("Error", "Warning", "Info", "Debug", "Trace", "Off"))
        raise ConfigError(f"log level {name!r} is not one of {choices}") from None


class InstanceFormatter(logging.Formatter):
    """``<UTC time> [<id>:<thread>[:<LEVEL>][:<module>:<line>]] <message>``."""

    def __init__(self, instance_id: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        micros = int((record.created % 1) * 1_000_000)
        where = f"{self.instance_id}:{record.threadName}"
        if self.show_level:
            where += f":{record.levelname}"
        if self.show_origin:
            where += f":{record.module}:{record.lineno}"
        text = f"{stamp}.{micros:06d}Z [{where}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(
    instance_id: str,
    path: str | os.PathLike[str] | None,
    level: str = "Warning",
    *,
    show_level: bool = False,
    show_origin: bool = False,
    module: str | None = None,
) -> logging.Handler:
    """Send the ``pyvmm`` logger (or its ``module`` child) to ``path`` (stderr if None).

    Replaces the handlers a previous call installed. A file is opened for
    appending, created if missing; a FIFO is opened without blocking on a
    missing reader. Returns the handler (tests read its stream).
    """
    numeric = parse_level(level)
    if path is None:
        handler: logging.Handler = logging.StreamHandler()
    else:
        handler = logging.StreamHandler(_open_log(Path(path)))
    handler.setFormatter(InstanceFormatter(instance_id, show_level, show_origin))
    handler.set_name("pyvmm-instance")
    target = logging.getLogger("pyvmm")
    for old in list(target.handlers):
        target.removeHandler(old)
        old.close()
    if module:
        handler.addFilter(_module_filter(module))
    target.addHandler(handler)
    target.setLevel(numeric)
    target.propagate = False
    return handler


def _module_filter(module: str) -> Callable[[logging.LogRecord], bool]:
    """Keep records of ``module``: a dotted path (``pyvmm.vmm.vcpu``, ``vmm.vcpu``) or a
    module's own name (``vcpu``), whichever package it lives in."""
    name = module.removeprefix("pyvmm.").strip(".")

    def keep(record: logging.LogRecord) -> bool:
        logger = record.name.removeprefix("pyvmm.")
        return logger == name or logger.startswith(name + ".") or logger.endswith("." + name)

    return keep


class _LineSink(io.TextIOBase):
    """A log destination that never blocks the VMM: a line a full FIFO cannot take is
    dropped and counted (Firecracker's ``logger.missed_log_count``)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.missed = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        try:
            os.write(self._fd, data)
        except (BlockingIOError, BrokenPipeError):
            self.missed += 1
        return len(text)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _open_log(path: Path) -> _LineSink:
    """Append to a file (created if missing); a FIFO is opened read-write and non-blocking,
    so a missing or slow reader never stops the VMM (Firecracker drops such lines too)."""
    try:
        is_fifo = path.exists() and stat.S_ISFIFO(path.stat().st_mode)
        if is_fifo:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open log file {str(path)!r}: {exc.strerror}") from None
    return _LineSink(fd)
