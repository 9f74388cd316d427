"""Snapshots of a paused machine: a state file plus a memory file.

* :mod:`pyvmm.snapshot.state`: what is saved, and the versioned,
  checksummed state file format;
* :mod:`pyvmm.snapshot.codec`: state dataclasses to JSON and back;
* :mod:`pyvmm.snapshot.kvm_state`: vCPU and in-kernel device state, in the
  order KVM needs;
* :mod:`pyvmm.snapshot.memory_file`: full and diff memory files, merging;
* :mod:`pyvmm.snapshot.files`: all-or-nothing file writes.

:class:`pyvmm.machine.Machine` orchestrates: ``Machine.snapshot()`` and
``Machine.restore()``.
"""

from pyvmm.snapshot.memory_file import merge_diff
from pyvmm.snapshot.state import FORMAT_VERSION, SnapshotError, read_state

__all__ = ["FORMAT_VERSION", "SnapshotError", "merge_diff", "read_state"]
