"""Training on a GPU, without Ray: does the feed keep the GPU busy?

    python bench/gpu_train.py [--per-class 400] [--size 1024x768] [--epochs 2]

Runs where only torch, torchvision, Pillow and pyarrow are installed (plus fsspec and
safetensors), as on the project's GPU machine: `worker.TrainingWorker` is plain PyTorch.
On generated camera-sized JPEGs (VGG-16, 224 px, batches of 32, random weights) it
measures, side by side: one core's decode rate (augmented path); the feed alone
(`worker.make_loaders`, no model) with every CPU but one decoding; the model alone on
batches already on the GPU (the rate the feed must reach); and whole epochs of
`TrainingWorker` on CUDA, full forward (augmented) and on cached trunk features.
Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from insectlib.config import TrainConfig  # noqa: E402
from insectlib.data import synthetic  # noqa: E402
from insectlib.data.images import load_image, normalize, train_transform  # noqa: E402
from insectlib.data.labels import discover  # noqa: E402
from insectlib.model.network import apply_freeze, build_model  # noqa: E402
from insectlib.model.precision import autocast, resolve_precision  # noqa: E402
from insectlib.training.worker import TrainingWorker, make_loaders  # noqa: E402


def _write(job: tuple[str, str, int, tuple[int, int]]) -> None:
    path, cls, seed, size = job
    synthetic.make_image(cls, random.Random(seed), size).save(path, quality=90)


def make_data(root: str, per_class: int, size: tuple[int, int]) -> str:
    jobs = []
    for c, cls in enumerate(synthetic.CLASSES):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            jobs.append((os.path.join(root, cls, f"{i:05d}.jpg"), cls, c * 100_000 + i, size))
    with multiprocessing.Pool() as pool:
        pool.map(_write, jobs, chunksize=16)
    return root


def model_alone(cfg: TrainConfig, device: torch.device, freeze: str, steps: int = 30) -> float:
    """Training images/s of the model on random batches already on the device."""
    model = build_model(cfg.arch, 3, "random")
    apply_freeze(model, freeze)
    model = model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    dtype = resolve_precision("auto", device)
    x = torch.randint(0, 255, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), device=device)
    x = normalize(x.to(torch.uint8)).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (cfg.batch_size,), device=device)
    for step in range(steps + 5):
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--steps", type=int, default=30, help="measured steps of the model alone")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "gpu_train.json"))
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = os.cpu_count() or 1
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpus": cpus,
        "images": 3 * args.per_class,
        "image_size_on_disk": args.size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = make_data(os.path.join(tmp, "data"), args.per_class, size)
        print(f"generated {3 * args.per_class} images in {time.perf_counter() - started:.0f} s")
        data = discover(root, val_fraction=0.1, seed=0)
        base = TrainConfig(
            data=root,
            arch=args.arch,
            weights="random",
            gpu=device.type == "cuda",
            epochs=args.epochs,
        ).sized(cpus_per_gpu=cpus)
        result["loader_processes"] = base.loader_workers

        torch.set_num_threads(1)
        files = [u for u, _ in data.train[:100]]
        transform, limits = train_transform(base.image_size), base.limits
        started = time.perf_counter()
        for f in files:
            load_image(f, transform, None, limits)
        one_core = len(files) / (time.perf_counter() - started)
        result["single_core_decode_images_per_second"] = one_core
        result["feed_limit_images_per_second"] = one_core * base.loader_workers
        torch.set_num_threads(cpus)

        # The feed as sized for the GPU, and as before (decoding in the worker's process).
        for processes in (base.loader_workers, 0):
            cfg = TrainConfig(**{**base.__dict__, "loader_workers": processes})
            sampler, loader, _ = make_loaders(cfg, data.train, [], pin_memory=True)
            for epoch in range(2):  # the first starts the processes
                started, n = time.perf_counter(), 0
                sampler.set_epoch(epoch)
                for _images, labels, _skipped in loader:
                    n += len(labels)
            rate = n / (time.perf_counter() - started)
            result[f"feed_alone_{processes}_processes_images_per_second"] = rate
            del loader
        print(json.dumps(result), flush=True)

        for freeze in ("trunk", "none"):
            rate = model_alone(base, device, freeze, args.steps)
            result[f"model_alone_freeze_{freeze}_images_per_second"] = rate
            print(f"model alone, freeze {freeze}: {rate:.0f} img/s", flush=True)

        for name, changes in (
            ("full forward, augmented", {"augment": True}),
            ("cached trunk features", {"augment": False}),
            ("full forward, augmented, decoding in the worker", {"loader_workers": 0}),
        ):
            cfg = TrainConfig(**{**base.__dict__, **changes})
            worker = TrainingWorker(cfg, data.classes, data.train, data.val, device=device)
            epochs = []
            for epoch in range(cfg.epochs):
                metrics = worker.run_epoch(epoch)
                worker.history.append(metrics)
                epochs.append(metrics)
                print(name, metrics, flush=True)
            result[name] = epochs
    result["machine_note"] = "no Ray: TrainingWorker directly, one worker, one GPU"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
