"""The VMM core: the machine's lifecycle, how it is built, and the threads that run it.

Front ends (``cli``, ``serve``, ``microvm``, the API) talk to
:class:`pyvmm.vmm.machine.Machine`; everything else in this package is its
parts: vCPU threads, the event loop, the buses, interrupt lines, and the
snapshot orchestration.
"""
