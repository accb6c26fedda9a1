"""`insect evaluate`: a model against a labelled tree, through the classification pipeline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq

from insectlib import outputs, storage
from insectlib.classify import classify
from insectlib.confidence import (
    calibration_change,
    coverage_accuracy,
    top_k_accuracy,
    uncalibrated,
)
from insectlib.config import ActorSettings, ClassifyConfig, EvaluateConfig, settings_of
from insectlib.errors import InsectError
from insectlib.labels import discover
from insectlib.layout import (
    CONFUSION_JSON,
    CONFUSION_PNG,
    COVERAGE_PNG,
    EVALUATION_FILES,
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    PREDICTIONS_DIR,
    RELIABILITY_PNG,
    write_file,
)
from insectlib.model import check_weights, read_meta
from insectlib.report import (
    classification_metrics,
    confusion_png,
    coverage_png,
    format_number,
    reliability_png,
)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Classify the labelled images of `cfg.data` (its held-out folder when it has one,
    else every image) and write metrics, the confusion matrix and the misclassified rows."""
    cfg.validate()
    # Its pictures inside the labelled tree would be read as images by the next run.
    outputs.check_location(
        cfg.output, {"the input": cfg.data, "the model": cfg.model}, apart=("the input",)
    )
    removal = plan_overwrite(cfg)
    meta = read_meta(cfg.model, cfg.s3)
    check_weights(cfg.model, meta, cfg.s3)
    labelled = discover(cfg.data, s3=cfg.s3)
    unknown = sorted(set(labelled.classes) - set(meta.classes))
    if unknown:
        raise InsectError(
            f"{cfg.data} has classes the model does not know: {', '.join(unknown)} "
            f"(model classes: {', '.join(meta.classes)})"
        )
    items = labelled.val if labelled.held_out else labelled.train + labelled.val
    index = {name: i for i, name in enumerate(meta.classes)}
    truth = {storage.printable(uri): index[labelled.classes[y]] for uri, y in items}
    where = f"its {labelled.held_out}/ folder" if labelled.held_out else "every image"
    print(f"evaluating model {meta.model_id} on {len(truth)} images of {cfg.data} ({where})")
    # Only now that the data is listed and the model checked: the old evaluation goes.
    outputs.remove(cfg.output, removal, cfg.s3)
    predictions = storage.join(cfg.output, PREDICTIONS_DIR)
    classified = classify(
        ClassifyConfig(
            input=cfg.data,
            model=cfg.model,
            output=predictions,
            # The old predictions are gone (above): this output starts empty.
            **{**settings_of(cfg, ActorSettings), "overwrite": False},
        ),
        paths=sorted(uri for uri, _ in items),
    )

    pa_fs, pa_path = storage.pyarrow_filesystem(predictions, cfg.s3)
    table = pyarrow.dataset.dataset(pa_path, filesystem=pa_fs, format="parquet").to_table()
    true_index = pa.array([truth[p] for p in table.column("path").to_pylist()], pa.int32())
    table = table.append_column("true_label", pa.array(np.array(meta.classes)[true_index]))
    table = table.append_column("true_label_index", true_index)
    ok = table.filter(pc.field("error").is_null())
    y_true = ok.column("true_label_index").to_numpy()
    metrics = classification_metrics(y_true, ok.column("label_index").to_numpy(), meta.classes)
    # What classified: with int8 (asked for, or chosen by auto) not the fp32 model.
    metrics.update(
        {"model": classified.model, "data": cfg.data, "unreadable": table.num_rows - ok.num_rows}
    )
    probs = ok.column("probabilities").combine_chunks().flatten().to_numpy()
    probs = probs.reshape(len(y_true), len(meta.classes))
    metrics.update(confidence_metrics(probs, y_true, meta.temperature))
    wrong = ok.filter(pc.field("label_index") != pc.field("true_label_index"))
    wrong = wrong.select(["path", "true_label", "label", "score", "probabilities", "model"])

    write_file(cfg.output, METRICS_FILE, json.dumps(metrics, indent=2), cfg.s3)
    confusion = {"classes": meta.classes, "matrix": metrics["confusion_matrix"]}
    write_file(cfg.output, CONFUSION_JSON, json.dumps(confusion, indent=2), cfg.s3)
    write_file(cfg.output, CONFUSION_PNG, confusion_png(metrics), cfg.s3)
    if len(y_true):
        picture = reliability_png(metrics["calibration"], cfg.data)
        write_file(cfg.output, RELIABILITY_PNG, picture, cfg.s3)
        correct = probs.argmax(1) == y_true
        picture = coverage_png(probs.max(1), correct, metrics["coverage"])
        write_file(cfg.output, COVERAGE_PNG, picture, cfg.s3)
    out_fs, out_path = storage.pyarrow_filesystem(cfg.output, cfg.s3)
    pq.write_table(wrong, f"{out_path.rstrip('/')}/{MISCLASSIFIED_FILE}", filesystem=out_fs)
    return metrics


def confidence_metrics(probs: np.ndarray, y_true: np.ndarray, temperature: float | None) -> dict:
    """Top-k accuracy, calibration (ECE and NLL of the classified probabilities and of the
    raw softmax behind them) and coverage/accuracy by score threshold."""
    raw = uncalibrated(probs, temperature) if temperature else probs
    return {
        "top_k_accuracy": top_k_accuracy(probs, y_true),
        "calibration": calibration_change(raw, probs, y_true, temperature),
        "coverage": coverage_accuracy(probs.max(1), probs.argmax(1) == y_true),
    }


def plan_overwrite(cfg: EvaluateConfig) -> list[str]:
    """What --overwrite will remove (only files an evaluation writes); refuses a non-empty
    output without it, or one holding anything else."""
    entries = outputs.entries_to_replace(cfg.output, cfg.s3, cfg.overwrite)
    if not entries:
        return []
    why = "--overwrite removes only what insect wrote: move them or choose another --output"
    outputs.refuse_foreign(cfg.output, entries, why, EVALUATION_FILES, (PREDICTIONS_DIR,))
    predictions = storage.join(cfg.output, PREDICTIONS_DIR)
    own = [e["name"] for e in entries if e["type"] == "file"]
    return own + outputs.overwrite_plan(predictions, cfg.s3)


def print_metrics(metrics: dict, output: str) -> None:
    accuracy = format_number(metrics["accuracy"], ".4f")
    print(
        f"accuracy {accuracy} on {metrics['images']} images"
        + (f" ({metrics['unreadable']} unreadable)" if metrics["unreadable"] else "")
    )
    if metrics.get("top_k_accuracy"):
        print(", ".join(f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items()))
        c = metrics["calibration"]
        if c["temperature"]:
            print(
                f"ECE {c['ece_after']:.4f} (raw softmax {c['ece_before']:.4f}, temperature "
                f"{c['temperature']:.3f}); NLL {c['nll_after']:.4f} (raw {c['nll_before']:.4f})"
            )
        else:
            print(
                f"ECE {c['ece_after']:.4f}, NLL {c['nll_after']:.4f} (raw softmax: the model "
                "has no temperature)"
            )
        print(
            "--min-score  coverage  accuracy: "
            + ", ".join(
                f"{r['min_score']:g} {r['coverage']:.3f} {format_number(r['accuracy'], '.3f')}"
                for r in metrics["coverage"]
            )
        )
    print(f"{'class':<20} {'precision':>9} {'recall':>7} {'F1':>6} {'images':>7}")
    for name, m in metrics["per_class"].items():
        print(
            f"{name:<20} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
            f"{m['support']:>7}"
        )
    print(f"confusion matrix, metrics and misclassified images in {output}")
