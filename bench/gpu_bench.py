"""The pieces of the GPU check (bench/gpu_check.sh), one subcommand each; each writes a
JSON fragment into --work, and `report` joins them into one result.

    python bench/gpu_bench.py data --work W [--distinct 3000] [--inputs 20000]
    python bench/gpu_bench.py model --work W            # the model alone: the ceilings
    python bench/gpu_bench.py decode --work W --model M [--photos DIR]
    python bench/gpu_bench.py sample --work W &         # CPU and GPU load, until killed
    python bench/gpu_bench.py phase --work W NAME start|end
    python bench/gpu_bench.py report --work W --out FILE

`model` times VGG-16 (224 px, bf16) on batches already on the device: inference through
`Predictor` (eager and compiled, batches of 32 and 128) and training steps as
bench/gpu_train.py times them (full fine-tune and frozen trunk). `decode` compares JPEG
decoding on the device with the CPU path: the same error rows on the hostile corpus and on
every kind of file, and the model's top-1 agreement on generated camera-size photos and on
the insect photos. `report` adds the classify and train runs' rates (steady state: rows of
the Parquet parts written after the first one, over the time between the first and the
last) and each phase's CPU cores, GPU utilisation and GPU memory. With INSECT_GPU_CHECK_CPU
set, every device is the CPU (a dry run of the script's logic).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from insectlib.data import synthetic  # noqa: E402

DEVICE = "cpu" if os.environ.get("INSECT_GPU_CHECK_CPU") else "cuda"


def _fragment(work: str, name: str, values: dict) -> None:
    """Merge `values` into the fragment `name`.json of `work`."""
    path = os.path.join(work, f"{name}.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    with open(path, "w") as f:
        json.dump({**old, **values}, f, indent=2)


def _write_photo(job: tuple[str, str, int, tuple[int, int]]) -> None:
    path, cls, seed, size = job
    synthetic.make_image(cls, random.Random(seed), size).save(path, quality=90)


def make_data(args) -> None:
    """A labelled tree (train/ and val/, 10% held out) of `--distinct` generated photos,
    and a flat folder of `--inputs` hard links to them to classify."""
    size = tuple(int(v) for v in args.size.split("x"))
    root, jobs = os.path.join(args.work, "labelled"), []
    for i in range(args.distinct):
        cls = synthetic.CLASSES[i % 3]
        split = "val" if i % 10 == 9 else "train"
        os.makedirs(os.path.join(root, split, cls), exist_ok=True)
        jobs.append((os.path.join(root, split, cls, f"{i:06d}.jpg"), cls, i, size))
    started = time.perf_counter()
    with multiprocessing.Pool() as pool:
        pool.map(_write_photo, jobs, chunksize=16)
    flat = os.path.join(args.work, "inputs")
    os.makedirs(flat, exist_ok=True)
    for i in range(args.inputs):
        os.link(jobs[i % len(jobs)][0], os.path.join(flat, f"{i:07d}.jpg"))
    megabytes = sum(os.path.getsize(j[0]) for j in jobs) / 1e6
    _fragment(args.work, "data", {
        "distinct_images": len(jobs), "classify_inputs": args.inputs,
        "image_size_on_disk": args.size, "megabytes_on_disk": round(megabytes, 1),
        "seconds_to_generate": round(time.perf_counter() - started, 1),
    })  # fmt: skip


def _timed(fn, steps: int) -> float:
    """Seconds per call of `fn` over `steps` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def model_alone(args) -> None:
    """Inference images/s of a model directory's model on uint8 batches already on the
    device (`Predictor.predict`), and training images/s of VGG-16 (gpu_train's)."""
    from bench.gpu_train import model_alone as train_alone
    from insectlib.config import TrainConfig
    from insectlib.model.predictor import Predictor

    rates = {}
    for batch, compile in ((32, False), (128, False), (32, True))[: 2 if args.no_compile else 3]:
        predictor = Predictor(args.model, DEVICE, "auto", compile=compile, batch_size=batch)
        size = predictor.meta.image_size
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=DEVICE)
        seconds = _timed(lambda p=predictor, x=x: p.predict(x), args.steps)
        key = "model_only" + ("_compiled" if compile else "")
        key += "" if batch == 32 else f"_batch_{batch}"
        rates[key] = batch / seconds
        print(key, round(rates[key]), flush=True)
        del predictor
    cfg = TrainConfig(
        data="-", weights="random", gpu=DEVICE == "cuda", image_size=args.image_size,
        arch=args.arch,
    )  # fmt: skip
    for freeze, key in (("none", "train_model_only_full"), ("trunk", "train_model_only_frozen")):
        rates[key] = train_alone(cfg, torch.device(DEVICE), freeze, args.steps)
        print(key, round(rates[key]), flush=True)
    _fragment(args.work, "model", {"images_per_second": rates})


