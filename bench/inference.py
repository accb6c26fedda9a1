"""Classification speed, end to end (read, decode, preprocess, model, write Parquet), VGG-16 at
224 px on camera-sized JPEGs, measured side by side in one run:

  (a) plain PyTorch, fp32: a DataLoader with workers, torch.no_grad()
  (b) plain PyTorch, the best precision of the hardware: bf16 autocast + channels_last on
      CPUs with bf16 units, fp16/bf16 on a GPU
  (c) `insect classify` on the same files (a local Ray of this machine's CPUs), with
      the default --compile auto (on at this size) and with --compile off
  (d) the limit: FLOPs per image / measured matrix-multiply peak in the same precision

plus model-only rows (no decoding) and single-core decode rates (full and draft).

    .venv/bin/python bench/inference.py [--images 2048] [--device cpu|cuda] [--no-ray]

Images: the insect photos of ../shared/data/insects scaled up to 1024x768 when present,
else generated ones. Prints a table and writes bench/results/inference-<device>.json.
`--no-ray` runs every row but (c), for machines without Ray (a GPU box).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.utils.flop_counter
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import write_result  # noqa: E402

from insectlib.images import decode, eval_transform, resize_size  # noqa: E402
from insectlib.model import ModelMeta, build_model, save_model  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "insects")
CLASSES = ["beetles", "cockroach", "dragonflies"]


def make_images(folder: str, count: int, size=(1024, 768)) -> str:
    """`count` JPEGs of `size`: real insect photos scaled up where available."""
    os.makedirs(folder, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(SHARED, "*", "*", "*.jpg")))
    rng = np.random.default_rng(0)
    for i in range(count):
        if sources:
            image = Image.open(sources[i * 7 % len(sources)]).convert("RGB")
            image = image.resize(size, Image.LANCZOS)
        else:
            noise = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            image = Image.fromarray(noise).resize(size, Image.BICUBIC)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return "real insect photos" if sources else "generated"


class Files(Dataset):
    """What a user writes: open, convert, the torchvision reference transform."""

    def __init__(self, paths):
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), self.paths[i]


def plain_pytorch(paths, out: str, device: str, dtype: torch.dtype | None, workers: int) -> float:
    """(a) with dtype None, (b) with a low precision dtype; returns images per second."""
    started = time.perf_counter()
    model = torchvision.models.vgg16(num_classes=len(CLASSES)).eval().to(device)
    if dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        Files(paths), batch_size=32, num_workers=workers, pin_memory=device == "cuda"
    )
    rows = {"path": [], "label": [], "probabilities": []}
    with torch.no_grad():
        for x, names in loader:
            x = x.to(device, non_blocking=True)
            if dtype is None:
                logits = model(x)
            else:
                with torch.autocast(device, dtype=dtype):
                    logits = model(x.contiguous(memory_format=torch.channels_last))
            probs = torch.softmax(logits.float(), 1).cpu().numpy()
            rows["path"] += list(names)
            rows["label"] += [CLASSES[i] for i in probs.argmax(1)]
            rows["probabilities"] += probs.tolist()
    pq.write_table(pa.table(rows), out)
    return len(paths) / (time.perf_counter() - started)


def model_only(device: str, dtype: torch.dtype | None, batch: int = 32, steps: int = 4) -> float:
    """The model alone on random input: images per second."""
    model = torchvision.models.vgg16(num_classes=len(CLASSES)).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    if dtype is not None:
        model, x = (t.to(memory_format=torch.channels_last) for t in (model, x))

    def step():
        with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32,
                                             enabled=dtype is not None):  # fmt: skip
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best measured FLOP/s of an n x n matrix multiply."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def vgg16_flops() -> float:
    model = torchvision.models.vgg16(num_classes=len(CLASSES)).eval()
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    return float(counter.get_total_flops())


def decode_rates(paths) -> dict[str, float]:
    """Single-thread decode + resize + crop rates, full resolution and JPEG draft."""
    torch.set_num_threads(1)
    transform = eval_transform(224)
    data = [open(p, "rb").read() for p in paths[:64]]
    rates = {}
    for name, min_side in (("full", None), ("draft", resize_size(224))):
        started = time.perf_counter()
        for d in data:
            transform(decode(d, min_side))
        rates[name] = len(data) / (time.perf_counter() - started)
    torch.set_num_threads(os.cpu_count() or 1)
    return rates


def insect_classify(folder: str, model_dir: str, out: str, device: str, compile: str) -> float:
    import ray

    from insectlib.classify import classify
    from insectlib.config import ClassifyConfig

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    started = time.perf_counter()
    summary = classify(
        ClassifyConfig(
            input=folder, model=model_dir, output=out, gpu=device == "cuda", compile=compile
        )
    )
    seconds = time.perf_counter() - started
    assert summary.rows == summary.inputs
    return summary.inputs / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-ray", action="store_true", help="skip (c): for machines without Ray")
    ap.add_argument("--out", help="JSON path (default bench/results/inference-<device>.json)")
    args = ap.parse_args()
    device = args.device
    low = torch.bfloat16
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        low = torch.float16
    if device == "cpu" and "bf16" not in open("/proc/cpuinfo").read():
        low = None  # no fast low precision: (b) is fp32 with channels_last

    tmp = tempfile.mkdtemp()
    try:
        folder = os.path.join(tmp, "images")
        source = make_images(folder, args.images)
        paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
        model_dir = os.path.join(tmp, "model")
        torch.manual_seed(0)
        save_model(
            model_dir,
            build_model("vgg16", len(CLASSES), "random"),
            ModelMeta(classes=CLASSES, arch="vgg16", image_size=224),
        )
        rows = {}
        print(f"{len(paths)} {source} JPEGs of 1024x768 on {device}", flush=True)
        rows["a_plain_fp32"] = plain_pytorch(
            paths, os.path.join(tmp, "a.parquet"), device, None, args.loader_workers
        )
        print(f"(a) {rows['a_plain_fp32']:.1f} img/s", flush=True)
        rows["b_plain_best"] = plain_pytorch(
            paths, os.path.join(tmp, "b.parquet"), device, low, args.loader_workers
        )
        print(f"(b) {rows['b_plain_best']:.1f} img/s", flush=True)
        if not args.no_ray:
            for key, compile in (("c_insect", "auto"), ("c_insect_no_compile", "off")):
                out = os.path.join(tmp, key)
                rows[key] = insect_classify(folder, model_dir, out, device, compile)
                print(f"{key} {rows[key]:.1f} img/s", flush=True)
        flops = vgg16_flops()
        peak = matmul_peak(device, low or torch.float32)
        rows["d_limit"] = peak / flops
        rows["model_only_fp32"] = model_only(device, None)
        rows["model_only_best"] = model_only(device, low)
        decode = decode_rates(paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratios = {"b/a": rows["b_plain_best"] / rows["a_plain_fp32"]}
    if "c_insect" in rows:
        ratios.update(
            {
                "c/a": rows["c_insect"] / rows["a_plain_fp32"],
                "c/b": rows["c_insect"] / rows["b_plain_best"],
                "c/d": rows["c_insect"] / rows["d_limit"],
            }
        )
    names = {
        "a_plain_fp32": "(a) plain PyTorch fp32, DataLoader",
        "b_plain_best": f"(b) plain PyTorch {low or torch.float32} + channels_last",
        "c_insect": "(c) insect classify (--compile auto: on)",
        "c_insect_no_compile": "    insect classify --compile off",
        "d_limit": f"(d) limit: {flops / 1e9:.1f} GFLOP/img at {peak / 1e9:.0f} GFLOP/s",
        "model_only_fp32": "model only, fp32",
        "model_only_best": f"model only, {low or torch.float32}",
    }
    print(f"\n{'end to end, VGG-16 224 px, 1024x768 JPEGs':<52} {'img/s':>8}")
    for key, value in rows.items():
        print(f"{names[key]:<52} {value:>8.1f}")
    print(f"{'decode+resize, 1 core, full resolution':<52} {decode['full']:>8.1f}")
    print(f"{'decode+resize, 1 core, JPEG draft':<52} {decode['draft']:>8.1f}")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    report = {
        "benchmark": "VGG-16 224 px classification, end to end, 1024x768 JPEGs",
        "images": len(paths),
        "source": source,
        "device": device,
        "gpu": gpu,
        "low_precision": str(low) if low else None,
        "images_per_second": rows,
        "decode_images_per_second_per_core": decode,
        "gflop_per_image": flops / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "ratios": ratios,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    out = args.out or os.path.join(REPO, "bench", "results", f"inference-{device}.json")
    write_result(out, report)


if __name__ == "__main__":
    main()
