"""Run commands on a nested KVM host: Linux under QEMU-TCG with a working /dev/kvm.

See :mod:`pyvmm.nested.host` for why and how, :mod:`pyvmm.nested.agent` for
the protocol between the host and L1, and :mod:`pyvmm.nested.command` for
``pyvmm nested -- COMMAND``.
"""
