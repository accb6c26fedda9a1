"""Classification speed, end to end (read, decode, preprocess, model, write Parquet), VGG-16 at
224 px on camera-sized JPEGs, measured side by side in one run:

  (a) plain PyTorch, fp32: a DataLoader with workers, torch.no_grad()
  (b) plain PyTorch, the best precision of the hardware: bf16 autocast + channels_last on
      CPUs with bf16 units, fp16/bf16 on a GPU
  (c) `insect classify` on the same files (a local Ray of this machine's CPUs), with
      the default --compile auto (on at this size) and with --compile off
  (c') `insect classify --precision int8` (CPU), calibrated beforehand (timed apart)
  (d) the limit: FLOPs per image / measured matrix-multiply peak in the same precision
  (d') the int8 limit: the same FLOPs at the measured int8 matrix-multiply peak

plus model-only rows (no decoding), single-core decode rates (full and draft), the start-up
of one model actor (load, build, compile, first batch) with --compile on and with int8, and
int8's agreement with fp32 on the shared insect test photos and on generated images (of a
trained model with --agreement-model: near-ties of random weights flip under any rounding).

    .venv/bin/python bench/inference.py [--images 2048] [--device cpu|cuda] [--no-ray]
        [--agreement-model DIR]

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
from dataclasses import asdict

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

from common import in_fresh_process, write_result  # noqa: E402

from insectlib.data.images import decode, eval_transform, resize_size  # noqa: E402
from insectlib.model.meta import ModelMeta, read_meta  # noqa: E402
from insectlib.model.network import build_model, save_model  # noqa: E402

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


def int8_matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Best measured int8 operations/s (int8 x int8 -> int32) of an n x n multiply."""
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        torch._int_mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def start_up(model_dir: str, steps: int = 4, **settings) -> tuple[float, float]:
    """Seconds for one model actor to be ready (load, build (int8: quantize), compile, first
    batch), then the model alone in images/s over `steps` batches of 32. Run it in a fresh
    process, as each actor is: in one process the second model compiled starts about 3 s
    faster (caches the first filled)."""
    from insectlib.model.predictor import Predictor

    batch = np.random.default_rng(0).integers(0, 256, (32, 3, 224, 224), dtype=np.uint8)
    started = time.perf_counter()
    predictor = Predictor(model_dir, compile=True, **settings)
    predictor.probabilities(batch)
    ready = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        predictor.probabilities(batch)
    return ready, 32 * steps / (time.perf_counter() - started)


def agreement(model_dir: str, kept, paths: list[str]) -> dict:
    """int8 against fp32 on `paths`: top-1 agreement and the largest probability difference."""
    from insectlib.model.predictor import Predictor

    size = read_meta(model_dir).image_size
    transform = eval_transform(size)
    images = np.stack(
        [transform(decode(open(p, "rb").read(), resize_size(size))).numpy() for p in paths]
    )
    fp32 = Predictor(model_dir, precision="fp32").probabilities(images)
    int8 = Predictor(model_dir, precision="int8", int8_model=kept).probabilities(images)
    return {
        "images": len(paths),
        "top1_agreement": float((fp32.argmax(1) == int8.argmax(1)).mean()),
        "max_probability_difference": float(np.abs(fp32 - int8).max()),
    }


