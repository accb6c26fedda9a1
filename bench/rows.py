"""What the optional columns cost: images/s and bytes per row, side by side in one run.

    .venv/bin/python bench/rows.py --model MODEL_DIR [--images DIR] [--repeat 2]
        [--out bench/results/rows.json]

Classifies the same images (default: the shared insect test photos, 180 camera JPEGs) with
`insect classify` four times, each in the same local Ray: the default columns, `--top-k 3`,
`--embeddings`, and everything (`--top-k 3 --embeddings --min-score 0.5`), `--repeat` times
each in turn (the best kept). Reports seconds, images/s (whole run, start-up included, as a
user sees it), and the Parquet bytes per row (every part's size over the rows: compressed,
as stored). The model directory decides the embedding size (4,096 for VGG-16).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import write_result  # noqa: E402

VARIANTS = {
    "default columns": {},
    "--top-k 3": {"top_k": 3},
    "--embeddings": {"embeddings": True},
    "--top-k 3 --embeddings --min-score 0.5": {"top_k": 3, "embeddings": True, "min_score": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    shared = os.path.join(REPO, "..", "shared", "data", "insects", "test")
    ap.add_argument("--images", default=shared)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "rows.json"))
    args = ap.parse_args()

    from insectlib.classify.pipeline import classify
    from insectlib.config import ClassifyConfig
    from insectlib.model.meta import read_meta

    meta = read_meta(args.model)
    work = tempfile.mkdtemp(prefix="insect-rows-")
    best: dict[str, dict] = {}
    try:
        for attempt in range(args.repeat):
            for i, (name, flags) in enumerate(VARIANTS.items()):
                out = os.path.join(work, f"{attempt}-{i}")
                s = classify(
                    ClassifyConfig(input=args.images, model=args.model, output=out, **flags)
                )
                size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*.parquet")))
                result = {
                    "images": s.inputs,
                    "seconds": round(s.seconds, 2),
                    "images_per_second": round(s.images_per_second, 2),
                    "bytes_per_row": round(size / s.rows, 1),
                }
                print(name, result, flush=True)
                if name not in best or result["seconds"] < best[name]["seconds"]:
                    best[name] = result
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = best["default columns"]
    for result in best.values():
        result["speed_vs_default"] = round(
            result["images_per_second"] / plain["images_per_second"], 3
        )
        result["bytes_vs_default"] = round(result["bytes_per_row"] / plain["bytes_per_row"], 2)
    report = {
        "model": f"{meta.arch} at {meta.image_size} px, {len(meta.classes)} classes",
        "input": os.path.abspath(args.images),
        "repeat": args.repeat,
        "variants": best,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
