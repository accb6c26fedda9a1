"""The shape of classification's model actors on this CPU, measured side by side in one run:
how many actors, how many torch threads each, for every precision this CPU runs (fp32,
bf16 where it is fast, int8 on x86 with AVX2).

  model alone   `Predictor` (the product's model path: normalisation, precision, compile)
                on batches already decoded, steady state after a warm-up batch: one
                process with every thread, and one single-thread process per core at once
  decoding      the actors' read, decode and resize alone, on one thread (the ceiling
                of classify is the model alone with this on the same cores)
  plain loop    a DataLoader decoding in worker processes and the model with every thread,
                the way a user would write it (fp32, and bf16 where fast)
  classify      `insect classify` with the default settings at steady state (the
                difference of a run and one of a quarter of its images in the same shape:
                start-up and drain cancel), in each shape tried, on high-entropy camera
                JPEGs (1024x768, quality 92, about 500 kB: the decoder's worst case) and on
                the shared insect photos scaled up to 1024x768

    .venv/bin/python bench/shapes.py [--images 256] [--precisions fp32,int8] [--rounds 3]

VGG-16 at 224 px, random weights (the int8 statistics measured on generated images).
Writes bench/results/shapes-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import machine, result_path, write_result  # noqa: E402

from insectlib.model.precision import cpu_name, cpu_runs_int8_fast, resolve_precision  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "insects")
CLASSES = ["beetles", "cockroach", "dragonflies"]
SIZE = 224
BATCH = 32


def camera_jpegs(folder: str, count: int) -> str:
    """High-entropy 1024x768 JPEGs at quality 92: sensor-like noise over smooth colour."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((1024, 768), Image.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.normal(0, 24, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(os.path.join(folder, f"{i:05d}.jpg"), quality=92)
    return folder


def insect_photos(folder: str, count: int) -> str | None:
    """The shared insect photos scaled up to 1024x768 (None where shared/ is absent)."""
    import glob

    sources = sorted(glob.glob(os.path.join(SHARED, "*", "*", "*.jpg")))
    if not sources:
        return None
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        image = Image.open(sources[i * 7 % len(sources)]).convert("RGB")
        image.resize((1024, 768), Image.LANCZOS).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90
        )
    return folder


def make_model(folder: str) -> str:
    import torch

    from insectlib.model.meta import ModelMeta
    from insectlib.model.network import build_model, save_model

    torch.manual_seed(0)
    model = build_model("vgg16", len(CLASSES), "random")
    save_model(folder, model, ModelMeta(classes=CLASSES, arch="vgg16", image_size=SIZE))
    return folder


def precisions() -> list[str]:
    """The precisions this CPU runs: fp32, bf16 where it is fast, int8 with AVX2."""
    import torch

    found = ["fp32"]
    if resolve_precision("auto", torch.device("cpu")) == torch.bfloat16:
        found.append("bf16")
    if cpu_runs_int8_fast():
        found.append("int8")
    return found


def model_rate(model_dir: str, precision: str, int8_model, threads: int, compile: bool,
                batches: int, start=None) -> tuple[float, float]:  # fmt: skip
    """(images per second, seconds to build) of `Predictor` on decoded batches."""
    from insectlib.model.predictor import Predictor

    began = time.perf_counter()
    predictor = Predictor(
        model_dir, precision=precision, threads=threads, compile=compile,
        batch_size=BATCH, int8_model=int8_model,
    )  # fmt: skip
    images = np.random.default_rng(0).integers(0, 255, (BATCH, 3, SIZE, SIZE), dtype=np.uint8)
    predictor.probabilities(images)  # warm-up
    built = time.perf_counter() - began
    if start is not None:
        start.wait()
    began = time.perf_counter()
    for _ in range(batches):
        predictor.probabilities(images)
    return BATCH * batches / (time.perf_counter() - began), built


def model_alone(model_dir: str, precision: str, int8_model, compile: bool, batches: int) -> dict:
    """The model alone in both shapes: one process with every thread, and one single-thread
    process per core running at once (their rates added up)."""
    cores = os.cpu_count() or 1
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        one, built = pool.submit(
            model_rate, model_dir, precision, int8_model, cores, compile, batches
        ).result()
    manager = spawn.Manager()
    start = manager.Barrier(cores)
    with ProcessPoolExecutor(cores, mp_context=spawn) as pool:
        runs = [
            pool.submit(model_rate, model_dir, precision, int8_model, 1, compile, batches, start)
            for _ in range(cores)
        ]
        rates = [r.result()[0] for r in runs]
    return {
        f"1x{cores}": one,
        f"{cores}x1": sum(rates),
        "build_seconds": built,
    }


