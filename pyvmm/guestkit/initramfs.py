"""Build a busybox initramfs that loads kernel modules and runs test commands.

What goes in (a gzip-compressed "newc" cpio, see :mod:`pyvmm.guestkit.cpio`):

- ``/bin/busybox`` from Debian's ``busybox-static`` and a symlink per applet
  in :data:`APPLETS` (``/sbin``, ``/usr/bin`` and ``/usr/sbin`` point at
  ``/bin``; every other applet runs as ``busybox <applet>``);
- ``/dev/console`` (c 5 1) and ``/dev/null`` (c 1 3), so ``/init`` has its
  standard streams before it mounts devtmpfs; empty ``/proc``, ``/sys``,
  ``/tmp``, ``/run``, ``/root``, ``/mnt``;
- the requested kernel modules *and everything they depend on* (from
  ``modules.dep``), under ``/lib/modules/<release>/`` with their tree paths,
  decompressed to plain ``.ko``; ``/etc/modules-load.order`` lists them in
  load order (dependencies first), one absolute path a line, and a
  ``modules.dep`` for just them lets ``modprobe`` work in the guest too;
- ``/init`` (the given script, :data:`DEFAULT_INIT` by default) and any
  ``extra_files``;
- with ``agent``: the guest agent as ``/bin/pyvmm-agent`` (mode 0755, see
  :mod:`pyvmm.guestkit.agent_tool`). The default guest's initramfs (``pyvmm
  run`` with no ``--kernel``, ``pyvmm guest initramfs``) and the sandbox
  guest's have it. Nothing starts it by default: a sandbox starts it as
  ``pyvmm.cmd=<base64 of "exec pyvmm-agent">`` (see below), which needs the
  vsock transport modules too (``--module virtio_mmio --module
  vmw_vsock_virtio_transport``; the sandbox guest loads them).

The output is a pure function of those inputs (fixed timestamps and inode
numbers, gzip without a name or time), and is cached under
``<cache>/initramfs/<sha256 of the cpio>.cpio.gz``.

The default ``/init`` (the contract e2e tests rely on)
--------------------------------------------------------
1. mounts proc on /proc, sysfs on /sys, devtmpfs on /dev, and sends its
   output to /dev/console (the kernel's ``console=``, ttyS0 for pyvmm);
2. ``insmod``s every module in ``/etc/modules-load.order``, printing
   ``PYVMM-INIT-MODULE-FAILED <path>`` for one that fails;
3. prints the line ``PYVMM-INIT-OK`` (except with ``pyvmm.shell=batch``, whose
   output is only what the commands print);
4. runs a shell script passed on the kernel command line as
   ``pyvmm.cmd=<base64 of the script>`` (build it with
   :func:`command_arg`), or else ``/etc/pyvmm/cmd.sh`` if the image has one
   (for scripts too long for the 2048-byte command line), printing
   ``PYVMM-CMD-BEGIN`` before it and ``PYVMM-CMD-EXIT=<status>`` after it;
   each marker is preceded by a newline so that it starts a line even after
   firmware output or a command's unterminated last line (so the command's
   output is followed by one empty line);
   a script that powers off, reboots or crashes the guest never returns,
   so no EXIT line follows (e.g. ``poweroff -f``, ``reboot -f``,
   ``echo o > /proc/sysrq-trigger``, ``echo c > /proc/sysrq-trigger``);
   ``PYVMM-CMD-ERROR <reason>`` if the argument does not decode;
5. with ``pyvmm.shell`` on the command line (and no command), prints how to
   quit (:data:`SHELL_BANNER`) and starts an interactive shell on the
   console; with ``pyvmm.shell=batch`` it runs the commands that arrive on
   the console instead, with a non-interactive shell (no prompt, no line
   editor), until the console's end of file (Ctrl-D): what ``pyvmm run``
   uses when its stdin is a pipe or a file. The tty still echoes input
   (it is a terminal); lines end in CRLF;
6. ends with ``sync`` and ``poweroff -f`` (after a shell, with the console
   log level at 0 so the kernel's "reboot: Power down" does not follow the
   shell's last line).

The script runs under busybox ``sh`` with ``PATH=/bin``, as root, in the
initramfs (a writable tmpfs). Add ``quiet`` to the kernel command line so
kernel messages do not interleave with the script's output.
"""

from __future__ import annotations

import base64
import difflib
import gzip
import hashlib
import lzma
import shlex
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError, HostError, KernelImageError
from pyvmm.guestkit.cache import cache_root, write_atomic
from pyvmm.guestkit.cpio import CpioWriter, normalize_name
from pyvmm.guestkit.progress import task

