"""The L1 side of a nested host: its ``/init`` script and the files it reads.

L1 is a Linux guest of QEMU-TCG (see :mod:`pyvmm.nested.host`). Its ``/init``
(busybox ``sh``, :data:`INIT_SCRIPT`) loads the modules listed by the guest
kit in ``/etc/modules-load.order``, mounts the host's ``/`` read-only at
``/host`` and the *work* share at ``/work``, sources the mount plan the host
wrote to ``/work/agent/config.sh`` (:func:`config_script`), and then serves
commands until told to stop.

The agent protocol (all files in ``<work>/agent/``, names in
:class:`AgentFiles`):

- L1 writes ``ready`` (its uptime in seconds) when it starts serving.
- The host writes ``cmd-<n>.sh`` (:func:`command_script`) and then the empty
  ``cmd-<n>.ready``; ``n`` counts up from 0 and the agent serves them in
  order, one at a time.
- The agent runs the script as ``chroot /host /bin/sh <script>`` with an
  empty environment (the script exports its own), stdin from ``/dev/null``,
  in a new session, and stdout/stderr going to ``cmd-<n>.out`` and
  ``cmd-<n>.err``. If the host also wrote ``cmd-<n>.console`` (before
  ``ready``), stdin and stdout are instead the console port: a
  virtio-serial port named :data:`CONSOLE_PORT_NAME` whose other end is a
  Unix socket of QEMU's on the host (:mod:`pyvmm.nested.host`), so a
  terminal or a pipe on the host streams both ways with no polling. It
  writes the exit status to ``cmd-<n>.status`` last
  (through a rename, so a reader never sees half of it). The script exits
  125 if it cannot enter its working directory; the shell's 126/127 mean the
  command could not be run or found.
- ``cmd-<n>.cancel`` (checked every half second) kills the command's whole
  process group; its status is then 137.
- ``shutdown`` kills any running command, then ``sync`` and ``poweroff -f``.

Every ``/init`` failure before the agent starts prints a line starting with
:data:`FATAL_MARKER` on the console and powers L1 off, so the host sees QEMU
exit instead of waiting for a ``ready`` that never comes.

Why files on a 9p share rather than a serial line or vsock: 9p without a cache
is coherent in both directions, needs no extra module or framing, survives
binary output of any size, and leaves every exchange on disk for a post-mortem.
The console port is the exception, for what files cannot do well: bytes
typed on the host reaching a command at once, and its output coming back
without a 9p round trip per write. The host stays connected to the port for
L1's whole life (a virtio-serial read returns end-of-file whenever the host
side is not connected, so connecting per command would race the command's
first read); the end of the host's input is therefore sent in-band, as the
console's end-of-file character (see :mod:`pyvmm.host.console_input`).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: Modules L1 needs; the guest kit adds their dependencies and orders them
#: (virtio_ring virtio virtio_mmio 9pnet 9pnet_virtio netfs fscache 9p
#: irqbypass kvm ccp kvm-amd; virtio_console for the console port; tun for TAP
#: devices, veth for pairs).
L1_MODULES: tuple[str, ...] = (
    "virtio_mmio", "9pnet_virtio", "9p", "virtio_console", "kvm_amd", "tun", "veth",
)  # fmt: skip

#: The name of the virtio-serial port that carries a streamed command's stdin/stdout.
CONSOLE_PORT_NAME = "pyvmm.console"

#: 9p mount options; ``msize`` 512000 is what the kernel and QEMU 7.2 allow.
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"

#: 9p cache modes for the read-only host share. ``loose`` lets L1 cache file
#: data and lookups: Python starts in about 2 s instead of 6-9 s, but a host
#: file that L1 has already read and the host then replaces is seen stale.
#: The writable shares are never cached (writes reach the host at once).
HOST_CACHE_MODES: tuple[str, ...] = ("loose", "none", "fscache", "mmap")

#: The L1 tmpfs that commands get as ``TMPDIR`` (fast, and Unix sockets work).
L1_TMPDIR = "/run/pyvmm-tmp"

#: Exit status of a command killed by ``cancel`` or ``shutdown`` (128 + SIGKILL).
KILLED_STATUS = 137

FATAL_MARKER = "pyvmm-nested: FATAL:"
READY_MARKER = "pyvmm-nested: agent ready"

INIT_SCRIPT = rf"""#!/bin/sh
# L1 /init of a pyvmm nested host; the protocol is in pyvmm/nested/agent.py.
export PATH=/bin:/sbin HOME=/root
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/null >/dev/console 2>&1
log() {{ echo "pyvmm-nested: $*"; }}
fatal() {{ echo "{FATAL_MARKER} $*"; sync; poweroff -f; sleep 60; }}
now() {{ read -r up _ </proc/uptime; echo "$up"; }}
log "init started at $(now) s"
if [ -s /etc/modules-load.order ]; then
    while read -r module; do
        insmod "$module" || log "module failed: $module"
    done </etc/modules-load.order