def decode_check(args) -> None:
    """The device decoder against the CPU path: error rows, pixels, top-1 agreement."""
    from insectlib.config import DecodeLimits
    from insectlib.data import device_decode
    from insectlib.data.images import eval_transform, load_images, resize_size
    from insectlib.errors import ImageError
    from insectlib.model.predictor import Predictor
    from tests.fuzz import hostile_files
    from tests.test_gpu_path import kinds_of_files

    limits = DecodeLimits(max_pixels=10_000_000)  # as the tests: the huge-header file fails
    predictor = Predictor(args.model, DEVICE, "auto")
    size = predictor.meta.image_size
    folder = os.path.join(args.work, "hostile")
    os.makedirs(folder, exist_ok=True)
    files = {**{n: d for n, (d, _) in kinds_of_files().items()}, **hostile_files(2100)}
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    sets = {"hostile_and_kinds": sorted(glob.glob(os.path.join(folder, "*")))}
    generated = sorted(glob.glob(os.path.join(args.work, "labelled", "*", "*", "*.jpg")))
    sets["generated"] = generated[: args.agreement_images]
    if args.photos and os.path.isdir(args.photos):
        pattern = os.path.join(args.photos, "**", "*.jpg")
        sets["insect_photos"] = sorted(glob.glob(pattern, recursive=True))
    transform, min_side = eval_transform(size), resize_size(size)
    result = {}
    for name, paths in sets.items():
        result[name] = _compare(
            paths, size, limits, predictor, device_decode, ImageError,
            lambda p: load_images(p, transform, min_side, limits),
        )  # fmt: skip
        print(name, result[name], flush=True)
    _fragment(args.work, "decode", result)


def _compare(paths, size, limits, predictor, device_decode, image_error, cpu_path) -> dict:
    """Rows equal, device-decoded share, pixel difference and top-1 agreement for `paths`,
    in batches of 64."""
    same = decoded = agree = rows = 0
    diffs = []
    for start in range(0, len(paths), 64):
        batch = paths[start : start + 64]
        cpu = list(cpu_path(batch))
        images, errors = device_decode.load_batch(batch, size, limits, DEVICE)
        expected = [str(c) if isinstance(c, image_error) else None for c in cpu]
        same += sum(a == b for a, b in zip(errors, expected, strict=True))
        ok = [i for i, e in enumerate(expected) if e is None and errors[i] is None]
        rows += len(batch)
        if not ok:
            continue
        host = torch.stack([cpu[i] for i in ok])
        device_images = images[ok]
        diffs.append((device_images.cpu().int() - host.int()).abs().float().mean().item())
        agree += int((predictor.probabilities(host).argmax(1)
                      == predictor.probabilities(device_images).argmax(1)).sum())  # fmt: skip
        decoded += len(ok)
    eligible = sum(
        device_decode.device_jpeg(open(p, "rb").read(), limits) is not None for p in paths
    )
    return {
        "files": rows, "rows_equal": same, "decoded": decoded,
        "device_decoded_share": eligible / max(1, rows),
        "mean_pixel_difference": sum(diffs) / max(1, len(diffs)),
        "top1_agreement": agree / max(1, decoded),
    }  # fmt: skip