if TYPE_CHECKING:
    from pyvmm.guestkit.debian import KernelPackage

#: Bumped when the archive layout changes in a way the inputs do not show.
_FORMAT = "1"

#: Applets linked into /bin; others run as ``busybox <applet>``.
APPLETS: tuple[str, ...] = (
    "[",
    "ash",
    "awk",
    "base64",
    "cat",
    "chmod",
    "chroot",
    "cp",
    "cttyhack",
    "cut",
    "date",
    "dd",
    "df",
    "dmesg",
    "echo",
    "env",
    "false",
    "find",
    "free",
    "grep",
    "halt",
    "head",
    "hexdump",
    "hostname",
    "insmod",
    "ip",
    "kill",
    "ln",
    "ls",
    "lsmod",
    "mkdir",
    "mknod",
    "modprobe",
    "mount",
    "mv",
    "nproc",
    "od",
    "poweroff",
    "printf",
    "ps",
    "readlink",
    "reboot",
    "rm",
    "rmdir",
    "rmmod",
    "sed",
    "seq",
    "setsid",
    "sh",
    "sleep",
    "sort",
    "stat",
    "switch_root",
    "sync",
    "sysctl",
    "tail",
    "tee",
    "test",
    "timeout",
    "touch",
    "tr",
    "true",
    "umount",
    "uname",
    "uniq",
    "wc",
    "xxd",
    # networking, for tests over virtio-net
    "md5sum",
    "nc",
    "ping",
    "sha256sum",
)

MODULES_LOAD_ORDER = "etc/modules-load.order"
COMMAND_FILE = "etc/pyvmm/cmd.sh"
COMMAND_PARAM = "pyvmm.cmd"
#: x86's COMMAND_LINE_SIZE is 2048 bytes, and the rest of the line needs room.
MAX_COMMAND_ARG = 1800

MARKER_INIT_OK = "PYVMM-INIT-OK"
MARKER_MODULE_FAILED = "PYVMM-INIT-MODULE-FAILED"
MARKER_CMD_BEGIN = "PYVMM-CMD-BEGIN"
MARKER_CMD_EXIT = "PYVMM-CMD-EXIT="
MARKER_CMD_ERROR = "PYVMM-CMD-ERROR"
MARKER_ROOT_FAILED = "PYVMM-INIT-ROOT-FAILED"


#: The initramfs hands over to a root filesystem named by ``root=`` on the
#: kernel command line (e.g. a virtio-blk disk) once its modules are loaded.
SWITCH_ROOT = f"""root=
mode=ro
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${{arg#root=}}" ;;
        rw|ro) mode="$arg" ;;
    esac
done
set +f
if [ -n "$root" ]; then
    mkdir -p /newroot
    if mount -o "$mode" "$root" /newroot; then
        mount --move /dev /newroot/dev
        umount /sys /proc
        exec switch_root /newroot /sbin/init
    fi
    echo "{MARKER_ROOT_FAILED} $root"
fi
"""


#: The first thing an interactive ``pyvmm.shell`` shows, above the prompt.
SHELL_BANNER = (
    "pyvmm: busybox shell in the guest. Quit pyvmm with Ctrl-A X (Ctrl-A H: help); "
    "'poweroff' or Ctrl-D shuts the guest down."
)


