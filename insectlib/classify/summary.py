"""The report of a classification run: what was predicted, how sure, what failed, how fast.

`classify` writes `_summary.json` and `_summary.png` (`layout.SUMMARY_JSON`/`SUMMARY_PNG`)
after `_SUCCESS`; `insect summary OUTPUT` prints them, or computes them from the Parquet
parts for an output that has none (one written before insect kept a summary, or an
interrupted one). One pass over three columns of the parts (label, score, error), a batch
at a time: the driver's memory does not grow with the output.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset

from insectlib import layout, storage
from insectlib.classify import outputs
from insectlib.config import SummaryConfig
from insectlib.errors import InsectError

SCORE_BINS = 20  # equal-width bins of the score histogram over [0, 1]


def error_kind(text: str) -> str:
    """The kind of an error row: its text up to the first colon or parenthesis
    ("unreadable image", "not an image", "file too large", "not found", ...)."""
    return re.split(r"[:(]", text, maxsplit=1)[0].strip() or "error"


def _add_counts(into: dict[str, int], column) -> None:
    """Add the counts of the non-null values of an Arrow column to `into`."""
    for item in pc.value_counts(column).to_pylist():
        if item["values"] is not None:
            into[item["values"]] = into.get(item["values"], 0) + item["counts"]


def summarize(
    output: str,
    s3: storage.S3Options,
    classes: list[str] | None = None,
    footers: dict | None = None,
) -> dict:
    """Counts over insect's parts in `output`: rows, errors and errors by kind, rows not
    decided (below --min-score), rows per predicted class (every one of `classes`, even
    at 0) and the histogram of scores (`footers`: `outputs.part_footers`, where read)."""
    # Footers first: a file named like a part with other columns is refused, and a part an
    # interrupted writer left without a footer holds no rows yet.
    footers = outputs.part_footers(output, s3) if footers is None else footers
    names = [name for name, footer in footers.items() if footer is not None]
    per_class = dict.fromkeys(classes or [], 0)
    errors: dict[str, int] = {}
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    scores = np.zeros(SCORE_BINS, dtype=np.int64)
    rows = undecided = 0
    if names:
        pa_fs, _ = storage.pyarrow_filesystem(output, s3)
        parts = pyarrow.dataset.dataset(names, filesystem=pa_fs, format="parquet")
        with storage.user_errors(output), _unreadable_parts(output):
            for batch in parts.to_batches(columns=["label", "score", "error"]):
                rows += batch.num_rows
                label, score, error = batch.columns
                _add_counts(per_class, label)
                texts: dict[str, int] = {}  # folded into kinds per batch: bounded memory
                _add_counts(texts, error)
                for text, n in texts.items():
                    errors[error_kind(text)] = errors.get(error_kind(text), 0) + n
                # No label and no error: below --min-score.
                undecided += pc.sum(pc.and_(pc.is_null(label), pc.is_null(error))).as_py() or 0
                values = score.drop_null().to_numpy(zero_copy_only=False)
                scores += np.histogram(np.clip(values, 0, 1), bins=edges)[0]
    return {
        "rows": rows,
        "errors": sum(errors.values()),
        "undecided": undecided,
        "classes": per_class,
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "scores": {"edges": [round(float(e), 6) for e in edges], "counts": scores.tolist()},
    }


@contextlib.contextmanager
def _unreadable_parts(output: str):
    """A part that is not Parquet, or lacks a column: one line, not a traceback."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InsectError(f"{output} holds a part that cannot be summarized: {e}") from None


# What `format_summary` reads from a `_summary.json`: required, and optional (may be null).
SUMMARY_KEYS = {"rows": int, "errors": int, "classes": dict, "error_kinds": dict, "scores": dict}
OPTIONAL_KEYS = {
    "inputs": int,
    "undecided": int,
    "model": str,
    "seconds": (int, float),
    "images_per_second": (int, float),
}


