"""Where a model actor of several threads decodes: before each batch on all its threads (the
product's way: `image_batch` fused in the actor, its model waiting), or beside its model,
the next batch decoded on threads of its own while the model runs (what a decoding thread in
the actor would do; decoding tasks in processes of their own would compete for the same
cores, plus a copy, and are not measured here). In one process with the product's parts
(`image_batch`, `Predictor` compiled), side by side:

  model alone     the model on every thread, on batches already decoded
  after           each batch decoded on every thread, then the model: the actor's way
  beside, N       the next batch decoded on N threads while the model runs on every thread
  split           the model on one thread fewer, the next batch decoded on the one left
                  (a process of its own: the compiled model keeps its thread count)

Each way decodes and classifies the same `--batches` batches (the first decode waits in
every way), in ROUNDS rounds, interleaved; every round's figure is kept.

    .venv/bin/python bench/decode_overlap.py [--batches 8] [--precisions bf16]

For each precision this CPU runs (an actor has several threads where a small input shares
out the CPUs, and with --cpus-per-actor); VGG-16 at 224 px, random weights, high-entropy
1024x768 camera JPEGs (bench/shapes.py's).
Writes bench/results/decode-overlap-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import in_fresh_process, result_path, write_result
from shapes import BATCH, SIZE, camera_jpegs, make_model, precisions

from insectlib.model.precision import cpu_name

ROUNDS = 3  # each way measured this many times, interleaved


def rates(model_dir: str, folder: str, precision: str, int8_model, batches: int,
          threads: int) -> dict[str, list[float]]:  # fmt: skip
    """Images per second of each way (see the module's docstring) with the model on
    `threads` threads, every round's, in this process: "split" where `threads` is one
    fewer than the cores, the others where it is all of them."""
    import numpy as np

    from insectlib.classify.dataset import image_batch
    from insectlib.config import DecodeLimits
    from insectlib.model.predictor import Predictor

    cores = os.cpu_count() or 1
    paths = np.array(sorted(os.path.join(folder, n) for n in os.listdir(folder)), dtype=object)
    inputs = [{"path": paths[i : i + BATCH]} for i in range(0, len(paths), BATCH)]

    def decoded(i: int, decoding: int):
        batch = image_batch(inputs[i % len(inputs)], SIZE, DecodeLimits(), None, decoding)
        return batch["image"]

    predictor = Predictor(
        model_dir, precision=precision, threads=threads, compile=True, batch_size=BATCH,
        int8_model=int8_model,
    )  # fmt: skip
    ready = decoded(0, cores)
    predictor.probabilities(ready)  # the compile and warm-up
    predictor.probabilities(ready)

    def alone() -> None:
        for _ in range(batches):
            predictor.probabilities(ready)

    def after() -> None:
        for i in range(batches):
            predictor.probabilities(decoded(i, threads))

    def beside(decoding: int) -> None:
        with ThreadPoolExecutor(1) as ahead:
            coming = ahead.submit(decoded, 0, decoding)
            for i in range(batches):
                images = coming.result()
                if i + 1 < batches:
                    coming = ahead.submit(decoded, i + 1, decoding)
                predictor.probabilities(images)

    if threads < cores:
        ways = {"split": lambda: beside(cores - threads)}
    else:
        ways = {"model alone": alone, "after": after}
        ways.update({f"beside, {n}": (lambda n=n: beside(n)) for n in sorted({1, cores})})
    found: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(ROUNDS):
        for name, way in ways.items():
            began = time.perf_counter()
            way()
            found[name].append(BATCH * batches / (time.perf_counter() - began))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="batches per measurement")
    ap.add_argument("--precisions", default="", help="default: those this CPU runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from insectlib.config import DecodeLimits
    from insectlib.model import int8_statistics
    from insectlib.model.meta import read_meta

    cores = os.cpu_count() or 1
    chosen = args.precisions.split(",") if args.precisions else precisions()
    report: dict = {"benchmark": "decode overlap", "model": "vgg16 224 px", "batch": BATCH,
                    "batches": args.batches, "rounds": ROUNDS, "threads": cores, "cpu": cpu_name(),
                    "precisions": chosen, "rates": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = camera_jpegs(os.path.join(tmp, "camera"), 4 * BATCH)
        model_dir = make_model(os.path.join(tmp, "model"))
        for precision in chosen:
            int8_model = None
            if precision == "int8":
                meta = read_meta(model_dir)
                int8_model = int8_statistics.measure(model_dir, meta, folder, BATCH, DecodeLimits())
            found = {}
            for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
                found.update(
                    in_fresh_process(
                        rates, model_dir, folder, precision, int8_model, args.batches, threads
                    )
                )
            report["rates"][precision] = found
            print(precision, found, flush=True)
    write_result(args.out or result_path("decode-overlap"), report)


if __name__ == "__main__":
    main()
