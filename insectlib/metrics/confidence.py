"""How far a score can be trusted: temperature scaling, expected calibration error, top-k
accuracy and coverage against accuracy. numpy and scipy only: training, classification and
evaluation share it.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides
the logits by one scalar T fitted on held-out images to minimise their negative
log-likelihood. T > 1 softens an over-confident model, T < 1 sharpens an under-confident
one; the order of the classes, and so every top-1 and top-k prediction, is unchanged.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from insectlib.config import TEMPERATURE_RANGE

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # reported by evaluate
TOP_K = (1, 2, 3, 5)  # top-k accuracies reported by evaluate (those up to the class count)
MIN_TEMPERATURE_IMAGES = 50  # validation images a temperature is fitted on, at least
TEMPERATURE_FOLDS = 5  # parts of the validation images the fit is cross-validated on


def probabilities(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Softmax of `logits / temperature` (None: 1), in float64."""
    return softmax(np.asarray(logits, np.float64) / (temperature or 1.0), axis=1)


def raw_softmax(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The raw softmax behind probabilities calibrated with `temperature`: log p is z / T
    up to a constant per row, so softmax(T log p) = softmax(z). Exact up to float32
    rounding; a probability that underflowed to 0 counts as the smallest float32."""
    logp = np.log(np.maximum(np.asarray(probs, np.float64), np.finfo(np.float32).tiny))
    return softmax(temperature * logp, axis=1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float | None = None) -> float:
    """Mean negative log-likelihood of the true `labels` under softmax(logits / T), from
    the logits (exact where a probability would underflow)."""
    logp = log_softmax(np.asarray(logits, np.float64) / (temperature or 1.0), axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in TEMPERATURE_RANGE that minimises the NLL of `labels`: a bounded
    one-dimensional search over log T (the NLL is smooth and has one minimum there)."""
    labels = np.asarray(labels, int)
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(found.x))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: images, mean confidence and accuracy (None where a
    bin is empty), and the expected calibration error: the images-weighted mean gap
    between confidence and accuracy."""
    probs, labels = np.asarray(probs), np.asarray(labels, int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of 0 goes to bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct, minlength=bins)
    gap = np.abs(conf_sum - correct_sum)  # = count * |mean confidence - accuracy|
    return {
        "bins": bins,
        "images": int(len(labels)),
        "ece": float(gap.sum() / len(labels)) if len(labels) else None,
        "counts": counts.tolist(),
        "confidence": [float(c / n) if n else None for c, n in zip(conf_sum, counts, strict=True)],
        "accuracy": [float(c / n) if n else None for c, n in zip(correct_sum, counts, strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """ECE with `bins` equal-width confidence bins (None without images)."""
    return reliability(probs, labels, bins)["ece"]


# Why no temperature is fitted where every held-out image is classified right.
ALL_RIGHT = (
    "every validation image is classified right: the NLL falls as T goes to 0 and has no "
    "minimum to fit, so the probabilities stay the raw softmax"
)


def temperature_report(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Fit the temperature on held-out `logits` and their `labels`, and what it changes (see
    `temperature_change`). The temperature is kept only where it earns its place: with
    MIN_TEMPERATURE_IMAGES or more, some of them misclassified (with none, the NLL falls as
    T goes to 0 and every later mistake would be near-certain), a fit inside
    TEMPERATURE_RANGE, and a cross-validated NLL below the raw softmax's (fitted on part of
    the images, it must help on the rest). Otherwise temperature None and a note why."""
    labels = np.asarray(labels, int)
    before = probabilities(logits)

    def raw(note: str, **more) -> dict:
        return {**temperature_change(before, before, labels, None), "note": note, **more}

    if (before.argmax(1) == labels).all():
        return raw(ALL_RIGHT)
    if len(labels) < MIN_TEMPERATURE_IMAGES:
        return raw(
            f"{len(labels)} validation images are too few to fit a temperature on (at least "
            f"{MIN_TEMPERATURE_IMAGES}), so the probabilities stay the raw softmax"
        )
    temperature = fit_temperature(logits, labels)
    low, high = TEMPERATURE_RANGE
    if not low * 1.01 < temperature < high / 1.01:
        return raw(
            f"the fit ended at the bound of {low}-{high} (T={temperature:.3g}): too few or too "
            "unrepresentative validation images to trust, so the probabilities stay the raw "
            "softmax"
        )
    checked = cross_validated_nll(logits, labels)
    if checked["with_temperature"] >= checked["raw"]:
        return raw(
            f"a temperature fitted on {TEMPERATURE_FOLDS - 1} of {TEMPERATURE_FOLDS} parts of "
            "the validation images did not lower the NLL of the part left out (cross-validated "
            f"NLL {checked['with_temperature']:.4f} against {checked['raw']:.4f} raw), so the "
            "probabilities stay the raw softmax",
            cross_validated=checked,
        )
    report = temperature_change(before, probabilities(logits, temperature), labels, temperature)
    # From the logits: exact where a probability underflows in float32.
    report.update(nll_before=nll(logits, labels), nll_after=nll(logits, labels, temperature))
    return {**report, "cross_validated": checked}


