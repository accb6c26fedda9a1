"""What every benchmark shares: naming the machine and writing the JSON result."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insectlib.precision import cpu_name, speed_flags  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """The CPU model, core count and speed flags (the figures mean little without them)."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs ({' '.join(speed_flags()) or 'no AVX2'})"


def write_result(path: str, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder) and say where."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**report, "machine": machine()}, f, indent=2)
    print(f"wrote {path}")
