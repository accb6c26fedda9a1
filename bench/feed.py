"""The training feed alone: images per second one training worker receives, beside the
machine's limit measured in the same run.

    .venv/bin/python bench/feed.py [--data ../shared/data/insects/train] [--epochs 2]

The feed is `worker.make_loaders`, exactly as a training worker builds it, with the model
replaced by nothing: the loop only takes each batch. Measured for augmented decoding
(random crops and flips: full decode) and evaluation-style decoding (JPEG draft, as
`--no-augment` and validation use), from local disk and from a moto S3 server on loopback,
with 0 (decoding in the worker's own process), 1 and 2 DataLoader processes. The limit is
the single-core decode rate (the same files through `images.load_image` in one loop, from
local disk) times the cores the feed has (1 for 0 or 1 processes, 2 for 2), or the
source's own read rate (files read as the feed reads them, without decoding) where that
is lower. Writes bench/results/feed.json.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import write_result  # noqa: E402

from insectlib import storage  # noqa: E402
from insectlib.config import TrainConfig  # noqa: E402
from insectlib.data.images import (  # noqa: E402
    eval_transform,
    load_image,
    resize_size,
    train_transform,
)
from insectlib.training.worker import make_loaders  # noqa: E402

BUCKET = "bench-feed"
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "insects", "train")


def single_core_rate(uris: list[str], augment: bool, image_size: int) -> float:
    """Images per second through `load_image` in one loop on one core (local files)."""
    import torch

    torch.set_num_threads(1)
    if augment:
        transform, min_side = train_transform(image_size), None
    else:
        transform, min_side = eval_transform(image_size), resize_size(image_size)
    limits = TrainConfig(data="").limits
    for uri in uris[:20]:  # warm up
        load_image(uri, transform, min_side, limits)
    started = time.perf_counter()
    for uri in uris:
        load_image(uri, transform, min_side, limits)
    return len(uris) / (time.perf_counter() - started)


def read_rate(uris: list[str], s3) -> float:
    """Files per second read (no decoding) the way the feed reads a batch: in order, 16 in
    flight on S3 (`storage.read_inputs`), in batches of 32. What the source alone allows."""
    started = time.perf_counter()
    for i in range(0, len(uris), 32):
        for data in storage.read_inputs(uris[i : i + 32], 2**30, s3):
            assert isinstance(data, bytes)
    return len(uris) / (time.perf_counter() - started)


def feed_rate(items, augment: bool, processes: int, epochs: int, image_size: int, s3) -> dict:
    """Images per second out of the training loader, over `epochs` epochs after a first
    one that starts the processes (persistent, as in training)."""
    cfg = TrainConfig(
        data="",
        augment=augment,
        loader_workers=processes,
        image_size=image_size,
        s3=s3 or storage.S3Options(),
    )
    sampler, loader, _ = make_loaders(cfg, items, [])
    images = 0
    for epoch in range(epochs + 1):
        if epoch == 1:
            started, images = time.perf_counter(), 0
        sampler.set_epoch(epoch)
        for _images, labels, skipped in loader:
            images += len(labels)
            assert not skipped
    return {"images_per_second": images / (time.perf_counter() - started), "images": images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=SHARED, help="folder of class folders of JPEGs")
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs per setting")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "feed.json"))
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "*", "*.jpg")))
    if not files:
        raise SystemExit(f"no JPEGs under {args.data}/<class>/")
    items = [(f, 0) for f in files]

    from PIL import Image

    sizes = sorted(Image.open(f).size for f in files)
    print(f"{len(files)} JPEGs, median size {sizes[len(sizes) // 2]}", flush=True)
    limits = {aug: single_core_rate(files, aug, args.image_size) for aug in (True, False)}
    print(f"single-core decode: {limits}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tests.s3server import MotoServer

        server = MotoServer(os.path.join(tmp, "moto.log"))
        os.environ.update(server.env)
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        s3_items = []
        for f in files:
            key = os.path.relpath(f, args.data)
            with open(f, "rb") as data:
                client.put_object(Bucket=BUCKET, Key=key, Body=data.read())
            s3_items.append((f"s3://{BUCKET}/{key}", 0))
        try:
            for source, source_items in (("local", items), ("s3", s3_items)):
                s3 = storage.S3Options() if source == "s3" else None
                reads = read_rate([u for u, _ in source_items], s3)
                print(f"{source}: {reads:.0f} files/s read, no decoding", flush=True)
                for augment in (True, False):
                    for processes in (0, 1, 2):
                        cores = max(1, processes)
                        # The cores' decode rate, or the source's read rate where lower.
                        limit = min(limits[augment] * cores, reads)
                        r = feed_rate(
                            source_items,
                            augment,
                            processes,
                            args.epochs,
                            args.image_size,
                            s3,
                        )
                        row = {
                            "source": source,
                            "decoding": "augmented" if augment else "evaluation (draft)",
                            "loader_processes": processes,
                            "cores": cores,
                            **r,
                            "source_reads_per_second": reads,
                            "limit_images_per_second": limit,
                            "fraction_of_limit": r["images_per_second"] / limit,
                        }
                        rows.append(row)
                        print(row, flush=True)
        finally:
            server.stop()

    print(f"{'source':<6} {'decoding':<19} {'procs':>5} {'img/s':>7} {'limit':>7} {'of limit':>8}")
    for r in rows:
        print(
            f"{r['source']:<6} {r['decoding']:<19} {r['loader_processes']:>5} "
            f"{r['images_per_second']:>7.1f} {r['limit_images_per_second']:>7.1f} "
            f"{r['fraction_of_limit']:>8.0%}"
        )
    write_result(
        args.out,
        {
            "benchmark": "training feed (worker.make_loaders) with a no-op model, one worker",
            "data": f"{len(files)} JPEGs from {args.data}, median {sizes[len(sizes) // 2]}",
            "image_size": args.image_size,
            "single_core_images_per_second": {
                "augmented": limits[True],
                "evaluation (draft)": limits[False],
            },
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
