"""int8 classification (`insectlib.int8`): calibration, what the model directory keeps, the
agreement record, and the refusals. Ray-free but for the end-to-end runs at the bottom."""

import dataclasses
import gc
import glob
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers the q/dq ops used here)
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from insectlib import layout
from insectlib.classify.evaluate import evaluate
from insectlib.classify.pipeline import int8_for_run
from insectlib.config import ClassifyConfig, DecodeLimits, EvaluateConfig
from insectlib.data import synthetic
from insectlib.data.images import decode, eval_transform
from insectlib.errors import InsectError
from insectlib.model import int8, int8_statistics
from insectlib.model.meta import ModelMeta
from insectlib.model.network import (
    WithEmbedding,
    build_model,
    embedding_size,
    head_name,
    load_model,
    save_model,
)
from insectlib.model.predictor import Predictor

LIMITS = DecodeLimits(2**26, 2**26)
# The columns every part has (an error row needs no others), as a resume reads them.
PART_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("error", pa.string()), ("model", pa.string())]
)
# The layers inductor lowers to oneDNN's int8 kernels, by the name of its prepack pass.
LOWERED = {"qconv": torch.nn.Conv2d, "qlinear": torch.nn.Linear}
SIZE = 64  # alexnet's smallest input is 63 px


def small_model_dir(root, arch="alexnet", data=None, varied=False) -> tuple[str, ModelMeta]:
    """A model directory of a small arch (VGG-16's int8 path, in seconds: AlexNet's graph
    is 5 convolutions and 3 Linear layers, where MobileNet's took several times longer to
    quantize and compile) whose meta.json points at `data`'s validation split. For an arch
    random weights give every image about the same output at small sizes (the layers shrink
    what they pass on); `varied` estimates batch norms' statistics on random inputs, then
    scales and centres the head's logits on them, so that outputs depend on the image."""
    torch.manual_seed(0)
    model = build_model(arch, 3, "random")
    if varied:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches seen
        with torch.no_grad():
            model.train()(torch.randn(32, 3, SIZE, SIZE))
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(32, 3, SIZE, SIZE))
            mean, std = logits.mean(0), logits.std(0)
            head = model.get_submodule(head_name(model))
            head.weight /= std[:, None]
            head.bias.copy_((head.bias - mean) / std)
    meta = ModelMeta(classes=list(synthetic.CLASSES), arch=arch, image_size=SIZE)
    if data:
        meta.data = {"root": data, "split": "stratified", "val_fraction": 0.5, "seed": 0}
    path = str(root / "model")
    return path, save_model(path, model, meta)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    return synthetic.make_labelled(
        str(tmp_path_factory.mktemp("int8-data")), per_class=12, size=(48, 36)
    )


def batch_of(paths: list[str]) -> np.ndarray:
    transform = eval_transform(SIZE)
    return np.stack([transform(decode(open(p, "rb").read())).numpy() for p in paths])


