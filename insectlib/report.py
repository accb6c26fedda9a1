"""Metrics and pictures: accuracy report, confusion matrix, training curves, feature maps.

Metrics come from scikit-learn and plots from matplotlib's object API (`Figure`, which
renders with the headless Agg canvas: no display, no pyplot state).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure

from insectlib.layout import CONFUSION_PNG, CURVES_FILE, RELIABILITY_PNG


def format_number(x: float | None, spec: str) -> str:
    """`x` formatted with `spec`; "n/a" for a metric that has no value (None or NaN)."""
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true
    class, columns: predicted class, both in `classes` order)."""
    # scikit-learn here, not at the top: importing it takes 1.3 s, and every classification
    # run imports this module for its summary picture.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "classes": classes,
        "images": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def confusion_png(metrics: dict, title: str = "confusion matrix") -> bytes:
    """The confusion matrix of `classification_metrics` as a PNG."""
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
    """Reliability diagram of a `confidence.calibration_report`: accuracy against mean
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


def report_markdown(
    meta, config: dict, metrics: dict | None, calibration: dict | None = None
) -> str:
    """report.md of a model directory: configuration, data, epochs, curves, confusion
    matrix, calibration."""
    lines = [
        f"# Training report: model {meta.model_id}",
        "",
        f"{meta.arch}, {len(meta.classes)} classes ({', '.join(meta.classes)}), "
        f"{meta.image_size} px, base weights `{meta.base_weights}`, freeze `{meta.freeze}`.",
        "",
        "## Configuration",
        "",
        "| option | value |",
        "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in config.items() if k != "s3"],
        "",
        "## Data",
        "",
        f"Split: {meta.data.get('split', '')}. Unreadable images skipped: "
        f"{meta.data.get('skipped_images', 0)}.",
        "",
        "| class | training | validation |",
        "|---|---|---|",
    ]
    counts = meta.data.get("counts", {})
    for name in meta.classes:
        train = counts.get("train", {}).get(name, 0)
        val = counts.get("val", {}).get(name, 0)
        lines.append(f"| {name} | {train} | {val} |")
    lines += [
        "",
        "## Epochs",
        "",
        "| epoch | train loss | train acc | val loss | val acc | img/s | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    f = format_number
    for e in meta.epochs:
        lines.append(
            f"| {e['epoch']} | {f(e['train_loss'], '.4f')} | {f(e['train_accuracy'], '.3f')} | "
            f"{f(e['val_loss'], '.4f')} | {f(e['val_accuracy'], '.3f')} | "
            f"{f(e['images_per_second'], '.1f')} | {f(e['seconds'], '.1f')} |"
        )
    lines += ["", f"![training curves]({CURVES_FILE})", ""]
    if metrics:
        lines += [
            "## Validation, last epoch",
            "",
            f"Accuracy {metrics['accuracy']:.4f} on {metrics['images']} images.",
            "",
            "| class | precision | recall | F1 | images |",
            "|---|---|---|---|---|",
            *[
                f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                f"{m['support']} |"
                for c, m in metrics["per_class"].items()
            ],
            "",
            f"![confusion matrix]({CONFUSION_PNG})",
            "",
        ]
    c = calibration
    if c and not c["temperature"]:
        lines += [
            "## Calibration",
            "",
            f"No temperature: {c.get('note', '')}. ECE ({c['reliability_before']['bins']} "
            f"bins) {c['ece_before']:.4f}, NLL {c['nll_before']:.4f} on the {c['images']} "
            "validation images.",
            "",
            f"![reliability diagram]({RELIABILITY_PNG})",
            "",
        ]
    elif c:
        lines += [
            "## Calibration",
            "",
            f"Temperature {c['temperature']:.4f}, fitted on the {c['images']} validation images "
            "(classify divides the logits by it; `--no-calibration` gives the raw softmax).",
            "",
            "| | raw softmax | calibrated |",
            "|---|---|---|",
            f"| ECE ({c['reliability_before']['bins']} bins) | {c['ece_before']:.4f} | "
            f"{c['ece_after']:.4f} |",
            f"| NLL | {c['nll_before']:.4f} | {c['nll_after']:.4f} |",
            "",
            f"![reliability diagram]({RELIABILITY_PNG})",
            "",
        ]
    return "\n".join(lines)
