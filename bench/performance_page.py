"""Render docs/performance.md from the benchmark results in bench/results/*.json.

A figure typed into prose drifts from the measurement it came from; here every figure on the
page is read from a result file a benchmark wrote, and every ratio is computed from those
figures. Rerun a benchmark, then `make bench-docs`; `--check` fails when the page differs
from what the results give (a test runs it). A result file no section knows is listed under
"Other results", not rendered, so a new benchmark never breaks the page.

    .venv/bin/python bench/performance_page.py [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"
PYTHON = ".venv/bin/python"

Result = dict  # one results file, as json.load gives it

# ---------------------------------------------------------------------------------------------
# Formatting: one place decides how many digits a kind of figure shows.


def num(x: float, decimals: int = 1) -> str:
    return f"{x:,.{decimals}f}"


def rate(x: float) -> str:
    """Images per second: whole numbers from 100 up, one decimal below."""
    return num(x, 0 if x >= 100 else 1)


def secs(x: float) -> str:
    """Seconds: two decimals below 1 s (three below 0.01 s, which two would show as 0.00),
    whole seconds from 1,000 s up, one decimal between."""
    if x == 0:
        return "0"
    return num(x, 3 if abs(x) < 0.01 else 2 if x < 1 else 0 if x >= 1000 else 1)


def pct(x: float, decimals: int = 0) -> str:
    """A fraction as a percentage; "100%" rather than "100.0%"."""
    text = f"{100 * x:.{decimals}f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"


def times(x: float, decimals: int = 2) -> str:
    return f"{x:.{decimals}f}x"


def mb(x: float) -> str:
    return f"{x:,.0f} MB"


def both(*values: str) -> str:
    return " / ".join(values)


def precision_name(dtype: str | None) -> str:
    """'torch.bfloat16' as the README names it: bf16."""
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16", None: "fp32"}.get(dtype, dtype)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# Absolute paths from the machine that ran a benchmark: the page keeps the last two parts.
_PATH = re.compile(r"(?<![\w.'/])/(?:[\w.\-]+/)+[\w.\-]+")


def clean(text: object) -> str:
    """A JSON value as page text, with no absolute machine path left in it."""

    def short(match: re.Match[str]) -> str:
        path = match.group(0)
        if path.startswith(("/tmp/", "/var/tmp/")):
            return "<tmp>"
        return ".../" + "/".join(path.split("/")[-2:])

    return _PATH.sub(short, str(text))


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A Markdown table; `align` holds one letter a column: l(eft) or r(ight)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def machine_of(data: Result) -> str:
    """The machine a result names: its `machine` key, else what it records of one."""
    if isinstance(data.get("machine"), str):
        return clean(data["machine"])
    parts = [str(data[k]) for k in ("gpu", "device", "cpu") if data.get(k) not in (None, "cpu")]
    if isinstance(data.get("cpus"), int):
        parts.append(f"{data['cpus']} CPUs")
    return clean(", ".join(parts)) if parts else "machine not recorded"


def command(script: str, args: str, name: str) -> str:
    """How `name` was produced: `--out` only where the file is not the script's default."""
    defaults = {"inference.py": "inference-cpu.json", "isa.py": "int8-isa.json"}
    default = defaults.get(script, script.replace(".py", ".json"))
    out = "" if name == default else f"--out bench/results/{name}"
    return " ".join(p for p in (PYTHON, f"bench/{script}", args, out) if p)


def provenance(cmd: str, name: str, data: Result, how: str = "") -> str:
    """Where a table comes from; `how` follows the command where one run did not write it."""
    return (
        f"- Command: `{cmd}`{how}\n- Results: `bench/results/{name}`\n- Machine: {machine_of(data)}"
    )


def paragraphs(*parts: str) -> str:
    """Blocks separated by blank lines, prose re-wrapped (tables and lists as they are)."""
    blocks = [b.strip() for p in parts for b in p.split("\n\n") if b.strip()]
    return "\n\n".join(b if b.startswith(("|", "- ", "#")) else wrap(b) for b in blocks)


# Words that would start a list, heading, quote or table at the start of a line.
_MARKUP = re.compile(r"^(?:[-+*>|#]|\d+[.)])")


def wrap(text: str, width: int = 100) -> str:
    """`text` as lines of at most `width` characters, never starting one with Markdown markup."""
    lines: list[list[str]] = [[]]
    for word in re.findall(r"(?:`[^`]*`|[^\s`]|`)+", text):  # a code span is one word
        line = lines[-1]
        if line and len(" ".join([*line, word])) > width:
            moved = [line.pop()] if _MARKUP.match(word) and len(line) > 1 else []
            lines.append([*moved])
        lines[-1].append(word)
    return "\n".join(" ".join(line) for line in lines)


def sentence(text: str) -> str:
    """`text` with its first letter capitalised (str.capitalize lowers the rest)."""
    return text[:1].upper() + text[1:]


def how_many(n: int) -> str:
    return {1: "one"}.get(n, str(n))