@pytest.mark.slow  # quantizes and compiles: tens of seconds
def test_calibration_is_kept_and_rebuilds_the_same_model(tmp_path, labelled, recwarn):
    model_dir, meta = small_model_dir(tmp_path, data=labelled)
    made = int8_statistics.measure(model_dir, meta, None, 8, LIMITS)
    # Half of the 18 validation images fit the statistics, the other half measure agreement.
    record = made.record
    assert (record.fit_images, record.agreement_images) == (9, 9)
    assert record.model_id == meta.model_id and record.images_from.startswith("validation")
    assert 0 <= record.top1_agreement <= 1 and record.max_probability_difference >= 0
    assert sorted(os.listdir(model_dir)) == sorted(
        ["model.safetensors", "meta.json", *layout.INT8_FILES]
    )

    kept = int8.load(model_dir, meta)
    assert kept.record == record
    assert set(kept.stats) == set(made.stats)
    assert all(torch.equal(kept.stats[k], made.stats[k]) for k in made.stats)

    # What an actor runs: rebuilt from the fp32 weights and the kept statistics; it agrees
    # with fp32 on the images it was calibrated for, and its rows carry the int8 model id.
    paths = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(labelled) for f in fs if f.endswith(".jpg")
    )
    images = batch_of(paths)
    fp32 = Predictor(model_dir, precision="fp32", batch_size=8).probabilities(images)
    int8_run = Predictor(model_dir, precision="int8", batch_size=8, int8_model=kept)
    got = int8_run.probabilities(images)
    assert int8_run.meta.model_id == record.int8_model_id != meta.model_id
    agreement = (got.argmax(1) == fp32.argmax(1)).mean()
    assert agreement >= 0.9, agreement
    assert np.abs(got - fp32).max() < 0.1
    # inductor's int8 lowering warns of its own tensor copies: not on the user's console.
    assert not [w for w in recwarn if "To copy construct" in str(w.message)]
    compiles = counters["frames"]["ok"]
    again = Predictor(model_dir, precision="int8", batch_size=8, int8_model=kept)
    assert again.compiled is not None and counters["frames"]["ok"] > compiles
    # Compiled in the constructor: Ray Data calls the model in a thread of its own, where
    # torch's per-thread settings (freezing, torchao's int8 pass) are not; nothing compiles
    # there (it ran q/dq in fp32 at a fifth of the speed, or failed to compile).
    compiles = counters["frames"]["ok"]
    with ThreadPoolExecutor(1) as pool:
        np.testing.assert_array_equal(pool.submit(again.probabilities, images).result(), got)
    assert counters["frames"]["ok"] == compiles
    # With --embeddings the int8 model gives the head's input too (the same graph).
    probs, features = again.predict(images, embeddings=True)
    np.testing.assert_array_equal(probs, got)
    assert features.shape == (len(images), embedding_size(meta)) and np.isfinite(features).all()

    # Nothing keeps the fp32 weights once quantized (`int8.forget_graphs`). Tracked by
    # storage: the layers whose weights reach the graph as they are (not fused with a
    # batch norm), among them the linear layers.
    model, _ = load_model(model_dir)
    weights = {_data_ptr(p) for p in model.parameters() if p.dim() > 1}
    quantized = int8.quantize(WithEmbedding(model), kept.stats, SIZE, 8)
    del model
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
    assert not [t for t in alive if _data_ptr(t) in weights]
    assert {t.dtype for t in quantized.state_dict().values() if t.dim() > 1} == {torch.int8}

    # A record made on the logits-only graph (before format_version): calibrate again.
    path = os.path.join(model_dir, layout.INT8_RECORD)
    old = json.loads(open(path).read())
    del old["format_version"]
    with open(path, "w") as f:
        json.dump(old, f)
    assert int8.load(model_dir, meta) is None


@pytest.mark.slow  # quantizes and compiles: tens of seconds
def test_int8_weights_compile_to_what_inductor_would_fold(tmp_path, labelled, monkeypatch):
    model_dir, meta = small_model_dir(tmp_path, data=labelled, varied=True)
    kept = int8_statistics.measure(model_dir, meta, None, 8, LIMITS)
    images = batch_of(sorted(glob.glob(os.path.join(labelled, "*", "*.jpg"))))
    prepacked = {k: counters["inductor"][f"{k}_weight_prepack_matcher_count"] for k in LOWERED}
    folded = Predictor(model_dir, precision="int8", batch_size=8, int8_model=kept)
    # Its weights reach the compiler as int8 (`int8._fold_weight_quantize`; no fp32 copy
    # kept) and every conv and linear layer is lowered to oneDNN's int8 kernels.
    assert {t.dtype for t in folded.model.state_dict().values() if t.dim() > 1} == {torch.int8}
    layers = list(load_model(model_dir)[0].modules())
    for name, kind in LOWERED.items():
        lowered = counters["inductor"][f"{name}_weight_prepack_matcher_count"] - prepacked[name]
        assert lowered == sum(isinstance(m, kind) for m in layers), name
    # The same outputs, compiled, as the graph left for inductor to fold (fp32 weights
    # quantized there, with their zero points); outputs that differ from image to image.
    monkeypatch.setattr(int8, "_fold_weight_quantize", lambda graph: graph)
    unfolded = Predictor(model_dir, precision="int8", batch_size=8, int8_model=kept)
    assert {t.dtype for t in unfolded.model.state_dict().values() if t.dim() > 1} != {torch.int8}
    got = folded.probabilities(images)
    np.testing.assert_array_equal(got, unfolded.probabilities(images))
    assert got.std(axis=0).max() > 1e-3 and len(set(got.argmax(1))) > 1