def sample(args) -> None:
    """Every 0.25 s until killed: time, busy CPU cores (/proc/stat), GPU utilisation (%) and
    GPU memory used (GiB), as JSON lines in WORK/samples.jsonl."""
    gpu = _gpu_reader()
    last = _cpu_times()
    with open(os.path.join(args.work, "samples.jsonl"), "a") as out:
        while True:
            time.sleep(0.25)
            now = _cpu_times()
            busy = (now[0] - last[0]) / max(1e-9, now[1] - last[1]) * (os.cpu_count() or 1)
            last = now
            util, memory = gpu()
            line = {"t": time.time(), "cpu_cores": busy, "gpu_util": util, "gpu_gib": memory}
            out.write(json.dumps(line) + "\n")
            out.flush()


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _gpu_reader():
    """A function returning (utilisation %, memory used GiB) of GPU 0, or (None, None)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def read():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
            return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, memory

        return read
    except Exception:
        return lambda: (None, None)


def phase(args) -> None:
    """Mark the start or end of a phase (a step of the check) in WORK/phases.jsonl."""
    with open(os.path.join(args.work, "phases.jsonl"), "a") as f:
        f.write(json.dumps({"phase": args.name, "mark": args.mark, "t": time.time()}) + "\n")


def phase_loads(work: str) -> dict:
    """Each phase's seconds, mean busy CPU cores, mean GPU utilisation and peak GPU memory."""
    marks, loads = {}, {}
    for line in open(os.path.join(work, "phases.jsonl")):
        m = json.loads(line)
        marks.setdefault(m["phase"], {})[m["mark"]] = m["t"]
    path = os.path.join(work, "samples.jsonl")
    samples = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    for name, m in marks.items():
        if "end" not in m:
            loads[name] = {"finished": False}
            continue
        inside = [s for s in samples if m["start"] <= s["t"] <= m["end"]]
        util = [s["gpu_util"] for s in inside if s["gpu_util"] is not None]
        memory = [s["gpu_gib"] for s in inside if s["gpu_gib"] is not None]
        loads[name] = {
            "seconds": round(m["end"] - m["start"], 1),
            "cpu_cores": round(sum(s["cpu_cores"] for s in inside) / max(1, len(inside)), 2),
            "gpu_util_percent": round(sum(util) / len(util), 1) if util else None,
            "gpu_memory_gib_peak": round(max(memory), 2) if memory else None,
        }
    return loads


def classify_rate(output: str) -> dict:
    """Steady-state images/s of a classify output (see the module's docstring), its total
    images/s from _summary.json, and its rows and errors."""
    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(output, "*.parquet")), key=os.path.getmtime)
    found = {"parts": len(parts)}
    summary = os.path.join(output, "_summary.json")
    if os.path.exists(summary):
        s = json.load(open(summary))
        found.update(rows=s.get("rows"), errors=s.get("errors"), seconds=s.get("seconds"),
                     images_per_second_with_start_up=s.get("images_per_second"))  # fmt: skip
    if len(parts) >= 3:
        rows = sum(pq.read_metadata(p).num_rows for p in parts[1:])
        span = os.path.getmtime(parts[-1]) - os.path.getmtime(parts[0])
        found["images_per_second"] = rows / span if span > 0 else None
    return found


def train_rate(model_dir: str) -> dict:
    """The last epoch's images/s of a trained model directory, and every epoch's."""
    meta = os.path.join(model_dir, "meta.json")
    if not os.path.exists(meta):
        return {"finished": False}
    epochs = json.load(open(meta)).get("epochs", [])
    rates = [e.get("images_per_second") for e in epochs]
    return {"images_per_second": rates[-1] if rates else None, "epochs": rates,
            "val_accuracy": epochs[-1].get("val_accuracy") if epochs else None}  # fmt: skip


