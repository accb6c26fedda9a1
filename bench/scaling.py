"""Classification at 10k, 100k and 1M inputs: time to the first file, steady cost, memory.

    .venv/bin/python bench/scaling.py [--sizes 10000,100000,1000000] [--arch resnet18]
        [--image-size 32] [--resume-left 1000]

The inputs are hard links to 300 distinct small generated images, 1,000 to a folder (the
paths are distinct, the content is not: a million inputs fit on a small disk). The model is
small (resnet18 at 32 px by default) so that the pipeline, not the model, is measured.
Each size runs in a fresh process with its own local Ray (2 CPUs), so that peak RSS figures
do not carry over. Measured: seconds to the first Parquet file, the driver's peak RSS
(VmHWM), the largest peak RSS of any one Ray worker process, and the largest sum over all
Ray worker processes at one moment (sampled every 0.2 s from /proc); "steady" is ms per
image between the first and the last Parquet file written (files are written as they
fill). Then a resume of the largest size with --resume-left inputs lacking a row: seconds
until its first new file (the anti-join deciding what is left, then the first batch) and
the driver's peak RSS. Prints a table and writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import write_result  # noqa: E402


def ray_worker_rss() -> dict[int, int]:
    """{pid: RSS bytes} of this machine's Ray worker processes (titles start with ray::)."""
    rss = {}
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = cmdline.split("/")[2]
        try:
            with open(cmdline, "rb") as f:
                if not f.read(5) == b"ray::":
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss[int(pid)] = int(line.split()[1]) * 1024
        except OSError:  # gone meanwhile
            continue
    return rss


def peak_rss_kb() -> int:
    """This process's peak RSS. Not getrusage: its maxrss survives fork+exec, so a child
    would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def one_run(images: str, model: str, out: str, batch_size: int, resume: bool) -> dict:
    """Classify `images` with a fresh local Ray; returns the measurements."""
    import ray

    from insectlib.classify.pipeline import classify
    from insectlib.config import ClassifyConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    peaks: dict[int, int] = {}
    peak_sum = [0]
    first_file: list[float] = []
    before = set(glob.glob(f"{out}/*.parquet"))
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            now = ray_worker_rss()
            peak_sum[0] = max(peak_sum[0], sum(now.values()))
            for pid, rss in now.items():
                peaks[pid] = max(peaks.get(pid, 0), rss)
            if not first_file and set(glob.glob(f"{out}/*.parquet")) - before:
                first_file.append(time.perf_counter())

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    cfg = ClassifyConfig(input=images, model=model, output=out, batch_size=batch_size)
    cfg.resume = resume
    phases = timed_phases()
    summary = classify(cfg)
    stop.set()
    sampler.join()
    ray.shutdown()
    assert summary.rows == summary.inputs, summary
    # Steady state, without the fixed start-up (actors, model load): files are written as
    # they fill, so rows per second between the first and the last new file.
    files = sorted(
        (os.path.getmtime(f), pq.read_metadata(f).num_rows)
        for f in set(glob.glob(f"{out}/*.parquet")) - before
    )
    rows = sum(n for _, n in files)
    steady = sum(n for _, n in files[1:]) / max(1e-9, files[-1][0] - files[0][0])
    return {
        "images": summary.inputs,
        "classified": rows,
        "resumed": resume,
        "seconds": summary.seconds,
        "first_file_seconds": (first_file or [time.perf_counter()])[0] - started,
        "ms_per_image": 1000 * summary.seconds / rows,
        "steady_ms_per_image": 1000 / steady if len(files) > 1 else None,
        "driver_peak_rss_mb": peak_rss_kb() / 1024,
        "worker_peak_rss_mb": max(peaks.values()) / 2**20,
        "workers_peak_total_rss_mb": peak_sum[0] / 2**20,
        **phases,
    }


def timed_phases() -> dict:
    """Seconds spent in the resume's two decisions, filled in as classify runs: checking
    the written parts (footers only) and the anti-join finding what is left."""
    from insectlib.classify import dataset, outputs

    phases: dict = {}

    def timing(module, name: str, key: str) -> None:
        real = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = real(*args, **kwargs)
            phases[key] = time.perf_counter() - started
            return result

        setattr(module, name, timed)

    timing(outputs, "resume_state", "resume_footers_seconds")
    timing(dataset, "cut", "resume_anti_join_seconds")  # it runs skip_done's lazy join
    return phases


def link_tree(root: str, distinct: list[str], count: int) -> None:
    """`count` inputs under `root`, 1,000 to a folder, hard links to the `distinct` files."""
    for i in range(count):
        folder = os.path.join(root, f"d{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(folder, exist_ok=True)
        source = distinct[i % len(distinct)]
        os.link(source, os.path.join(folder, f"{i:07d}{os.path.splitext(source)[1]}"))


def hide(root: str, count: int) -> int:
    """Delete the last `count` parts' worth of rows from an output: the interrupted run."""
    files = sorted(glob.glob(f"{root}/*.parquet"), key=os.path.getmtime)
    removed = 0
    while removed < count:
        f = files.pop()
        removed += pq.read_metadata(f).num_rows
        os.remove(f)
    os.remove(os.path.join(root, "_SUCCESS"))
    return removed