def init_script(purpose: str, mounts: str, ready_marker: str, handoff: str = "") -> str:
    """A busybox init: ``mounts``, console, modules, ``ready_marker``, then the command.

    The part after the mounts is the contract shared by the initramfs and the
    rootfs inits: load /etc/modules-load.order, print the marker, run the
    ``pyvmm.cmd`` script (or /etc/pyvmm/cmd.sh) between the CMD markers, or
    a shell with ``pyvmm.shell``, then power off.
    """
    return f"""#!/bin/sh
# {purpose}; the contract is in pyvmm/guestkit/initramfs.py.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
{mounts}[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
if [ -s /{MODULES_LOAD_ORDER} ]; then
    while read -r module; do
        case "$module" in ''|'#'*) continue ;; esac
        insmod "$module" || echo "{MARKER_MODULE_FAILED} $module"
    done < /{MODULES_LOAD_ORDER}
fi
{handoff}cmd=
shell=
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        {COMMAND_PARAM}=*) cmd="${{arg#{COMMAND_PARAM}=}}" ;;
        pyvmm.shell) shell=interactive ;;
        pyvmm.shell=*) shell="${{arg#pyvmm.shell=}}" ;;
    esac
done
set +f
[ "$shell" = batch ] || printf '\\n%s\\n' {ready_marker}
script=
if [ -n "$cmd" ]; then
    script=/tmp/pyvmm-cmd.sh
    if ! printf '%s' "$cmd" | base64 -d > "$script" || [ ! -s "$script" ]; then
        echo "{MARKER_CMD_ERROR} {COMMAND_PARAM} is not valid base64"
        script=
    fi
elif [ -f /{COMMAND_FILE} ]; then
    script=/{COMMAND_FILE}
fi
finish() {{  # finish poweroff|reboot|halt; after a shell, no kernel line follows its output
    [ -n "$shell" ] && echo 0 > /proc/sys/kernel/printk
    sync
    "$1" -f
}}
# busybox's plain poweroff/reboot/halt only signal PID 1 (and the shell runs the
# applet even where /bin has something else): act on those signals, while
# waiting for a command run in the background (a trap waits for a foreground one).
trap 'finish poweroff' USR2
trap 'finish reboot' TERM
trap 'finish halt' USR1
if [ -n "$script" ]; then
    echo {MARKER_CMD_BEGIN}
    sh "$script" </dev/console >/dev/console 2>&1 &
    wait $!
    printf '\\n%s%s\\n' {MARKER_CMD_EXIT} $?
elif [ "$shell" = batch ]; then
    sh /dev/console </dev/console >/dev/console 2>&1 &  # a script read from the tty
    wait $!
elif [ -n "$shell" ]; then
    echo {shlex.quote(SHELL_BANNER)}
    setsid cttyhack sh -l </dev/console >/dev/console 2>&1 &
    wait $!
fi
finish poweroff
"""


DEFAULT_INIT = init_script(
    "pyvmm's default guest /init",
    "mount -t proc -o nosuid,nodev,noexec proc /proc\n"
    "mount -t sysfs -o nosuid,nodev,noexec sysfs /sys\n"
    "mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev\n",
    MARKER_INIT_OK,
    SWITCH_ROOT,
)


# --- the command-line contract ----------------------------------------------------


def command_arg(script: str) -> str:
    """``pyvmm.cmd=<base64>``: the kernel argument that makes /init run ``script``."""
    arg = f"{COMMAND_PARAM}={base64.b64encode(script.encode()).decode('ascii')}"
    if len(arg) > MAX_COMMAND_ARG:
        raise ConfigError(
            f"the guest command is too long for the kernel command line ({len(arg)} bytes "
            f"encoded, at most {MAX_COMMAND_ARG}): put it in extra_files[{COMMAND_FILE!r}]"
        )
    return arg


def insmod_lines(module_paths: Sequence[str]) -> str:
    """Shell lines that load ``module_paths`` in order (for custom /init scripts)."""
    return "".join(
        f'insmod {_shell_quote(p)} || echo "{MARKER_MODULE_FAILED} {p}"\n' for p in module_paths
    )


# --- building -------------------------------------------------------------------------


def build_initramfs(
    kernel: KernelPackage | None,
    modules: Sequence[str] = (),
    init_script: str = DEFAULT_INIT,
    cache_dir: Path | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    *,
    busybox: Path | None = None,
    agent: Path | bool = False,
    compress: bool = True,
) -> Path:
    """Build (or find in the cache) an initramfs image and return its path.

    ``modules`` are module names (``virtio_mmio`` or ``kvm-amd``) from
    ``kernel``'s tree; their dependencies are added. Names built into the
    kernel (``modules.builtin``) are skipped. ``extra_files`` maps archive
    paths to contents; a file starting with ``#!`` or ELF is made executable.
    ``busybox`` overrides the busybox binary (default: :func:`fetch_busybox`).
    ``agent`` True adds ``pyvmm-agent`` (built by
    :func:`~pyvmm.guestkit.agent_tool.build_agent`, which needs gcc and a
    static libc) as ``/bin/pyvmm-agent``; a path adds that binary instead.
    The cache key is the archive's hash, so a changed agent is a new image.
    ``compress=False`` writes a plain cpio: bigger, but the guest kernel
    spends no time inflating it (worth it where guest kernel code is slow).
    """
    root = cache_root(cache_dir)
    if modules and kernel is None:
        raise ConfigError("kernel modules were requested but no kernel was given")
    if busybox is None:
        from pyvmm.guestkit.debian import fetch_busybox

        busybox = fetch_busybox(root)
    archive = CpioWriter()
    _add_base(archive, _read(busybox, "busybox"))
    if kernel is not None and modules:
        _add_modules(archive, kernel.modules_dir, kernel.version, modules)
    archive.add_file("init", init_script.encode(), mode=0o755)
    files = dict(extra_files or {})
    if agent is not False:
        from pyvmm.guestkit.agent_tool import agent_bytes

        files[_agent_name(files)] = agent_bytes(agent, root)  # type: ignore[assignment]
    for path, data in sorted(files.items()):
        name = _checked_extra_name(path)
        if name in archive:
            raise ConfigError(f"extra file /{name} would replace a file the initramfs needs")
        archive.add_file(name, data, mode=_file_mode(data))
    try:
        data = archive.to_bytes()
    except ValueError as exc:  # e.g. an extra file under the /sbin symlink
        raise ConfigError(f"cannot build the initramfs: {exc}") from None
    key = hashlib.sha256(f"pyvmm-initramfs-{_FORMAT}\0".encode() + data).hexdigest()[:20]
    suffix = ".cpio.gz" if compress else ".cpio"
    out = root / "initramfs" / f"{key}{suffix}"
    if out.is_file():
        return out
    with task(f"building an initramfs ({len(data) / 1e6:.1f} MB)"):
        if compress:
            data = gzip.compress(data, compresslevel=9, mtime=0)
        return write_atomic(out, data)


