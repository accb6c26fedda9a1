"""int8 where a CPU has no fast bf16: VGG-16 at 224 px, fp32 and int8 compiled as each model
actor runs them, on this CPU as it is and limited to AVX2, the instruction set of the AMD EPYC
Zen 3 machines this project also runs on (no AVX-512, no VNNI: oneDNN's int8 kernels there
multiply with `vpmaddubsw`, which can saturate, so agreement is measured there too).

The limit is set where each library picks its kernels, in a fresh process per row:
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: convolutions, int8 and `torch._int_mm`),
MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL: fp32 matrix multiplies), ATEN_CPU_CAPABILITY=avx2 (ATen's
own kernels, and the vector width of inductor's generated code) and
TORCHINDUCTOR_CPP_MARCH=znver3 (what inductor's C++ is compiled for). It runs the kernels an
AVX2-only CPU runs, at this CPU's clock, caches and memory: the ratios carry over, the rates
only roughly.

Rows per instruction set: model only (batch 32, all cores; start-up first, from a fresh
process: load, build, compile, first batch; one start-up each to fill the kernel cache, then
alternated, twice) for fp32 and int8; the fp32 and int8 matrix
multiply peaks and the limits they give; int8's top-1 agreement with fp32 and largest
probability difference on the shared insect test photos (the `--agreement-model`, a trained
model, calibrated on its own validation images) and on generated images.

    .venv/bin/python bench/isa.py --agreement-model DIR [--steps 4]

Writes bench/results/int8-isa.json (or --out), naming the CPU.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
from common import RESULTS, in_fresh_process, write_result
from inference import SHARED, agreement, int8_matmul_peak, matmul_peak, start_up, vgg16_flops

from insectlib.config import ClassifyConfig
from insectlib.data import synthetic
from insectlib.model import int8, int8_statistics
from insectlib.model.meta import ModelMeta, read_meta

# What limits each library to an instruction set (see the module docstring); None: unset.
from insectlib.model.network import build_model, save_model

# What limits each library to an instruction set (see the module docstring); None: unset.
AVX2 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "TORCHINDUCTOR_CPP_MARCH": "znver3",  # inductor's C++ (-march=native otherwise)
}
ISAS = {"native": dict.fromkeys(AVX2), "avx2": AVX2}


def peaks() -> dict:
    """The fp32 and int8 matrix-multiply peaks, in G(FL)OP/s, and the vector instructions
    ATen and inductor chose."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {
        "fp32_gflops": matmul_peak("cpu", torch.float32) / 1e9,
        "int8_gops": int8_matmul_peak() / 1e9,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_vec_isa": str(pick_vec_isa()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--agreement-model", required=True, help="a trained model directory")
    ap.add_argument("--steps", type=int, default=4, help="batches of 32 timed per model")
    ap.add_argument("--out", help="JSON path (default bench/results/int8-isa.json)")
    args = ap.parse_args()
    limits = ClassifyConfig(input="", model="", output="").limits
    trained = read_meta(args.agreement_model)
    tmp = tempfile.mkdtemp()
    try:
        # The speed rows: random VGG-16 weights, calibrated on generated images (the rates do
        # not depend on what the statistics are).
        model_dir = os.path.join(tmp, "model")
        torch.manual_seed(0)
        meta = save_model(
            model_dir,
            build_model("vgg16", len(synthetic.CLASSES), "random"),
            ModelMeta(classes=list(synthetic.CLASSES), arch="vgg16", image_size=224),
        )
        generated = sorted(synthetic.make_unlabelled(os.path.join(tmp, "generated"), count=180))
        generated_dir = os.path.join(tmp, "generated")
        speed_stats = int8_statistics.measure(model_dir, meta, generated_dir, 32, limits)
        kept = int8.load(args.agreement_model, trained) or int8_statistics.measure(
            args.agreement_model, trained, None, 32, limits
        )
        photos = sorted(glob.glob(os.path.join(SHARED, "test", "*", "*.jpg")))
        flops = vgg16_flops()
        results = {}
        for isa, env in ISAS.items():
            row: dict = {"environment": env}
            models = {
                "fp32": {"precision": "fp32"},
                "int8": {"precision": "int8", "int8_model": speed_stats},
            }
            for settings in models.values():  # fill the kernel cache, as a node's first actor
                in_fresh_process(start_up, model_dir, 1, env=env, **settings)
            for _ in range(2):  # alternated, twice: one start-up varies by about a second
                for precision, settings in models.items():
                    ready, rate = in_fresh_process(
                        start_up, model_dir, args.steps, env=env, **settings
                    )
                    row.setdefault(f"{precision}_start_up_seconds", []).append(ready)
                    row.setdefault(f"{precision}_images_per_second", []).append(rate)
                    print(
                        f"{isa} {precision}: ready in {ready:.1f} s, {rate:.1f} img/s", flush=True
                    )
            row.update(in_fresh_process(peaks, env=env))
            row["fp32_limit"] = row["fp32_gflops"] * 1e9 / flops
            row["int8_limit"] = row["int8_gops"] * 1e9 / flops
            row["int8/fp32"] = max(row["int8_images_per_second"]) / max(
                row["fp32_images_per_second"]
            )
            row["agreement"] = {
                name: in_fresh_process(agreement, args.agreement_model, kept, paths, env=env)
                for name, paths in (("shared insect test photos", photos), ("generated", generated))
                if paths
            }
            print(f"{isa}: {row}", flush=True)
            results[isa] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "VGG-16 224 px, model only, fp32 and int8 compiled, native and AVX2-only",
        "agreement_model": {"model_id": trained.model_id, "record": asdict(kept.record)},
        "results": results,
    }
    write_result(args.out or os.path.join(RESULTS, "int8-isa.json"), report)


if __name__ == "__main__":
    main()
