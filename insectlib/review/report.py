"""`insect report OUT --html DIR`: the review page of a classification or an evaluation.

Phases: `read_source` (what OUT is and what its small files say), `plan_page` (whether the
page may go where asked and what `--overwrite` removes), one pass over the Parquet parts
choosing the rows (`selection`), the thumbnails in Ray tasks (`thumbnails`), then the page:
its script and style, and `index.html` last, so that a folder with an index.html holds a
whole page.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from insectlib import storage
from insectlib.classify import outputs, summary
from insectlib.classify.checks import inside_images_warning
from insectlib.config import ReportConfig
from insectlib.errors import InsectError
from insectlib.layout import (
    CONFUSION_JSON,
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    PREDICTIONS_DIR,
    REVIEW_FILES,
    REVIEW_PAGE,
    REVIEW_SCRIPT,
    REVIEW_STYLE,
    SUCCESS_FILE,
    SUMMARY_JSON,
    THUMB_NAME,
    THUMBS_DIR,
)
from insectlib.review import page, selection, thumbnails
from insectlib.runtime import console
from insectlib.runtime.connect import init_ray
from insectlib.storage.lock import output_lock

MAX_ERROR_ROWS = 1000  # error rows listed on the page (all are counted by kind)
RUN_FACTS = ("inputs", "rows", "errors", "undecided", "model", "input", "started", "finished")
RUN_SPEED = ("seconds", "images_per_second", "row_format")


@dataclass
class Source:
    """What `insect report` was pointed at."""

    kind: str  # "classify" or "evaluate"
    output: str  # as the user named it
    predictions: str  # the classification output holding the Parquet parts
    run: dict  # what its _SUCCESS and _summary.json say
    classes: list[str]  # the model's classes, in its order, where the output says them
    evaluation: dict | None = None  # metrics.json and confusion_matrix.json
    truth: dict[str, str] | None = None  # {path: true class} of the misclassified rows
    inputs: dict[str, str] = field(default_factory=dict)  # locations the page must keep out of


def read_json(uri: str, s3) -> dict | None:
    """A small JSON file of an output (an object, as insect writes them), None where there
    is none."""
    if not storage.exists(uri, s3):
        return None
    with storage.user_errors(uri):
        try:
            found = json.loads(storage.read_bytes(uri, s3))
        except ValueError as e:
            raise InsectError(f"{uri} is not valid JSON: {e}") from None
    if not isinstance(found, dict):  # taken for no file at all, a _SUCCESS meant 'unfinished'
        raise InsectError(f"{uri} is not one insect wrote: a JSON {type(found).__name__}")
    return found


def read_run(predictions: str, s3) -> tuple[dict, list[str]]:
    """The facts of a classification run (`complete`: whether it has a _SUCCESS; nothing
    else without one) and the model's classes (from its _summary.json, which lists every
    one)."""
    manifest = read_json(storage.join(predictions, SUCCESS_FILE), s3) or {}
    written = (read_json(storage.join(predictions, SUMMARY_JSON), s3) or {}) if manifest else {}
    run = {k: written[k] for k in (*RUN_FACTS, *RUN_SPEED) if written.get(k) is not None}
    run.update({k: manifest[k] for k in RUN_FACTS if k in manifest})  # _SUCCESS's count first
    run["complete"] = bool(manifest)
    classes = written.get("classes")
    return run, list(classes) if isinstance(classes, dict) else []


def read_source(output: str, s3) -> Source:
    """Recognise a classification output or an evaluation (its predictions in
    PREDICTIONS_DIR beside metrics.json and confusion_matrix.json) and read its small files."""
    names = {outputs.entry_name(e): e["type"] for e in outputs.list_entries(output, s3)}
    if not names:
        if not storage.exists(output, s3):
            raise storage.not_found(output, s3)
        raise InsectError(f"{output} holds no insect classification or evaluation output")
    if names.get(PREDICTIONS_DIR) == "directory" and CONFUSION_JSON in names:
        return _evaluation_source(output, s3)
    if not any(outputs.is_part_name(n) for n in names) and SUCCESS_FILE not in names:
        raise InsectError(
            f"{output} holds no insect classification or evaluation output (no Parquet parts, "
            f"no {SUCCESS_FILE}, no {PREDICTIONS_DIR}/ beside {CONFUSION_JSON})"
        )
    run, classes = read_run(output, s3)
    inputs = {"the classification": output}
    if isinstance(run.get("input"), str):
        inputs["its input"] = run["input"]
    return Source("classify", output, output, run, classes, inputs=inputs)


def _evaluation_source(output: str, s3) -> Source:
    predictions = storage.join(output, PREDICTIONS_DIR)
    metrics = read_json(storage.join(output, METRICS_FILE), s3) or {}
    confusion = read_json(storage.join(output, CONFUSION_JSON), s3) or {}
    classes, matrix = confusion.get("classes"), confusion.get("matrix")
    if not isinstance(classes, list) or not isinstance(matrix, list):
        raise InsectError(f"{storage.join(output, CONFUSION_JSON)} holds no classes and matrix")
    run, _ = read_run(predictions, s3)
    evaluation = {
        key: metrics.get(key) for key in ("accuracy", "images", "unreadable", "per_class", "data")
    }
    evaluation.update(classes=classes, matrix=matrix)
    inputs = {"the evaluation": output}
    if isinstance(metrics.get("data"), str):
        inputs["its labelled data"] = metrics["data"]
    truth = read_truth(storage.join(output, MISCLASSIFIED_FILE), s3)
    return Source("evaluate", output, predictions, run, classes, evaluation, truth, inputs)


def read_truth(uri: str, s3) -> dict[str, str]:
    """{path: true class} of an evaluation's misclassified rows; every other classified row
    of an evaluation is right, so its true class is its label."""
    if not storage.exists(uri, s3):
        return {}
    fs, path = storage.filesystem(uri, s3)
    with storage.user_errors(uri), fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["path", "true_label"])
    return dict(zip(table["path"].to_pylist(), table["true_label"].to_pylist(), strict=True))


def plan_page(cfg: ReportConfig, source: Source) -> list[str]:
    """Refuse a non-empty page folder without --overwrite (`build_report` has checked it
    is apart from the output and its inputs); returns what --overwrite removes: only the
    page's own files and thumbnails, refusing anything else there."""
    entries = outputs.list_entries(cfg.html, cfg.s3)
    if entries and not cfg.overwrite:
        raise InsectError(f"--html {cfg.html} is not empty; pass --overwrite to replace the page")
    why = "--overwrite removes only the page insect report wrote: choose another --html"
    outputs.refuse_foreign(cfg.html, entries, why, REVIEW_FILES, (THUMBS_DIR,))
    removal = [e["name"] for e in entries if e["type"] == "file"]
    if any(outputs.entry_name(e) == THUMBS_DIR for e in entries):
        thumbs = storage.join(cfg.html, THUMBS_DIR)
        found = outputs.list_entries(thumbs, cfg.s3)
        foreign = [e for e in found if e["type"] != "file" or not _is_thumb(e)]
        if foreign:
            shown = ", ".join(sorted(outputs.entry_name(e) for e in foreign)[:5])
            raise InsectError(f"{thumbs} holds files insect did not write ({shown}); {why}")
        removal += [e["name"] for e in found]
    return removal


