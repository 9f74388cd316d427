"""pyvmm's seccomp filters per thread role, in Firecracker's JSON format (as a dict).

Measured, not guessed: ``python -m pyvmm.jail.learn`` ran the probe-guest
suite (API, every device, pause/resume, snapshot/restore, metrics, the CLI)
under ``strace -ff`` and summed up each thread's syscalls by role; these
lists are that result, with the argument checks taken from the same traces
(which ioctls, which ``fcntl`` commands, which socket family). Every filter
traps everything else (``SIGSYS``: see :mod:`pyvmm.jail.faults`).

What CPython and glibc force into every role, whatever pyvmm does: ``futex``
(the GIL and every lock), ``mmap``/``munmap``/``mprotect``/``madvise``
(pymalloc arenas, glibc malloc arenas and their trimming, thread stacks),
``brk`` (a thread can fall back to the main arena), ``rt_sigprocmask`` and
``rt_sigreturn`` (signal delivery: the vCPU kick, the SIGSYS handler),
``getpid`` (every ``logging`` record), ``gettid`` (``threading.get_native_id``),
``exit`` (a thread ending) and ``exit_group`` (the fault path's ``_exit``),
``clock_gettime``/``clock_nanosleep`` (``time`` when the vDSO is not used,
``time.sleep``), ``getrandom`` (``random``, ``os.urandom``) and
``restart_syscall``. A thread that starts threads also needs ``clone3`` and
what the new thread runs before it installs its own filter (``rseq``,
``set_robust_list``).

``api`` is narrow: the API threads parse requests, answer queries and hand
every action to the vmm thread (Firecracker's design, :mod:`pyvmm.api.actions`),
so they never build a VM; they accept and serve connections, start one
thread per client, and write log and metrics lines to files opened by the
vmm thread.

``vcpu`` and ``io`` are the tight ones: a vCPU thread may issue only
``KVM_RUN``, ``KVM_KVMCLOCK_CTRL`` (pause) and ``TUNSETOFFLOAD`` (virtio-net
feature negotiation happens on the MMIO write) as ioctls, and may map only
non-executable memory; the I/O thread issues no KVM ioctl at all.
"""

from __future__ import annotations

from typing import Any

Rule = dict[str, Any]

# --- numbers the rules check (the unit tests compare them with the kernel headers') ----
PROT_READ_WRITE = 0x3
PROT_NONE = 0x0
MADV_DONTNEED = 4
AF_UNIX = 1
FIONBIO = 0x5421
FALLOC_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01
FALLOC_ZERO_RANGE_KEEP_SIZE = 0x10 | 0x01
F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 1, 2, 3, 4, 1030
PR_SET_NAME, NO_NEW_PRIVS = 15, 38
SECCOMP_SET_MODE_FILTER = 1

#: ioctls on a vCPU thread.
VCPU_IOCTLS = {"KVM_RUN": 0xAE80, "KVM_KVMCLOCK_CTRL": 0xAEAD, "TUNSETOFFLOAD": 0x400454D0}

#: ioctls that build, snapshot and restore a VM (vmm and api threads).
VM_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_GET_MSR_FEATURE_INDEX_LIST": 0xC004AE0A,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    # TAP set-up and the console's terminal.
    "TUNSETIFF": 0x400454CA,
    "TUNSETVNETHDRSZ": 0x400454D8,
    "TCGETS": 0x5401,
    "TCSETSW": 0x5403,
    "TIOCGWINSZ": 0x5413,
    "FIONBIO": FIONBIO,
    "FIOCLEX": 0x5451,
}


def allow(*names: str) -> list[Rule]:
    return [{"syscall": name} for name in names]


def arg_equals(syscall: str, index: int, values: dict[str, int], qword: bool = False) -> list[Rule]:
    """One rule per allowed value of argument ``index`` (rules are OR-ed)."""
    return [
        {
            "syscall": syscall,
            "comment": name,
            "args": [
                {
                    "arg_index": index,
                    "arg_type": "qword" if qword else "dword",
                    "op": "eq",
                    "val": value,
                    "comment": name,
                }
            ],
        }
        for name, value in values.items()
    ]


#: Every pyvmm thread, because CPython and glibc need them (see the module docstring).
PYTHON_THREAD = [
    *allow("futex", "read", "write", "close", "munmap", "brk", "rt_sigprocmask", "rt_sigreturn"),
    *allow("getpid", "gettid", "exit", "exit_group", "tgkill", "restart_syscall", "sched_yield"),
    *allow("clock_gettime", "clock_nanosleep", "getrandom"),
    *arg_equals("madvise", 2, {"MADV_DONTNEED": MADV_DONTNEED}),
]

#: Only non-executable memory: a thread that never loads code cannot map new code.
DATA_MEMORY_ONLY = [
    *arg_equals("mmap", 2, {"PROT_READ|PROT_WRITE": PROT_READ_WRITE, "PROT_NONE": PROT_NONE}),
    *arg_equals("mprotect", 2, {"PROT_READ|PROT_WRITE": PROT_READ_WRITE}),
]

VCPU_OWN = [
    *arg_equals("ioctl", 1, VCPU_IOCTLS),
]

