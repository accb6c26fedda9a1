"""What a Ray Data block costs the driver: the classification pipeline's shape (a listing
source yielding batches of paths, an actor pool returning a batch of prediction-like rows,
Parquet written) with the model replaced by nothing, at three block sizes.

    .venv/bin/python bench/blocks.py [--rows 50000]

Ray Data cuts every stage's output at one target_max_block_size. Streaming the listing
needs small blocks; with one batch of *paths* a block (what classify used for every input
before), each 32-row batch of predictions came out as 4 blocks of 8 rows. Measured per
size, each in a fresh process: seconds, and the driver's RSS growth after start-up (peak
minus the RSS 6 s in). Writes bench/results/blocks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_result  # noqa: E402

TASKS = 16
SIZES = {
    "one batch of paths (1 kB): before": 32 * 32,
    "one batch of predictions (4 kB): now": 4096,
    "eight batches of predictions (32 kB)": 32768,
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one(block_bytes: int, rows: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Paths(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, **kwargs):
            def read(k):
                for i in range(k * rows // TASKS // 32, (k + 1) * rows // TASKS // 32):
                    paths = [f"/data/images/d{i:05d}/{j:07d}.jpg" for j in range(32)]
                    yield pa.table({"path": paths})

            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda k=k: read(k), meta) for k in range(TASKS)]

    class Predictions:
        def __call__(self, batch):
            n = len(batch["path"])
            return {
                "path": batch["path"],
                "label": np.array(["beetles"] * n),
                "score": np.ones(n, np.float32),
                "probabilities": list(np.ones((n, 3), np.float32)),
                "model": np.array(["0123456789abcdef"] * n),
            }

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.target_max_block_size = block_bytes
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1):
            samples.append(rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    ds = ray.data.read_datasource(Paths(), num_cpus=0, concurrency=TASKS)
    ds = ds.map_batches(
        Predictions, batch_size=32, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1
    )
    with tempfile.TemporaryDirectory() as out:
        ds.write_parquet(out, min_rows_per_file=1000, ray_remote_args={"num_cpus": 0})
    seconds = time.perf_counter() - started
    stop.set()
    return {
        "block_bytes": block_bytes,
        "rows": rows,
        "seconds": seconds,
        "driver_rss_growth_mb": max(samples) - samples[min(5, len(samples) - 1)],
        "driver_peak_rss_mb": max(samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "blocks.json")
    )
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows)))
        return
    results = {}
    for name, size in SIZES.items():
        done = subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--one", str(size)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    print(f"{'block size':<40} {'s':>6} {'driver +MB':>10}")
    for name, r in results.items():
        print(f"{name:<40} {r['seconds']:>6.1f} {r['driver_rss_growth_mb']:>10.0f}")
    write_result(
        args.out,
        {
            "benchmark": f"{args.rows} rows: listing source -> 2 actors (no model) -> Parquet, "
            "local Ray, 2 CPUs, by Ray Data block size",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
