"""Confinement: the jailer, seccomp filters per thread role, cgroups.

A microVM's promise is defence in depth: a guest that escapes the device
model must land in a process that can do almost nothing. This package is
that process's walls, each in its own module:

=====================  ==========================================================
``filter_file``        Firecracker's JSON seccomp format, parsed and checked
``libseccomp``         compiles a filter to BPF with libseccomp (ctypes)
``install``            loads BPF on the calling thread (no TSYNC); thread names
``faults``             SIGSYS: the log line, ``seccomp.num_faults``, exit 148 or EPERM
``default_filters``    pyvmm's filters per thread role, measured
``thread_setup``       the :class:`~pyvmm.vmm.threads.ThreadSetup` that applies them
``seccomp``            what a front end calls: compile once, choose the fault policy
``spec``               the jailer's flags as checked values
``cgroups``            cgroup v1/v2 placement, Firecracker's way
``chroot``             the jail directory, mount namespace, pivot_root, device nodes
``process``            rlimits, netns, daemonize, dropping privileges
``system``             the libc calls Python 3.11 lacks (unshare, mount, capset...)
``preload``            imports the VMM before pivoting (no interpreter in the jail)
``jailer``             ``pyvmm-jailer``: the order of operations, then the VMM
``confine``            the same confinement for ``pyvmm run`` (one process)
``learn``              tooling: measures syscalls per role, checks the filters
=====================  ==========================================================

Nothing here is imported by the VMM unless confinement is asked for.
"""
