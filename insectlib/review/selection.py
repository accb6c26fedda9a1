"""What the review page shows, chosen in one pass over a classification's Parquet parts, a
batch at a time: the driver holds one batch and, per gallery, at most `size` rows.

Galleries: one per predicted class (the least confident first), one of the rows below
`--min-score` (label null, no error: the least confident first) and, for an evaluation,
one per cell of the confusion matrix (on the diagonal the least confident first, off it
the most confident first: a confident mistake is often a wrong label in the data). Each
batch is narrowed with numpy before any row becomes a Python object: rows that cannot
beat what a full gallery already holds are dropped, then at most `size` per gallery are
sorted in. Error rows are kept in the order met, up to `max_errors`, and counted by kind.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset

from insectlib import storage
from insectlib.classify import outputs
from insectlib.classify.summary import SCORE_BINS, error_kind

CELL = 1 << 20  # cell code = true class * CELL + predicted class (far more than any class count)
READ_COLUMNS = ("path", "label", "score", "error")  # what every gallery needs
OPTIONAL_COLUMNS = ("top_labels", "top_scores")  # shown where the run kept them (--top-k)
BATCH_ROWS = 65_536


class Lowest:
    """The `size` rows with the lowest keys offered so far (ties: the first offered)."""

    def __init__(self, size: int):
        self.size, self.heap, self.offered = size, [], 0

    def threshold(self) -> float:
        """Keys at or above this cannot enter any more."""
        return -self.heap[0][0] if len(self.heap) >= self.size else math.inf

    def offer(self, key: float, row: dict) -> None:
        self.offered += 1
        entry = (-key, -self.offered, row)
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, entry)
        elif entry > self.heap[0]:
            heapq.heapreplace(self.heap, entry)

    def rows(self) -> list[dict]:
        return [row for _, _, row in sorted(self.heap, key=lambda e: (-e[0], -e[1]))]


@dataclass
class Selection:
    """The outcome of the pass (see the module's docstring)."""

    classes: list[str]
    size: int
    rows: int = 0
    galleries: dict[tuple, Lowest] = field(default_factory=dict)  # ("class", i), ("cell", i, j)
    totals: dict[tuple, int] = field(default_factory=dict)  # rows in each gallery, all of them
    errors: list[dict] = field(default_factory=list)
    error_total: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))

    def gallery(self, key: tuple) -> Lowest:
        if key not in self.galleries:
            self.galleries[key] = Lowest(self.size)
        return self.galleries[key]

    @property
    def undecided(self) -> int:
        return self.totals.get(("undecided",), 0)

    def paths(self) -> list[str]:
        """Every path a gallery shows, once, sorted."""
        return sorted({row["path"] for g in self.galleries.values() for row in g.rows()})


@dataclass
class Parts:
    """A classification output's complete Parquet parts and what their rows hold."""

    names: list[str]
    columns: list[str]
    row_format: dict
    footers: dict  # every part's, None where it has none (`outputs.part_footers`)


def find_parts(output: str, s3: storage.S3Options) -> Parts:
    """The complete parts of `output` (footers checked as `insect summary` checks them)."""
    footers = outputs.part_footers(output, s3)
    names = sorted(name for name, footer in footers.items() if footer is not None)
    if not names:
        return Parts([], list(READ_COLUMNS), {}, footers)
    footer = footers[names[0]]
    present = set(footer.schema.to_arrow_schema().names)
    columns = [c for c in (*READ_COLUMNS, *OPTIONAL_COLUMNS) if c in present]
    if "decided" in present:  # --min-score: the guess of an undecided row is its argmax
        columns.append("probabilities")
    return Parts(names, columns, outputs.row_format_of(footer, {}), footers)


def batches(output: str, parts: Parts, s3: storage.S3Options):
    """The parts' rows, `parts.columns` only, a batch at a time."""
    if not parts.names:
        return
    pa_fs, _ = storage.pyarrow_filesystem(output, s3)
    found = pyarrow.dataset.dataset(parts.names, filesystem=pa_fs, format="parquet")
    with storage.user_errors(output):
        yield from found.to_batches(columns=parts.columns, batch_size=BATCH_ROWS)