def classify_once(folder: str, model_dir: str, output: str, **settings):
    """`insect classify` of `folder` with the default settings but `settings`: (its
    summary, seconds)."""
    from insectlib.classify.pipeline import classify
    from insectlib.config import ClassifyConfig

    began = time.perf_counter()
    summary = classify(ClassifyConfig(input=folder, model=model_dir, output=output, **settings))
    assert summary.rows == summary.inputs
    return summary, time.perf_counter() - began


def first_of(folder: str, count: int, where: str) -> str:
    """A folder at `where` of links to the first `count` files of `folder`."""
    os.makedirs(where)
    for name in sorted(os.listdir(folder))[:count]:
        os.symlink(os.path.join(folder, name), os.path.join(where, name))
    return where


def classify_rate(folder: str, model_dir: str, output: str, **settings) -> dict:
    """`insect classify` of `folder`: images per second at steady state (the difference of
    this run and one of a quarter of the images in the same shape and compilation: start-up
    and the last batches' drain cancel), and of the whole run."""
    summary, seconds = classify_once(folder, model_dir, output, **settings)
    shape = summary.shape
    same = {**settings, "max_actors": shape["actors"], "cpus_per_actor": shape["cpus_per_actor"]}
    same["compile"] = compiled(shape)
    quarter = first_of(folder, summary.inputs // 4, output + "-input")
    with tasks_in_flight(shape["tasks_in_flight"]):  # the rule's for the longer run
        short, short_seconds = classify_once(quarter, model_dir, output + "-quarter", **same)
    assert short.shape["actors"] == shape["actors"], "a quarter too small for the shape"
    longer = seconds - short_seconds
    return {
        "steady": (summary.inputs - short.inputs) / longer if longer > 0 else float("nan"),
        "whole": summary.inputs / seconds,
        "seconds": seconds,
        "shape": shape,
    }


@contextlib.contextmanager
def tasks_in_flight(n: int | None):
    """The product's pool is given `n` tasks an actor at a time, whatever its rule
    (`dataset.tasks_in_flight`) would give."""
    from insectlib.classify import dataset

    rule = dataset.tasks_in_flight
    dataset.tasks_in_flight = lambda *_: n
    try:
        yield
    finally:
        dataset.tasks_in_flight = rule


def pools() -> dict[str, dict]:
    """One actor per core, and one actor of every core's threads, as classify settings
    (one pool on one core)."""
    cores = os.cpu_count() or 1
    return {f"{cores}x1": {"max_actors": cores, "cpus_per_actor": 1.0},
            f"1x{cores}": {"max_actors": 1, "cpus_per_actor": float(cores)}}  # fmt: skip


def camera_shapes(folder: str, model_dir: str, out: str, precision: str, rounds: int):
    """(shape, run) of `insect classify` of `folder` in the default shape and in those of
    one actor per core and one of every core that it is not, `rounds` rounds, each in the
    reverse order of the one before (the machine drifts); a run is the median round's, with
    every round's steady rate. The other shapes are compiled as the default is, not auto."""
    shapes = pools()
    runs: dict[str, list[dict]] = {"default": []}
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        for name in order:
            settings = shapes.get(name, {})
            run = classify_rate(folder, model_dir, f"{out}-{name}-{round_}", precision=precision,
                                **settings)  # fmt: skip
            runs[name].append(run)
            print(precision, "camera", name, run, flush=True)
            if name == "default" and round_ == 0:  # the other shapes, compiled as the default
                for other in (n for n in shapes if n != shape_of(run)):
                    shapes[other]["compile"] = compiled(run["shape"])
                    runs[other] = []
                    order.append(other)
    for name, tried in runs.items():
        middle = sorted(tried, key=lambda run: run["steady"])[len(tried) // 2]
        yield name, {**middle, "steady_rounds": [run["steady"] for run in tried]}


def compiled(shape: dict) -> str:
    """The --compile setting that runs as a run of `shape` (its summary's) ran."""
    return "on" if shape["compile"] else "off"


def shape_of(run: dict | None) -> str | None:
    """ "2x1" for a run of 2 actors of 1 CPU each."""
    return run and f"{run['shape']['actors']}x{run['shape']['cpus_per_actor']:g}"


def decode_rate(folder: str, rounds: int = 3) -> float:
    """Images per second of the product's read, decode and resize (`image_batch`, what a
    model actor does before its model) on one thread, over batches of `folder`."""
    from insectlib.classify.dataset import image_batch
    from insectlib.config import DecodeLimits

    paths = np.array(sorted(os.path.join(folder, n) for n in os.listdir(folder)), dtype=object)
    batches = [paths[i : i + BATCH] for i in range(0, min(len(paths), 4 * BATCH), BATCH)]
    image_batch({"path": batches[0]}, SIZE, DecodeLimits(), None)  # warm-up
    began = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            image_batch({"path": batch}, SIZE, DecodeLimits(), None)
    return rounds * sum(map(len, batches)) / (time.perf_counter() - began)


def plain_loop(folder: str, dtype_name: str) -> float:
    """A user's loop: DataLoader decoding in worker processes, the model on every thread."""
    import torch
    from inference import plain_pytorch  # the same (a)/(b) loop as bench/inference.py

    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    dtype = None if dtype_name == "fp32" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        return plain_pytorch(paths, os.path.join(tmp, "p.parquet"), "cpu", dtype, os.cpu_count())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batches", type=int, default=3, help="model-alone batches per shape")
    ap.add_argument("--precisions", default="", help="default: what this CPU runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="", help="a few words for the page's title")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the shapes on camera JPEGs")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be 1 or more")
    import ray

    from insectlib.config import DecodeLimits
    from insectlib.model import int8_statistics
    from insectlib.model.meta import read_meta

    chosen = args.precisions.split(",") if args.precisions else precisions()
    report: dict = {"benchmark": "shapes", "images": args.images, "model": "vgg16 224 px",
                    "precisions_asked": args.precisions, "label": args.label,
                    "cpu": cpu_name(), "precisions": chosen, "model_alone": {},
                    "plain_loop": {}, "classify": {},
                    "rounds": args.rounds,
                    "steady_method": "the difference of a run with the default settings and "
                    "one of a quarter of its images in the same shape"
                    + ("; on the camera JPEGs the median of the rounds, each in the reverse "
                       "order of the one before" if args.rounds > 1 else "")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = {"camera": camera_jpegs(os.path.join(tmp, "camera"), args.images)}
        photos = insect_photos(os.path.join(tmp, "photos"), args.images)
        if photos:
            data["photos"] = photos
        report["decode_per_core"] = decode_rate(data["camera"])
        print("decode, one thread", report["decode_per_core"], flush=True)
        model_dir = make_model(os.path.join(tmp, "model"))
        int8_model = None
        if "int8" in chosen:
            started = time.perf_counter()
            meta = read_meta(model_dir)
            int8_model = int8_statistics.measure(
                model_dir, meta, data["camera"], BATCH, DecodeLimits()
            )
            report["int8_statistics_seconds"] = time.perf_counter() - started
        for precision in chosen:
            kept = int8_model if precision == "int8" else None
            for compile in (True,) if precision == "int8" else (False, True):
                key = f"{precision} {'compiled' if compile else 'eager'}"
                report["model_alone"][key] = model_alone(
                    model_dir, precision, kept, compile, args.batches
                )
                print(key, report["model_alone"][key], flush=True)
            if precision in ("fp32", "bf16"):
                report["plain_loop"][precision] = plain_loop(data["camera"], precision)
                print("plain", precision, report["plain_loop"][precision], flush=True)
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        for precision in chosen:
            out = os.path.join(tmp, f"out-{precision}")
            for shape, run in camera_shapes(data["camera"], model_dir, out, precision, args.rounds):
                report["classify"][f"{precision} camera {shape}"] = run
            if "photos" in data:  # the shapes are compared on the decoder's worst case
                run = classify_rate(data["photos"], model_dir, out + "-photos", precision=precision)
                report["classify"][f"{precision} photos default"] = run
                print(precision, "photos default", run, flush=True)
    write_result(args.out or result_path("shapes"), report)
    print(machine())


if __name__ == "__main__":
    main()
