"""Temperature scaling, calibration error, top-k and coverage: checked against hand-computed
values, against a known temperature, and on a real over-confident model."""

import numpy as np
import pytest

from insectlib.metrics import confidence as C
from insectlib.metrics.charts import reliability_png
from insectlib.model.meta import ModelMeta
from insectlib.model.predictor import RowFormat, prediction_table
from insectlib.training.report import report_markdown


def test_ece_and_reliability_by_hand():
    # confidences 0.9, 0.9 (one right), 0.65 (right), 0.45 (wrong) in 15 bins
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.35, 0.65, 0.0], [0.45, 0.3, 0.25]])
    labels = np.array([0, 1, 1, 2])
    r = C.reliability(probs, labels)
    # bins of 1/15: 0.9 -> bin 13 (0.867, 0.933]; 0.65 -> bin 9 (0.6, 0.667]; 0.45 -> bin 6
    assert r["counts"][13] == 2 and r["counts"][9] == 1 and r["counts"][6] == 1
    assert r["accuracy"][13] == 0.5 and r["accuracy"][9] == 1.0 and r["accuracy"][6] == 0.0
    assert sum(r["counts"]) == 4 and r["accuracy"][0] is None
    expected = (2 * abs(0.9 - 0.5) + abs(0.65 - 1.0) + abs(0.45 - 0.0)) / 4
    assert r["ece"] == pytest.approx(expected)
    assert C.top_k_accuracy(probs, labels) == {"1": 0.5, "2": 0.75, "3": 1.0}
    rows = {r["min_score"]: r for r in C.coverage_accuracy(probs.max(1), probs.argmax(1) == labels)}
    assert rows[0.5]["coverage"] == 0.75 and rows[0.5]["accuracy"] == pytest.approx(2 / 3)
    assert rows[0.9]["images"] == 2 and rows[0.9]["accuracy"] == 0.5
    assert rows[0.95] == {"min_score": 0.95, "images": 0, "coverage": 0.0, "accuracy": None}


def test_fitted_temperature_recovers_the_true_one():
    """Labels drawn from softmax(z / 3): the fit finds T near 3, the NLL and ECE of z / T
    fall, and no prediction changes."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(6000, 5))
    truth = C.probabilities(logits, 3.0)
    labels = np.array([rng.choice(5, p=p) for p in truth])
    t = C.fit_temperature(logits, labels)
    assert 2.7 < t < 3.3
    report = C.temperature_report(logits, labels)
    assert report["nll_after"] < report["nll_before"] and report["ece_after"] < 0.02
    assert report["ece_after"] < report["ece_before"] / 5
    assert (C.probabilities(logits, t).argmax(1) == logits.argmax(1)).all()
    # The raw softmax is recovered from calibrated probabilities.
    back = C.raw_softmax(C.probabilities(logits, t).astype(np.float32), t)
    np.testing.assert_allclose(back, C.probabilities(logits), atol=1e-5)


def test_no_temperature_is_fitted_when_every_prediction_is_right():
    """With no mistake the NLL keeps falling as T goes to 0: the fit would end at the bound
    and make every later mistake near-certain. No temperature then."""
    logits = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 1.0], [0.5, 0.0, 4.0]])
    report = C.temperature_report(logits, np.array([0, 1, 2]))
    assert report["temperature"] is None and "classified right" in report["note"]
    assert report["ece_after"] == report["ece_before"]
    # One mistake in three, too sure of it: too few images to fit on, then enough.
    one_wrong = np.array([0, 1, 0])
    few = C.temperature_report(logits, one_wrong)
    assert few["temperature"] is None and "too few" in few["note"]
    n = C.MIN_TEMPERATURE_IMAGES // 3 + 1
    enough = C.temperature_report(np.tile(logits * 2, (n, 1)), np.tile(one_wrong, n))
    assert enough["temperature"] > 1 and enough["nll_after"] < enough["nll_before"]


def test_a_fitted_temperature_is_reported_and_drawn():
    """The training report's calibration section and reliability diagram for a fitted T."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(300, 3))
    labels = np.where(rng.random(300) < 0.7, logits.argmax(1), rng.integers(0, 3, 300))
    c = C.temperature_report(logits, labels)
    assert c["temperature"] and c["nll_after"] <= c["nll_before"]
    meta = ModelMeta(classes=["a", "b", "c"], arch="vgg16", image_size=32)
    text = report_markdown(meta, {}, None, c)
    assert f"Temperature {c['temperature']:.4f}, fitted on the 300 validation images" in text
    assert f"| ECE (15 bins) | {c['ece_before']:.4f} | {c['ece_after']:.4f} |" in text
    assert reliability_png(c, "validation").startswith(b"\x89PNG")


def test_a_temperature_at_the_bound_is_not_applied():
    """Labels unrelated to the logits: the fit runs to T = 20 (uniform probabilities);
    such a temperature is not kept."""
    rng = np.random.default_rng(2)
    report = C.temperature_report(rng.normal(0, 3, (200, 3)), rng.integers(0, 3, 200))
    assert report["temperature"] is None and "ended at the bound" in report["note"]


def test_a_nan_score_is_not_decided():
    """A row whose probabilities are NaN (an overflow) is not decided, whatever S."""
    meta = ModelMeta(classes=["a", "b"], arch="vgg16", image_size=32, model_id="0" * 16)
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.4, 0.6]], np.float32)
    rows = prediction_table(
        ["x", "y", "z"], probs, [None] * 3, meta, RowFormat(min_score=0.5)
    ).to_pylist()
    assert [r["decided"] for r in rows] == [True, False, True]
    assert rows[1]["label"] is None and rows[2]["label"] == "b"