class Selector:
    """Feeds batches into a `Selection`. `truth` ({path: true class}) for an evaluation:
    its misclassified rows; every other classified row's truth is its own label."""

    def __init__(self, classes: list[str], size: int, max_errors: int, truth=None):
        self.selection = Selection(list(classes), size)
        self.max_errors = max_errors
        self.truth = None
        if truth is not None:
            self.truth = (
                pa.array(list(truth), pa.string()),
                pa.array(list(truth.values()), pa.string()),
            )
        self.edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)

    def add(self, batch: pa.RecordBatch) -> None:
        s, table = self.selection, pa.Table.from_batches([batch])
        s.rows += table.num_rows
        failed = pc.is_valid(table["error"]).to_numpy(zero_copy_only=False)
        self._errors(table, failed)
        scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        known = ~np.isnan(scores)
        s.histogram += np.histogram(np.clip(scores[known], 0, 1), bins=self.edges)[0]
        predicted = self._codes(table["label"])
        self._offer(table, np.where(predicted >= 0, predicted, -1), scores, "class")
        undecided = np.where((predicted < 0) & ~failed & known, 0, -1)
        self._offer(table, undecided, scores, "undecided")
        if self.truth is not None:
            true = self._codes(self._true_labels(table))
            cells = np.where((predicted >= 0) & (true >= 0), true * CELL + predicted, -1)
            # Off the diagonal the most confident first: the sort key is minus the score.
            keys = np.where(true == predicted, scores, -scores)
            self._offer(table, cells, keys, "cell")

    def _codes(self, labels: pa.ChunkedArray) -> np.ndarray:
        """Class index of each label (-1: null), new labels added to the classes."""
        s = self.selection
        known = pa.array(s.classes, pa.string())
        new = pc.unique(labels.filter(pc.is_null(pc.index_in(labels, value_set=known))))
        s.classes += sorted(v for v in new.to_pylist() if v is not None)
        index = pc.index_in(labels, pa.array(s.classes, pa.string()))
        return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def _true_labels(self, table: pa.Table) -> pa.ChunkedArray:
        paths, truth = self.truth
        found = pc.index_in(table["path"], value_set=paths)
        return pc.coalesce(pc.take(truth, found), table["label"])

    def _errors(self, table: pa.Table, failed: np.ndarray) -> None:
        s = self.selection
        if not failed.any():
            return
        rows = table.filter(pa.array(failed)).select(["path", "error"])
        s.error_total += rows.num_rows
        for item in pc.value_counts(rows["error"]).to_pylist():
            kind = error_kind(item["values"])
            s.error_kinds[kind] = s.error_kinds.get(kind, 0) + item["counts"]
        room = self.max_errors - len(s.errors)
        if room > 0:
            s.errors += rows.slice(0, room).to_pylist()

    def _offer(self, table: pa.Table, codes: np.ndarray, keys: np.ndarray, kind: str) -> None:
        """Offer the rows with a code (>= 0) to the gallery of (kind, code): only those
        that can still enter it, at most `size` per gallery, become Python rows."""
        s, index = self.selection, np.flatnonzero(codes >= 0)
        if not len(index):
            return
        codes, keys = codes[index], keys[index]
        found, counts = np.unique(codes, return_counts=True)
        limits = np.array([s.gallery(_key(kind, c)).threshold() for c in found.tolist()])
        for code, n in zip(found.tolist(), counts.tolist(), strict=True):
            s.totals[_key(kind, code)] = s.totals.get(_key(kind, code), 0) + n
        keep = keys < limits[np.searchsorted(found, codes)]
        index, codes, keys = index[keep], codes[keep], keys[keep]
        order = np.lexsort((index, keys, codes))
        index, codes, keys = index[order], codes[order], keys[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
        chosen = rank < s.size
        rows = table.take(pa.array(index[chosen])).to_pylist()
        for row, code, key in zip(rows, codes[chosen].tolist(), keys[chosen].tolist(), strict=True):
            s.gallery(_key(kind, code)).offer(key, _shown(row, s.classes))


def _key(kind: str, code: int) -> tuple:
    if kind == "cell":
        return ("cell", code // CELL, code % CELL)
    return (kind,) if kind == "undecided" else (kind, code)


def _shown(row: dict, classes: list[str]) -> dict:
    """What the page shows of a row: path, label, score, the top-k and, for a row below
    --min-score, its most probable class."""
    shown = {"path": row["path"], "label": row["label"], "score": row["score"]}
    if row.get("top_labels") is not None:
        pairs = zip(row["top_labels"], row["top_scores"], strict=True)
        shown["top"] = [[label, score] for label, score in pairs]
    probabilities = row.get("probabilities")
    if row["label"] is None and probabilities:
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        shown["guess"] = classes[best] if best < len(classes) else None
    return shown


def select(
    output: str,
    parts: Parts,
    classes: list[str],
    size: int,
    max_errors: int,
    s3: storage.S3Options,
    truth: dict[str, str] | None = None,
) -> Selection:
    """One pass over `parts` of `output` (see the module's docstring)."""
    selector = Selector(classes, size, max_errors, truth)
    for batch in batches(output, parts, s3):
        selector.add(batch)
    return selector.selection
