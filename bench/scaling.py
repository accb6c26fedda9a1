"""Classification of N and 4N small generated images: time per image and peak memory.

    .venv/bin/python bench/scaling.py [--n 5000] [--arch vgg16] [--image-size 32]

Each size runs in a fresh process with its own local Ray (2 CPUs), so that peak RSS figures
do not carry over. Measured: the driver's peak RSS (VmHWM), the largest peak RSS of any
one Ray worker process, and the largest sum over all Ray worker processes at one moment
(sampled every 0.2 s from /proc); "steady" is ms per image between the first and the last
Parquet file written (files are written as they fill), without the fixed start-up (actors,
model load, torch.compile). Prints a table and writes bench/results/scaling.json.
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


def one_run(images: str, model: str, out: str, batch_size: int) -> dict:
    """Classify `images` with a fresh local Ray; returns the measurements."""
    import ray

    from insectlib.classify import ClassifyConfig, classify

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    peaks: dict[int, int] = {}
    peak_sum = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            now = ray_worker_rss()
            peak_sum[0] = max(peak_sum[0], sum(now.values()))
            for pid, rss in now.items():
                peaks[pid] = max(peaks.get(pid, 0), rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = classify(ClassifyConfig(input=images, model=model, output=out, batch_size=batch_size))
    stop.set()
    sampler.join()
    ray.shutdown()
    assert summary.rows == summary.inputs, summary
    # Steady state, without the fixed start-up (actors, model load, compilation): files are
    # written as they fill, so rows per second between the first and the last file.
    files = sorted(
        (os.path.getmtime(f), pq.read_metadata(f).num_rows) for f in glob.glob(f"{out}/*.parquet")
    )
    steady = sum(n for _, n in files[1:]) / (files[-1][0] - files[0][0])
    return {
        "images": summary.inputs,
        "seconds": summary.seconds,
        "ms_per_image": 1000 * summary.seconds / summary.inputs,
        "images_per_second": summary.images_per_second,
        "steady_ms_per_image": 1000 / steady,
        "startup_seconds": summary.seconds - summary.inputs / steady,
        "driver_peak_rss_mb": peak_rss_kb() / 1024,
        "worker_peak_rss_mb": max(peaks.values()) / 2**20,
        "workers_peak_total_rss_mb": peak_sum[0] / 2**20,
    }


def make_model(path: str, arch: str, image_size: int) -> None:
    import torch

    from insectlib.model import ModelMeta, build_model, save_model

    torch.manual_seed(0)
    model = build_model(arch, 3, "random")
    save_model(path, model, ModelMeta(classes=["a", "b", "c"], arch=arch, image_size=image_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000, help="the smaller count; the larger is 4N")
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--image-size", type=int, default=32, help="model input size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "scaling.json"))
    ap.add_argument("--one", nargs=3, metavar=("IMAGES", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.batch_size)))
        return

    from insectlib import sample

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model, args.arch, args.image_size)
        for count in (args.n, 4 * args.n):
            images = os.path.join(tmp, f"images-{count}")
            started = time.perf_counter()
            sample.make_unlabelled(images, count=count, size=(48, 36))
            print(f"generated {count} images in {time.perf_counter() - started:.0f} s", flush=True)
            result = subprocess.run(
                [sys.executable, __file__, "--batch-size", str(args.batch_size), "--one",
                 images, model, os.path.join(tmp, f"out-{count}")],
                capture_output=True, text=True, check=True, cwd=REPO,
            )  # fmt: skip
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    small, large = rows
    ratios = {
        "ms_per_image_4n_over_n": large["ms_per_image"] / small["ms_per_image"],
        "steady_ms_per_image_4n_over_n": large["steady_ms_per_image"]
        / small["steady_ms_per_image"],
        "driver_rss_growth": large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"] - 1,
        "worker_rss_growth": large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"] - 1,
        "workers_total_rss_growth": (
            large["workers_peak_total_rss_mb"] / small["workers_peak_total_rss_mb"] - 1
        ),
    }
    header = f"{'images':>8} {'s':>7} {'ms/img':>7} {'steady':>7} {'start s':>7} {'driver MB':>10} "
    header += f"{'worker MB':>10} {'all workers MB':>15}"
    print(header)
    for r in rows:
        print(
            f"{r['images']:>8} {r['seconds']:>7.1f} {r['ms_per_image']:>7.2f} "
            f"{r['steady_ms_per_image']:>7.2f} {r['startup_seconds']:>7.1f} "
            f"{r['driver_peak_rss_mb']:>10.0f} "
            f"{r['worker_peak_rss_mb']:>10.0f} {r['workers_peak_total_rss_mb']:>15.0f}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v:+.1%}" if "growth" in k else f"{k}: {v:.2f}")
    report = {
        "benchmark": "classify N and 4N generated 48x36 JPEG/PNG images, local Ray, 2 CPUs",
        "arch": args.arch,
        "image_size": args.image_size,
        "runs": rows,
        "ratios": ratios,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
