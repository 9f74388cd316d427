"""Taking a snapshot of a built VM, and reading one back: the order of the steps.

What is saved and how lives in :mod:`pyvmm.snapshot` (file formats, the
memory file, KVM state in the order KVM needs, atomic writes); the machine
decides *when* (paused, under its lifecycle lock). This module is the
sequence in between:

* :func:`write_snapshot`: collect the dirty pages (diff) from guest memory
  itself, write the memory file and the state file - every part saves
  itself: vCPUs, the in-kernel irqchip and PIT, kvmclock, every device by
  id, the whole machine config - and put both in place atomically;
* :func:`load_snapshot`: read and verify the state file, apply the host-side
  renames a restore may ask for (TAPs, the vsock socket; a clone's drives
  and CID), and open the
  memory file after checking that it belongs to that state file. Building
  the machine from them is :func:`pyvmm.vmm.builder.build_from_snapshot`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pyvmm.config import MachineConfig
from pyvmm.errors import VmStateError
from pyvmm.memory import DirtyTrackingMemory
from pyvmm.snapshot.files import atomic_files, write_all
from pyvmm.snapshot.kvm_state import save_vcpu, save_vm
from pyvmm.snapshot.memory_file import open_memory_file, write_diff, write_full
from pyvmm.snapshot.overrides import CloneOverrides, restored_config
from pyvmm.snapshot.state import MemoryState, MicrovmState, pack_state, pyvmm_version, read_state
from pyvmm.vmm.vmm import Vmm

log = logging.getLogger(__name__)


def write_snapshot(
    vmm: Vmm,
    state_path: str | Path,
    mem_path: str | Path,
    *,
    diff: bool,
    base_id: str | None,
) -> str:
    """Write a snapshot of the paused ``vmm``; returns its id (what a later diff builds on).

    ``base_id`` is the id of this machine's previous snapshot (or of the
    one it was restored from); a diff needs one, and guest memory that
    tracks dirty pages.
    """
    memory = vmm.memory
    tracking = isinstance(memory, DirtyTrackingMemory)
    if diff and not tracking:
        raise VmStateError("a diff snapshot needs a machine with track_dirty_pages")
    if diff and base_id is None:
        raise VmStateError("a diff snapshot needs a full snapshot of this VM first (its base)")
    started = time.monotonic()
    dirty = memory.take_dirty() if tracking else set()
    try:
        with atomic_files(mem_path, state_path) as (mem_fd, state_fd):
            if diff:
                assert base_id is not None
                memory_state = write_diff(memory, dirty, mem_fd, base_id)
            else:
                memory_state = write_full(memory, mem_fd)
            write_all(state_fd, pack_state(_microvm_state(vmm, memory_state)))
    except BaseException:
        if tracking:  # the next diff must still see these pages
            memory.put_back(dirty)
        raise
    log.debug(
        "%s snapshot written in %.3f s", "diff" if diff else "full", time.monotonic() - started
    )
    return memory_state.snapshot_id


def _microvm_state(vmm: Vmm, memory: MemoryState) -> MicrovmState:
    msr_indices = vmm.kvm.msr_index_list()
    assert vmm.paused_clock is not None, "snapshots are taken of paused machines"
    return MicrovmState(
        pyvmm_version=pyvmm_version(),
        config=vmm.config,
        memory=memory,
        vcpus=tuple(save_vcpu(vcpu, msr_indices) for vcpu in vmm.vcpus),
        vm=save_vm(vmm.vm, vmm.paused_clock),
        devices=vmm.devices.save(),
    )


def load_snapshot(
    state_path: str | Path,
    mem_path: str | Path,
    net_overrides: dict[str, str],
    vsock_uds: str | Path | None,
    track_dirty_pages: bool | None,
    clone: CloneOverrides | None = None,
) -> tuple[MicrovmState, MachineConfig, int]:
    """The verified state, the config to build (renames applied) and the memory file's fd.

    ``clone`` gives a clone of the snapshot its own drive images and vsock CID.

    The memory file is checked against the state file before anything is
    built: a file of another snapshot, a torn pair, a diff's own memory
    file are refused with one line naming both files.
    """
    state = read_state(state_path)
    config = restored_config(state.config, net_overrides, vsock_uds, clone)
    if track_dirty_pages is not None:
        config = dataclasses.replace(config, track_dirty_pages=track_dirty_pages)
    mem_fd = open_memory_file(mem_path, state.memory, state_path)
    return state, config, mem_fd
