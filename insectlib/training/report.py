"""report.md of a model directory: configuration, data, epochs, curves, confusion matrix
and temperature scaling, for people (nothing reads it back)."""

from __future__ import annotations

from insectlib.layout import CONFUSION_PNG, CURVES_FILE, RELIABILITY_PNG
from insectlib.metrics.scores import format_number


def report_markdown(
    meta, config: dict, metrics: dict | None, temperature: dict | None = None
) -> str:
    """The report of the model `meta` trained with `config`; `metrics`: the last epoch's
    validation metrics; `temperature`: `metrics.confidence.temperature_report`."""
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
    ]
    lines += _data(meta) + _epochs(meta) + _validation(metrics) + _temperature(temperature)
    return "\n".join(lines)


def _data(meta) -> list[str]:
    lines = [
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
    return lines


def _epochs(meta) -> list[str]:
    lines = [
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
    return [*lines, "", f"![training curves]({CURVES_FILE})", ""]


def _validation(metrics: dict | None) -> list[str]:
    if not metrics:
        return []
    return [
        "## Validation, last epoch",
        "",
        f"Accuracy {metrics['accuracy']:.4f} on {metrics['images']} images.",
        "",
        "| class | precision | recall | F1 | images |",
        "|---|---|---|---|---|",
        *[
            f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
            for c, m in metrics["per_class"].items()
        ],
        "",
        f"![confusion matrix]({CONFUSION_PNG})",
        "",
    ]


def _temperature(c: dict | None) -> list[str]:
    if not c:
        return []
    bins = c["reliability_before"]["bins"]
    if not c["temperature"]:
        return [
            "## Temperature scaling",
            "",
            f"No temperature: {c.get('note', '')}. ECE ({bins} bins) {c['ece_before']:.4f}, "
            f"NLL {c['nll_before']:.4f} on the {c['images']} validation images.",
            "",
            f"![reliability diagram]({RELIABILITY_PNG})",
            "",
        ]
    return [
        "## Temperature scaling",
        "",
        f"Temperature {c['temperature']:.4f}, fitted on the {c['images']} validation images "
        "(classify divides the logits by it; `--no-temperature` gives the raw softmax).",
        "",
        "| | raw softmax | with the temperature |",
        "|---|---|---|",
        f"| ECE ({bins} bins) | {c['ece_before']:.4f} | {c['ece_after']:.4f} |",
        f"| NLL | {c['nll_before']:.4f} | {c['nll_after']:.4f} |",
        "",
        f"![reliability diagram]({RELIABILITY_PNG})",
        "",
    ]
