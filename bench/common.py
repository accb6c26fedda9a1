"""What every benchmark shares: naming the machine and writing the JSON result."""

from __future__ import annotations

import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """The CPU model and core count (the figures mean little without them)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def write_result(path: str, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder) and say where."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**report, "machine": machine()}, f, indent=2)
    print(f"wrote {path}")
