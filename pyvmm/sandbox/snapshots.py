"""Sandbox snapshots and forks: a running sandbox saved, and copies of it restored.

:func:`save_sandbox` writes a directory with the layout of a cache entry
(:mod:`pyvmm.sandbox.cache`): the VM's state and memory files, a copy of
each writable disk as it is at that moment (the VM is paused, so its disks
and its memory agree), and ``meta.json``. The directory appears whole or
not at all (it is written under a temporary name and renamed).

:func:`fork_entries` restores ``n`` clones of such a directory at once, one
thread each (restoring takes milliseconds; what takes time is each guest
answering and taking its identity), and hands back all of them or, if one
fails, none: the others are closed.
"""

from __future__ import annotations

import secrets
import shutil
import threading
from pathlib import Path

from pyvmm.errors import ConfigError, HostError
from pyvmm.sandbox.cache import (
    DISK_DIR,
    MEM_FILE,
    META_FILE,
    STATE_FILE,
    CacheEntry,
    EntryMeta,
    record_extents,
)
from pyvmm.sandbox.config import SandboxConfig
from pyvmm.sandbox.disks import clone_file
from pyvmm.sandbox.launch import Launched, restore_entry
from pyvmm.sandbox.runners import Runner
from pyvmm.sandbox.vm import SandboxVm
from pyvmm.vmm.threads import ThreadRole, spawn


def save_sandbox(
    vm: SandboxVm, launched: Launched, runner_kind: str, config: SandboxConfig, target: Path
) -> None:
    """Write the paused ``vm`` to the new directory ``target`` (see the module docstring)."""
    if target.exists():
        raise ConfigError(f"snapshot directory {target} already exists")
    staging = target.with_name(f".tmp-{target.name}-{secrets.token_hex(4)}")
    try:
        (staging / DISK_DIR).mkdir(parents=True)
        vm.snapshot(staging / STATE_FILE, staging / MEM_FILE)
        record_extents(staging)
        for drive_id in launched.disk_ids:
            clone_file(launched.workdir.disk(drive_id), staging / DISK_DIR / f"{drive_id}.img")
        meta = EntryMeta(
            key=f"snapshot-{launched.identity.name}",
            runner=runner_kind,
            disks={d: f"{d}.img" for d in launched.disk_ids},
            shared=dict(launched.shared),
            macs=launched.identity.macs,
            taps=launched.identity.taps,
        )
        (staging / META_FILE).write_text(meta.to_json())
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise HostError(f"cannot write the sandbox snapshot {target}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fork_entries(
    entry: CacheEntry, config: SandboxConfig, runner: Runner, n: int
) -> list[Launched]:
    """``n`` clones of ``entry``, restored concurrently; all of them, or an error and none."""
    results: list[Launched | None] = [None] * n
    errors: list[BaseException] = []
    lock = threading.Lock()

    def restore_one(index: int) -> None:
        try:
            launched = restore_entry(entry, config, runner)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        results[index] = launched

    def thread_failed(message: str) -> None:
        with lock:
            errors.append(HostError(message))

    threads = [
        spawn(ThreadRole.VMM, f"pyvmm-fork{i}", lambda i=i: restore_one(i), on_error=thread_failed)
        for i in range(n)
    ]
    for thread in threads:
        thread.join()
    if errors:
        for launched in results:
            if launched is not None:
                close_launched(launched)
        raise errors[0]
    return [launched for launched in results if launched is not None]


def close_launched(launched: Launched) -> None:
    """Throw away a launched sandbox VM that nobody adopted."""
    if launched.agent is not None:
        launched.agent.close()
    try:
        launched.vm.close()
    finally:
        launched.workdir.remove()