def _checked(summary, uri: str) -> dict:
    """A `_summary.json` as read, refused unless it holds what `format_summary` shows."""
    if not isinstance(summary, dict):
        raise InsectError(f"{uri} is not a valid insect summary (not an object)")
    wrong = [k for k, kind in SUMMARY_KEYS.items() if not isinstance(summary.get(k), kind)]
    wrong += [
        k for k, kind in OPTIONAL_KEYS.items()
        if summary.get(k) is not None and not isinstance(summary[k], kind)
    ]  # fmt: skip
    if not wrong:
        scores = summary["scores"]
        lists = [scores.get("edges"), scores.get("counts")]
        numbers = [
            *summary["classes"].values(),
            *summary["error_kinds"].values(),
            *(v for values in lists for v in (values if isinstance(values, list) else [None])),
        ]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            wrong = ["classes", "error_kinds", "scores"]
    if wrong:
        raise InsectError(f"{uri} is not a valid insect summary (check: {', '.join(wrong)})")
    return summary


def write_summary(output: str, summary: dict, s3: storage.S3Options) -> None:
    """Write `_summary.json` and its picture `_summary.png` into `output`."""
    from insectlib.metrics.charts import summary_png  # matplotlib: only when a picture is drawn

    text = json.dumps(summary, indent=2)
    storage.write_bytes(storage.join(output, layout.SUMMARY_JSON), text.encode(), s3)
    storage.write_bytes(storage.join(output, layout.SUMMARY_PNG), summary_png(summary), s3)


def read_summary(output: str, s3: storage.S3Options) -> dict:
    """The summary of any classification output: its `_summary.json` where `_SUCCESS` is
    there and still true of the parts (as many rows as it says), or else one computed from
    its parts (with `_SUCCESS`'s inputs and times, when it has a true one); `foreign`: the
    files beside them a reader of the folder would count too."""
    found = {outputs.entry_name(e) for e in outputs.list_entries(output, s3)}
    summary = _summary_of(output, s3, found)
    foreign = outputs.foreign_rows(found)
    return {**summary, "foreign": foreign} if foreign else summary


def _summary_of(output: str, s3: storage.S3Options, found: set[str]) -> dict:
    """read_summary's judgement, `found`: the names in `output`."""
    manifest = _manifest(output, s3) if layout.SUCCESS_FILE in found else None
    footers = outputs.part_footers(output, s3)  # read once for every judgement below
    stale = None
    if manifest is not None:
        stale = stale_success(output, manifest.get("rows"), s3, footers)
    if stale:
        return {**summarize(output, s3, footers=footers), "complete": False, "problem": stale}
    if layout.SUMMARY_JSON in found and manifest is not None:
        # Written after _SUCCESS; without it, it is a stale one from before a resume.
        return {**_summary_file(output, s3), "complete": True}
    summary = summarize(output, s3, footers=footers)
    if manifest is None:
        cut = _cut_short(footers)
        if not summary["rows"]:
            if not found and not storage.exists(output, s3):
                raise storage.not_found(output, s3)
            if cut:
                raise InsectError(f"{output} holds no rows yet{cut}")
            if {layout.PREDICTIONS_DIR, layout.CONFUSION_JSON} <= found:
                inside = storage.join(output, layout.PREDICTIONS_DIR)
                raise InsectError(f"{output} is an evaluation; its classification is {inside}")
            raise InsectError(f"{output} holds no insect classification output")
        summary["problem"] = f"no {layout.SUCCESS_FILE}{cut}"
    summary["complete"] = manifest is not None
    if manifest is not None:
        summary.update(
            inputs=manifest.get("inputs"),
            model=manifest.get("model"),
            input=manifest.get("input"),
            seconds=manifest["seconds"],
        )
    return summary


def record_holds(output: str, s3: storage.S3Options, rows: int, inputs: int) -> bool:
    """Whether an output's `_SUCCESS` and `_summary.json` are valid and count `rows` rows
    of `inputs` inputs: a finished run's record, which a resume with nothing to do keeps."""
    try:
        manifest, summary = _manifest(output, s3), _summary_file(output, s3)
    except InsectError:
        return False
    return manifest.get("inputs") == inputs and manifest.get("rows") == rows == summary["rows"]


def _summary_file(output: str, s3: storage.S3Options) -> dict:
    """`_summary.json`, read and checked."""
    uri = storage.join(output, layout.SUMMARY_JSON)
    with storage.user_errors(uri):
        try:
            summary = json.loads(storage.read_bytes(uri, s3))
        except ValueError as e:
            raise InsectError(f"{uri} is not a valid insect summary: {e}") from None
    return _checked(summary, uri)