# The goals of issue 26: classify with GPU decoding at 80% of the model alone, the full
# fine-tune's epochs at 90% of its model alone.
GOALS = {
    "classify_gpu_decode": ("model_only_compiled", 0.8),
    "train_full": ("train_model_only_full", 0.9),
    "train_full_gpu_decode": ("train_model_only_full", 0.9),
}


def environment() -> dict:
    """The device's name and the versions the figures ran with."""
    import platform

    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "cuda": torch.version.cuda}  # fmt: skip
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        versions["ray"] = None
    try:
        smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        versions["driver"] = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
    except OSError:
        versions["driver"] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "versions": versions, "cpus": os.cpu_count()}


def report(args) -> None:
    """Every fragment and run of WORK as one JSON result in --out."""
    work = args.work
    fragments = {}
    for name in ("data", "model", "decode"):
        path = os.path.join(work, f"{name}.json")
        fragments[name] = json.load(open(path)) if os.path.exists(path) else None
    rates = dict((fragments["model"] or {}).get("images_per_second", {}))
    runs = {}
    for path in sorted(glob.glob(os.path.join(work, "runs", "*"))):
        name = os.path.basename(path)
        if name.startswith("classify"):
            runs[name] = classify_rate(path)
        elif name.startswith("train"):
            runs[name] = train_rate(path)
        elif name.startswith("evaluate") and os.path.exists(os.path.join(path, "metrics.json")):
            metrics = json.load(open(os.path.join(path, "metrics.json")))
            runs[name] = {"accuracy": metrics.get("accuracy"), "images": metrics.get("images")}
        if runs.get(name, {}).get("images_per_second"):
            rates[name] = runs[name]["images_per_second"]
    goals = {}
    for key, (ceiling, share) in GOALS.items():
        if rates.get(key) and rates.get(ceiling):
            ratio = rates[key] / rates[ceiling]
            goals[key] = {"of": ceiling, "ratio": round(ratio, 3), "goal": share,
                          "met": ratio >= share}  # fmt: skip
    steps_path = os.path.join(work, "steps.jsonl")
    steps = [json.loads(line) for line in open(steps_path)] if os.path.exists(steps_path) else []
    result = {
        **environment(), "through": "Ray (insect train/classify/evaluate --gpu)",
        "images_per_second": {k: round(v, 1) for k, v in rates.items() if v},
        "goals": goals, "runs": runs, "decode_check": fragments["decode"],
        "data": fragments["data"], "loads": phase_loads(work) if os.path.exists(
            os.path.join(work, "phases.jsonl")) else {},
        "steps": steps,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("device", "versions", "images_per_second", "goals")},
                     indent=2))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("data", "model", "decode", "sample", "phase", "report"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True)
    sub.choices["data"].add_argument("--distinct", type=int, default=3000)
    sub.choices["data"].add_argument("--inputs", type=int, default=20000)
    sub.choices["data"].add_argument("--size", default="1024x768")
    sub.choices["model"].add_argument("--model", required=True)
    sub.choices["model"].add_argument("--steps", type=int, default=30)
    sub.choices["model"].add_argument("--image-size", type=int, default=224)
    sub.choices["model"].add_argument("--no-compile", action="store_true")
    sub.choices["model"].add_argument("--arch", default="vgg16")
    sub.choices["decode"].add_argument("--model", required=True)
    sub.choices["decode"].add_argument("--photos")
    sub.choices["decode"].add_argument("--agreement-images", type=int, default=1500)
    sub.choices["phase"].add_argument("name")
    sub.choices["phase"].add_argument("mark", choices=("start", "end"))
    sub.choices["report"].add_argument("--out", required=True)
    args = ap.parse_args()
    commands = {"data": make_data, "model": model_alone, "decode": decode_check,
                "sample": sample, "phase": phase, "report": report}  # fmt: skip
    commands[args.command](args)


if __name__ == "__main__":
    main()