def cross_validated_nll(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """The mean NLL of each of TEMPERATURE_FOLDS parts (a seeded split) under the
    temperature fitted on the other parts, and under the raw softmax."""
    order = np.random.default_rng(seed).permutation(len(labels))
    fitted = raw = 0.0
    for part in np.array_split(order, TEMPERATURE_FOLDS):
        rest = np.setdiff1d(order, part)
        t = fit_temperature(logits[rest], labels[rest])
        fitted += nll(logits[part], labels[part], t) * len(part)
        raw += nll(logits[part], labels[part]) * len(part)
    return {"with_temperature": fitted / len(labels), "raw": raw / len(labels)}


def temperature_change(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, temperature: float | None
) -> dict:
    """NLL, ECE and the reliability bins of the probabilities `before` and `after`
    temperature scaling (None: not calibrated), for metrics.json and the reliability
    diagram."""
    labels = np.asarray(labels, int)
    result = {"temperature": temperature, "images": int(len(labels))}
    for key, probs in (("before", before), ("after", after)):
        bins = reliability(probs, labels)
        chosen = np.asarray(probs, np.float64)[np.arange(len(labels)), labels]
        nll_value = -np.log(np.maximum(chosen, np.finfo(np.float32).tiny)).mean()
        result[f"nll_{key}"] = float(nll_value) if len(labels) else None
        result[f"ece_{key}"] = bins["ece"]
        result[f"reliability_{key}"] = bins
    return result


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, ks=TOP_K) -> dict[str, float]:
    """{"k": fraction of images whose true label is among the k most probable} for the
    `ks` up to the number of classes."""
    probs, labels = np.asarray(probs), np.asarray(labels, int)
    order = np.argsort(-probs, axis=1, kind="stable")
    result = {}
    for k in ks:
        if k <= probs.shape[1] and len(labels):
            result[str(k)] = float((order[:, :k] == labels[:, None]).any(axis=1).mean())
    return result


def coverage_accuracy(
    scores: np.ndarray, correct: np.ndarray, thresholds=COVERAGE_THRESHOLDS
) -> list[dict]:
    """For each threshold: the fraction of images whose score reaches it (coverage, what
    `classify --min-score` would decide) and the accuracy among those (None if none)."""
    scores, correct = np.asarray(scores), np.asarray(correct, bool)
    rows = []
    for t in thresholds:
        kept = scores >= t
        n = int(kept.sum())
        rows.append(
            {
                "min_score": t,
                "images": n,
                "coverage": n / len(scores) if len(scores) else None,
                "accuracy": float(correct[kept].mean()) if n else None,
            }
        )
    return rows
