"""What decoding for the model costs, the two ways it was made cheaper side by side with the
way before each, in one process, ROUNDS rounds interleaved:

  resize      one image on one thread (`decode` with JPEG draft, then the transform): the
              crop's box alone resized (`eval_transform`, the product's) against
              torchvision's Resize then CenterCrop (the product's before), in ms an image
  ahead       `image_batch` on every core's thread, as a model actor decodes a batch, with
              1 (the product's before), `DECODES_AHEAD` (the product's) and twice that
              many images in flight a thread; images/s

on high-entropy 1024x768 camera JPEGs and the shared insect photos scaled to 1024x768
(bench/shapes.py's), 224 px. Each round runs the ways in the reverse order of the round
before, so that a drift of the machine's speed favours none.

    .venv/bin/python bench/decoding.py [--images 256]

Writes bench/results/decoding-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from common import result_path, write_result
from shapes import BATCH, SIZE, camera_jpegs, insect_photos

from insectlib.classify.dataset import image_batch
from insectlib.config import DecodeLimits
from insectlib.data import images
from insectlib.model.precision import cpu_name

ROUNDS = 6
AHEAD = sorted({1, images.DECODES_AHEAD, 2 * images.DECODES_AHEAD})


def torchvision_transform(image_size: int):
    """The product's transform before: torchvision's Resize then CenterCrop."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            images.limit_aspect,
            v2.Resize(images.resize_size(image_size), antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )


def per_image_ms(datas: list[bytes], transform) -> float:
    """Milliseconds an image of `datas`, decoded and transformed on this thread."""
    began = time.perf_counter()
    for data in datas:
        transform(images.decode(data, images.resize_size(SIZE)))
    return (time.perf_counter() - began) * 1000 / len(datas)


def batch_rate(paths: np.ndarray, ahead: int) -> float:
    """Images per second of `image_batch` on every core, `ahead` images in flight a thread."""
    images.DECODES_AHEAD = ahead  # read by each call
    began = time.perf_counter()
    for i in range(0, len(paths), BATCH):
        image_batch({"path": paths[i : i + BATCH]}, SIZE, DecodeLimits(), None, os.cpu_count())
    return len(paths) / (time.perf_counter() - began)


def measure(folder: str) -> dict:
    """Every round's figures of both comparisons on the images of `folder`."""
    paths = np.array(sorted(os.path.join(folder, n) for n in os.listdir(folder)), dtype=object)
    datas = [open(p, "rb").read() for p in paths]
    transforms = {"torchvision": torchvision_transform(SIZE), "box": images.eval_transform(SIZE)}
    kept = images.DECODES_AHEAD
    resize: dict[str, list[float]] = {name: [] for name in transforms}
    ahead: dict[str, list[float]] = {str(a): [] for a in AHEAD}
    batch_rate(paths[:BATCH], kept)  # warm-up: imports, the page cache
    for round_ in range(ROUNDS):
        order = 1 if round_ % 2 == 0 else -1
        for name, transform in list(transforms.items())[::order]:
            resize[name].append(per_image_ms(datas, transform))
        for a in AHEAD[::order]:
            ahead[str(a)].append(batch_rate(paths, a))
    images.DECODES_AHEAD = kept
    return {"resize_ms": resize, "ahead_rates": ahead}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = {"camera": measure(camera_jpegs(os.path.join(tmp, "camera"), args.images))}
        photos = insect_photos(os.path.join(tmp, "photos"), args.images)
        if photos:
            found["photos"] = measure(photos)
    write_result(
        args.out or result_path("decoding"),
        {
            "benchmark": "decode",
            "images": args.images,
            "image_size": SIZE,
            "rounds": ROUNDS,
            "threads": os.cpu_count(),
            "product_ahead": images.DECODES_AHEAD,
            "cpu": cpu_name(),
            **found,
        },
    )


if __name__ == "__main__":
    main()