fi
[ -c /dev/kvm ] || log "no /dev/kvm in L1 (kvm_amd did not load?)"
mkdir -p /host /work
mount -t 9p -o {NINEP_OPTIONS} work /work || fatal "cannot mount the work share"
A=/work/agent
[ -f $A/config.sh ] || fatal "no $A/config.sh on the work share"
share() {{  # share TAG PATH: a writable share at the same path in the chroot
    mkdir -p "/host$2" 2>/dev/null
    mount -t 9p -o {NINEP_OPTIONS} "$1" "/host$2" || fatal "cannot mount share $1 on $2"
}}
bind_work() {{  # bind_work PATH: the work share at its host path in the chroot
    mkdir -p "/host$1" 2>/dev/null
    mount --bind /work "/host$1" || fatal "cannot bind the work share on $1"
}}
. $A/config.sh
mount -t 9p -o {NINEP_OPTIONS},ro,cache=$HOST_CACHE host /host ||
    fatal "cannot mount the host share"
mount -t proc -o nosuid,nodev,noexec proc /host/proc || fatal "cannot mount /host/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /host/sys || fatal "cannot mount /host/sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /host/dev || fatal "cannot mount /host/dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o nosuid,noexec,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /host/dev/shm
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /host/sys/fs/cgroup
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /host/run || fatal "cannot mount /host/run"
mkdir -p -m 1777 /host{L1_TMPDIR}
chroot_mounts
ip link set lo up 2>/dev/null
console_port() {{  # the device node of the port named {CONSOLE_PORT_NAME}
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = {CONSOLE_PORT_NAME} ] && echo "/dev/${{p##*/}}" && return
    done
    return 1
}}
serve() {{  # serve N: run cmd-N.sh, write cmd-N.status last
    c=$A/cmd-$1
    if [ ! -e "$c.console" ]; then
        setsid env -i /bin/chroot /host /bin/sh "$WORK_PATH/agent/cmd-$1.sh" \
            >"$c.out" 2>"$c.err" </dev/null &
    elif port=$(console_port); then
        # One open for both directions: a virtio-serial port allows one opener.
        setsid env -i /bin/chroot /host /bin/sh "$WORK_PATH/agent/cmd-$1.sh" \
            0<>"$port" 1>&0 2>"$c.err" &
    else
        echo "pyvmm-nested: L1 has no {CONSOLE_PORT_NAME} port" >"$c.err"
        echo 125 >"$c.status.tmp" && mv "$c.status.tmp" "$c.status"
        return
    fi
    pid=$!
    (
        while kill -0 $pid 2>/dev/null; do
            if [ -e "$c.cancel" ] || [ -e $A/shutdown ]; then
                kill -KILL -$pid 2>/dev/null
                kill -KILL $pid 2>/dev/null
                break
            fi
            sleep 0.5
        done
    ) &
    watch=$!
    wait $pid
    status=$?
    kill $watch 2>/dev/null
    wait $watch 2>/dev/null
    echo $status >"$c.status.tmp" && mv "$c.status.tmp" "$c.status"
}}
# Idle ticks: a read with a timeout on a FIFO nobody writes is a sleep without a fork.
busybox mkfifo /tick && exec 3<>/tick || fatal "cannot make the idle FIFO"
now >$A/ready.tmp && mv $A/ready.tmp $A/ready || fatal "cannot write to the work share"
log "agent ready at $(now) s"
n=0
while [ ! -e $A/shutdown ]; do
    if [ -e $A/cmd-$n.ready ]; then
        serve $n
        n=$((n + 1))
    else
        read -t 0.1 -u 3 _
    fi
