"""``python -m pyvmm`` is the ``pyvmm`` command (through its entry module, which relays
``run`` to a fork server when ``PYVMM_FORKSERVER`` is set)."""

from pyvmm.entry import main

main()
