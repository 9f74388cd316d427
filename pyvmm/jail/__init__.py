"""Confinement: the jailer, seccomp filters per thread role, cgroups.

A microVM's promise is defence in depth: a guest that escapes the device
model must land in a process that can do almost nothing. This package is
that process's walls, each in its own module:

========================  =====================================================
``filter_file``           Firecracker's JSON seccomp format, parsed and checked
``libseccomp``            compiles a filter to BPF with libseccomp (ctypes)
``install``               loads BPF on the calling thread (no TSYNC)
``faults``                SIGSYS: the log line, ``seccomp.num_faults``, exit 148
``default_filters``       pyvmm's filters per thread role, measured
``thread_setup``          the :class:`~pyvmm.vmm.threads.ThreadSetup` that applies them
========================  =====================================================

Nothing here is imported by the VMM unless confinement is asked for.
"""
