"""VGG-16 itself, the product's default, trained once for all of these (`trained_vgg`:
a build takes tens of seconds, so its tests share one module and one test worker): feature
maps, int8, bf16 and compiled against fp32 eager, temperature scaling of an over-confident
head."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from insectlib import layout
from insectlib.classify.pipeline import classify, int8_for_run
from insectlib.config import ClassifyConfig
from insectlib.data.images import decode, eval_transform, normalize, resize_size
from insectlib.data.labels import discover
from insectlib.errors import InsectError
from insectlib.metrics import confidence as C
from insectlib.model import int8
from insectlib.model.network import load_model
from insectlib.model.predictor import Predictor, RowFormat
from insectlib.review.visualize import feature_maps
from tests.conftest import assert_picture, expect_cli_error

# bf16 keeps 8 bits of mantissa: probabilities move by a few thousandths at most here.
BF16_PROBABILITY_TOLERANCE = 0.02


def test_an_over_confident_model_is_calibrated_without_changing_a_prediction(trained_vgg):
    """The session's VGG-16 with its head's weights replaced by large random ones: often
    wrong, and sure of itself. The fitted temperature is large, ECE and NLL fall, and
    every top-1 prediction stays."""
    cfg, meta = trained_vgg
    model, _ = load_model(cfg.output)
    head = model.get_submodule(meta.head)
    torch.manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(30 * head.weight.std() * torch.randn_like(head.weight))
    found = discover(cfg.data, cfg.val_fraction, cfg.seed)
    items = found.val + found.train[:40]  # a few more images than the validation split
    transform = eval_transform(meta.image_size)
    x = torch.stack([transform(decode(open(uri, "rb").read())) for uri, _ in items])
    labels = np.array([y for _, y in items])
    with torch.no_grad():
        logits = model(normalize(x)).numpy()
    accuracy = (logits.argmax(1) == labels).mean()
    assert 0.3 < accuracy < 0.8 and C.probabilities(logits).max(1).mean() > accuracy + 0.3
    report = C.temperature_report(logits, labels)
    assert report["temperature"] > 3
    assert report["ece_after"] < report["ece_before"] and report["nll_after"] < report["nll_before"]
    calibrated = C.probabilities(logits, report["temperature"])
    assert (calibrated.argmax(1) == logits.argmax(1)).all()


def test_feature_map_shapes(trained_vgg, unlabelled):
    cfg, meta = trained_vgg  # VGG-16 at 64 px
    model, _ = load_model(cfg.output)
    image = decode(open(sorted(unlabelled)[0], "rb").read())
    x = normalize(eval_transform(meta.image_size)(image).unsqueeze(0))[0]
    maps = feature_maps(model, x, [0, 1, 5, 30])
    assert maps[0][2].shape == (64, 64, 64)  # features[0]: first conv, full size
    assert maps[5][2].shape == (128, 32, 32)  # features[5]: conv after one max-pool
    assert maps[30][2].shape == (512, 2, 2)  # features[30]: the last max-pool
    assert type(maps[30][1]) is torch.nn.MaxPool2d and maps[30][0] == "features.30"
    # The conv output is kept as it was, not as the in-place ReLU after it leaves it.
    assert (maps[0][2] < 0).any() and (maps[1][2] >= 0).all()


def test_visualize_cli(trained_vgg, unlabelled, tmp_path, capsys):
    """In-process (no Ray, one torch import: 3 subprocesses took 25 s); the installed
    `insect` entry point is run by test_cluster."""
    from insectlib.cli.main import main

    cfg, _ = trained_vgg
    image = sorted(unlabelled)[0]
    out = tmp_path / "maps"
    assert main(["visualize", image, "--model", cfg.output, "--layers", "1,28",
                 "--output", str(out)]) == 0  # fmt: skip
    written = sorted(os.listdir(out))
    assert written == ["layer-001-features.1.png", "layer-028-features.28.png"]
    for name in written:
        assert_picture(out / name)

    argv = ["visualize", image, "--model", cfg.output, "--layers"]
    capsys.readouterr()
    assert main([*argv, "99"]) == 2  # an error that lists the layers on the lines after it
    err = capsys.readouterr().err
    assert "no layer 99" in err and "features.30" in err
    assert "has no feature maps" in expect_cli_error(capsys, [*argv, "33"])


def test_classify_int8_end_to_end(trained_vgg, unlabelled, tmp_path, capsys):
    """The session's VGG-16: calibrated on its own validation images in the driver, run
    int8 by the actors, rows that agree with fp32 (run here); auto picks int8 only with a
    record that passed; a resume refuses rows of another precision's model."""
    cfg, meta = trained_vgg
    model_dir = str(tmp_path / "model")
    shutil.copytree(cfg.output, model_dir)  # the session's model must stay without int8
    folder = os.path.dirname(next(iter(unlabelled)))

    def run(name: str, **settings):
        out = str(tmp_path / name)
        # One actor: each int8 actor quantizes and compiles VGG-16 (tens of seconds here).
        classify(
            ClassifyConfig(input=folder, model=model_dir, output=out, max_actors=1, **settings)
        )
        return {r["path"]: r for r in pq.read_table(out).to_pylist()}

    rows = run("int8", precision="int8")
    said = capsys.readouterr().out
    assert "measuring int8 statistics" in said and "top-1 agreement with fp32" in said
    record = int8.load(model_dir, meta).record
    assert set(rows) == set(unlabelled)
    assert {r["model"] for r in rows.values()} == {record.int8_model_id}
    paths = sorted(rows)
    # fp32 in this process: the same model, without an actor pool of its own to start
    reference = Predictor(cfg.output, precision="fp32", row_format=RowFormat(meta.temperature))
    fp32 = reference.probabilities(decoded(paths, meta))
    labels = [meta.classes[i] for i in fp32.argmax(1)]
    agree = np.mean([rows[p]["label"] == label for p, label in zip(paths, labels, strict=True)])
    assert agree >= 0.9, agree
    diff = np.abs(np.array([rows[p]["probabilities"] for p in paths]) - fp32).max()
    assert diff < 0.1, diff

    # auto: int8 with the kept calibration (no second one) only while its record passed;
    # the run below it is the int8 run above (int8_for_run is what classify asks).
    record_path = os.path.join(model_dir, layout.INT8_RECORD)
    kept = json.load(open(record_path))
    auto = ClassifyConfig(input=folder, model=model_dir, output=str(tmp_path / "auto"))
    json.dump({**kept, "top1_agreement": 1.0}, open(record_path, "w"))
    assert int8_for_run(auto, meta).record.int8_model_id == record.int8_model_id
    json.dump({**kept, "top1_agreement": 0.5}, open(record_path, "w"))
    assert int8_for_run(auto, meta) is None
    assert {r["model"] for r in run("auto").values()} == {meta.model_id}
    assert "measuring int8 statistics" not in capsys.readouterr().out

    with pytest.raises(InsectError, match="model"):
        classify(
            ClassifyConfig(
                input=folder, model=model_dir, output=str(tmp_path / "auto"), precision="int8",
                resume=True,
            )
        )  # fmt: skip


