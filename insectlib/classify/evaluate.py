"""`insect evaluate`: a model against a labelled tree, through the classification pipeline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq

from insectlib import storage
from insectlib.classify import outputs
from insectlib.classify.checks import check_evaluation, plan_evaluation_output
from insectlib.classify.pipeline import classify
from insectlib.config import ActorSettings, ClassifyConfig, EvaluateConfig, settings_of
from insectlib.data.labels import EVALUATION_DIRS, TRAIN_DIR, discover, unicode_twins
from insectlib.errors import InsectError
from insectlib.layout import (
    CONFUSION_JSON,
    CONFUSION_PNG,
    COVERAGE_PNG,
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    PREDICTIONS_DIR,
    RELIABILITY_PNG,
)
from insectlib.metrics.charts import confusion_png, coverage_png, reliability_png
from insectlib.metrics.confidence import (
    coverage_accuracy,
    raw_softmax,
    temperature_change,
    top_k_accuracy,
)
from insectlib.metrics.scores import classification_metrics, format_number
from insectlib.model.meta import ModelMeta, read_meta
from insectlib.model.network import check_weights
from insectlib.runtime import console
from insectlib.storage.lock import output_lock


def evaluate(cfg: EvaluateConfig, checked: bool = False) -> dict:
    """Classify the labelled images of `cfg.data` (its held-out folder when it has one,
    else every image) and write metrics, the confusion matrix and the misclassified rows.
    `checked`: `checks.check_evaluation` ran for this `cfg` already."""
    if not checked:
        check_evaluation(cfg)
    meta = read_meta(cfg.model, cfg.s3)
    check_weights(cfg.model, meta, cfg.s3)
    truth = labelled_images(cfg, meta)
    with output_lock(cfg.output, "evaluate", cfg.s3, console.say), restartable(cfg):
        # Only now that the data is listed and the model checked: the old evaluation goes
        # (planned again: another run may have ended since).
        outputs.remove(cfg.output, plan_evaluation_output(cfg), cfg.s3)
        predictions = storage.join(cfg.output, PREDICTIONS_DIR)
        classified = classify(
            ClassifyConfig(
                input=cfg.data,
                model=cfg.model,
                output=predictions,
                # The old predictions are gone (above): this output starts empty.
                **{**settings_of(cfg, ActorSettings), "overwrite": False},
            ),
            paths=sorted(truth),
        )
        table = with_truth(read_predictions(predictions, cfg.s3), truth, meta)
        metrics, probs, y_true = evaluation_metrics(table, meta)
        # What classified: with int8 (asked for, or chosen by auto) not the fp32 model.
        metrics.update({"model": classified.model, "data": cfg.data})
        write_evaluation(cfg, meta, table, metrics, probs, y_true)
    return metrics


def restartable(cfg: EvaluateConfig):
    """A Ctrl-C within the block says how to evaluate again (the CLI prints it), in place of
    its classification's advice: evaluate has no --resume, and needs --overwrite once rows
    are written."""
    flag = "" if cfg.overwrite else " with --overwrite"
    return console.on_interrupt(f"the same command{flag} evaluates again from the start")


def labelled_images(cfg: EvaluateConfig, meta: ModelMeta) -> dict[str, int]:
    """{path as the rows name it: true label index in the model's classes} of the images
    to evaluate: the held-out folder of `cfg.data` when it has one, else every image."""
    labelled = discover(cfg.data, s3=cfg.s3, held_out_dirs=EVALUATION_DIRS)
    warn_if_not_held_out(cfg.data, labelled.held_out, meta)
    unknown = sorted(set(labelled.classes) - set(meta.classes))
    if unknown:
        raise InsectError(
            f"{cfg.data} has classes the model does not know: {', '.join(unknown)} "
            f"(model classes: {', '.join(meta.classes)})" + unicode_twins(unknown, meta.classes)
        )
    items = labelled.val if labelled.held_out else labelled.train + labelled.val
    index = {name: i for i, name in enumerate(meta.classes)}
    where = f"its {labelled.held_out}/ folder" if labelled.held_out else "every image"
    console.say(f"evaluating model {meta.model_id} on {len(items)} images of {cfg.data} ({where})")
    return {storage.printable(uri): index[labelled.classes[y]] for uri, y in items}


def warn_if_not_held_out(data: str, held_out: str | None, meta: ModelMeta) -> None:
    """Say so where the images evaluated are images training used: its validation folder
    (where it fitted its temperature too), its train/ folder, or, with no held-out folder,
    every image of its root."""
    used = used_in_training(data, held_out, meta.data)
    if used:
        console.warn(
            f"warning: {used}: these figures are not held out; evaluate on images training "
            "never saw (a test/ folder beside train/ and val/)"
        )


def used_in_training(data: str, held_out: str | None, trained: dict) -> str | None:
    """How training used the images `data` names (`held_out`: the folder of it evaluated),
    from the model's record of its data (`trained`); None where it never saw them."""
    root, folder = trained.get("root"), trained.get("held_out")
    if not root:
        return None
    validated = "training validated on {} (and fitted its temperature there)"
    where = storage.location_key(data)
    if where == storage.location_key(root):
        if held_out and held_out != folder:
            return None  # a folder training never read (test/ beside val/)
        if held_out:
            return validated.format(f"its {held_out}/ folder")
        return "training trained and validated on every image of it"
    if folder and where == storage.location_key(storage.join(root, folder)):
        return validated.format(f"these images, its {folder}/ folder")
    if folder and where == storage.location_key(storage.join(root, TRAIN_DIR)):
        return f"training trained on these images, its {TRAIN_DIR}/ folder"
    return None


def read_predictions(predictions: str, s3) -> pa.Table:
    pa_fs, pa_path = storage.pyarrow_filesystem(predictions, s3)
    return pyarrow.dataset.dataset(pa_path, filesystem=pa_fs, format="parquet").to_table()


def with_truth(table: pa.Table, truth: dict[str, int], meta: ModelMeta) -> pa.Table:
    """The predictions with their true label and its index."""
    true_index = pa.array([truth[p] for p in table.column("path").to_pylist()], pa.int32())
    table = table.append_column("true_label", pa.array(np.array(meta.classes)[true_index]))
    return table.append_column("true_label_index", true_index)


def evaluation_metrics(table: pa.Table, meta: ModelMeta) -> tuple[dict, np.ndarray, np.ndarray]:
    """The metrics of the classified rows, and their probabilities and true labels."""
    ok = table.filter(pc.field("error").is_null())
    y_true = ok.column("true_label_index").to_numpy()
    metrics = classification_metrics(y_true, ok.column("label_index").to_numpy(), meta.classes)
    metrics["unreadable"] = table.num_rows - ok.num_rows
    probs = ok.column("probabilities").combine_chunks().flatten().to_numpy()
    probs = probs.reshape(len(y_true), len(meta.classes))
    metrics.update(confidence_metrics(probs, y_true, meta.temperature))
    return metrics, probs, y_true


def write_evaluation(
    cfg: EvaluateConfig,
    meta: ModelMeta,
    table: pa.Table,
    metrics: dict,
    probs: np.ndarray,
    y_true: np.ndarray,
) -> None:
    """metrics.json, the confusion matrix, the pictures and the misclassified rows."""
    storage.write_file(cfg.output, METRICS_FILE, json.dumps(metrics, indent=2), cfg.s3)
    confusion = {"classes": meta.classes, "matrix": metrics["confusion_matrix"]}
    storage.write_file(cfg.output, CONFUSION_JSON, json.dumps(confusion, indent=2), cfg.s3)
    storage.write_file(cfg.output, CONFUSION_PNG, confusion_png(metrics), cfg.s3)
    if len(y_true):
        picture = reliability_png(metrics["calibration"], cfg.data)
        storage.write_file(cfg.output, RELIABILITY_PNG, picture, cfg.s3)
        correct = probs.argmax(1) == y_true
        picture = coverage_png(probs.max(1), correct, metrics["coverage"])
        storage.write_file(cfg.output, COVERAGE_PNG, picture, cfg.s3)
    ok = table.filter(pc.field("error").is_null())
    wrong = ok.filter(pc.field("label_index") != pc.field("true_label_index"))
    wrong = wrong.select(["path", "true_label", "label", "score", "probabilities", "model"])
    buffer = pa.BufferOutputStream()  # whole or absent, as every file of the output
    pq.write_table(wrong, buffer)
    storage.write_file(cfg.output, MISCLASSIFIED_FILE, buffer.getvalue(), cfg.s3)


def confidence_metrics(probs: np.ndarray, y_true: np.ndarray, temperature: float | None) -> dict:
    """Top-k accuracy, calibration (ECE and NLL of the classified probabilities and of the
    raw softmax behind them) and coverage/accuracy by score threshold."""
    raw = raw_softmax(probs, temperature) if temperature else probs
    return {
        "top_k_accuracy": top_k_accuracy(probs, y_true),
        "calibration": temperature_change(raw, probs, y_true, temperature),
        "coverage": coverage_accuracy(probs.max(1), probs.argmax(1) == y_true),
    }


def print_metrics(metrics: dict, output: str) -> None:
    accuracy = format_number(metrics["accuracy"], ".4f")
    console.say(
        f"accuracy {accuracy} on {metrics['images']} images"
        + (f" ({metrics['unreadable']} unreadable)" if metrics["unreadable"] else "")
    )
    if metrics.get("top_k_accuracy"):
        console.say(", ".join(f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items()))
        c = metrics["calibration"]
        if c["temperature"]:
            console.say(
                f"ECE {c['ece_after']:.4f} (raw softmax {c['ece_before']:.4f}, temperature "
                f"{c['temperature']:.3f}); NLL {c['nll_after']:.4f} (raw {c['nll_before']:.4f})"
            )
        else:
            console.say(
                f"ECE {c['ece_after']:.4f}, NLL {c['nll_after']:.4f} (raw softmax: the model "
                "has no temperature)"
            )
        console.say(
            "--min-score  coverage  accuracy: "
            + ", ".join(
                f"{r['min_score']:g} {r['coverage']:.3f} {format_number(r['accuracy'], '.3f')}"
                for r in metrics["coverage"]
            )
        )
    console.say(f"{'class':<20} {'precision':>9} {'recall':>7} {'F1':>6} {'images':>7}")
    for name, m in metrics["per_class"].items():
        console.say(
            f"{name:<20} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
            f"{m['support']:>7}"
        )
    console.say(f"confusion matrix, metrics and misclassified images in {output}")
