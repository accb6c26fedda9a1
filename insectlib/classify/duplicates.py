"""Paths with more than one row in an output: what two runs writing at once (before the lock)
or any other fault would leave. `_SUCCESS` is written only when there are none, and
`--resume` removes the parts that hold them, so that their inputs are classified once more.

One pass over the `path` column, a part at a time, keeping an 8-byte hash per row (8 MB per
million rows, never the paths themselves); the few hashes seen twice are then checked
against the paths, so that a hash collision never counts as a duplicate.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from insectlib.storage import retry


def _hashes(fs, name: str) -> np.ndarray:
    def read():
        with fs.open(name, "rb") as f:
            return pq.read_table(f, columns=["path"]).column("path").to_pylist()

    # Python's str hash: 64 bits, the same for a string within this process.
    return np.array([hash(p) for p in retry.retrying(read, name)], dtype=np.int64)


def _repeated(values: np.ndarray) -> np.ndarray:
    """The values found more than once in `values`."""
    unique, counts = np.unique(values, return_counts=True)
    return unique[counts > 1]


def duplicates(fs, names: list[str]) -> dict[str, list[str]]:
    """{path: the parts holding it (a part once per row)} for every path of the parts
    `names` that has more than one row."""
    per_part = [_hashes(fs, name) for name in names]
    suspects = _repeated(np.concatenate(per_part)) if per_part else np.array([], np.int64)
    if not len(suspects):
        return {}
    holders: dict[str, list[str]] = {}
    suspect = set(suspects.tolist())
    for name, hashes in zip(names, per_part, strict=True):
        if not np.isin(hashes, suspects).any():
            continue
        with fs.open(name, "rb") as f:
            paths = pq.read_table(f, columns=["path"]).column("path").to_pylist()
        for path, h in zip(paths, hashes, strict=True):
            if h in suspect:
                holders.setdefault(path, []).append(name)
    return {path: parts for path, parts in holders.items() if len(parts) > 1}


def parts_to_remove(found: dict[str, list[str]]) -> list[str]:
    """The parts to remove so that no path keeps more than one row: for each duplicated
    path every part holding it but the first by name (a part holding it twice too). Rows
    of those parts that were not duplicated lose their row as well: `--resume` classifies
    them again."""
    remove: set[str] = set()
    for parts in found.values():
        first = min(parts)
        remove |= {p for p in parts if p != first}
        if parts.count(first) > 1:
            remove.add(first)
    return sorted(remove)
