"""What `insect report` costs at a million rows, side by side in one run: (a) reading the
Parquet columns the page needs, (b) the one-pass selection (reading included), (c) the
thumbnails (Ray tasks, decode + re-encode + write), (d) the whole `insect report` command
(a new process: imports, Ray's start, all of the above, the page).

The output is synthetic, as a classification with `--top-k 3 --min-score 0.5` writes it:
ROWS rows in parts of 100,000, their paths cycling over a few hundred real generated
images (the galleries are bounded, so the thumbnails stay few whatever the row count),
random labels and scores, 0.5% error rows.

    .venv/bin/python bench/review.py [--rows 1000000] [--screenshot docs/review.png]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import result_path, write_result

from insectlib import storage
from insectlib.classify.summary import summarize
from insectlib.config import DecodeLimits
from insectlib.data import synthetic
from insectlib.layout import SUCCESS_FILE, SUMMARY_JSON
from insectlib.model.predictor import RowFormat
from insectlib.review import selection, thumbnails

CLASSES = [f"class-{i:02d}" for i in range(10)]
PART_ROWS = 100_000
MIN_SCORE, TOP_K = 0.5, 3


def part_table(paths: list[str], start: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """`rows` synthetic rows of a classification with --top-k 3 --min-score 0.5."""
    k = len(CLASSES)
    logits = rng.normal(size=(rows, k)) * rng.uniform(0.5, 4, size=(rows, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    best = probs.argmax(1)
    score = probs.max(1)
    failed = rng.random(rows) < 0.005
    decided = (score >= MIN_SCORE) & ~failed
    order = np.argsort(-probs, axis=1)[:, :TOP_K]
    names = np.array(CLASSES)
    schema = RowFormat(top_k=TOP_K, min_score=MIN_SCORE).schema()
    mask = pa.array(failed)

    def lists(values: np.ndarray, kind: pa.DataType) -> pa.ListArray:
        offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), kind), mask=mask)

    columns = {
        "path": pa.array(paths * (rows // len(paths) + 2))[start % len(paths) :][:rows],
        "label": pa.array(np.where(decided, names[best], None), pa.string()),
        "label_index": pa.array(np.where(decided, best, 0), pa.int32(), mask=~decided),
        "score": pa.array(score, pa.float32(), mask=failed),
        "probabilities": lists(probs, pa.float32()),
        "error": pa.array(np.where(failed, "unreadable image: synthetic failure", None)),
        "model": ["bench"] * rows,
        "decided": pa.array(decided, mask=failed),
        "top_labels": lists(names[order], pa.string()),
        "top_scores": lists(np.take_along_axis(probs, order, 1), pa.float32()),
    }
    return pa.Table.from_pydict({n: columns[n] for n in schema.names}, schema=schema)


def make_output(folder: str, rows: int, images: int) -> tuple[str, str]:
    """The synthetic classification output (and its images); returns (output, images)."""
    pictures = synthetic.make_unlabelled(os.path.join(folder, "images"), count=images)
    paths = sorted(pictures)
    output = os.path.join(folder, "predictions")
    os.makedirs(output)
    rng = np.random.default_rng(0)
    write = uuid.uuid4().hex
    for i, start in enumerate(range(0, rows, PART_ROWS)):
        table = part_table(paths, start, min(PART_ROWS, rows - start), rng)
        pq.write_table(table, os.path.join(output, f"part-{write}-{i:06d}-0.parquet"))
    summary = summarize(output, storage.S3Options(), CLASSES)
    manifest = {"inputs": rows, "rows": rows, "errors": summary["errors"], "model": "bench",
                "input": os.path.join(folder, "images"), "started": "2026-01-01T00:00:00+00:00",
                "finished": "2026-01-01T01:00:00+00:00"}  # fmt: skip
    with open(os.path.join(output, SUCCESS_FILE), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(output, SUMMARY_JSON), "w") as f:
        row_format = {"top_k": TOP_K, "min_score": MIN_SCORE}
        json.dump({**summary, **manifest, "row_format": row_format}, f)
    return output, os.path.join(folder, "images")


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def measure(output: str, folder: str, gallery_size: int) -> dict:
    """(a), (b) and (c) in this process, (d) as a command."""
    s3 = storage.S3Options()
    parts = selection.find_parts(output, s3)
    read_s, rows = timed(lambda: sum(b.num_rows for b in selection.batches(output, parts, s3)))
    select_s, chosen = timed(
        lambda: selection.select(output, parts, CLASSES, gallery_size, 1000, s3)
    )
    import ray

    start = {"address": "local", "num_cpus": os.cpu_count(), "logging_level": "ERROR"}
    start_s, _ = timed(lambda: ray.init(**start))
    paths = chosen.paths()
    thumbs_dir = os.path.join(folder, "thumbs-only")
    thumbs_s, made = timed(
        lambda: thumbnails.write_thumbnails(thumbs_dir, paths, DecodeLimits(), s3)
    )
    ray.shutdown()
    html = os.path.join(folder, "page")
    insect = os.path.join(os.path.dirname(sys.executable), "insect")
    command = [insect, "report", output, "--html", html, "--gallery-size", str(gallery_size)]
    report_s, done = timed(lambda: subprocess.run(command, capture_output=True, text=True))
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    # The command's last line ends with its phases: "(select 3.1, ray 25.9, ...)".
    phases = re.findall(r"(\w+) ([\d.]+)", done.stdout.strip().splitlines()[-1].rsplit("(", 1)[1])
    return {
        "rows": rows,
        "parts": len(parts.names),
        "columns_read": parts.columns,
        "a_read_seconds": round(read_s, 2),
        "b_select_seconds": round(select_s, 2),
        "ray_start_seconds": round(start_s, 2),
        "c_thumbnails_seconds": round(thumbs_s, 2),
        "thumbnails": sum("thumb" in t for t in made.values()),
        "galleries": len(chosen.galleries),
        "d_report_command_seconds": round(report_s, 2),
        "d_phases_seconds": {name: float(t) for name, t in phases},
        "page_bytes": os.path.getsize(os.path.join(html, "index.html")),
        "thumbs_bytes": sum(
            os.path.getsize(os.path.join(html, "thumbs", n))
            for n in os.listdir(os.path.join(html, "thumbs"))
        ),
    }


def screenshot(page: str, path: str) -> None:
    """A picture of the page as headless Chromium draws it (Debian's chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run"],
        )  # fmt: skip
        view = browser.new_page(viewport={"width": 1280, "height": 1600})
        view.goto(f"file://{page}")
        view.wait_for_load_state("load")
        view.screenshot(path=path)
        browser.close()
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=300, help="real images the paths cycle over")
    ap.add_argument("--gallery-size", type=int, default=60)
    ap.add_argument("--screenshot", help="also save a picture of the page there")
    ap.add_argument("--out", default=result_path("review-cpu"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        _, made = timed(lambda: make_output(folder, args.rows, args.images))
        output, _ = made
        report = measure(output, folder, args.gallery_size)
        if args.screenshot:
            screenshot(os.path.join(folder, "page", "index.html"), args.screenshot)
    report = {
        "benchmark": (
            f"insect report on a synthetic classification of {args.rows} rows (--top-k 3 "
            f"--min-score 0.5, 10 classes, paths over {args.images} real images), "
            f"--gallery-size {args.gallery_size}, local Ray"
        ),
        **report,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
