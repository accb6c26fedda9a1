"""Classification metrics from scikit-learn, and how a metric is shown."""

from __future__ import annotations

import math

import numpy as np


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