def stale_success(
    output: str, rows: int | None, s3: storage.S3Options, footers: dict | None = None
) -> str | None:
    """Why a `_SUCCESS` counting `rows` is no longer true of the parts (that many rows,
    each path once: what it was written for), or None (`footers`: `outputs.part_footers`,
    where read already; read once for both judgements)."""
    footers = outputs.part_footers(output, s3) if footers is None else footers
    complete = [footer for footer in footers.values() if footer is not None]
    if rows != sum(footer.num_rows for footer in complete):
        said = f"{layout.SUCCESS_FILE} says {rows} rows"
        return f"{said}, the parts differ{_cut_short(footers)}"
    repeated = outputs.duplicated_paths(output, s3, footers)
    if repeated:
        return f"paths with more than one row: {len(repeated)}; run again with --resume"
    return None


def _cut_short(footers: dict) -> str:
    """The parts without a footer, as said after what is wrong: they hold no rows yet."""
    names = sorted(name.rsplit("/", 1)[-1] for name, footer in footers.items() if footer is None)
    if not names:
        return ""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"; {names[0]}{more} without a Parquet footer (cut short, or being written)"


def _manifest(output: str, s3: storage.S3Options) -> dict:
    """`_SUCCESS`, read and checked, with the run's `seconds`."""
    uri = storage.join(output, layout.SUCCESS_FILE)
    with storage.user_errors(uri):
        try:
            manifest = json.loads(storage.read_bytes(uri, s3))
            seconds = (
                datetime.fromisoformat(manifest["finished"])
                - datetime.fromisoformat(manifest["started"])
            ).total_seconds()
        except KeyError as e:
            raise InsectError(
                f"{uri} is not a valid insect manifest: it has no {e} field"
            ) from None
        except (ValueError, TypeError) as e:
            raise InsectError(f"{uri} is not a valid insect manifest: {e}") from None
    return {**manifest, "seconds": seconds}


def format_summary(summary: dict, output: str) -> str:
    """`insect summary`'s text: totals, rows per class, scores, errors by kind."""
    rows = summary["rows"]
    lines = [
        f"{output}: {rows} rows"
        + (f" for {summary['inputs']} inputs" if summary.get("inputs") is not None else "")
        + (
            ""
            if summary.get("complete", True)
            else f" (incomplete: {summary.get('problem', 'no _SUCCESS')})"
        )
        + f", {summary['errors']} errors"
        + (f", {summary['undecided']} not decided" if summary.get("undecided") else "")
        + (f"; model {summary['model']}" if summary.get("model") else "")
    ]
    if summary.get("seconds"):
        rate = summary.get("images_per_second")
        lines.append(f"{summary['seconds']:.1f} s" + (f", {rate:.1f} images/s" if rate else ""))
    width = max([20, *(len(c) for c in summary["classes"])])
    lines += ["", f"{'class':<{width}} {'rows':>9} {'share':>7}"]
    for name, n in sorted(summary["classes"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{name:<{width}} {n:>9} {n / max(rows, 1):>7.1%}")
    counts = summary["scores"]["counts"]
    edges = summary["scores"]["edges"]
    if sum(counts):
        lines += ["", "score        rows"]
        top = max(counts)
        for low, high, n in zip(edges, edges[1:], counts, strict=False):
            if n:
                lines.append(f"{low:.2f}-{high:.2f} {n:>9} {'#' * max(1, round(30 * n / top))}")
    if summary["error_kinds"]:
        lines += ["", "errors by kind"]
        lines += [f"  {kind}: {n}" for kind, n in summary["error_kinds"].items()]
    if summary.get("foreign"):
        lines += ["", "warning: " + foreign_note(output, summary["foreign"], "counted")]
    return "\n".join(lines)


def foreign_note(output: str, names: list[str], ignored: str) -> str:
    """That `output` holds `names` (`outputs.foreign_rows`), which insect did not write and
    has not `ignored` (counted, shown), though a reader of the folder takes them for rows."""
    shown = ", ".join(names[: outputs.SHOWN])
    more = f" and {len(names) - outputs.SHOWN} more" if len(names) > outputs.SHOWN else ""
    return (
        f"{output} also holds {shown}{more}, which insect did not write: not {ignored} "
        "here, but read with the parts by pandas.read_parquet or pyarrow.dataset of the "
        "folder; move them out"
    )


def show(cfg: SummaryConfig) -> str:
    """`insect summary`: the text of the summary of `cfg.predictions`."""
    cfg.validate()
    return format_summary(read_summary(cfg.predictions, cfg.s3), cfg.predictions)