done
log "shutting down"
sync
poweroff -f
"""


@dataclass(frozen=True)
class AgentFiles:
    """The protocol files of one work directory (host paths)."""

    workdir: Path

    @property
    def directory(self) -> Path:
        return self.workdir / "agent"

    @property
    def config(self) -> Path:
        return self.directory / "config.sh"

    @property
    def ready(self) -> Path:
        return self.directory / "ready"

    @property
    def shutdown(self) -> Path:
        return self.directory / "shutdown"

    def command(self, n: int, suffix: str) -> Path:
        """``cmd-<n>.<suffix>``: sh, ready, out, err, status or cancel."""
        return self.directory / f"cmd-{n}.{suffix}"


@dataclass(frozen=True)
class Share:
    """A 9p share: QEMU exports ``host_path`` under ``tag``."""

    tag: str
    host_path: Path
    readonly: bool = False


def is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def plan_shares(
    workdir: Path,
    cwd: Path | None,
    tmp: Path | None = Path("/tmp"),
    extra: Sequence[Path] = (),
) -> list[Share]:
    """The shares of one L1: host ``/`` (read-only), the work dir, /tmp, the cwd
    and the ``extra`` directories (e.g. where a VM's disk images are).

    These are shared writable at their own paths, so a path means the same
    file in L1 and on the host (pytest's ``tmp_path`` included). A share
    inside another writable one is left out: it is visible through the outer
    one. ``/`` itself is never shared writable.
    """
    shares = [Share("host", Path("/"), readonly=True), Share("work", workdir)]
    writable: list[Path] = [workdir]
    candidates = [("tmp", tmp), ("cwd", cwd)]
    candidates += [(f"w{index}", path) for index, path in enumerate(extra)]
    for tag, path in candidates:
        if path is None or path == Path("/"):
            continue
        if any(is_within(path, other) for other in writable):
            continue
        shares.append(Share(tag, path))
        writable.append(path)
    return shares


def config_script(workdir: Path, shares: Sequence[Share], host_cache: str = "loose") -> str:
    """``config.sh``: the host share's cache mode, and the mounts /init makes
    inside the chroot (``chroot_mounts``), outermost first.

    A writable share (other than the work share) is mounted at its host path;
    the work share is bound at its host path unless a writable share already
    covers it. Mounting outer paths first keeps an inner mount from being
    hidden by an outer one.
    """
    mounts: list[tuple[Path, str]] = []
    covered = False
    for share in shares:
        if share.readonly or share.tag == "work":
            continue
        mounts.append((share.host_path, f"share {share.tag} {_quote_path(share.host_path)}"))
        covered = covered or is_within(workdir, share.host_path)
    if not covered:
        mounts.append((workdir, f"bind_work {_quote_path(workdir)}"))
    mounts.sort(key=lambda item: len(item[0].parts))
    if host_cache not in HOST_CACHE_MODES:
        raise ValueError(f"host_cache must be one of {', '.join(HOST_CACHE_MODES)}")
    lines = [
        "# Written by the host before L1 boots; sourced by /init.",
        f"WORK_PATH={_quote_path(workdir)}",
        f"HOST_CACHE={host_cache}",
        "chroot_mounts() {",
        *(f"    {line}" for _, line in mounts),
        "    :",
        "}",
    ]
    return "\n".join(lines) + "\n"


def command_script(command: Sequence[str] | str, cwd: Path, env: Mapping[str, str]) -> str:
    """``cmd-<n>.sh``: export ``env``, enter ``cwd``, run ``command``.

    A sequence is one argv (run with ``exec``); a string is shell code.
    """
    lines = ["# pyvmm nested command"]
    for key, value in sorted(env.items()):
        if not key.isidentifier():
            raise ValueError(f"not a valid environment variable name: {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {_quote_path(cwd)} || exit 125")
    if isinstance(command, str):
        lines.append(command)
    else:
        if not command:
            raise ValueError("the command is empty")
        lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def _quote_path(path: Path) -> str:
    text = str(PurePosixPath(path))
    if not text.startswith("/"):
        raise ValueError(f"L1 paths must be absolute: {text!r}")
    return shlex.quote(text)