IO_OWN = [
    # The event loop, eventfd kicks and interrupts (read/write are common).
    *allow("epoll_wait", "epoll_pwait", "epoll_ctl"),
    # virtio-blk: vectored reads/writes at offsets, flush.
    *allow("preadv2", "pwritev2", "preadv", "pwritev", "pread64", "pwrite64"),
    *allow("fdatasync", "fsync"),
    # virtio-blk discard and write zeroes: holes punched or ranges zeroed, the size kept
    # (found by the Linux e2e tests: ext4 discards; only these two modes).
    *arg_equals(
        "fallocate",
        1,
        {
            "FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE": FALLOC_PUNCH_HOLE_KEEP_SIZE,
            "FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE": FALLOC_ZERO_RANGE_KEEP_SIZE,
        },
    ),
    # virtio-net: frames to and from the TAP.
    *allow("readv", "writev"),
    # virtio-vsock over Unix sockets: guest-initiated connects, host-initiated accepts.
    *arg_equals("socket", 0, {"AF_UNIX": AF_UNIX}),
    *allow("connect", "accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown"),
    # CPython's accept() asks the new socket's address (getsockname), and a socket's
    # repr in a log line asks both ends: found by the Linux vsock e2e test under --enforce.
    *allow("getsockname", "getpeername"),
    *arg_equals("ioctl", 1, {"FIONBIO": FIONBIO}),
    # pyvmm run's console relay waits on piped stdin, the guest's input pipe and its stop
    # pipe with select.poll (found by pyvmm run under its default filters).
    *allow("poll"),
]

#: What the API threads need for themselves (once actions run on the vmm thread).
API_OWN = [
    *allow("accept4", "recvfrom", "sendto", "shutdown", "epoll_wait", "epoll_ctl", "poll"),
    *allow("epoll_create1", "getsockname", "newfstatat"),
    *arg_equals("ioctl", 1, {"FIONBIO": FIONBIO}),
]

#: A thread that starts confined threads: the new thread names itself and installs
#: its own filter (never with TSYNC: flags must be 0) while it still inherits ours.
SPAWNER = [
    *allow("clone3", "rseq", "set_robust_list"),
    *arg_equals("prctl", 0, {"PR_SET_NAME": PR_SET_NAME, "PR_SET_NO_NEW_PRIVS": NO_NEW_PRIVS}),
    {
        "syscall": "seccomp",
        "comment": "SECCOMP_SET_MODE_FILTER without flags (no TSYNC)",
        "args": [
            {"arg_index": 0, "arg_type": "dword", "op": "eq", "val": SECCOMP_SET_MODE_FILTER},
            {"arg_index": 1, "arg_type": "dword", "op": "eq", "val": 0},
        ],
    },
]

#: Building, snapshotting and restoring VMs, the API socket, starting threads.
VMM_OWN = [
    *SPAWNER,
    *allow("rt_sigaction", "sigaltstack"),
    *allow("mmap", "mprotect", "mremap"),  # extension modules may still be imported (dlopen)
    *allow("openat", "newfstatat", "statx", "fstat", "lseek", "access", "readlink", "getcwd"),
    *allow("getdents64", "fallocate", "ftruncate", "flock", "rename", "unlink", "unlinkat"),
    *allow("mkdir", "eventfd2", "pipe2", "dup", "dup3", "memfd_create"),
    *allow("bind", "listen", "getsockopt", "setsockopt", "getpeername", "socketpair"),
    *allow("fchmod", "chmod", "fchown", "kill", "wait4"),
    *allow("poll", "ppoll", "pselect6", "select", "epoll_create1", "sysinfo", "uname"),
    *allow("sched_getaffinity", "prlimit64", "getuid", "geteuid", "getgid", "getegid"),
    *arg_equals(
        "fcntl",
        1,
        {
            "F_GETFD": F_GETFD,
            "F_SETFD": F_SETFD,
            "F_GETFL": F_GETFL,
            "F_SETFL": F_SETFL,
            "F_DUPFD_CLOEXEC": F_DUPFD_CLOEXEC,
        },
    ),
    *arg_equals("ioctl", 1, VM_IOCTLS),
]


def _filter(*groups: list[Rule]) -> dict[str, Any]:
    """The groups' rules, once each; argument rules that an unconditional one covers go."""
    rules: list[Rule] = []
    for group in groups:
        rules.extend(rule for rule in group if rule not in rules)
    unconditional = {rule["syscall"] for rule in rules if "args" not in rule}
    rules = [rule for rule in rules if "args" not in rule or rule["syscall"] not in unconditional]
    return {"default_action": "trap", "filter_action": "allow", "filter": rules}


_VMM = _filter(PYTHON_THREAD, VMM_OWN, API_OWN, IO_OWN, VCPU_OWN, DATA_MEMORY_ONLY)

DEFAULT_FILTERS: dict[str, Any] = {
    "vmm": _VMM,
    "api": _filter(PYTHON_THREAD, DATA_MEMORY_ONLY, API_OWN, SPAWNER),
    "vcpu": _filter(PYTHON_THREAD, DATA_MEMORY_ONLY, VCPU_OWN),
    "io": _filter(PYTHON_THREAD, DATA_MEMORY_ONLY, IO_OWN),
}