def make_model(path: str, arch: str, image_size: int) -> None:
    import torch

    from insectlib.model.meta import ModelMeta
    from insectlib.model.network import build_model, save_model

    torch.manual_seed(0)
    model = build_model(arch, 3, "random")
    save_model(path, model, ModelMeta(classes=["a", "b", "c"], arch=arch, image_size=image_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32, help="model input size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resume-left", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "scaling.json"))
    ap.add_argument("--one", nargs=4, metavar=("IMAGES", "MODEL", "OUT", "RESUME"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    if args.one:
        images, model, out, resume = args.one
        print(json.dumps(one_run(images, model, out, args.batch_size, resume == "1")))
        return

    from insectlib.data import synthetic

    def run(images, model, out, resume=False):
        result = subprocess.run(
            [sys.executable, __file__, "--batch-size", str(args.batch_size), "--one",
             images, model, out, "1" if resume else "0"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        return row

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        model = os.path.join(tmp, "model")
        make_model(model, args.arch, args.image_size)
        distinct = sorted(
            synthetic.make_unlabelled(os.path.join(tmp, "distinct"), count=300, size=(48, 36))
        )
        for count in (int(n) for n in args.sizes.split(",")):
            images = os.path.join(tmp, f"images-{count}")
            started = time.perf_counter()
            link_tree(images, distinct, count)
            print(f"linked {count} inputs in {time.perf_counter() - started:.0f} s", flush=True)
            out = os.path.join(tmp, f"out-{count}")
            rows.append(run(images, model, out))
        removed = hide(out, args.resume_left)
        resumed = run(images, model, out, resume=True)
        assert resumed["classified"] == removed, (resumed, removed)

    small, large = rows[0], rows[-1]
    ratios = {
        "first_file_largest_over_smallest": large["first_file_seconds"]
        / small["first_file_seconds"],
        "steady_ms_per_image_largest_over_smallest": large["steady_ms_per_image"]
        / small["steady_ms_per_image"],
        "driver_rss_growth": large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1,
        "worker_rss_growth": large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"] - 1,
    }
    header = f"{'images':>8} {'s':>7} {'first s':>7} {'steady':>7} {'driver MB':>10} "
    header += f"{'worker MB':>10} {'all workers MB':>15}"
    print(header)
    for r in [*rows, resumed]:
        print(
            f"{r['images']:>8} {r['seconds']:>7.1f} {r['first_file_seconds']:>7.1f} "
            f"{r['steady_ms_per_image'] or 0:>7.2f} {r['driver_peak_rss_mb']:>10.0f} "
            f"{r['worker_peak_rss_mb']:>10.0f} {r['workers_peak_total_rss_mb']:>15.0f}"
            + (" (resume)" if r["resumed"] else "")
        )
    for k, v in ratios.items():
        print(f"{k}: {v:+.1%}" if "growth" in k else f"{k}: {v:.2f}")
    report = {
        "benchmark": "classify N inputs (hard links to 300 generated 48x36 images, 1,000 a "
        "folder), local Ray, 2 CPUs; then resume the largest with some rows missing",
        "arch": args.arch,
        "image_size": args.image_size,
        "runs": rows,
        "resume": resumed,
        "ratios": ratios,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