def decoded(paths: list[str], meta) -> np.ndarray:
    """The images at `paths` as the model's batch, decoded and resized as classify does
    (a JPEG at the smallest scale that keeps the resize size)."""
    transform, least = eval_transform(meta.image_size), resize_size(meta.image_size)
    return np.stack([transform(decode(open(p, "rb").read(), least)).numpy() for p in paths])


def test_bf16_agrees_with_fp32(trained_vgg, labelled_root, unlabelled):
    cfg, meta = trained_vgg
    paths = sorted(unlabelled) + sorted(
        os.path.join(d, f) for d, _, fs in os.walk(labelled_root) for f in fs
    )
    batch = decoded(paths, meta)
    fp32 = Predictor(cfg.output, precision="fp32").probabilities(batch)
    bf16 = Predictor(cfg.output, precision="bf16").probabilities(batch)
    agree = (fp32.argmax(1) == bf16.argmax(1)).mean()
    assert len(paths) >= 100 and agree >= 0.99, agree
    assert np.abs(fp32 - bf16).max() < BF16_PROBABILITY_TOLERANCE


def test_compiled_model_matches_eager(trained_vgg, unlabelled):
    cfg, meta = trained_vgg
    batch = decoded(sorted(unlabelled), meta)
    eager = Predictor(cfg.output, precision="fp32").probabilities(batch)
    compiled = Predictor(cfg.output, precision="fp32", compile=True, batch_size=10)
    got = compiled.probabilities(batch)  # 24 images: batches of 10, 10 and a padded 4
    assert compiled.compiled is not None, "compilation failed and fell back to eager"
    np.testing.assert_allclose(got, eager, atol=1e-4)
