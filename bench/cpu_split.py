"""Where the CPUs go while `insect classify` runs at steady state: a profile of the run by
process, measured from /proc, beside the decode and model cost of one image in an actor.

  by process    every process's CPU seconds (utime + stime, sampled every 0.25 s) between
                the run's first and last Parquet part, grouped by what the process is:
                the model actors (decoding fused in), the driver (this process: Ray Data's
                scheduling loop, and this sampler), Ray's own daemons (raylet, GCS, agents),
                Ray worker processes still starting (default_worker.py, importing), other
                Ray workers (the Parquet writes, the progress actor, listing), and how many
                Ray worker processes were born in the window
  per image     decoding and preprocessing one camera JPEG on one core (`image_batch`), and
                the model on one image in a one-thread actor (`Predictor`, decoded batches)

    .venv/bin/python bench/cpu_split.py [--images 256] [--precision fp32] [--dashboard]
                                        [--kill-idle-workers]

Ray starts as `insect classify` starts it (`init_ray`). As it started before: with
--kill-idle-workers, Ray's default for idle workers (those beyond the free CPUs killed a
second after their task); with --dashboard, plain `ray.init`, which also has that default.

VGG-16 at 224 px, random weights, high-entropy 1024x768 camera JPEGs (bench/shapes.py's).
Writes bench/results/cpu-split-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import tempfile
import threading
import time

from common import result_path, write_result
from shapes import BATCH, SIZE, camera_jpegs, classify_once, make_model, model_rate

from insectlib.model.precision import cpu_name
from insectlib.runtime.connect import IDLE_WORKER_LIMIT, init_ray

TICK = os.sysconf("SC_CLK_TCK")
DAEMONS = ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")
STARTING = "default_worker.py"  # a Ray worker process before it takes a task's name


def kind_of(pid: int, cmdline: str) -> str:
    """What a process is, by its command line (Ray names its workers `ray::<what>`)."""
    if pid == os.getpid():
        return "driver"
    if "Predictor" in cmdline:
        return "model actors"
    if cmdline.startswith("ray::"):
        return "other Ray workers"
    if STARTING in cmdline:
        return "Ray workers starting"
    if "dashboard/dashboard.py" in cmdline or cmdline.startswith("ray-dashboard-"):
        return "Ray dashboard"
    if any(d in cmdline for d in DAEMONS):
        return "Ray daemons"
    return "other"


def worker_name(cmdline: str) -> str | None:
    """What a Ray worker is running (`ray::Write`, `ray::IDLE`, ...), else None."""
    return cmdline.split()[0] if cmdline.startswith("ray::") else None


def cpu_seconds() -> dict[int, tuple[str, str | None, float]]:
    """{pid: (kind, Ray worker's name or None, CPU seconds so far)} of every process."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = int(stat.split("/")[2])
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        found[pid] = (kind_of(pid, cmdline), worker_name(cmdline), seconds)
    return found


class Sampler(threading.Thread):
    """Samples `cpu_seconds` until stopped: [(time, sample)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.samples.append((time.time(), cpu_seconds()))
            self.done.wait(0.25)

    def workers_born(self, start: float, end: float) -> int:
        """Ray worker processes that appeared between `start` and `end`."""
        inside = [s for t, s in self.samples if start <= t <= end]
        if not inside:
            return 0
        first = set(inside[0])
        return len({
            pid
            for sample in inside[1:]
            for pid, (kind, _, _) in sample.items()
            if pid not in first
            and kind not in ("driver", "Ray daemons", "Ray dashboard", "other")
        })  # fmt: skip

    def between(self, start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds spent from `start` to `end` (by the nearest samples) by kind, and by
        Ray worker name; each sample's increase counted under the kind and name the process
        had then (a worker is "starting" until it takes a task's name); a process born in
        the window counts from zero."""
        inside = [s for t, s in self.samples if start <= t <= end]
        used: dict[str, float] = {}
        workers: dict[str, float] = {}
        for before, after in itertools.pairwise(inside):
            for pid, (kind, name, seconds) in after.items():
                spent = seconds - (before[pid][2] if pid in before else 0.0)
                used[kind] = used.get(kind, 0.0) + spent
                if name:
                    workers[name] = workers.get(name, 0.0) + spent
        return used, workers


def parts_window(output: str) -> tuple[float, float]:
    times = sorted(os.path.getmtime(p) for p in glob.glob(os.path.join(output, "*.parquet")))
    return times[0], times[-1]


def decode_seconds(folder: str) -> float:
    """Seconds to read, decode and preprocess one camera JPEG on one core."""
    import numpy as np
    import torch

    from insectlib.classify.dataset import image_batch
    from insectlib.config import DecodeLimits

    torch.set_num_threads(1)
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:64]
    batch = {"path": np.array(paths, dtype=object)}
    image_batch(batch, SIZE, DecodeLimits(), None)  # warm-up
    began = time.perf_counter()
    image_batch(batch, SIZE, DecodeLimits(), None)
    return (time.perf_counter() - began) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--label", default="", help="a word for the page's title: before, after")
    ap.add_argument("--change", default="", help="what the label means, for the page")
    ap.add_argument("--dashboard", action="store_true", help="Ray's dashboard on, as before")
    ap.add_argument(
        "--kill-idle-workers",
        action="store_true",
        help="Ray's default: idle workers beyond the free CPUs killed, as before",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        images = camera_jpegs(os.path.join(tmp, "camera"), args.images)
        model = make_model(os.path.join(tmp, "model"))
        per_image = {
            "decode": decode_seconds(images),
            "model, one thread": 1 / model_rate(model, args.precision, None, 1, False, 2)[0],
        }
        if args.kill_idle_workers:  # Ray's own setting, which init_ray leaves to Ray
            os.environ[IDLE_WORKER_LIMIT] = "-1"
        if args.dashboard:  # as init_ray started a local Ray before
            ray.init(address="local", logging_level="WARNING")
        else:
            init_ray("local")
        sampler = Sampler()
        sampler.start()
        out = os.path.join(tmp, "out")
        # Four parts: a window between the first and the last, and a write task each (one
        # a block would start a worker process each, which the default's 1,000 do not).
        summary, seconds = classify_once(
            images, model, out, precision=args.precision, rows_per_file=args.images // 4
        )
        run = {"whole": summary.inputs / seconds, "seconds": seconds, "shape": summary.shape}
        sampler.done.set()
        sampler.join()
        start, end = parts_window(out)
        used, workers = sampler.between(start, end)
        born = sampler.workers_born(start, end)
    report = {
        "benchmark": "cpu split",
        "label": args.label,
        "change": args.change,
        "images": args.images,
        "model": f"vgg16 {SIZE} px",
        "precision": args.precision,
        "dashboard": args.dashboard,
        "idle_workers_killed": args.kill_idle_workers,
        "batch": BATCH,
        "cpu": cpu_name(),
        "classify": run,
        "window_seconds": end - start,
        "core_seconds": cores * (end - start),
        "cpu_seconds_by_kind": used,
        "cpu_seconds_by_ray_worker": workers,
        "ray_workers_born": born,
        "per_image_seconds": per_image,
    }
    print(report)
    write_result(args.out or result_path("cpu-split"), report)


if __name__ == "__main__":
    main()