def _agent_name(extra_files: Mapping[str, bytes]) -> str:
    from pyvmm.guestkit.agent_tool import GUEST_PATH

    if any(_checked_extra_name(path) == GUEST_PATH for path in extra_files):
        raise ConfigError(f"extra file /{GUEST_PATH} would replace the agent")
    return GUEST_PATH


def _add_base(archive: CpioWriter, busybox: bytes) -> None:
    for directory in ("bin", "dev", "etc", "lib", "mnt", "proc", "run", "sys", "usr"):
        archive.add_dir(directory)
    archive.add_dir("root", mode=0o700)
    archive.add_dir("tmp", mode=0o1777)
    archive.add_symlink("sbin", "bin")
    archive.add_symlink("usr/bin", "../bin")
    archive.add_symlink("usr/sbin", "../bin")
    archive.add_device("dev/console", "c", 5, 1, mode=0o600)
    archive.add_device("dev/null", "c", 1, 3, mode=0o666)
    archive.add_file("bin/busybox", busybox, mode=0o755)
    for applet in APPLETS:
        archive.add_symlink(f"bin/{applet}", "busybox")


def _add_modules(
    archive: CpioWriter, modules_dir: Path, release: str, names: Sequence[str]
) -> None:
    deps = _read_deps(modules_dir)
    order = _load_order(modules_dir, deps, names)
    base = f"lib/modules/{release}"
    dep_lines = []
    in_guest = []
    for rel in order:
        plain = _plain_ko_name(rel)
        archive.add_file(f"{base}/{plain}", _module_bytes(modules_dir / rel), mode=0o644)
        in_guest.append(f"/{base}/{plain}")
        closure = [_plain_ko_name(d) for d in _closure(rel, deps)]
        dep_lines.append(f"{plain}: {' '.join(reversed(closure))}".rstrip() + "\n")
    archive.add_file(f"{base}/modules.dep", "".join(dep_lines).encode())
    archive.add_file(MODULES_LOAD_ORDER, "".join(p + "\n" for p in in_guest).encode())


# --- module trees ------------------------------------------------------------------------

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: str) -> str:
    """``kernel/arch/x86/kvm/kvm-amd.ko.xz`` -> ``kvm_amd`` (the kernel's name for it)."""
    base = PurePosixPath(path).name
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def module_load_order(modules_dir: Path, names: Sequence[str]) -> list[str]:
    """Tree paths (relative to ``modules_dir``) of ``names`` and their deps, deps first.

    Built-in modules are skipped; an unknown name is a :class:`ConfigError`.
    """
    return _load_order(modules_dir, _read_deps(modules_dir), names)


def _load_order(
    modules_dir: Path, deps: Mapping[str, Sequence[str]], names: Sequence[str]
) -> list[str]:
    by_name = {module_name(rel): rel for rel in deps}
    builtin = _read_builtin(modules_dir)
    order: list[str] = []
    for requested in names:
        name = module_name(requested)
        rel = by_name.get(name)
        if rel is None:
            if name in builtin:
                continue
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"no kernel module {requested!r} in {modules_dir}{hint}")
        for dep in _closure(rel, deps):
            if dep not in order:
                order.append(dep)
        if rel not in order:
            order.append(rel)
    return order


