"""What every benchmark shares: naming the machine, running a row in a fresh process, and
writing the JSON result."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insectlib.model.precision import cpu_name, speed_flags  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """The CPU model, core count and speed flags (the figures mean little without them)."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs ({' '.join(speed_flags()) or 'no AVX2'})"


def result_path(benchmark: str) -> str:
    """bench/results/<benchmark>-<this CPU's model>.json, a result's default file."""
    cpu = cpu_name().lower().replace(" ", "-").replace("(r)", "").replace("(tm)", "")
    return os.path.join(RESULTS, f"{benchmark}-{cpu[:40]}.json")


def write_result(path: str, report: dict) -> None:
    """Write `report` as indented JSON to `path` (creating its folder) and say where."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**report, "machine": machine()}, f, indent=2)
    print(f"wrote {path}")


def in_fresh_process(fn, *args, env: dict[str, str | None] | None = None, **kwargs):
    """`fn(*args, **kwargs)` in a new spawned process, as a model actor starts (nothing
    imported or compiled before), whose environment has `env` added (None: the variable
    unset; the libraries read it when they load)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    try:
        _set_environment(env or {})
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args, **kwargs).result()
    finally:
        _set_environment(saved)


def _set_environment(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
