"""x86_64 boot: kernel loaders, boot parameters, tables and boot CPU state.

The entry point is :func:`pyvmm.boot.configure.setup_boot`; the other
modules each build one structure and can be used (and tested) alone.
"""
