"""Shared by the benchmarks: the JSON report every bench script writes."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def write_report(path: Path, benchmark: str, results: dict, **details: object) -> None:
    """Write ``results`` with the host facts needed to compare runs later."""
    report = {
        "benchmark": benchmark,
        **details,
        "host": {
            "kernel": platform.release(),
            "pvm": os.path.exists("/sys/module/kvm_pvm"),
            "nested": os.environ.get("PYVMM_NESTED") == "1",
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "results": results,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
