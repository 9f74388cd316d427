"""Host back ends: the parts that touch host files, sockets and terminals.

Device models (:mod:`pyvmm.devices`) never import from here; the VMM core
hands them these back ends through small protocols (a block file, a TAP,
the vsock Unix-socket side, console input and the terminal).
"""
