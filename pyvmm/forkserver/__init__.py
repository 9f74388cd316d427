"""A fork server for ``pyvmm run``: one warm process that forks a VM process per request.

``pyvmm forkserver --socket PATH`` starts it (:mod:`.command`); a ``pyvmm
run`` with ``PYVMM_FORKSERVER=PATH`` in its environment relays to it
(:mod:`pyvmm.entry`, :mod:`.client`). The parts: :mod:`.protocol` (frames,
limits, checks; no I/O), :mod:`.client`, :mod:`.connection` (one client on
the server side), :mod:`.server` (the loop, lifetime rules, what the server
runs under), :mod:`.child` (a forked child becoming ``pyvmm run``) and
:mod:`.preload` (what the server imports first).
"""