def _is_thumb(entry: dict) -> bool:
    return bool(re.fullmatch(THUMB_NAME, outputs.entry_name(entry)))


def choose_rows(cfg: ReportConfig, source: Source) -> tuple[selection.Selection, dict]:
    """The one pass over the parts (`selection`); also the run's facts for the page."""
    parts = selection.find_parts(source.predictions, cfg.s3)
    if not parts.names:
        raise InsectError(f"{source.predictions} holds no complete Parquet part to show")
    if not source.classes and "probabilities" in parts.columns:
        parts.columns.remove("probabilities")  # without the model's class order, no guess
    chosen = selection.select(
        source.predictions, parts, source.classes, cfg.gallery_size, MAX_ERROR_ROWS,
        cfg.s3, source.truth,
    )  # fmt: skip
    check_matrix(source, chosen)
    row_format = source.run.get("row_format") or parts.row_format
    run = {**source.run, "row_format": row_format, "rows_read": chosen.rows}
    names = map(outputs.entry_name, outputs.list_entries(source.predictions, cfg.s3))
    foreign = outputs.foreign_rows(names)
    note = summary.foreign_note(source.predictions, foreign, "shown") if foreign else None
    return chosen, {**run, "incomplete": not_whole(source, parts, cfg.s3), "foreign": note}


def not_whole(source: Source, parts: selection.Parts, s3) -> str | None:
    """Why the parts are not a whole run, or None: no _SUCCESS, or one no longer true of
    them (as `insect summary` judges it: a part cut short or removed, a path twice)."""
    if not source.run["complete"]:
        return f"no {SUCCESS_FILE}: an interrupted or running insect {source.kind}"
    rows = source.run.get("rows")
    return summary.stale_success(source.predictions, rows, s3, parts.footers)


