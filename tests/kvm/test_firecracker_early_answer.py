"""With ``--config-file``, ``GET /`` waits for that boot: no early "Not started".

Firecracker answers nothing before the boot from its config file, and Kata
Containers relies on it; ``pyvmm-firecracker``'s early responder
(:mod:`pyvmm.api.early_responder`) must not answer then. The process is
held before it imports click (see :class:`tests.unit.api.test_early_responder.Held`),
with a ``GET /`` already sent: its answer comes after the boot.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import requires_kvm
from tests.unit.api.test_early_responder import GET_ROOT, Held, read_response

pytestmark = requires_kvm


def test_get_root_sent_early_is_answered_after_the_boot_from_the_file(
    tmp_path: Path, probe_elf: Path
) -> None:
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(probe_elf), "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }))  # fmt: skip
    held = Held(tmp_path, "--config-file", str(config))
    try:
        client = held.connect()
        client.sendall(GET_ROOT)
        held.release()
        status, raw = read_response(client)
        assert status == 200
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["state"] == "Running"
        client.close()
    finally:
        held.close()
