"""``python -m pyvmm`` is the ``pyvmm`` command."""

from pyvmm.cli import main

main()
