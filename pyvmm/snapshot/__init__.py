"""Snapshots of a paused machine: a state file plus a memory file.

* :mod:`pyvmm.snapshot.state`: what is saved, and the versioned,
  checksummed state file format;
* :mod:`pyvmm.snapshot.codec`: state dataclasses to JSON and back;
* :mod:`pyvmm.snapshot.kvm_state`: vCPU and in-kernel device state, in the
  order KVM needs;
* :mod:`pyvmm.snapshot.memory_file`: full and diff memory files, the
  trailer that pairs a memory file with its state file, block checksums,
  merging;
* :mod:`pyvmm.snapshot.files`: opening snapshot files safely (regular files
  only), all-or-nothing writes, removing a killed writer's temporaries;
* :mod:`pyvmm.snapshot.overrides`: the restored machine's config (TAP and
  vsock socket renames);
* :mod:`pyvmm.vmm.snapshots`: the orchestration, in what order
  a machine is checked, saved, rebuilt and loaded: the mixin
  ``SnapshotSupport`` that gives :class:`pyvmm.vmm.machine.Machine` its
  ``snapshot()`` and ``restore()``.

Only ``pyvmm.vmm.snapshots`` knows about a machine's parts; the other modules
take and return plain state, files and KVM objects.
"""

from pyvmm.snapshot.files import SnapshotError
from pyvmm.snapshot.memory_file import merge_diff, verify_snapshot
from pyvmm.snapshot.state import FORMAT_VERSION, read_state

__all__ = ["FORMAT_VERSION", "SnapshotError", "merge_diff", "read_state", "verify_snapshot"]
