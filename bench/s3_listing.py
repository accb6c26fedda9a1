"""Listing time for 10,000 and 50,000 tiny objects on a real S3 API (moto server, loopback).

    .venv/bin/python bench/s3_listing.py [--counts 10000 50000]

Prints a table and writes bench/results/s3_listing.json. Counts the ListObjectsV2 requests
in the server's access log: one per 1,000 keys, never one per object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import write_result  # noqa: E402

from insectlib import storage  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "s3_listing.json")
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = MotoServer(os.path.join(tmp, "moto.log"))
        os.environ.update(server.env)
        client = server.client()
        rows = []
        try:
            for count in args.counts:
                bucket = f"bench-{count}"
                client.create_bucket(Bucket=bucket)
                keys = [f"images/{i // 1000:03d}/{i:06d}.jpg" for i in range(count)]
                with ThreadPoolExecutor(32) as pool:
                    list(
                        pool.map(
                            lambda k, b=bucket: client.put_object(Bucket=b, Key=k, Body=b"x"), keys
                        )
                    )
                before = os.path.getsize(server._log.name)
                tracemalloc.start()
                started = time.perf_counter()
                listed = sum(1 for _ in storage.iter_files(f"s3://{bucket}/images"))
                seconds = time.perf_counter() - started
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                with open(server._log.name, errors="replace") as f:
                    f.seek(before)
                    requests = sum("list-type=2" in line for line in f)
                assert listed == count, (listed, count)
                rows.append(
                    {
                        "objects": count,
                        "seconds": round(seconds, 3),
                        "objects_per_second": round(count / seconds),
                        "list_requests": requests,
                        "python_peak_mib": round(peak / 2**20, 2),
                    }
                )
        finally:
            server.stop()
    print(f"{'objects':>8} {'seconds':>8} {'objects/s':>10} {'requests':>9} {'peak MiB':>9}")
    for r in rows:
        print(
            f"{r['objects']:>8} {r['seconds']:>8} {r['objects_per_second']:>10} "
            f"{r['list_requests']:>9} {r['python_peak_mib']:>9}"
        )
    write_result(
        args.out, {"benchmark": "s3_listing", "server": "moto (loopback)", "results": rows}
    )


if __name__ == "__main__":
    main()
