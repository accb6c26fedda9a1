"""Listing 100,000 objects under 16 prefixes on a real S3 API (moto server, loopback):
one stream vs parallel listing parts vs a manifest, and when the first paths come out.

    .venv/bin/python bench/s3_listing.py [--objects 100000] [--prefixes 16]

Each way runs as classification reads its input: `inputs.InputSource` read through Ray
Data (a local Ray with 2 CPUs), consumed by the driver as blocks arrive. Measured: seconds
until the first block and until the last, and the ListObjectsV2 / GetObject requests in the
server's access log. Prints a table and writes bench/results/s3_listing.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_result  # noqa: E402

from insectlib import storage  # noqa: E402
from insectlib.data import inputs  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402

BUCKET = "bench-listing"


def read_all(parts: list[inputs.Part], s3) -> dict:
    """Stream the parts through Ray Data as classify does; times to first and last block."""
    import ray
    import ray.data

    from insectlib.classify.dataset import read_inputs, streaming_block_size
    from insectlib.config import ClassifyConfig
    from insectlib.model.meta import ModelMeta
    from insectlib.runtime.progress import RunProgress

    # The block size classify streams a large input with, for a 3-class model.
    cfg = ClassifyConfig(input="in", model="m", output="o", max_actors=2)
    meta = ModelMeta(classes=["a", "b", "c"], arch="vgg16", image_size=224, model_id="0" * 16)
    counter = RunProgress.remote()
    large = inputs.Count(10**9, len("s3://bucket/x/0000001.jpg"))
    ds = read_inputs(parts, 32, s3, counter, streaming_block_size(cfg, meta, large))
    started = time.perf_counter()
    first, rows = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first or time.perf_counter() - started
        rows += batch.num_rows
    return {
        "paths": rows,
        "first_block_seconds": round(first, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "total_from_parts": ray.get(counter.inputs.remote(len(parts))),
    }


def requests_since(log: str, offset: int) -> dict:
    with open(log, errors="replace") as f:
        f.seek(offset)
        lines = f.readlines()
    return {
        "list_requests": sum("list-type=2" in line for line in lines),
        "get_requests": sum('"GET /' in line and "list-type" not in line for line in lines),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "s3_listing.json")
    )
    args = ap.parse_args()
    import ray
    import ray.data

    with tempfile.TemporaryDirectory() as tmp:
        server = MotoServer(os.path.join(tmp, "moto.log"))
        os.environ.update(server.env)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        keys = [f"images/cam{i % args.prefixes:02d}/{i:07d}.jpg" for i in range(args.objects)]
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=b"x"), keys))
        print(f"put {len(keys)} objects in {time.perf_counter() - started:.0f} s", flush=True)
        manifest = f"s3://{BUCKET}/manifest.txt"
        text = "\n".join(f"s3://{BUCKET}/{k}" for k in keys)
        client.put_object(Bucket=BUCKET, Key="manifest.txt", Body=text.encode())
        s3 = storage.S3Options()
        root = f"s3://{BUCKET}/images"
        rows = {}
        try:
            for name, plan in (
                ("one stream", lambda: [inputs.Part("tree", root)]),
                ("parallel parts", lambda: inputs.plan_listing(root, s3)),
                ("manifest", lambda: inputs.plan_manifest(manifest, s3)),
            ):
                offset = os.path.getsize(server._log.name)
                planned = time.perf_counter()
                parts = plan()
                result = {
                    "parts": len(parts),
                    "planning_seconds": round(time.perf_counter() - planned, 2),
                    **read_all(parts, s3),
                }
                result.update(requests_since(server._log.name, offset))
                assert result["paths"] == args.objects == result["total_from_parts"], result
                rows[name] = result
                print(name, result, flush=True)
        finally:
            ray.shutdown()
            server.stop()
    print(f"{'':<15} {'parts':>5} {'plan s':>6} {'first s':>7} {'all s':>6} {'LIST':>5} {'GET':>4}")
    for name, r in rows.items():
        print(
            f"{name:<15} {r['parts']:>5} {r['planning_seconds']:>6} {r['first_block_seconds']:>7} "
            f"{r['seconds']:>6} {r['list_requests']:>5} {r['get_requests']:>4}"
        )
    write_result(
        args.out,
        {
            "benchmark": f"{args.objects} objects under {args.prefixes} prefixes, streamed "
            "through Ray Data as classify reads them",
            "server": "moto (loopback)",
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
