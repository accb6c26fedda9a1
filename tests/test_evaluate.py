"""Evaluation and pictures: metrics, confusion matrix, training report, feature maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from insectlib.classify.evaluate import evaluate, print_metrics
from insectlib.config import EvaluateConfig
from insectlib.data.images import decode, eval_transform, normalize
from insectlib.errors import InsectError
from insectlib.layout import LOCK_FILE, LOG_DIR, PREDICTIONS_DIR
from insectlib.metrics.confidence import MIN_TEMPERATURE_IMAGES, expected_calibration_error
from insectlib.metrics.scores import classification_metrics
from insectlib.model.network import load_model
from insectlib.model.precision import resolve_precision
from tests.conftest import assert_picture, expect_cli_error


def test_metrics_match_a_hand_computed_confusion_matrix():
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 1, 0], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["images"] == 6
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3),) * 2 + (3,)
    assert (b["precision"], b["recall"], b["f1"]) == (
        pytest.approx(2 / 3),
        1.0,
        pytest.approx(0.8),
    )
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0, 0, 0, 1)


def truth_of(path: str) -> str:
    return Path(path).parent.name


def test_evaluate_end_to_end(calibrated, labelled_root, tmp_path, capsys):
    model_dir, meta = calibrated
    out = tmp_path / "eval"
    # What a killed evaluation leaves before its first row: its locks and a log, no output.
    gone = json.dumps({"host": "elsewhere", "pid": 999999, "command": "evaluate"})
    for folder in (out, out / PREDICTIONS_DIR):
        (folder / LOG_DIR).mkdir(parents=True)
        (folder / LOCK_FILE).write_text(gone)
    m = evaluate(EvaluateConfig(data=labelled_root, model=model_dir, output=str(out)))
    predictions = pq.read_table(out / "predictions").to_pylist()
    assert len(predictions) == m["images"] == 90  # a plain tree: every image
    assert m["model"] == meta.model_id  # auto: bf16 or fp32 (no int8 calibration here)
    correct = sum(r["label"] == truth_of(r["path"]) for r in predictions)
    assert m["accuracy"] == pytest.approx(correct / 90)
    matrix = np.array(m["confusion_matrix"])
    assert matrix.sum() == 90 and np.trace(matrix) == correct
    for i, name in enumerate(meta.classes):  # rows: true class, columns: predicted
        for j, other in enumerate(meta.classes):
            expected = sum(truth_of(r["path"]) == name and r["label"] == other for r in predictions)
            assert matrix[i, j] == expected
    wrong = pq.read_table(out / "misclassified.parquet").to_pylist()
    assert len(wrong) == 90 - correct
    assert all(r["label"] != r["true_label"] == truth_of(r["path"]) for r in wrong)
    saved = json.loads((out / "confusion_matrix.json").read_text())
    assert saved == {"classes": meta.classes, "matrix": m["confusion_matrix"]}
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    assert_picture(out / "confusion_matrix.png")
    # Top-k, calibration and coverage, from the rows' (calibrated) probabilities.
    probs = np.array([r["probabilities"] for r in predictions])
    truth = np.array([meta.classes.index(truth_of(r["path"])) for r in predictions])
    top2 = np.mean([t in np.argsort(-p)[:2] for p, t in zip(probs, truth, strict=True)])
    assert m["top_k_accuracy"]["1"] == pytest.approx(m["accuracy"])
    assert m["top_k_accuracy"]["2"] == pytest.approx(top2)
    assert m["top_k_accuracy"]["3"] == 1.0 and "5" not in m["top_k_accuracy"]
    c = m["calibration"]
    assert c["temperature"] == meta.temperature == 1.7 and c["images"] == 90
    assert c["ece_after"] == pytest.approx(expected_calibration_error(probs, truth), abs=1e-6)
    model, _ = load_model(model_dir)  # the raw softmax, recovered from the rows
    transform = eval_transform(meta.image_size)
    x = torch.stack([transform(decode(open(r["path"], "rb").read())) for r in predictions])
    with torch.no_grad():
        raw = torch.softmax(model(normalize(x)), dim=1).numpy()
    # The rows ran in bf16 where this CPU runs it fast: the fp32 softmax differs in 1e-3s.
    bf16 = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    raw_ece = expected_calibration_error(raw, truth)
    assert c["ece_before"] == pytest.approx(raw_ece, abs=5e-3 if bf16 else 1e-4)
    kept = probs.max(1) >= 0.5
    row = next(r for r in m["coverage"] if r["min_score"] == 0.5)
    assert row["coverage"] == pytest.approx(kept.mean())
    assert row["accuracy"] == pytest.approx((probs.argmax(1) == truth)[kept].mean())
    assert_picture(out / "reliability.png")
    assert_picture(out / "coverage_accuracy.png")
    capsys.readouterr()
    print_metrics(m, str(out))
    shown = capsys.readouterr().out
    assert f"top-1 {m['accuracy']:.4f}, top-2 {top2:.4f}, top-3 1.0000" in shown
    assert f"ECE {c['ece_after']:.4f} (raw softmax {c['ece_before']:.4f}" in shown

    err = expect_cli_error(capsys, ["evaluate", labelled_root, "--model", model_dir,
                                    "--output", str(out)])  # fmt: skip
    assert "not empty" in err
    other = tmp_path / "other" / "wasps"
    other.mkdir(parents=True)
    (other / "w.jpg").write_bytes(Path(predictions[0]["path"]).read_bytes())
    (tmp_path / "other" / "beetles").mkdir()
    (tmp_path / "other" / "beetles" / "b.jpg").write_bytes(other.joinpath("w.jpg").read_bytes())
    err = expect_cli_error(capsys, ["evaluate", str(tmp_path / "other"), "--model", model_dir])
    assert "classes the model does not know: wasps" in err


def test_training_writes_metrics_curves_and_report(trained):
    cfg, meta = trained
    model_dir = Path(cfg.output)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    validation = metrics["validation"]
    assert np.array(validation["confusion_matrix"]).sum() == meta.epochs[-1]["val_images"]
    assert validation["accuracy"] == pytest.approx(meta.epochs[-1]["val_accuracy"])
    assert_picture(model_dir / "training_curves.png")
    assert_picture(model_dir / "confusion_matrix.png")
    report = (model_dir / "report.md").read_text()
    assert meta.model_id in report and "![training curves](training_curves.png)" in report
    assert "![confusion matrix](confusion_matrix.png)" in report
    for name in meta.classes:
        assert f"| {name} | " in report
    assert report.count("\n| 4 |") == 1  # one row per epoch
    # Temperature scaling fitted on the validation split: recorded, drawn and reported.
    c = metrics["calibration"]
    assert c["temperature"] == meta.temperature and c["images"] == validation["images"]
    assert "## Temperature scaling" in report
    assert "![reliability diagram](reliability.png)" in report
    if validation["accuracy"] == 1.0:  # nothing to fit against: no temperature
        assert meta.temperature is None and "No temperature: every validation image" in report
    elif validation["images"] < MIN_TEMPERATURE_IMAGES:  # too few to trust a fit
        assert meta.temperature is None and "too few to fit a temperature on" in report
    else:
        assert meta.temperature and c["nll_after"] <= c["nll_before"] + 1e-9
    assert_picture(model_dir / "reliability.png")


def test_a_file_named_predictions_is_no_empty_predictions_folder(tmp_path):
    """Only a folder of a killed run's bookkeeping is passed over (test_evaluate_end_to_end)."""
    from insectlib.classify.checks import plan_evaluation_output

    out = tmp_path / "ev"
    out.mkdir()
    (out / PREDICTIONS_DIR).write_text("mine")
    cfg = EvaluateConfig(data=str(tmp_path), model=str(tmp_path), output=str(out))
    with pytest.raises(InsectError, match="is not empty; pass --overwrite"):
        plan_evaluation_output(cfg)


def test_an_interrupted_evaluation_says_how_to_run_it_again(
    trained, labelled_root, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in its classification: evaluate has no --resume, which classify's advice
    names; it says the command to run instead."""
    from insectlib.classify import evaluate as evaluating
    from insectlib.classify.pipeline import resumable
    from insectlib.cli.main import main

    def interrupted(cfg, **_):
        with resumable(cfg):  # classify's own advice, as a Ctrl-C mid-run gives it
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluating, "classify", interrupted)
    cfg, _ = trained
    argv = ["evaluate", labelled_root, "--model", cfg.output, "--output", str(tmp_path / "ev")]
    for flags, said in (([], " with --overwrite"), (["--overwrite"], "")):
        capsys.readouterr()
        assert main([*argv, *flags]) == 130
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"insect: interrupted; the same command{said} evaluates again from the start"