def how_often(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


# ---------------------------------------------------------------------------------------------
# Classification on CPU: bench/inference.py on a CPU with bf16 units.

CLASSIFICATION_WHY = """
What gets it there: {low} weights (no autocast casts); `torch.compile` with weight freezing
(oneDNN pre-packed weights; {compile_gain} the same run with `--compile off` here), which
costs each actor a compile at start-up (see the start-up rows in the next section), hence
`auto`: on only where an actor has enough images to pay for it; JPEG draft decoding
({draft_gain} the full-resolution decode rate on one core) fused into the model actors so
nothing is copied between processes; one batch per Ray Data block so both actors work from
the first batch; and a full-size actor pool from the start. {low} agrees with fp32 on top-1
and on every probability within the bounds a test checks.
"""


def classification_rows(data: Result) -> list[list[str]]:
    ips, low = data["images_per_second"], precision_name(data["low_precision"])
    decode = data["decode_images_per_second_per_core"]
    base = ips["a_plain_fp32"]
    rows = [
        ("(a) plain PyTorch, fp32, DataLoader with a worker per CPU, `no_grad`", "a_plain_fp32"),
        (f"(b) plain PyTorch, {low} autocast + channels_last, same loader", "b_plain_best"),
        (f"(c) `insect classify` (defaults: {low}, `--compile auto`, on at this size)", "c_insect"),
        ("(c) `insect classify --compile off`", "c_insect_no_compile"),
        (
            f"(d) limit: {num(data['gflop_per_image'])} GFLOP/image / "
            f"{num(data['matmul_peak_gflops'], 0)} GFLOP/s measured {low} matmul peak",
            "d_limit",
        ),
    ]
    out = []
    for label, key in rows:
        bold = "**" if key == "c_insect" else ""
        out.append([label, f"{bold}{rate(ips[key])}{bold}", f"{bold}{num(ips[key] / base)}{bold}"])
    decoded = both(rate(decode["full"]), rate(decode["draft"]))
    only = both(rate(ips["model_only_fp32"]), rate(ips["model_only_best"]))
    out.append([f"model alone, fp32 / {low} (no decoding)", only, ""])
    out.append(["decode + resize, one core: full resolution / JPEG draft mode", decoded, ""])
    return out


def classification_cpu(data: Result, name: str) -> str:
    ips, ratios = data["images_per_second"], data["ratios"]
    decode = data["decode_images_per_second_per_core"]
    what = (
        f"{data['benchmark']} (read, decode, preprocess, model, Parquet written): "
        f"{data['images']:,} JPEGs from {clean(data['source'])}."
    )
    summary = (
        f"(c) is {times(ratios['c/b'])} (b) and {pct(ratios['c/d'])} of (d). "
        + CLASSIFICATION_WHY.format(
            low=precision_name(data["low_precision"]),
            compile_gain=times(ips["c_insect"] / ips["c_insect_no_compile"]),
            draft_gain=times(decode["draft"] / decode["full"], 1),
        ).strip()
    )
    return paragraphs(
        what,
        provenance(command("inference.py", "", name), name, data),
        table(["", "images/s", "vs (a)"], "lrr", classification_rows(data)),
        summary,
    )


# ---------------------------------------------------------------------------------------------
# int8 on a second CPU: bench/inference.py --agreement-model on AMD EPYC.

INT8_START_UP_WHY = """
What changed (`int8._fold_weight_quantize`, measured on one VGG-16 actor's compile; those
timings are not in the results): inductor's freezing evaluated every weight's dequantize
twice only to drop the result (it keeps the q/dq pairs to lower them to int8 kernels), and it
folded the fp32 weights to int8 itself. The actor now folds them before compiling, in blocks
(several times faster than in one piece: each of the op's steps allocates a temporary as
large as the weight), and leaves out the weights' zero points, which the x86 quantizer makes
all zero and inductor's lowering takes as zero when absent (the dequantize it evaluates then
multiplies int8 by the scales instead of subtracting int64 zeros first). Each step shortened
the compile, with identical outputs (a test compares them compiled) and the same int8
lowering and speed. torchao's own folding (`fold_quantize=True`) computes each dequantized
weight too, only to drop it.
"""

INT8_MEMORY = """
**Memory** (measured after the first batches, one thread, not recorded in the results, so
stated here without figures): a running int8 actor holds less memory than a compiled {low}
one, though it peaks higher while it builds. Until this version an int8 actor held more:
torch {torch} and torchao {torchao} each cache a device lookup per module with
`functools.cache`, which kept the exported and prepared graphs alive, and with them the fp32
weights (after a calibration, the whole model in the driver). `int8` clears those caches
once it has converted (`_forget_graphs`; a test checks that no tensor holds the fp32
weights' storage afterwards).
"""

INT8_THREADS = """
What made int8 pay end to end: torch {torch} keeps its settings per thread, and Ray Data
calls a model actor in a thread of its own (Ray Data's
`make_callable_class_single_threaded`). Compiled at the first batch in that thread, the int8
graph lost the freezing setting and the pre-grad pass torchao's quantizer installs where it
is imported, and ran its q/dq ops in fp32, several times slower than when compiled in the
actor's constructor. Each model actor now compiles in its constructor, on a batch of zeros
made under `inference_mode` as the real batches are (another tensor kind recompiled), and
every call runs under the settings (int8 passes torchao's pass explicitly), so a recompile in
any thread gets them too. The compiled {low} model gains a little from the same fix.
"""


def int8_speed_rows(data: Result) -> list[list[str]]:
    ips, low = data["images_per_second"], precision_name(data["low_precision"])
    peaks = f"{num(data['gflop_per_image'])} GFLOP/image at {num(data['matmul_peak_gflops'], 0)}"
    int8_peak = num(data["int8_matmul_peak_gops"], 0)
    return [
        [f"(a) plain PyTorch fp32 / (b) {low} + channels_last", both(rate(ips["a_plain_fp32"]),
                                                                     rate(ips["b_plain_best"]))],
        [f"(c) `insect classify` {low}, `--compile on` / `--compile off`",
         both(rate(ips["c_insect"]), rate(ips["c_insect_no_compile"]))],
        ["(c') `insect classify --precision int8` (calibration kept from a run before)",
         f"**{rate(ips['c_insect_int8'])}**"],
        [f"(d) {low} limit: {peaks} GFLOP/s", rate(ips["d_limit"])],
        [f"(d') int8 limit: the same at {int8_peak} GOP/s measured (`torch._int_mm`)",
         rate(ips["d_int8_limit"])],
    ]  # fmt: skip


def int8_other_rows(data: Result) -> list[list[str]]:
    ips, low, int8 = data["images_per_second"], precision_name(data["low_precision"]), data["int8"]
    only = [rate(ips[k]) for k in ("model_only_fp32", "model_only_best", "model_only_compiled")]
    decode = data["decode_images_per_second_per_core"]
    start, record = int8["start_up_seconds"], int8["record"]
    return [
        [f"model only: fp32 eager / {low} / {low} compiled / **int8 compiled**",
         both(*only, f"**{rate(ips['model_only_int8'])}**")],
        ["decode + resize, one core: full resolution / JPEG draft mode",
         both(rate(decode["full"]), rate(decode["draft"]))],
        [f"one actor's start-up, fresh process (load, build, compile, first batch): {low} "
         "compile on / **int8**",
         f"{secs(start['compile on (auto precision)'])} s / **{secs(start['int8'])} s**"],
        [f"calibration, once per model ({record['calibration_images']} images fit, "
         f"{record['agreement_images']} held out; in the driver)",
         f"{secs(int8['calibration_seconds'])} s"],
    ]  # fmt: skip


def int8_start_up(int8: Result) -> str:
    each, start = int8["start_up_seconds_each"], int8["start_up_seconds"]
    bf16, q8 = start["compile on (auto precision)"], start["int8"]
    lead = "before" if q8 < bf16 else "after"
    return (
        f"**An int8 actor is ready {secs(abs(bf16 - q8))} s ({pct(abs(bf16 - q8) / bf16)}) "
        f"{lead} a compiled bf16 one**: each start-up in a fresh process, as an actor's is (on "
        "a warm inductor kernel cache, as every actor after a node's first; freezing bypasses "
        "inductor's graph cache, so each compiles its graph), alternated, "
        f"{how_often(len(each['int8']))} each: {' and '.join(secs(s) for s in each['int8'])} s "
        "against "
        f"{' and '.join(secs(s) for s in each['compile on (auto precision)'])} s. Until this "
        "version it was behind.\n\n" + INT8_START_UP_WHY.strip()
    )


def changed_images(agreement: Result) -> int:
    """How many images changed their top-1 label, from the agreement fraction."""
    return round((1 - agreement["top1_agreement"]) * agreement["images"])


def agreement_phrase(a: Result, what: str) -> str:
    """`what` holds {n}, the number of images."""
    return (
        f"**{pct(a['top1_agreement'], 1)} top-1 on {what.format(n=a['images'])}** (largest "
        f"probability difference {num(a['max_probability_difference'], 3)})"
    )


def int8_agreement(int8: Result) -> str:
    held = int8["agreement_model"]["record"]
    shared = int8["agreement"]["shared insect test photos"]
    changed = changed_images(
        {"top1_agreement": held["top1_agreement"], "images": held["agreement_images"]}
    )
    which = "the one image that changes is" if changed == 1 else "the images that change are"
    return (
        "Agreement with fp32 (the model trained on the insect photos, calibrated on its own "
        f"validation images): {agreement_phrase(shared, 'the {n} shared test photos')} and "
        f"{agreement_phrase(int8['agreement']['generated'], '{n} generated images')}. On the "
        f"calibration's held-out half it was {held['agreement_images'] - changed} of "
        f"{held['agreement_images']} ({pct(held['top1_agreement'], 1)}): {which} a near tie "
        "between two classes. Below the agreement `--precision auto` requires "
        "(`INT8_AGREEMENT_MIN` in `insectlib/config.py`), it keeps the bf16 or fp32 model; "
        "`--precision int8` runs it and says so. With random weights every probability is "
        "close to uniform and such ties are everywhere "
        f"({pct(int8['record']['top1_agreement'], 1)} on the held-out half)."
    )


def int8_second_cpu(data: Result, name: str) -> str:
    int8, ratios, ips = data["int8"], data["ratios"], data["images_per_second"]
    trained = int8["agreement_model"]
    versions = {k: ".".join(v.split(".")[:2]) for k, v in int8["record"]["versions"].items()}
    low = precision_name(data["low_precision"])
    what = (
        f"The same benchmark with the int8 rows: {data['images']:,} JPEGs from "
        f"{clean(data['source'])}, random VGG-16 weights for the speed rows, and the agreement "
        f"rows on a model trained on the insect photos ({trained['epochs']} epochs, validation "
        f"accuracy {num(trained['validation_accuracy'], 3)})."
    )
    over_c, of_limit = ratios["c'/c"], ratios["c'/d'"]
    summary = (
        f"(c') is **{times(over_c)} (c)** end to end and **{pct(of_limit)} of (d')**. (d') is "
        "a measured `torch._int_mm` peak, not a bound: the compiled int8 model alone reaches "
        f"{pct(ips['model_only_int8'] / ips['d_int8_limit'])} of it."
    )
    return paragraphs(
        what,
        provenance(command("inference.py", "--agreement-model MODEL", name), name, data),
        table(
            ["", "images/s (seconds where marked)"],
            "lr",
            int8_speed_rows(data) + int8_other_rows(data),
        ),
        summary,
        int8_start_up(int8),
        INT8_MEMORY.format(low=low, **versions),
        INT8_THREADS.format(low=low, **versions),
        int8_agreement(int8),
    )


# ---------------------------------------------------------------------------------------------
# int8 with AVX2 only: bench/isa.py, the same CPU limited to AVX2.

ISA_NAMES = {"native": "native", "avx2": "AVX2 only"}

ISA_WHY = """
oneDNN's AVX2 int8 kernels multiply with `vpmaddubsw`, whose 16-bit sums can saturate, so
agreement was measured there too: {changed}, and probabilities move up to {avx2_diff},
against {native_diff} natively. `int8.json` records the CPU its agreement was measured on; a
record made on a VNNI machine and used on an AVX2 one is not re-measured (noted, not done).
"""


def isa_column(row: Result) -> list[str]:
    agree = row["agreement"]
    photos, generated = agree["shared insect test photos"], agree["generated"]
    fp32, int8 = max(row["fp32_images_per_second"]), max(row["int8_images_per_second"])
    return [
        rate(fp32),
        f"**{rate(int8)} ({times(int8 / fp32, 1)} fp32)**",
        both(secs(mean(row["fp32_start_up_seconds"])), secs(mean(row["int8_start_up_seconds"]))),
        both(num(row["fp32_gflops"], 0), num(row["int8_gops"], 0)),
        both(pct(photos["top1_agreement"], 1), pct(generated["top1_agreement"], 1)),
        both(
            num(photos["max_probability_difference"], 3),
            num(generated["max_probability_difference"], 3),
        ),
    ]


def isa_table(results: Result) -> str:
    photos = next(iter(results.values()))["agreement"]["shared insect test photos"]["images"]
    generated = next(iter(results.values()))["agreement"]["generated"]["images"]
    labels = [
        "fp32 compiled, images/s (best of the runs)",
        "**int8 compiled, images/s (best of the runs)**",
        "start-up, fp32 / int8 (s, mean of the runs)",
        "fp32 peak (GFLOP/s) / int8 peak (`torch._int_mm`, GOP/s)",
        f"int8 top-1 agreement, {photos} test photos / {generated} generated",
        "largest probability difference",
    ]
    columns = [isa_column(row) for row in results.values()]
    header = ["VGG-16 224 px, model only"] + [
        f"{ISA_NAMES.get(isa, isa)} ({row['inductor_vec_isa']})" for isa, row in results.items()
    ]
    rows = [[label, *(c[i] for c in columns)] for i, label in enumerate(labels)]
    return table(header, "l" + "r" * len(columns), rows)


def isa_changed(photos: Result) -> str:
    changed = changed_images(photos)
    if not changed:
        return f"none of the {photos['images']} photos changes label"
    verb = "changes" if changed == 1 else "change"
    share = pct(photos["top1_agreement"], 1)
    return f"{how_many(changed)} of the {photos['images']} photos {verb} label ({share})"


def int8_avx2(data: Result, name: str) -> str:
    native, avx2 = data["results"]["native"], data["results"]["avx2"]
    env = ", ".join(f"`{k}={v}`" for k, v in avx2["environment"].items())
    what = (
        "The AMD EPYC Zen 3 machines have no AVX-512, no VNNI and no fast bf16, so auto runs "
        "fp32 there. Emulated on the machine below by limiting every library to AVX2 in a fresh "
        f"process per row ({env}; ATen reported {avx2['aten_capability']}, inductor "
        f"{avx2['inductor_vec_isa']}). The kernels are an AVX2-only CPU's; the clock, caches and "
        "memory are the host's, so the ratios carry over better than the rates. Not yet "
        "measured on a real Zen 3."
    )
    photos = {
        isa: row["agreement"]["shared insect test photos"]
        for isa, row in (("native", native), ("avx2", avx2))
    }
    why = (
        f"On AVX2, int8 is the only way past fp32: {times(avx2['int8/fp32'], 1)}, close to the "
        "ratio an external guide reports measured on a real Zen 3 (not in these results). "
        + ISA_WHY.format(
            changed=isa_changed(photos["avx2"]),
            avx2_diff=num(photos["avx2"]["max_probability_difference"], 3),
            native_diff=num(photos["native"]["max_probability_difference"], 3),
        ).strip()
    )
    return paragraphs(
        what,
        provenance(command("isa.py", "--agreement-model MODEL", name), name, data),
        isa_table(data["results"]),
        why,
    )


# ---------------------------------------------------------------------------------------------
# Richer rows: bench/rows.py, what the optional columns cost.

ROWS_WHY = """
The columns cost no measurable compute: the embedding is the head's input, already computed,
and most of a {images}-image run is start-up, so the differences between variants are within
the spread between runs. An embedding row takes {embedding_bytes} the bytes of a default one:
{embedding_row} bytes compressed (many of the ReLU outputs are zeros), so a million rows take
about {million_rows} GB. Before small inputs with embeddings were cut into batches up front,
their rows left the actors one row per block and the run took noticeably longer (not in the
results); an input the first look sees whole is now cut into the blocks a run without
embeddings makes on a GPU or wherever a run may hold several actors (docs/classification.md).
"""


def rows_section(data: Result, name: str) -> str:
    variants = data["variants"]
    plain = variants["default columns"]
    embeddings = variants["--embeddings"]
    rows = [
        [
            "default" if key == "default columns" else f"`{key}`",
            num(v["images_per_second"], 2),
            num(v["images_per_second"] / plain["images_per_second"], 2),
            num(v["bytes_per_row"], 0),
        ]
        for key, v in variants.items()
    ]
    what = (
        f"What the optional columns cost: {plain['images']} photos from "
        f"`{clean(data['input'])}`, {data['model']} (a model trained on the insect photos), "
        f"each variant {how_often(data['repeat'])} in turn in one local Ray, the fastest run kept."
    )
    why = ROWS_WHY.format(
        images=plain["images"],
        embedding_bytes=times(embeddings["bytes_per_row"] / plain["bytes_per_row"], 0),
        embedding_row=num(embeddings["bytes_per_row"], 0),
        million_rows=num(embeddings["bytes_per_row"] * 1e6 / 1e9),
    )
    header = ["columns", "images/s", "vs default", "Parquet bytes per row"]
    return paragraphs(
        what,
        provenance(command("rows.py", "--model MODEL", name), name, data),
        table(header, "lrrr", rows),
        why,
    )


# ---------------------------------------------------------------------------------------------
# Training: bench/train.py, and the same before and after a refactoring.


def train_table(runs: Result) -> str:
    rows = [
        [
            key,
            str(r["epochs"]),
            secs(r["seconds"]),
            rate(r["first_epoch_images_per_second"]),
            num(r["val_accuracy"], 3),
        ]
        for key, r in runs.items()
    ]
    return table(["", "epochs", "total s", "img/s, epoch 1", "val acc"], "lrrrr", rows)


def train_why(data: Result) -> str:
    runs = data["runs"]
    full, cached = runs["full forward, 2 workers"], runs["cached features, 2 workers"]
    n = full["val_images"]
    p = (full["val_accuracy"] + cached["val_accuracy"]) / 2
    differ = abs(full["val_accuracy"] - cached["val_accuracy"]) * n
    error = math.sqrt(n * p * (1 - p))  # one standard error of a count of right answers
    return (
        f"Cached features take {times(data['cached_over_full_time'])} the time of the full "
        f"forward for {full['epochs']} epochs. The accuracies differ by {differ:.0f} of {n} "
        f"images, {num(differ / error)} standard errors ({num(error)} images; the runs shuffle "
        "differently); with a zero learning rate both give the same losses within a test's "
        "tolerance, so the head sees the same inputs."
    )


def before_after_rows(before: Result, after: Result) -> list[list[str]]:
    rows = []
    for key, b in before.items():
        a = after[key]
        speed = both(
            rate(b["first_epoch_images_per_second"]), rate(a["first_epoch_images_per_second"])
        )
        ratio = num(a["seconds"] / b["seconds"], 2)
        rows.append([key, both(secs(b["seconds"]), secs(a["seconds"])), ratio, speed])
    return rows


def before_after(data: Result, name: str) -> str:
    before, after = data["before"]["runs"], data["after"]["runs"]
    ratios = [after[key]["seconds"] / b["seconds"] for key, b in before.items()]
    args = f"--epochs {max(r['epochs'] for r in after.values())} "
    args += f"--image-size {data['after']['image_size']}"
    # Two runs of train.py, on two commits, side by side: not one command's --out.
    how = " once on each side, the two reports side by side in this file"
    verdict = "the CPU path did not get slower" if max(ratios) <= 1.01 else "see the ratios"
    header = ["", "total s, before / after", "after / before", "img/s epoch 1, before / after"]
    return paragraphs(
        "**Before and after** the worker loop was factored into `TrainingWorker` and the feed "
        f"began reading a batch at a time (the file's own words: {clean(data['benchmark'])}).",
        provenance(command("train.py", args, "train.json"), name, data, how),
        table(header, "lrrr", before_after_rows(before, after)),
        f"After / before, total time: {num(min(ratios), 2)} to {num(max(ratios), 2)}: {verdict}.",
    )


def training(data: Result, name: str, earlier: tuple[Result, str] | None) -> str:
    runs = data["runs"].values()
    train = sorted({r["train_images"] for r in runs})
    val = sorted({r["val_images"] for r in runs})
    weights = f"{data['weights']} weights" + (
        " (ImageNet's were not in the torch hub cache)" if data["weights"] == "random" else ""
    )
    what = (
        f"{sentence(data['benchmark'])}: VGG-16 at {data['image_size']} px on the "
        f"{clean(data['data'])} ({' or '.join(f'{n:,}' for n in train)} training images an "
        f"epoch, as the sampler splits them between the workers; "
        f"{' or '.join(f'{n:,}' for n in val)} held out), {weights}."
    )
    return paragraphs(
        what,
        provenance(command("train.py", "", name), name, data),
        train_table(data["runs"]),
        train_why(data),
        before_after(*earlier) if earlier else "",
    )


# ---------------------------------------------------------------------------------------------
# The training feed: bench/feed.py, one training worker's loader with no model.

FEED_WHY = """
From local disk the feed scales {scale_low} to {scale_high} from one core to two, and with
two processes reaches {limit_low} to {limit_high} of the limit; it extrapolates linearly
while the cores are the limit, as on the GPU machine below. From moto the server is the
limit (one Python process on the same cores); a batch's reads are in flight together (a test
checks that they overlap), so on real S3 latency overlaps as in classification.
"""


def feed_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        processes = r["loader_processes"]
        where = "0, in the worker" if processes == 0 else str(processes)
        rows.append(
            [
                "local" if r["source"] == "local" else f"moto {r['source'].upper()}",
                r["decoding"],
                f"{where} ({r['cores']})",
                rate(r["images_per_second"]),
                rate(r["limit_images_per_second"]),
                pct(r["fraction_of_limit"]),
            ]
        )
    return rows


def feed_why(results: list[Result]) -> str:
    local = [r for r in results if r["source"] == "local"]
    two = {r["decoding"]: r for r in local if r["cores"] == 2}
    scale = [
        two[r["decoding"]]["images_per_second"] / r["images_per_second"]
        for r in local
        if r["cores"] == 1 and r["decoding"] in two
    ]
    limits = [r["fraction_of_limit"] for r in two.values()]
    return FEED_WHY.format(
        scale_low=times(min(scale), 1),
        scale_high=times(max(scale), 1),
        limit_low=pct(min(limits)),
        limit_high=pct(max(limits)),
    )


def feed(data: Result, name: str) -> str:
    single, results = data["single_core_images_per_second"], data["results"]
    reads = {r["source"]: r["source_reads_per_second"] for r in results}
    what = (
        "Images per second one training worker receives with the model replaced by nothing: "
        f"the {data['benchmark']}, on {clean(data['data'])}, at {data['image_size']} px. The "
        "limit is one core's decode rate through `images.load_image` "
        f"({rate(single['augmented'])} images/s augmented, "
        f"{rate(single['evaluation (draft)'])} with JPEG draft) times the feed's cores, or the "
        f"source's own read rate where lower (moto S3 on loopback: {rate(reads['s3'])} files/s, "
        "read as the feed reads them, without decoding)."
    )
    header = [
        "source",
        "decoding",
        "DataLoader processes (cores)",
        "images/s",
        "limit",
        "of the limit",
    ]
    return paragraphs(
        what,
        provenance(command("feed.py", "", name), name, data),
        table(header, "llrrrr", feed_rows(results)),
        feed_why(results),
    )


# ---------------------------------------------------------------------------------------------
# The training feed on a GPU: bench/gpu_train.py, TrainingWorker without Ray.

GPU_WHY = """
With {processes} of the {cpus} cores decoding, training runs at the feed's rate ({at_feed} of
the feed alone), {gain} the old default of decoding in the worker's process; the feed reaches
{of_limit} of its limit (the worker's own process also collates and pins memory). The
frozen-trunk model could take {headroom} what the feed gives: on this machine a GPU still
waits for JPEG decoding unless the trunk's features are cached, and a node needs about
{cores} cores per GPU to keep VGG-16's frozen trunk busy with augmentation, which is where
feeding from CPU-only nodes (Ray Data) would pay.
"""


def gpu_feed_rows(d: Result) -> list[list[str]]:
    n, limit = d["loader_processes"], d["feed_limit_images_per_second"]
    feed = d[f"feed_alone_{n}_processes_images_per_second"]
    model = [d[f"model_alone_freeze_{f}_images_per_second"] for f in ("trunk", "none")]
    return [
        ["decode + augment, one core", rate(d["single_core_decode_images_per_second"])],
        [f"limit of the feed: {n} decoding processes x one core", rate(limit)],
        [f"the feed alone (no model), {n} DataLoader processes (the `--gpu` default here)",
         f"{rate(feed)} ({pct(feed / limit)})"],
        ["the feed alone, decoding in the worker's process (the default before)",
         rate(d["feed_alone_0_processes_images_per_second"])],
        ["the model alone on batches already on the GPU, `--freeze trunk` / `--freeze none`",
         both(*(rate(m) for m in model))],
    ]  # fmt: skip


def gpu_epoch_rows(d: Result) -> list[list[str]]:
    full, cached = d["full forward, augmented"], d["cached trunk features"]
    worker = d["full forward, augmented, decoding in the worker"]
    return [
        [f"training epoch, full forward with augmentation (epoch {full[-1]['epoch']}; epoch "
         f"{full[0]['epoch']}: {rate(full[0]['images_per_second'])}, processes starting)",
         f"**{rate(full[-1]['images_per_second'])}**"],
        [f"the same, decoding in the worker's process (epoch {worker[-1]['epoch']})",
         rate(worker[-1]["images_per_second"])],
        [f"training epoch on cached trunk features (`--no-augment`; epoch {cached[0]['epoch']}, "
         f"the trunk pass: {rate(cached[0]['images_per_second'])})",
         rate(cached[-1]["images_per_second"])],
    ]  # fmt: skip


def gpu_why(d: Result) -> str:
    n = d["loader_processes"]
    feed = d[f"feed_alone_{n}_processes_images_per_second"]
    train = d["full forward, augmented"][-1]["images_per_second"]
    old = d["full forward, augmented, decoding in the worker"][-1]["images_per_second"]
    trunk = d["model_alone_freeze_trunk_images_per_second"]
    return GPU_WHY.format(
        processes=n,
        cpus=d["cpus"],
        at_feed=pct(train / feed),
        gain=times(train / old, 1),
        of_limit=pct(feed / d["feed_limit_images_per_second"]),
        headroom=times(trunk / feed, 1),
        cores=num(trunk / d["single_core_decode_images_per_second"], 0),
    )


def gpu_train(data: Result, name: str) -> str:
    what = (
        f"On the project's GPU machine ({clean(data['machine_note'])}; `worker.TrainingWorker` "
        f"is what each Ray Train worker runs): {data['images']:,} generated "
        f"{data['image_size_on_disk']} JPEGs, VGG-16 with random weights at the script's "
        "default image size, batch size and precision."
    )
    return paragraphs(
        what,
        provenance(command("gpu_train.py", "", name), name, data),
        table(["", "images/s"], "lr", gpu_feed_rows(data) + gpu_epoch_rows(data)),
        gpu_why(data),
    )


# ---------------------------------------------------------------------------------------------
# The GPU path through Ray: bench/gpu_check.sh (insect train/classify/evaluate --gpu).

GPU_CHECK_ROWS = [
    ("model_only", "the model alone on batches already on the GPU (eager, batches of 32)"),
    ("model_only_batch_128", "the same, batches of 128"),
    ("model_only_compiled", "the same, compiled (the ceiling of `classify --gpu`)"),
    ("classify_cpu_decode", "`insect classify --gpu --decode cpu` (JPEGs decoded on the CPUs)"),
    ("classify_gpu_decode", "`insect classify --gpu` (JPEGs decoded on the GPU)"),
    ("classify_gpu_decode_batch_128", "the same, `--batch-size 128`"),
    ("train_model_only_full", "training steps alone, `--freeze none` (bench/gpu_train.py's)"),
    ("train_full", "`insect train --gpu --freeze none`, epoch 2 (CPU decoding)"),
    ("train_full_gpu_decode", "the same, `--decode device`"),
    ("train_model_only_frozen", "training steps alone, `--freeze trunk`"),
    ("train_frozen", "`insect train --gpu --freeze trunk`, epoch 2 (CPU decoding)"),
    ("train_frozen_gpu_decode", "the same, `--decode device`"),
]
GPU_CHECK_OF = {"classify": "model_only_compiled", "train_full": "train_model_only_full",
                "train_frozen": "train_model_only_frozen"}  # fmt: skip


def gpu_check_rows(d: Result) -> list[list[str]]:
    rates = d["images_per_second"]
    rows = []
    for key, label in GPU_CHECK_ROWS:
        if key not in rates:
            continue
        ceiling = next((rates.get(c) for k, c in GPU_CHECK_OF.items() if key.startswith(k)), None)
        share = pct(rates[key] / ceiling) if ceiling else ""
        rows.append([label, rate(rates[key]), share])
    return rows


def gpu_check_decode(d: Result) -> str:
    parts = []
    for name, what in (("generated", "generated photos"), ("insect_photos", "insect photos"),
                       ("hostile_and_kinds", "hostile corpus and every kind of file")):  # fmt: skip
        c = (d.get("decode_check") or {}).get(name)
        if c:
            parts.append(
                f"{what}: {c['rows_equal']:,} of {c['files']:,} rows equal to the CPU path's, "
                f"{pct(c['device_decoded_share'])} decoded on the GPU, top-1 agreement "
                f"{pct(c['top1_agreement'], 1)}, mean pixel difference "
                f"{num(c['mean_pixel_difference'], 2)} levels"
            )
    return "GPU against CPU decoding: " + "; ".join(parts) + "." if parts else ""


def gpu_check_loads(d: Result) -> str:
    rows = [
        [f"`{name}`", secs(v["seconds"]), num(v["cpu_cores"]),
         "" if v.get("gpu_util_percent") is None else pct(v["gpu_util_percent"] / 100),
         "" if v.get("gpu_memory_gib_peak") is None else num(v["gpu_memory_gib_peak"])]
        for name, v in d.get("loads", {}).items() if "seconds" in v
    ]  # fmt: skip
    header = ["step", "s", "CPU cores busy", "GPU utilisation", "GPU memory, GiB"]
    return table(header, "lrrrr", rows) if rows else ""


def gpu_check(data: Result, name: str) -> str:
    v = data["versions"]
    what = (
        f"insect itself through Ray {v['ray']} (torch {v['torch']}, driver {v['driver']}) on "
        f"one GPU: {data['data']['distinct_images']:,} generated "
        f"{data['data']['image_size_on_disk']} JPEGs, {data['data']['classify_inputs']:,} "
        "classify inputs, VGG-16 at 224 px in bf16, one training worker."
    )
    how = " (prepared with `bash bench/gpu_check.sh --stage`)"
    return paragraphs(
        what,
        provenance("bash bench/gpu_check.sh", name, data, how),
        table(["", "images/s", "of the model alone"], "lrr", gpu_check_rows(data)),
        gpu_check_decode(data),
        gpu_check_loads(data),
    )


# ---------------------------------------------------------------------------------------------
# Scale and memory: bench/scaling.py at 10k to 1M inputs, and an earlier run.

SCALING_CHANGES = """
What changed since the earlier run: Ray Data cut every stage's output at the listing's block
size (one batch of paths), so each batch of predictions left the actors as several small
blocks, and every block costs the driver memory and time (see Blocks). Large inputs now get
blocks of one batch of predictions. And the listing tasks, all started at once, started as
many worker processes at once on this machine's few cores, which held the first paths back;
now they take no more than half the CPUs. What still grows with N in the driver: Ray Data
keeps one small record per output block until the dataset is done, and the start-up holds
one read task per listing part (the parts are capped in number, so this is bounded). A
resume's anti-join is O(N) work spread over Ray. (Summed RSS over all Ray workers counts the
shared object store in every process, so it is in the results only.)
"""


def scaling_row(r: Result, label: str) -> list[str]:
    steady = r["steady_ms_per_image"]
    if r["resumed"] or steady is None:
        shown = ""
    elif r["seconds"] - r["first_file_seconds"] < r["seconds"] / 2:
        shown = f"({num(steady, 2)})"  # files written in under half the run: not steady
    else:
        shown = num(steady, 2)
    return [
        label,
        secs(r["seconds"]),
        secs(r["first_file_seconds"]),
        shown,
        mb(r["driver_peak_rss_mb"]),
        mb(r["worker_peak_rss_mb"]),
    ]


def scaling_rows(data: Result, prefix: str = "") -> list[list[str]]:
    rows = [scaling_row(r, f"{prefix}{r['images']:,}") for r in data["runs"]]
    resume = data["resume"]
    label = f"{prefix}{resume['images']:,}, resume ({resume['classified']:,} left)"
    return [*rows, scaling_row(resume, label)]


def scaling_growth(data: Result) -> str:
    runs, ratios = data["runs"], data["ratios"]
    small, large = runs[0], runs[-1]
    text = (
        f"At {large['images'] / small['images']:,.0f}x the inputs the first file comes "
        f"{times(ratios['first_file_largest_over_smallest'])} as late, the driver's peak RSS "
        f"is {pct(ratios['driver_rss_growth'], 1)} higher and the largest worker's "
        f'{pct(ratios["worker_rss_growth"], 1)}. "Steady" is ms per image between the first '
        "and the last Parquet file (in parentheses where those files came in the last half of "
        "the run: not a steady state)"
    )
    if len(runs) < 3:
        return text + "."
    prev = runs[-2]
    change = large["steady_ms_per_image"] / prev["steady_ms_per_image"] - 1
    trend = (
        "the cost per image does not grow with N, it shrinks as start-up and drain spread "
        "over more images"
        if change < 0
        else "the cost per image grows with N"
    )
    return text + (
        f": from {prev['images']:,} to {large['images']:,} inputs it goes from "
        f"{num(prev['steady_ms_per_image'], 2)} to {num(large['steady_ms_per_image'], 2)} "
        f"({'+' if change > 0 else ''}{pct(change)}): {trend}."
    )


def scaling_resume(data: Result) -> str:
    small, resume = data["runs"][0], data["resume"]
    tail = small["seconds"] - small["first_file_seconds"]
    text = (
        f"The {small['images']:,} figure is not a steady state: its files are written in the "
        f"last {secs(tail)} s of a {secs(small['seconds'])} s run."
    )
    if "resume_anti_join_seconds" not in resume:
        return text
    footers, join = resume["resume_footers_seconds"], resume["resume_anti_join_seconds"]
    return text + (
        f" The resume decided what was left in {secs(footers + join)} s: {secs(footers)} s to "
        f"check the written parts (footers only) and {secs(join)} s for the hash-partitioned "
        f"anti-join of {resume['images']:,} listed paths with "
        f"{resume['images'] - resume['classified']:,} written ones, in Ray, no process holding "
        "them all."
    )


def scaling_against(data: Result, before: Result) -> str:
    now = {r["images"]: r for r in data["runs"]}
    parts = []
    for b in before["runs"]:
        if b["images"] in now:
            n = now[b["images"]]
            faster = times(b["seconds"] / n["seconds"], 1)
            sooner = times(b["first_file_seconds"] / n["first_file_seconds"], 1)
            parts.append(
                f"at {b['images']:,} inputs, {faster} less time and the first file {sooner} sooner"
            )
    if not parts:
        return ""
    return "Against the earlier run, at the sizes both measured: " + "; ".join(parts) + "."


def scaling(data: Result, name: str, earlier: tuple[Result, str] | None) -> str:
    sizes = ",".join(str(r["images"]) for r in data["runs"])
    what = (
        f"{sentence(clean(data['benchmark']))}. The model is {data['arch']} at "
        f"{data['image_size']} px, so that the pipeline rather than the model is what is "
        "measured, with `--compile auto`; each size runs in a fresh process, and the resume's "
        "missing rows are the largest run's last files, removed."
    )
    rows = scaling_rows(data)
    sources = [provenance(command("scaling.py", f"--sizes {sizes}", name), name, data)]
    if earlier:
        before, before_name = earlier
        rows += scaling_rows(before, "before: ")
        before_sizes = ",".join(str(r["images"]) for r in before["runs"])
        sources.append(
            '"Before" is an earlier run of the same benchmark, committed before the block and '
            "listing changes below:\n\n"
            + provenance(
                command("scaling.py", f"--sizes {before_sizes}", before_name), before_name, before
            )
        )
    header = [
        "inputs",
        "total s",
        "first Parquet file, s",
        "ms/image, steady",
        "driver peak RSS",
        "largest worker RSS",
    ]
    return paragraphs(
        what,
        *sources,
        table(header, "rrrrrr", rows),
        scaling_growth(data) + " " + scaling_resume(data),
        scaling_against(data, earlier[0]) if earlier else "",
        SCALING_CHANGES if earlier else "",
    )


# ---------------------------------------------------------------------------------------------
# S3 listing: bench/s3_listing.py against moto.

S3_LABELS = {
    "one stream": "one stream (`ListObjectsV2` pages)",
    "parallel parts": "parallel listing (delimiter listings a level or two down, then one task "
    "a prefix)",
    "manifest": "manifest (a text file of the URIs)",
}

S3_WHY = """
The first paths leave the listing long before it ends in every case ({first} s of {whole} s
for one stream). moto answers one request at a time and scans the whole bucket for each page
(a delimiter listing too: hence the {planning} s of planning), so only the request counts and
the first-block-before-the-end carry over to S3: there the {requests} requests of the
parallel listing run {parts} at a time (about {sequential} sequential pages) where one stream
makes {stream_requests} one after the other. A manifest needs no listing at all:
{manifest_gain} faster than one stream here. Before the read fix (a part's blocks were cut
into many small pieces) one stream took several times as long and the manifest run did not
finish.
"""


def s3_why(results: Result) -> str:
    stream, parallel = results["one stream"], results["parallel parts"]
    return S3_WHY.format(
        first=secs(stream["first_block_seconds"]),
        whole=secs(stream["seconds"]),
        planning=num(parallel["planning_seconds"], 0),
        requests=parallel["list_requests"],
        parts=parallel["parts"],
        sequential=num(parallel["list_requests"] / parallel["parts"], 0),
        stream_requests=stream["list_requests"],
        manifest_gain=times(stream["seconds"] / results["manifest"]["seconds"], 1),
    )


def s3_listing(data: Result, name: str) -> str:
    results = data["results"]
    rows = [
        [
            S3_LABELS.get(key, key),
            str(r["parts"]),
            secs(r["planning_seconds"]),
            secs(r["first_block_seconds"]),
            secs(r["seconds"]),
            str(r["list_requests"]),
        ]
        for key, r in results.items()
    ]
    sizes = re.match(r"(\d+) objects under (\d+) prefixes", data["benchmark"])
    args = f"--objects {sizes[1]} --prefixes {sizes[2]}" if sizes else ""
    header = ["", "parts", "planning s", "first block s", "all paths s", "LIST requests"]
    return paragraphs(
        f"{sentence(data['benchmark'])}, on {data['server']}.",
        provenance(command("s3_listing.py", args, name), name, data),
        table(header, "lrrrrr", rows),
        s3_why(results),
    )


# ---------------------------------------------------------------------------------------------
# Blocks: bench/blocks.py, what a Ray Data block costs the driver.

BLOCKS_WHY = """
Larger blocks would cost less still, but a block is what one actor takes at once: the
largest blocks here would hold back the first rows and leave actors idle on smaller inputs.
"""


def blocks(data: Result, name: str) -> str:
    results = data["results"]
    rows = [[key, secs(r["seconds"]), mb(r["driver_rss_growth_mb"])] for key, r in results.items()]
    count = {r["rows"] for r in results.values()}
    args = f"--rows {count.pop()}" if len(count) == 1 else ""
    return paragraphs(
        "What a Ray Data block costs: the classification pipeline's shape with the model "
        f"replaced by nothing ({clean(data['benchmark'])}).",
        provenance(command("blocks.py", args, name), name, data),
        table(["block size", "seconds", "driver RSS growth"], "lrr", rows),
        BLOCKS_WHY,
    )


# ---------------------------------------------------------------------------------------------
# The review page: bench/review.py, `insect report` at a million rows (issue 28).


REVIEW_PHASES = {
    "select": "reading and choosing the rows",
    "ray": "starting Ray",
    "thumbnails": "the thumbnails",
    "page": "writing the page",
}


def review(data: Result, name: str) -> str:
    read, select = data["a_read_seconds"], data["b_select_seconds"]
    thumbs, total = data["c_thumbnails_seconds"], data["d_report_command_seconds"]
    phases = data["d_phases_seconds"]
    rows = [
        ["(a) read the columns the page needs", secs(read), clean(", ".join(data["columns_read"]))],
        ["(b) the one-pass selection, reading included", secs(select),
         f"{data['galleries']} galleries"],
        ["(c) the thumbnails: Ray tasks, decode, re-encode, write", secs(thumbs),
         f"{data['thumbnails']} thumbnails, Ray started ({secs(data['ray_start_seconds'])} s)"],
        ["(d) the whole `insect report` command", secs(total), "a new process"],
        *([f"(d) of which: {REVIEW_PHASES.get(p, p)}", secs(t), ""] for p, t in phases.items()),
    ]  # fmt: skip
    rest = total - sum(phases.values())
    return paragraphs(
        f"What the review page costs ({clean(data['benchmark'])}).",
        provenance(command("review.py", f"--rows {data['rows']}", name), name, data),
        table(["step", "seconds", "what"], "lrl", rows),
        f"The selection adds {secs(max(0.0, select - read))} s to reading "
        f"{num(data['rows'], 0)} rows; (b) and (c) together take {secs(select + thumbs)} s. "
        f"Within the command, starting Ray takes {secs(phases['ray'])} s of "
        f"{secs(sum(phases.values()))} s, and the process's imports and exit "
        f"{secs(rest)} s more. The page holds {num(data['page_bytes'] / 1e3, 0)} kB of HTML "
        f"and {num(data['thumbs_bytes'] / 1e3, 0)} kB of thumbnails.",
    )


# ---------------------------------------------------------------------------------------------
# Actor shapes: bench/shapes.py, one file per CPU.

SHAPES_WHY = """
Model alone: `Predictor` on batches already decoded, as one process with {cores} threads
(1x{cores}) and as {cores} one-thread processes at once ({cores}x1), the better of the two.
Classify: `insect classify` at steady state ({method}), on {images} high-entropy 1024x768
camera JPEGs, in its default
shape and in the shapes tried; photos: the shared insect photos scaled to 1024x768. "Of it
in that shape": of the model alone in the default's shape and compilation. "Of that with
decoding": of the same with each actor also reading, decoding and resizing its images on its
own threads ({decode}), which the model alone leaves out and classify cannot: the most
classify could reach in that shape. The goal is a default at 90% of the model alone or more,
and never below the plain loop.
"""


def steady_method(data: Result) -> str:
    """How the result measured classify's steady state (the first results: by its parts)."""
    return data.get("steady_method") or (
        "rows between its first and last Parquet part over the time between them, with a part "
        "a block"
    )


def best_alone(data: Result, precision: str) -> tuple[float, str]:
    """The fastest model-alone figure of `precision`, and how it ran (eager 2x1, ...)."""
    found = [
        (rate_, f"{kind.split(' ', 1)[1]} {shape}")
        for kind, shapes in data["model_alone"].items()
        if kind.split(" ", 1)[0] == precision
        for shape, rate_ in shapes.items()
        if shape != "build_seconds"
    ]
    return max(found)


def shape_name(shape: Result) -> str:
    compiled = ", compiled" if shape["compile"] else ""
    return f"{shape['actors']}x{shape['cpus_per_actor']:g}{compiled}"


def shapes_rows(data: Result) -> list[list[str]]:
    rows = []
    for precision in data["precisions"]:
        alone, how = best_alone(data, precision)
        runs = data["classify"]
        default = runs[f"{precision} camera default"]
        tried = [
            f"{key.rsplit(' ', 1)[1]}: {rate(r['steady'])}"
            for key, r in runs.items()
            if key.startswith(f"{precision} camera ") and not key.endswith(" default")
        ]
        photos = runs.get(f"{precision} photos default")
        plain = data["plain_loop"].get(precision)
        steady = default["steady"]
        rows.append([
            precision, f"{rate(alone)} ({how})", rate(plain) if plain else "not measured",
            f"{rate(steady)} ({shape_name(default['shape'])})",
            pct(steady / alone), share_of_alone_as(data, precision, default),
            share_of_ceiling(data, precision, default), ", ".join(tried),
            rate(photos["steady"]) if photos else "no photos",
        ])  # fmt: skip
    return rows


def alone_as(data: Result, precision: str, shape: Result) -> float | None:
    """The model alone in `precision` in `shape` and its compilation, where measured."""
    kind = f"{precision} {'compiled' if shape['compile'] else 'eager'}"
    return data["model_alone"].get(kind, {}).get(f"{shape['actors']}x{shape['cpus_per_actor']:g}")


def share_of_alone_as(data: Result, precision: str, run: Result) -> str:
    """`run`'s steady rate as a share of the model alone in its shape and compilation."""
    alone = alone_as(data, precision, run["shape"])
    return pct(run["steady"] / alone) if alone else "not measured"


def share_of_ceiling(data: Result, precision: str, run: Result) -> str:
    """`run`'s steady rate as a share of its ceiling: the model alone in its shape, each
    actor also decoding its images on its own threads at the measured one-thread rate."""
    alone, decode = alone_as(data, precision, run["shape"]), data.get("decode_per_core")
    if not alone or not decode:
        return "not measured"
    actors, threads = run["shape"]["actors"], run["shape"]["cpus_per_actor"]
    per_actor = 1 / (actors / alone + 1 / (threads * decode))
    return pct(run["steady"] / (actors * per_actor))


def compile_break_even(
    data: Result, precision: str, key: str | None = None
) -> tuple[float, float, str] | None:
    """(extra build seconds, seconds saved per image per actor, shape) of compiling in the
    shape `key` ("2x1": 2 actors of one thread; default: the run's default's); None where
    `precision` was not measured both ways."""
    eager, compiled = (data["model_alone"].get(f"{precision} {k}") for k in ("eager", "compiled"))
    if not eager or not compiled:
        return None
    if key is None:
        shape = data["classify"][f"{precision} camera default"]["shape"]
        key = f"{shape['actors']}x{shape['cpus_per_actor']:g}"
    per_actor = [v[key] / int(key.split("x")[0]) for v in (eager, compiled)]
    saved = 1 / per_actor[0] - 1 / per_actor[1]
    return compiled["build_seconds"] - eager["build_seconds"], saved, key


def compile_pays_from(data: Result, precision: str) -> str | None:
    """Images per actor from which compiling repays its start-up, in words."""
    found = compile_break_even(data, precision)
    if found is None:
        return None
    extra, saved, key = found
    if saved <= 0:
        return f"for {precision}, compiling saved nothing per image ({key})"
    return (
        f"for {precision}, {secs(extra)} s more to build, {secs(saved)} s less per image per "
        f"actor ({key}), so compiling pays from {num(extra / saved, 0)} images per actor"
    )


def shapes_args(data: Result) -> str:
    """The arguments that shaped the run that wrote `data` (not --out, --label)."""
    asked, rounds = data.get("precisions_asked"), data.get("rounds", 1)
    return (
        f"--images {data['images']}"
        + (f" --precisions {asked}" if asked else "")
        + (f" --rounds {rounds}" if rounds > 1 else "")
    )


def shapes(data: Result, name: str) -> str:
    cores = next(k[2:] for v in data["model_alone"].values() for k in v if k.startswith("1x"))
    builds = ", ".join(
        f"{kind} {secs(v['build_seconds'])} s" for kind, v in data["model_alone"].items()
    )
    statistics = data.get("int8_statistics_seconds")
    pays = [p for p in (compile_pays_from(data, x) for x in data["precisions"]) if p]
    return paragraphs(
        f"{clean(data['model'])}, images per second on {machine_of(data)}.",
        provenance(command("shapes.py", shapes_args(data), name), name, data),
        table(
            [
                "precision",
                "model alone",
                "plain loop",
                "classify, default shape",
                "of the model alone",
                "of it in that shape",
                "of that with decoding",
                "classify, shapes tried",
                "photos, default",
            ],
            "lrrrrrrlr",
            shapes_rows(data),
        ),  # fmt: skip
        SHAPES_WHY.format(
            cores=cores,
            images=data["images"],
            method=steady_method(data),
            decode=f"{rate(data['decode_per_core'])} images/s on one thread here"
            if data.get("decode_per_core")
            else "not measured in this result",
        ),
        sentence(clean(data["note"])) + "." if data.get("note") else "",
        f"Building the model in one process took {builds}"
        + (f"; the int8 statistics, {secs(statistics)} s." if statistics else "."),
        sentence("; ".join(pays) + ".") if pays else "",
    )


def cpu_split(data: Result, name: str) -> str:
    used, cores = data["cpu_seconds_by_kind"], data["core_seconds"]
    idle = max(0.0, cores - sum(used.values()))
    rows = [
        [kind, secs(t), pct(t / cores)] for kind, t in sorted(used.items(), key=lambda x: -x[1])
    ]
    rows.append(["idle", secs(idle), pct(idle / cores)])
    decode, model = (data["per_image_seconds"][k] for k in ("decode", "model, one thread"))
    run, window = data["classify"], data["window_seconds"]
    cpus = run["shape"]["actors"] * run["shape"].get("cpus_per_actor", 1)
    # The images the actors' CPU seconds pay for, at the measured cost of one.
    done = used.get("model actors", 0.0) / (decode + model) / window
    change = f" ({clean(data['change'])})" if data.get("change") else ""
    return paragraphs(
        f"Where the CPUs go while `insect classify`{change} runs {data['images']} camera "
        f"JPEGs ({clean(data['model'])}, {data['precision']}, default shape "
        f"{shape_name(run['shape'])}; the whole run {secs(run['seconds'])} s).",
        provenance(command("cpu_split.py", cpu_split_args(data), name), name, data),
        table(["process", "CPU seconds", "of the cores"], "lrr", rows),
        f"Over the {secs(window)} s between the first and the last Parquet part. In an actor, "
        f"one image costs {secs(decode)} s to read, decode and resize and {secs(model)} s in "
        f"the model on one thread: decoding is {pct(decode / (decode + model))} of an "
        f"actor's work. The actors' CPU seconds pay for {rate(done)} images/s, "
        f"{pct(done * (decode + model) / cpus)} of what their {cpus:g} CPUs busy all the time "
        f"would classify.",
        other_workers(data),
    )


def actor_profile(data: Result, name: str) -> str:
    runs = data["runs"]
    kinds = [tuple(kind) for kind in data["kinds"]]  # (thread, doing), in the bench's order
    share = lambda run, t, w: run["mean"].get(t, {}).get(w, 0.0)  # noqa: E731
    rows = [[t, w] + [pct(share(run, t, w), 1) for run in runs.values()] for t, w in kinds]
    shapes = ", ".join(f"{source} {shape_name(run['shape'])}" for source, run in runs.items())
    wholes = ", ".join(f"{source} {rate(run['whole'])} images/s" for source, run in runs.items())
    return paragraphs(
        f"Inside the model actors of `insect classify` ({clean(data['model'])}, "
        f"{data['precision']}, the default shape: {shapes}), each sampled by py-spy for "
        f"{secs(data['seconds'])} s from {secs(data['warm_up'])} s after the actors started, "
        f"{data['images']} images a run; the share of each thread's samples, the mean over "
        "the actors.",
        provenance(command("actor_profile.py", actor_profile_args(data), name), name, data),
        table(["thread", "doing", *runs], "ll" + "r" * len(runs), rows),
        f"The whole runs: {wholes}. The model thread is the one Ray Data runs the model's "
        "calls in; the task thread reads and decodes each batch, then waits while the model "
        "thread runs it. The model thread waits while the task thread is not waiting on it: "
        "the two shares are the same time seen from each thread.",
    )


def actor_profile_args(data: Result) -> str:
    """The arguments that shaped the runs that wrote `data` (not --out)."""
    args = [f"--images {data['images']}"]
    if data["precision"] != "bf16":
        args.append(f"--precision {data['precision']}")
    args += [f"--seconds {data['seconds']:g}", f"--warm-up {data['warm_up']:g}"]
    return " ".join(args)


def cpu_split_args(data: Result) -> str:
    """The arguments that shaped the run that wrote `data` (not --out, --label, --change)."""
    args = [f"--images {data['images']}"]
    if data["precision"] != "fp32":
        args.append(f"--precision {data['precision']}")
    if data.get("dashboard"):
        args.append("--dashboard")
    if data.get("idle_workers_killed"):
        args.append("--kill-idle-workers")
    return " ".join(args)


def other_workers(data: Result) -> str:
    """The other Ray workers' CPU seconds by what they ran, where the result has them."""
    workers = data.get("cpu_seconds_by_ray_worker")
    if not workers:
        return ""
    ran = sorted(
        ((name, t) for name, t in workers.items() if "Predictor" not in name), key=lambda x: -x[1]
    )
    listed = ", ".join(f"`{name}` {secs(t)} s" for name, t in ran if t >= 0.05)
    born = data.get("ray_workers_born")
    return (
        (f"The other Ray workers, by what they ran: {listed}. " if listed else "")
        + (f"Ray worker processes born in the window: {born}." if born is not None else "")
    ).strip()


def decode_overlap(data: Result, name: str) -> str:
    rates, threads = data["rates"], data["threads"]
    ways = [w for w in next(iter(rates.values())) if w != "model alone"]

    def cell(runs: list[float], alone: float) -> str:
        spread = f", {rate(min(runs))}-{rate(max(runs))}" if len(runs) > 1 else ""
        return f"{rate(median(runs))} ({pct(median(runs) / alone)}{spread})"

    rows = []
    for p, r in rates.items():
        alone = median(r["model alone"])
        rows.append([p, rate(alone), *(cell(r[w], alone) for w in ways)])
    header = ["precision", "model alone", *map(way_name, ways)]
    return paragraphs(
        f"Where a model actor of {threads} threads decodes: before each batch's model, on all "
        "its threads while the model waits (the product's way, decoding fused in the actor), or "
        "beside its model: the next batch decoded on threads of its own while the model runs "
        "on every core (as a decoding thread in the actor would), or on the core the model is "
        "left without (split: the model on one thread fewer). Decoding tasks in processes of "
        "their own would compete for the cores as a thread does, plus a copy; they are not "
        f"measured here. One process, the product's `image_batch` and `Predictor` compiled, "
        f"{clean(data['model'])}, {data['batches']} batches of {data['batch']} camera JPEGs a "
        f"measurement, {data['rounds']} rounds interleaved (split in a process of its own); "
        "images/s, the median (of the model alone, and the rounds' range).",
        provenance(command("decode_overlap.py", "", name), name, data),
        table(header, "l" + "r" * (len(ways) + 1), rows),
        "The fastest way in each round: "
        + "; ".join(f"{p}, {fastest_rounds(r, ways)}" for p, r in rates.items())
        + ".",
    )


def fastest_rounds(runs: dict[str, list[float]], ways: list[str]) -> str:
    """Which way was the fastest in how many of the rounds, e.g. "decoded first 3 of 3"."""
    rounds = min(len(runs[w]) for w in ways)
    wins = [max(ways, key=lambda w: runs[w][i]) for i in range(rounds)]
    counted = sorted({w: wins.count(w) for w in wins}.items(), key=lambda x: -x[1])
    return ", ".join(f"{way_name(w)} {n} of {rounds}" for w, n in counted)


def way_name(way: str) -> str:
    """A column of decode_overlap's table, as the page names it."""
    if way == "after":
        return "decoded first (the actor's way)"
    if way == "split":
        return "split: the model on a thread fewer"
    threads = int(way.split(", ")[1])
    return f"beside, {threads} decoding thread{'s' if threads > 1 else ''}"


# The images of bench/decoding.py: (a table's row, the prose's words)
DECODED = {
    "camera": ("camera JPEGs", "high-entropy 1024x768 camera JPEGs"),
    "photos": ("insect photos", "insect photos scaled to 1024x768"),
}


def ranged(runs: list[float], show: Callable[[float], str]) -> str:
    """Rounds' figures as their median and (range)."""
    return f"{show(median(runs))} ({show(min(runs))}-{show(max(runs))})"


def paired(a: list[float], b: list[float]) -> list[float]:
    """Round-by-round ratios of `a` to `b`."""
    return [x / y for x, y in zip(a, b, strict=True)]


def decoding(data: Result, name: str) -> str:
    kinds = [k for k in DECODED if k in data]
    ahead = list(data[kinds[0]]["ahead_rates"])
    now = str(data["product_ahead"])

    resize_rows, ahead_rows, more = [], [], []
    for kind in kinds:
        ms, rates = data[kind]["resize_ms"], data[kind]["ahead_rates"]
        saved = [1 - r for r in paired(ms["box"], ms["torchvision"])]
        resize_rows.append(
            [DECODED[kind][0], ranged(ms["torchvision"], secs), ranged(ms["box"], secs),
             ranged(saved, pct)]
        )  # fmt: skip
        gain = paired(rates[now], rates["1"])
        ahead_rows.append(
            [DECODED[kind][0], *(ranged(rates[a], rate) for a in ahead),
             ranged(gain, times)]
        )  # fmt: skip
        most = ahead[-1]
        if most != now:
            wins = sum(r > 1 for r in paired(rates[most], rates[now]))
            more.append(f"{DECODED[kind][0]}, faster in {wins} of {len(rates[now])} rounds")
    ahead_names = [
        f"{a} a thread{' (before)' if a == '1' else ' (now)' if a == now else ''}" for a in ahead
    ]
    return paragraphs(
        f"What decoding an image for the model costs ({data['image_size']} px, JPEG draft "
        f"decoding), the way before and the way now side by side on {data['images']} "
        f"{' and as many '.join(DECODED[k][1] for k in kinds)}, {data['rounds']} rounds in one "
        "process, each round in the reverse order of the one before; the median (the rounds' "
        "range), and the ratios taken round by round.",
        provenance(command("decoding.py", f"--images {data['images']}", name), name, data),
        "One image on one thread, decoded and resized, in milliseconds: torchvision's Resize "
        "then CenterCrop (before) resampled the whole image and dropped its sides; the "
        "product now resizes the crop's box alone (`images.resized_centre`).",
        table(["images", "Resize then CenterCrop", "the crop's box", "saved"], "lrrr", resize_rows),
        f"A batch decoded as a model actor does before its model (`image_batch` on "
        f"{data['threads']} threads), in images/s, by images in flight a thread "
        "(`images.DECODES_AHEAD`): with one, a thread whose image was done waited for the "
        "oldest, which is taken first.",
        table(["images", *ahead_names, "now / before"], "l" + "r" * (len(ahead) + 1), ahead_rows),
        f"{ahead[-1]} a thread against {now}: " + "; ".join(more) + "." if more else "",
    )


def in_flight(data: Result, name: str) -> str:
    runs = data["runs"]
    counts = sorted({n for shape in runs.values() for n in shape}, key=int)
    rows = []
    for shape, by_count in runs.items():
        first, last = by_count[counts[0]]["steady"], by_count[counts[-1]]["steady"]
        rows.append(
            [shape,
             *(ranged(by_count[n]["steady"], rate) for n in counts),
             ranged(paired(last, first), times)]
        )  # fmt: skip
    header = ["pool", *(f"{n} in flight an actor" for n in counts), f"{counts[-1]} / {counts[0]}"]
    return paragraphs(
        f"`insect classify` at steady state with {' and '.join(counts)} tasks in flight per "
        "model actor (set by the bench for every run; the product's rule is "
        "`dataset.tasks_in_flight`), in a pool "
        "of one-thread actors and in one actor of every core's threads: "
        f"{data['images']} high-entropy 1024x768 camera "
        f"JPEGs, vgg16 224 px, {data['precision']}, compiled, {data['rounds']} rounds, each in "
        "the reverse order of the one before; images/s, the median (the rounds' range), and "
        "the ratio round by round.",
        provenance(
            command(
                "in_flight.py", f"--images {data['images']} --precision {data['precision']}", name
            ),
            name,
            data,
        ),
        table(header, "l" + "r" * (len(counts) + 1), rows),
    )


# ---------------------------------------------------------------------------------------------
# The page: which file feeds which section, in reading order.

Render = Callable[..., str]


@dataclass(frozen=True)
class Section:
    title: str
    file: str  # the section is rendered where this file exists; a pattern: once per file
    render: Render
    also: str | None = None  # a second file the section uses where it exists


SECTIONS = [
    Section("Classification on CPU", "inference-cpu.json", classification_cpu),
    Section("int8 on a second CPU", "inference-cpu-epyc-zen4.json", int8_second_cpu),
    Section("int8 with AVX2 only", "int8-isa-epyc-zen4.json", int8_avx2),
    Section("Richer rows", "rows.json", rows_section),
    Section("Training", "train.json", training, also="train-before-after.json"),
    Section("The training feed", "feed.json", feed),
    Section("The training feed on a GPU", "gpu_train.json", gpu_train),
    Section("The GPU path through Ray", "gpu_check.json", gpu_check),
    Section("Scale and memory", "scaling-1m.json", scaling, also="scaling.json"),
    Section("S3 listing", "s3_listing.json", s3_listing),
    Section("Blocks", "blocks.json", blocks),
    Section("Actor shapes", "shapes-*.json", shapes),
    Section("Where the CPUs go", "cpu-split-*.json", cpu_split),
    Section("Inside a model actor", "actor-profile-*.json", actor_profile),
    Section("Tasks in flight", "in-flight-*.json", in_flight),
    Section("Decoding for the model", "decoding-*.json", decoding),
    Section("Decoding beside the model", "decode-overlap-*.json", decode_overlap),
    Section("The review page", "review-cpu-amd-epyc.json", review),
]

HEADER = """
# Performance

_Generated by `bench/performance_page.py` from `bench/results/*.json`: do not edit by hand.
`make bench-docs` regenerates it after a benchmark has written new results; a test fails
when this page and the results differ._

Every figure here is read from a result file, and every ratio and percentage is computed
from those figures. Each section names the command that measured it, its result file and the
machine the file records. Figures once quoted that no result file holds are left out or
stated without a number.
"""


def load(folder: Path) -> dict[str, Result | None]:
    """Every result file by name, sorted; None for one that is not a JSON object."""
    results: dict[str, Result | None] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        results[path.name] = data if isinstance(data, dict) else None
    return results


def pattern_title(title: str, data: Result) -> str:
    """A pattern section's title: the machine, and the file's label where it has one."""
    label = f", {clean(data['label'])}" if data.get("label") else ""
    return f"{title}: {machine_of(data)}{label}"


def expand(section: Section, results: dict[str, Result | None]) -> list[Section]:
    """`section`, or one per result file its pattern matches, titled by the file's machine."""
    if "*" not in section.file:
        return [section]
    return [
        dataclasses.replace(section, file=name, title=pattern_title(section.title, data or {}))
        for name, data in results.items()
        if fnmatch.fnmatch(name, section.file)
    ]


def render_section(section: Section, results: dict[str, Result | None]) -> str:
    """The section's Markdown; raises KeyError and the like where a file's keys differ."""
    data = results[section.file]
    if data is None:
        raise ValueError("not a JSON object")
    args: list = [data, section.file]
    if section.also:
        other = results.get(section.also)
        args.append((other, section.also) if other is not None else None)
    return f"## {section.title}\n\n" + section.render(*args)


def other_results(names: list[str], results: dict[str, Result | None], notes: dict) -> str:
    """The files no section rendered: named, with what they say they are."""
    rows = []
    for name in names:
        data = results[name] or {}
        benchmark = clean(data.get("benchmark", "")) if isinstance(data, dict) else ""
        unread = "not a JSON object" if results[name] is None else ""
        note = notes.get(name, unread or "no section on this page renders it yet")
        rows.append([f"`bench/results/{name}`", benchmark or "(not named)", machine_of(data), note])
    return "## Other results\n\n" + table(["file", "benchmark", "machine", "note"], "llll", rows)


def page(folder: Path = RESULTS) -> str:
    """The whole page from the result files in `folder`."""
    results = load(folder)
    parts, used, notes = [HEADER.strip()], set(), {}
    for section in (one for each in SECTIONS for one in expand(each, results)):
        if section.file not in results:
            continue
        try:
            parts.append(render_section(section, results))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            # A known file whose keys changed: listed below, never a failed page.
            notes[section.file] = f"not rendered ({type(e).__name__}: {clean(e)})"
            continue
        used.add(section.file)
        if section.also and results.get(section.also) is not None:
            used.add(section.also)
    left = [name for name in results if name not in used]
    if left:
        parts.append(other_results(left, results, notes))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if docs/performance.md differs from what the results give",
    )
    args = ap.parse_args()
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            sys.exit(
                "docs/performance.md is out of date with bench/results/*.json: "
                "run `make bench-docs`"
            )
        return
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