def _closure(rel: str, deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module ``rel`` needs, in load order (each after its own deps)."""
    out: list[str] = []
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(node: str) -> None:
        mark = state.get(node)
        if mark == 2:
            return
        if mark == 1:
            raise KernelImageError(f"kernel modules depend on each other in a cycle at {node}")
        state[node] = 1
        for dep in deps.get(node, ()):
            visit(dep)
        state[node] = 2
        out.append(node)

    for dep in deps.get(rel, ()):
        visit(dep)
    return [m for m in out if m != rel]


def _read_deps(modules_dir: Path) -> dict[str, list[str]]:
    """``modules.dep`` as {module: [deps]}; derived from .modinfo when missing."""
    path = modules_dir / "modules.dep"
    if not path.is_file():
        if not modules_dir.is_dir():
            raise KernelImageError(f"kernel module directory {modules_dir} does not exist")
        return scan_module_deps(modules_dir)
    deps: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        module, sep, rest = line.partition(":")
        if not sep:
            raise KernelImageError(f"{path}: malformed line {line!r}")
        deps[module.strip()] = rest.split()
    return deps


def _read_builtin(modules_dir: Path) -> set[str]:
    try:
        text = (modules_dir / "modules.builtin").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def scan_module_deps(modules_dir: Path) -> dict[str, list[str]]:
    """What depmod computes: {module: [direct deps]} from each ``.modinfo``'s ``depends=``."""
    files = sorted(
        str(p.relative_to(modules_dir))
        for p in modules_dir.rglob("*.ko*")
        if p.is_file() and p.name.endswith(_MODULE_SUFFIXES)
    )
    by_name: dict[str, str] = {}
    depends: dict[str, list[str]] = {}
    for rel in files:
        info = read_modinfo(_module_bytes(modules_dir / rel))
        names = info.get("name") or [module_name(rel)]
        by_name[names[0].replace("-", "_")] = rel
        dep_names = [d for value in info.get("depends", []) for d in value.split(",") if d]
        depends[rel] = dep_names
    deps: dict[str, list[str]] = {}
    for rel, dep_names in depends.items():
        resolved = []
        for dep in dep_names:
            target = by_name.get(dep.replace("-", "_"))
            if target is None:
                raise KernelImageError(
                    f"kernel module {rel} depends on {dep}, which is not in {modules_dir}"
                )
            resolved.append(target)
        deps[rel] = resolved
    return deps


def write_modules_dep(modules_dir: Path) -> Path:
    """Write ``modules.dep`` for a tree that has none (a .deb unpacked without depmod).

    Same format as depmod's: each line lists the module's full dependency
    closure, in the order modprobe expects (the first to load comes last).
    """
    deps = scan_module_deps(modules_dir)
    lines = [
        f"{rel}: {' '.join(reversed(_closure(rel, deps)))}".rstrip() + "\n" for rel in sorted(deps)
    ]
    return write_atomic(modules_dir / "modules.dep", "".join(lines).encode())


def read_modinfo(module: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (ELF64 LE)."""
    try:
        return _modinfo(module)
    except struct.error:
        raise KernelImageError("kernel module is truncated or not an ELF64 file") from None


def _modinfo(module: bytes) -> dict[str, list[str]]:
    if module[:4] != b"\x7fELF" or module[4] != 2 or module[5] != 1:
        raise KernelImageError("kernel module is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name,) = struct.unpack_from("<I", module, base)
        offset, size = struct.unpack_from("<QQ", module, base + 0x18)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    strtab = module[str_off : str_off + str_size]
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = strtab.find(b"\0", name_off)
        if strtab[name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in module[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    return {}


def _module_bytes(path: Path) -> bytes:
    data = _read(path, "kernel module")
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if name.endswith(".ko.gz"):
            return gzip.decompress(data)
        if name.endswith(".ko.zst"):
            try:
                import zstandard
            except ImportError:
                raise HostError(
                    f"{path} is zstd-compressed and the zstandard package is not installed"
                ) from None
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise KernelImageError(f"kernel module {path} is corrupt: {exc}") from None
    return data


def _plain_ko_name(rel: str) -> str:
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst"):
        if rel.endswith(suffix):
            return rel[: -len(suffix)] + ".ko"
    return rel


# --- helpers ----------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read {what} {path}: {exc.strerror}") from None


def _checked_extra_name(path: str) -> str:
    try:
        return normalize_name(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _file_mode(data: bytes) -> int:
    return 0o755 if data.startswith((b"#!", b"\x7fELF")) else 0o644


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