def int8_rows(
    folder: str, model_dir: str, tmp: str, device: str, no_ray: bool, agreement_model: str | None
) -> dict:
    """Calibration, (c'), start-up and agreement of int8: of `agreement_model` where given
    (random weights leave near-ties that any rounding flips)."""
    from insectlib.config import ClassifyConfig
    from insectlib.data import synthetic
    from insectlib.model import int8_statistics

    meta = read_meta(model_dir)
    calibration = os.path.join(SHARED, "train") if os.path.isdir(SHARED) else folder
    started = time.perf_counter()
    limits = ClassifyConfig(input="", model="", output="").limits
    kept = int8_statistics.measure(model_dir, meta, calibration, 32, limits)
    result = {"calibration_seconds": time.perf_counter() - started, "record": asdict(kept.record)}
    print(f"int8 calibration {result['calibration_seconds']:.0f} s: {kept.record}", flush=True)
    if not no_ray:
        result["c_insect_int8"] = insect_classify(
            folder, model_dir, os.path.join(tmp, "c-int8"), device, "on", "int8"
        )
        print(f"(c') {result['c_insect_int8']:.1f} img/s", flush=True)
    ready = {"compile on (auto precision)": [], "int8": []}
    for _ in range(2):  # alternated, twice: one start-up varies by about a second
        for name, settings in (
            ("compile on (auto precision)", {}),
            ("int8", {"precision": "int8", "int8_model": kept}),
        ):
            seconds, rate = in_fresh_process(start_up, model_dir, **settings)
            ready[name].append(seconds)
            result["model_only_int8" if settings else "model_only_compiled"] = rate
    result["start_up_seconds_each"] = ready
    result["start_up_seconds"] = {name: float(np.mean(each)) for name, each in ready.items()}
    print(f"start-up {ready}", flush=True)
    if agreement_model:  # trained weights: calibrated on its own validation images
        meta = read_meta(agreement_model)
        kept = int8_statistics.measure(agreement_model, meta, None, 32, limits)
        result["agreement_model"] = {
            "model_id": meta.model_id,
            "data": meta.data.get("root"),
            "epochs": len(meta.epochs),
            "validation_accuracy": meta.epochs[-1].get("val_accuracy") if meta.epochs else None,
            "record": asdict(kept.record),
        }
        model_dir = agreement_model
    test = sorted(glob.glob(os.path.join(SHARED, "test", "*", "*.jpg")))
    generated = sorted(synthetic.make_unlabelled(os.path.join(tmp, "generated"), count=180))
    result["agreement"] = {"generated": agreement(model_dir, kept, generated)}
    if test:
        result["agreement"]["shared insect test photos"] = agreement(model_dir, kept, test)
    print(f"agreement {result['agreement']}", flush=True)
    return result


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


def insect_classify(
    folder: str, model_dir: str, out: str, device: str, compile: str, precision: str = "auto"
) -> float:
    import ray

    from insectlib.classify.pipeline import classify
    from insectlib.config import ClassifyConfig

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    started = time.perf_counter()
    summary = classify(
        ClassifyConfig(
            input=folder,
            model=model_dir,
            output=out,
            gpu=device == "cuda",
            compile=compile,
            precision=precision,
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
    ap.add_argument(
        "--agreement-model",
        help="a trained model directory whose meta.json names its data: int8 agreement with "
        "fp32 is measured on it (calibrated on its own validation images; its int8 files are "
        "written there; default: the random-weights VGG-16 of the speed rows)",
    )
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
            for key, compile in (("c_insect", "on"), ("c_insect_no_compile", "off")):
                out = os.path.join(tmp, key)
                rows[key] = insect_classify(folder, model_dir, out, device, compile)
                print(f"{key} {rows[key]:.1f} img/s", flush=True)
        flops = vgg16_flops()
        peak = matmul_peak(device, low or torch.float32)
        rows["d_limit"] = peak / flops
        rows["model_only_fp32"] = model_only(device, None)
        rows["model_only_best"] = model_only(device, low)
        int8 = None
        if device == "cpu":
            int8 = int8_rows(folder, model_dir, tmp, device, args.no_ray, args.agreement_model)
            for key in ("c_insect_int8", "model_only_compiled", "model_only_int8"):
                if key in int8:
                    rows[key] = int8[key]
            int8_peak = int8_matmul_peak()
            rows["d_int8_limit"] = int8_peak / flops
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
    if "c_insect_int8" in rows:
        ratios["c'/c"] = rows["c_insect_int8"] / rows["c_insect"]
        ratios["c'/d'"] = rows["c_insect_int8"] / rows["d_int8_limit"]
    names = {
        "a_plain_fp32": "(a) plain PyTorch fp32, DataLoader",
        "b_plain_best": f"(b) plain PyTorch {low or torch.float32} + channels_last",
        "c_insect": "(c) insect classify (--compile on)",
        "c_insect_int8": "(c') insect classify --precision int8",
        "c_insect_no_compile": "    insect classify --compile off",
        "d_limit": f"(d) limit: {flops / 1e9:.1f} GFLOP/img at {peak / 1e9:.0f} GFLOP/s",
        "model_only_fp32": "model only, fp32",
        "model_only_best": f"model only, {low or torch.float32}",
        "model_only_compiled": "model only, compiled (auto precision)",
        "model_only_int8": "model only, int8 compiled",
    }
    if "d_int8_limit" in rows:
        names["d_int8_limit"] = f"(d') int8 limit at {int8_peak / 1e9:.0f} GOP/s"
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
        "int8_matmul_peak_gops": int8_peak / 1e9 if int8 else None,
        "int8": int8,
        "ratios": ratios,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    out = args.out or os.path.join(REPO, "bench", "results", f"inference-{device}.json")
    write_result(out, report)


if __name__ == "__main__":
    main()
