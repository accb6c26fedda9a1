"""Training time with the frozen trunk's features cached against the full forward every epoch,
side by side in one run (VGG-16, 224 px, no augmentation, 4 epochs), plus training images
per second for 1 and 2 workers.

    .venv/bin/python bench/train.py [--data ROOT] [--epochs 4] [--image-size 224]

Data: ../shared/data/insects (the reference article's photos) when present, else a
generated sample. Weights: ImageNet when in the torch hub cache, else random (then the
accuracy only shows that both ways learn the same). Prints a table and writes
bench/results/train.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ray  # noqa: E402
from common import write_result  # noqa: E402

from insectlib.config import TrainConfig  # noqa: E402
from insectlib.data import synthetic  # noqa: E402
from insectlib.training.trainer import fit  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "insects")


def weights_available() -> str:
    import torchvision

    try:
        torchvision.models.get_model_weights("vgg16").IMAGENET1K_V1.get_state_dict(
            progress=False, check_hash=False
        )
        return "imagenet"
    except Exception:  # not cached, no network
        return "random"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=SHARED if os.path.isdir(SHARED) else None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train.json"))
    args = ap.parse_args()
    weights = weights_available()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthetic.make_labelled(os.path.join(tmp, "data"), per_class=100)
        runs = {
            # name: (workers, cache_features, epochs)
            "full forward, 2 workers": (2, False, args.epochs),
            "cached features, 2 workers": (2, True, args.epochs),
            "full forward, 1 worker": (1, False, 1),
        }
        results = {}
        for name, (workers, cache, epochs) in runs.items():
            started = time.perf_counter()
            meta = fit(
                TrainConfig(
                    data=data,
                    output=os.path.join(tmp, name.replace(" ", "-").replace(",", "")),
                    weights=weights,
                    image_size=args.image_size,
                    augment=False,
                    cache_features=cache,
                    epochs=epochs,
                    workers=workers,
                    cpus_per_worker=2 / workers,
                    storage=os.path.join(tmp, "runs"),
                )
            )
            seconds = time.perf_counter() - started
            results[name] = {
                "workers": workers,
                "cached_features": cache,
                "epochs": epochs,
                "seconds": seconds,
                "epoch_seconds": [e["seconds"] for e in meta.epochs],
                "first_epoch_images_per_second": meta.epochs[0]["images_per_second"],
                "val_accuracy": meta.epochs[-1]["val_accuracy"],
                "train_images": meta.epochs[0]["train_images"],
                "val_images": meta.epochs[0]["val_images"],
            }
    ray.shutdown()

    full, cached = results["full forward, 2 workers"], results["cached features, 2 workers"]
    ratio = cached["seconds"] / full["seconds"]
    print(f"\n{'VGG-16 ' + str(args.image_size) + ' px, ' + weights + ' weights':<30} "
          f"{'epochs':>6} {'total s':>8} {'img/s ep1':>10} {'val acc':>8}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:<30} {r['epochs']:>6} {r['seconds']:>8.1f} "
            f"{r['first_epoch_images_per_second']:>10.1f} {r['val_accuracy']:>8.3f}"
        )
    print(f"cached / full forward time for {args.epochs} epochs: {ratio:.2f}")
    report = {
        "benchmark": f"fine-tune VGG-16 head, {args.epochs} epochs, no augmentation",
        "data": "reference insect photos" if args.data == SHARED else (args.data or "generated"),
        "weights": weights,
        "image_size": args.image_size,
        "runs": results,
        "cached_over_full_time": ratio,
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