def _data_ptr(tensor: torch.Tensor) -> int | None:
    """Where the tensor's storage starts; None for tensors without one (the functional
    and meta tensors torch.compile keeps)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _weight_graph(zero_points: torch.Tensor) -> torch.fx.GraphModule:
    """x -> linear(x, dequantize(quantize(w))) with per-channel parameters, as
    `convert_pt2e` leaves a weight before folding, and one activation quantized per
    channel (not a weight: left alone)."""
    quantize = torch.ops.quantized_decomposed.quantize_per_channel.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    torch.manual_seed(0)
    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(5, 3))
    root.register_buffer("scale", torch.rand(5) / 50 + 0.01)
    root.register_buffer("zero", zero_points)
    root.register_buffer("x_scale", torch.full((3,), 0.05))
    root.register_buffer("x_zero", torch.zeros(3, dtype=torch.int64))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w, scale, zero = g.get_attr("w"), g.get_attr("scale"), g.get_attr("zero")
    x_scale, x_zero = g.get_attr("x_scale"), g.get_attr("x_zero")
    limits = (-128, 127, torch.int8)
    qx = g.call_function(quantize, (x, x_scale, x_zero, 1, *limits))
    x = g.call_function(dequantize, (qx, x_scale, x_zero, 1, *limits))
    qw = g.call_function(quantize, (w, scale, zero, 0, *limits))
    dw = g.call_function(dequantize, (qw, scale, zero, 0, *limits))
    g.output(g.call_function(torch.nn.functional.linear, (x, dw)))
    return torch.fx.GraphModule(root, g)


@pytest.mark.parametrize("zero_points", ["zero", "not zero"])
def test_weights_are_folded_to_int8(zero_points):
    zero = torch.zeros(5, dtype=torch.int64)
    if zero_points == "not zero":
        zero[1:3] = torch.tensor([3, -7])
    x = torch.randn(4, 3)
    graph = _weight_graph(zero)
    want = graph(x)
    folded = int8._fold_weight_quantize(_weight_graph(zero))
    torch.testing.assert_close(folded(x), want, rtol=0, atol=0)
    # The weight is kept as int8 only; the activation is still quantized per call.
    assert not hasattr(folded, "w")
    assert {t.dtype for t in folded.state_dict().values() if t.numel() == 15} == {torch.int8}
    targets = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.quantized_decomposed.quantize_per_channel.default) == 1
    # Zero points are dropped only where they are all zero (inductor's int8 lowering then
    # takes zero), never where they shift the weights.
    dequantize = folded.graph.find_nodes(
        op="call_function", target=torch.ops.quantized_decomposed.dequantize_per_channel.default
    )
    weight = next(n for n in dequantize if n.args[0].op == "get_attr")
    assert (weight.args[2] is None) == (zero_points == "zero")
    assert hasattr(folded, "zero") == (zero_points == "not zero")
    activation = next(n for n in dequantize if n is not weight)
    assert activation.args[2].target == "x_zero"  # all zero, but not a weight's


@pytest.mark.parametrize("axis", [0, 1])
def test_weights_are_quantized_in_blocks(monkeypatch, axis):
    quantize = torch.ops.quantized_decomposed.quantize_per_channel
    torch.manual_seed(0)
    w = torch.randn(30, 70) if axis == 0 else torch.randn(70, 30)
    scale = w.abs().amax(1 - axis) / 100
    zero = torch.arange(30) % 7 - 3
    whole = quantize(w, scale, zero, axis, -128, 127, torch.int8)
    monkeypatch.setattr(int8, "FOLD_BLOCK", 300)  # blocks of 4 channels, the last of 2
    blocked = int8._quantize_in_blocks(w, scale, zero, axis, -128, 127, torch.int8)
    assert torch.equal(blocked, whole) and blocked.dtype == torch.int8


@pytest.mark.slow  # quantizes and compiles: tens of seconds
def test_kept_statistics_are_checked(tmp_path, labelled, capsys):
    model_dir, meta = small_model_dir(tmp_path, data=labelled)
    assert int8.load(model_dir, meta) is None
    int8_statistics.measure(model_dir, meta, labelled, 8, LIMITS)
    # In a fresh process, as in a model actor: building and compiling the int8 model prints
    # none of COMPILE_CHATTER (torchao is imported only once the filters are in).
    script = (
        "from insectlib.model import int8; from insectlib.model.meta import read_meta; "
        "from insectlib.model.predictor import Predictor; "
        f"d = {model_dir!r}; "
        "Predictor(d, precision='int8', batch_size=8, int8_model=int8.load(d, read_meta(d)))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Enum subclass" not in done.stderr and "No CUDA runtime" not in done.stderr
    stats = os.path.join(model_dir, layout.INT8_STATS)
    data = bytearray(open(stats, "rb").read())
    data[-1] ^= 1
    open(stats, "wb").write(bytes(data))
    # The int8 files are a cache: what is wrong with them is said in one line and they are
    # not used (auto runs bf16/fp32, int8 calibrates again and replaces them); a run never
    # fails on them. Altered statistics:
    assert int8.load(model_dir, meta) is None
    assert "int8.safetensors does not match" in capsys.readouterr().err

    # A record of other weights (the directory was retrained) is not used.
    record_path = os.path.join(model_dir, layout.INT8_RECORD)
    record = json.load(open(record_path))
    record["model_id"] = "0" * 16
    json.dump(record, open(record_path, "w"))
    assert int8.load(model_dir, meta) is None

    # Statistics made with another torchao or torch release (the venv was upgraded): they
    # may have observed another graph, so they are not used. Another build of the same
    # release (+cpu, +cu130), or a record made before torchao was recorded, is no reason.
    hash_checked = "int8.safetensors does not match"  # the check after the versions
    for name, version, same_graph in (
        ("torchao", "0.0.1", False),
        ("torch", "2.0.0\x1b[2J", False),  # shown escaped: one line
        ("torch", record["versions"]["torch"].split("+")[0] + "+cpu", True),
        ("torchao", None, True),
    ):
        made = {**record["versions"], name: version}
        if version is None:
            del made[name]
        json.dump({**record, "model_id": meta.model_id, "versions": made}, open(record_path, "w"))
        assert int8.load(model_dir, meta) is None
        err = capsys.readouterr().err
        assert (hash_checked in err) == same_graph, err
        if not same_graph:
            assert f"{name} {version!r}" in err and "an int8 run measures them again" in err
            assert "\x1b" not in err and err.count("\n") == 1

    # Records that are not insect's (or half written by a calibration running meanwhile).
    for text in (
        json.dumps({"model_id": meta.model_id}),
        json.dumps({**record, "top1_agreement": "1.0"}),
        json.dumps({**record, "versions": "torch"}),
        json.dumps(record)[:40],
    ):
        open(record_path, "w").write(text)
        assert int8.load(model_dir, meta) is None
        assert "is not a valid insect int8 record" in capsys.readouterr().err
    # Statistics that are not safetensors, named by a record with their hash.
    junk = b"\x08" + bytes(7) + b"not a header"
    open(stats, "wb").write(junk)
    with open(record_path, "w") as f:
        json.dump(
            {**record, "model_id": meta.model_id, "stats_sha256": sha256(junk).hexdigest()}, f
        )
    assert int8.load(model_dir, meta) is None
    assert "is not a valid safetensors file" in capsys.readouterr().err

    # A record whose statistics are gone (a calibration killed between its two writes, a
    # half-cleaned directory) is no calibration: the next int8 run calibrates again.
    json.dump({**record, "model_id": meta.model_id}, open(record_path, "w"))
    os.remove(stats)
    assert int8.load(model_dir, meta) is None


def test_auto_resumes_in_the_precision_its_rows_were_made_in(tmp_path, labelled, monkeypatch):
    """auto picks int8 where trusted statistics are kept; resuming, only where the rows
    written so far are int8's: statistics measured after the run began made its resume
    another model's. Where auto would not run the rows' int8 form, it says why."""
    from insectlib.classify import pipeline

    model_dir, meta = small_model_dir(tmp_path, data=labelled)
    int8_statistics.measure(model_dir, meta, labelled, 8, LIMITS)
    record_path = os.path.join(model_dir, layout.INT8_RECORD)
    record = json.load(open(record_path))
    json.dump({**record, "top1_agreement": 1.0}, open(record_path, "w"))  # trusted
    monkeypatch.setattr(pipeline, "cpu_runs_int8_fast", lambda: True)
    int8_id = int8.load(model_dir, meta).record.int8_model_id
    # Through plan_run, which reads the output's parts before Ray starts: one row each of an
    # interrupted run, of the model in bf16 or fp32, then of its int8 form.
    images = os.path.join(labelled, "beetles")
    out = tmp_path / "out"
    out.mkdir()
    cfg = ClassifyConfig(input=images, model=model_dir, output=str(out), resume=True)
    for model_id, chosen in ((meta.model_id, None), (int8_id, int8_id)):
        path = sorted(glob.glob(f"{images}/*"))[0]
        row = {"path": [path], "label": [None], "error": ["x"], "model": [model_id]}
        pq.write_table(pa.table(row, schema=PART_SCHEMA), out / f"part-{'0' * 32}-000000.parquet")
        plan = pipeline.plan_run(cfg)
        assert (plan.int8_model and plan.int8_model.record.int8_model_id) == chosen, model_id
    assert (
        int8_for_run(dataclasses.replace(cfg, resume=False), meta).record.int8_model_id == int8_id
    )
    # The int8 rows, resumed where auto would not run them as int8: refused before Ray
    # starts, saying why and what finishes them (not the flags the user passed).
    monkeypatch.setattr(pipeline, "cpu_runs_int8_fast", lambda: False)
    with pytest.raises(InsectError, match=r"int8 fast\): finish it with --precision int8, or"):
        pipeline.plan_run(cfg)
    monkeypatch.setattr(pipeline, "cpu_runs_int8_fast", lambda: True)
    gpu = dataclasses.replace(cfg, gpu=True)
    with pytest.raises(InsectError, match=r"CPU only\): finish it with --precision int8, without"):
        pipeline.auto_int8(gpu, meta, {int8_id})
    remeasured = {int8.int8_id_prefix(meta.model_id) + "0" * 12}
    for settings in ({}, {"gpu": True}):  # --gpu: --precision int8 would run other statistics
        with pytest.raises(InsectError, match=r"measured again since\): start it again with --"):
            pipeline.auto_int8(dataclasses.replace(cfg, **settings), meta, remeasured)
    json.dump({**record, "top1_agreement": 0.5}, open(record_path, "w"))
    with pytest.raises(InsectError, match=r"below 99%\): finish it with --precision int8"):
        pipeline.auto_int8(cfg, meta, {int8_id})
    json.dump({**record, "top1_agreement": 1.0}, open(record_path, "w"))
    os.remove(record_path)  # statistics gone (or of another insect or torch): none usable
    with pytest.raises(InsectError, match=r"no int8 statistics usable here\): start it again"):
        pipeline.auto_int8(cfg, meta, {int8_id})
    # --precision int8 over rows that were never int8's: refused before statistics are
    # measured (minutes), which would also replace those kept.
    row = {"path": [path], "label": [None], "error": ["x"], "model": [meta.model_id]}
    pq.write_table(pa.table(row, schema=PART_SCHEMA), out / f"part-{'0' * 32}-000000.parquet")
    monkeypatch.setattr(int8_statistics, "measure", None)  # would fail if called
    with pytest.raises(InsectError, match="not of its int8 form: resume with the --precision"):
        pipeline.plan_run(dataclasses.replace(cfg, precision="int8", int8_images=labelled))


@pytest.mark.slow  # quantizes and compiles: tens of seconds
def test_interleaved_calibrations_are_calibrated_again(tmp_path, labelled, capsys):
    """Two runs calibrating one model directory at once write two files each: whichever
    record and statistics are left, a later run never fails on them, and never uses
    statistics its record does not name."""
    model_dir, meta = small_model_dir(tmp_path, data=labelled)
    first = int8_statistics.measure(model_dir, meta, labelled, 8, LIMITS)
    # The other run's statistics (as valid as these, other values) beside this record.
    other = {k: v + 1 if v.is_floating_point() else v for k, v in first.stats.items()}
    save_file(other, os.path.join(model_dir, layout.INT8_STATS))
    assert int8.load(model_dir, meta) is None
    cfg = ClassifyConfig(input="x", model=model_dir, output="o", precision="int8")
    again = int8_for_run(cfg, meta)
    assert "measuring int8 statistics" in capsys.readouterr().out
    assert int8.load(model_dir, meta).record == again.record
    assert sorted(os.listdir(model_dir)) == sorted(
        ["model.safetensors", "meta.json", *layout.INT8_FILES]
    )


@pytest.mark.slow  # quantizes and compiles: tens of seconds
def test_statistics_of_another_model_are_refused(tmp_path, labelled):
    small, small_meta = small_model_dir(tmp_path / "a", data=labelled)
    other, _ = small_model_dir(tmp_path / "b", arch="shufflenet_v2_x0_5", data=labelled)
    stats = int8_statistics.measure(small, small_meta, None, 8, LIMITS).stats
    model, _ = load_model(other)
    with pytest.raises(InsectError, match="do not fit this model"):
        int8.quantize(model, stats, SIZE, 8)


def test_refusals_are_one_line(tmp_path, labelled):
    (tmp_path / "a").mkdir()
    resnet, meta = small_model_dir(tmp_path / "a", arch="resnet18", data=labelled)
    with pytest.raises(InsectError, match="does not support this model.*bf16 or fp32"):
        int8_statistics.measure(resnet, meta, None, 8, LIMITS)
    (tmp_path / "b").mkdir()
    nowhere, meta = small_model_dir(tmp_path / "b")
    with pytest.raises(InsectError, match="give --int8-images"):
        int8_statistics.measure(nowhere, meta, None, 8, LIMITS)
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(next(p for p in sample_files(labelled)), few / "one.jpg")
    with pytest.raises(InsectError, match="needs at least"):
        int8_statistics.measure(nowhere, meta, str(few), 8, LIMITS)
    with pytest.raises(InsectError, match="runs on CPUs"):
        ClassifyConfig(input="x", model="m", output="o", precision="int8", gpu=True).validate()
    with pytest.raises(InsectError, match="--int8-images is for --precision int8"):
        ClassifyConfig(input="x", model="m", output="o", int8_images="c").validate()


def sample_files(root: str):
    for r, _, fs in os.walk(root):
        for f in sorted(fs):
            yield os.path.join(r, f)


def test_evaluate_int8(ray_local, tmp_path, labelled):
    """`insect evaluate --precision int8`: the int8 model's accuracy, under its own id."""
    model_dir, meta = small_model_dir(tmp_path, data=labelled)
    out = tmp_path / "eval"
    settings = {"max_actors": 1, "batch_size": 8}
    m = evaluate(
        EvaluateConfig(
            data=labelled, model=model_dir, output=str(out), precision="int8", **settings
        )
    )
    record = int8.load(model_dir, meta).record  # calibrated on the model's validation images
    rows = pq.read_table(out / "predictions").to_pylist()
    assert len(rows) == m["images"] == 36 and m["model"] == record.int8_model_id
    assert {r["model"] for r in rows} == {record.int8_model_id}
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert m["accuracy"] == pytest.approx(correct / 36)
    with pytest.raises(InsectError, match="--int8-images is for --precision int8"):
        EvaluateConfig(data="d", model="m", int8_images="c").validate()