def build_report(cfg: ReportConfig) -> dict:
    """Write the review page of `cfg.predictions` into `cfg.html`; returns what it shows
    and the seconds of each phase."""
    cfg.validate()
    seconds, last = {}, [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase], last[0] = now - last[0], now

    source = read_source(cfg.predictions, cfg.s3)
    # Before the lock, which would refuse a --html it cannot make without naming the flag.
    storage.check_location(cfg.html, source.inputs, tuple(source.inputs), cfg.s3, "--html")
    with output_lock(cfg.html, "report", cfg.s3, console.say):
        return _write_report(cfg, source, seconds, lap)


def _write_report(cfg: ReportConfig, source: Source, seconds: dict, lap) -> dict:
    """build_report's phases once the page folder is this run's alone."""
    removal = plan_page(cfg, source)
    chosen, run = choose_rows(cfg, source)
    if run["incomplete"]:
        console.warn(
            f"warning: {source.predictions} is not a whole run ({run['incomplete']}): the "
            "page shows the rows it holds"
        )
    if run["foreign"]:
        console.warn(f"warning: {run['foreign']}")
    paths = chosen.paths()
    folder = folder_of_images(cfg.html, paths)
    if folder:  # a manifest's run: its input (`read_source`) is not a folder
        console.warn(inside_images_warning("--html", cfg.html, folder, "the page's"))
    console.say(
        f"{console.counted(chosen.rows, 'row')} read: "
        f"{console.counted(len(chosen.galleries), 'gallery', 'galleries')}, "
        f"{console.counted(len(paths), 'image')} in them; making their thumbnails"
    )
    lap("select")
    init_ray(cfg.address)
    lap("ray")
    outputs.remove(cfg.html, removal, cfg.s3)
    with storage.user_errors(cfg.html, "write"):  # the thumbnails written there
        thumbs = thumbnails.write_thumbnails(cfg.html, paths, cfg.limits, cfg.s3)
    lap("thumbnails")
    document = page.page_document(
        source.kind, source.output, run, chosen, thumbs, source.evaluation
    )
    for name in (REVIEW_SCRIPT, REVIEW_STYLE):
        storage.write_file(cfg.html, name, page.asset(name), cfg.s3)
    storage.write_file(cfg.html, REVIEW_PAGE, page.render(document), cfg.s3)
    lap("page")
    missing = sum("problem" in t for t in thumbs.values())
    return {
        "page": storage.join(cfg.html, REVIEW_PAGE),
        "rows": chosen.rows,
        "galleries": len(chosen.galleries),
        "thumbnails": len(thumbs) - missing,
        "without_thumbnail": missing,
        "errors": chosen.error_total,
        "seconds": sum(seconds.values()),
        "phases": seconds,
    }


def folder_of_images(html: str, paths: list[str]) -> str | None:
    """The folder of the page's images (`paths` as the rows write them) that holds `html`,
    if one does: the next classification of it would read the page's thumbnails."""
    folders = {os.path.dirname(storage.from_printable(p)) for p in paths}  # as the OS has them
    return storage.folder_holding(html, sorted(folders))


def check_matrix(source: Source, chosen: selection.Selection) -> None:
    """Warn when the predictions do not give the evaluation's confusion matrix (its
    files were changed since), as the cells then show other images than it counts."""
    if source.evaluation is None:
        return
    matrix = source.evaluation["matrix"]
    found = [
        [chosen.totals.get(("cell", i, j), 0) for j in range(len(row))]
        for i, row in enumerate(matrix)
    ]
    if found != matrix:
        console.warn(
            f"warning: the predictions in {source.predictions} do not give the confusion "
            f"matrix of {source.output}; the cells show what the predictions hold"
        )


def print_report(result: dict) -> None:
    phases = ", ".join(f"{name} {t:.1f}" for name, t in result["phases"].items())
    console.say(
        f"{result['page']}: {console.counted(result['rows'], 'row')}, "
        f"{console.counted(result['galleries'], 'gallery', 'galleries')}, "
        f"{console.counted(result['thumbnails'], 'thumbnail')}"
        + (f" ({console.counted(result['without_thumbnail'], 'image')} could not be read)"
           if result["without_thumbnail"] else "")
        + f", {console.counted(result['errors'], 'error row')}; "
        + f"{result['seconds']:.1f} s ({phases})"
    )  # fmt: skip
