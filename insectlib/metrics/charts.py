"""Pictures: confusion matrix, training curves, reliability diagram, coverage, a
classification's summary, feature maps. matplotlib's object API (`Figure`, which renders
with the headless Agg canvas: no display, no pyplot state).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def confusion_png(metrics: dict, title: str = "confusion matrix") -> bytes:
    """The confusion matrix of `scores.classification_metrics` as a PNG."""
    from sklearn.metrics import ConfusionMatrixDisplay

    classes = metrics["classes"]
    size = max(4.0, 0.6 * len(classes) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=classes).plot(
        ax=ax, colorbar=False, xticks_rotation=45 if len(classes) > 4 else "horizontal"
    )
    ax.set_title(f"{title} (accuracy {metrics['accuracy']:.3f})")
    return _png(fig)


def curves_png(epochs: list[dict]) -> bytes:
    """Loss and accuracy per epoch, training and validation, as a PNG."""
    x = [e["epoch"] for e in epochs]
    fig = Figure(figsize=(10, 4))
    for ax, what in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, style in (("train", "o-"), ("val", "s--")):
            y = [np.nan if e[f"{split}_{what}"] is None else e[f"{split}_{what}"] for e in epochs]
            ax.plot(x, y, style, label="training" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training curves")
    return _png(fig)


def reliability_png(calibration: dict, title: str) -> bytes:
    """Reliability diagram of a `confidence.temperature_report`: accuracy against mean
    confidence per bin, before and after temperature scaling (the diagonal is perfect
    calibration), with the share of images in each bin below."""
    fig = Figure(figsize=(6, 6.5))
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    width = 1 / calibration["reliability_before"]["bins"]
    curves = (("before", "o-", "raw softmax"), ("after", "s-", "calibrated"))
    for key, style, name in curves[: 2 if calibration["temperature"] else 1]:
        r = calibration[f"reliability_{key}"]
        filled = [i for i, n in enumerate(r["counts"]) if n]
        label = f"{name} (T={calibration['temperature']:.2f})" if key == "after" else name
        top.plot(
            [r["confidence"][i] for i in filled],
            [r["accuracy"][i] for i in filled],
            style,
            label=f"{label}, ECE {calibration[f'ece_{key}']:.3f}",
        )
        centres = (np.arange(r["bins"]) + 0.5) * width
        shift = -width / 4 if key == "before" else width / 4
        bottom.bar(centres + shift, np.array(r["counts"]) / r["images"], width / 2, label=name)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("share of images")
    top.set_title(f"reliability, {title} ({calibration['images']} images)")
    return _png(fig)


def coverage_png(scores: np.ndarray, correct: np.ndarray, marked: list[dict]) -> bytes:
    """Accuracy of the images kept against the share kept (coverage), as the score
    threshold rises; the `confidence.coverage_accuracy` thresholds marked on the curve."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept = np.arange(1, len(order) + 1)
    accuracy = np.cumsum(np.asarray(correct, float)[order]) / kept
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.plot(kept / len(order), accuracy, "-")
    for row in marked:
        if row["images"]:
            ax.plot(row["coverage"], row["accuracy"], "o", color="black")
            ax.annotate(
                f"{row['min_score']:g}",
                (row["coverage"], row["accuracy"]),
                fontsize=8,
                xytext=(4, -10),
                textcoords="offset points",
            )
    ax.set_xlabel("coverage (share of images decided)")
    ax.set_ylabel("accuracy of those decided")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("coverage and accuracy by --min-score")
    return _png(fig)


def summary_png(summary: dict, shown: int = 30) -> bytes:
    """A classification run's summary (`summary.summarize`): count per predicted class (the
    `shown` largest), the distribution of scores and the errors by kind."""
    fig = Figure(figsize=(15, 4.5))
    classes_ax, scores_ax, errors_ax = fig.subplots(1, 3)
    classes = sorted(summary["classes"].items(), key=lambda kv: -kv[1])[:shown]
    if summary.get("undecided"):
        classes.append(("(not decided)", summary["undecided"]))
    _bars(classes_ax, classes, "images per predicted class")
    edges, counts = summary["scores"]["edges"], summary["scores"]["counts"]
    scores_ax.stairs(counts, edges, fill=True)
    scores_ax.set_xlabel("score (top probability)")
    scores_ax.set_ylabel("images")
    scores_ax.set_title("scores")
    _bars(errors_ax, sorted(summary["error_kinds"].items(), key=lambda kv: -kv[1]), "errors")
    rate = summary.get("images_per_second")
    fig.suptitle(
        f"{summary['rows']} rows, {summary['errors']} errors"
        + (f", {summary['seconds']:.1f} s, {rate:.1f} images/s" if rate else "")
    )
    return _png(fig)


def _bars(ax, items: list[tuple[str, int]], title: str) -> None:
    names = [name for name, _ in items]
    ax.barh(range(len(items)), [n for _, n in items])
    ax.set_yticks(range(len(items)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title if items else f"{title}: none")
    if not items:
        ax.axis("off")


def feature_maps_png(activation: np.ndarray, title: str, max_maps: int = 64) -> bytes:
    """The first `max_maps` channels of a (C, H, W) activation as a grid of images, each
    scaled to its own range (viridis: dark low, yellow high)."""
    maps = activation[:max_maps]
    cols = math.ceil(math.sqrt(len(maps)))
    rows = math.ceil(len(maps) / cols)
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for i, (ax, m) in enumerate(zip(axes, maps, strict=False)):
        ax.imshow(m, cmap="viridis")
        ax.set_title(str(i), fontsize=7)
    fig.suptitle(title)
    return _png(fig)
