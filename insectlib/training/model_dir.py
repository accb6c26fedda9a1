"""Writing the model directory at the end of training, in the order `layout.MODEL_FILES`
states: meta.json (the completeness marker) is removed first and written last."""

from __future__ import annotations

import json
from dataclasses import asdict

from torch import nn

from insectlib import storage
from insectlib.config import TrainConfig
from insectlib.layout import CONFUSION_PNG, CURVES_FILE, METRICS_FILE, RELIABILITY_PNG, REPORT_FILE
from insectlib.metrics.charts import confusion_png, curves_png, reliability_png
from insectlib.model.meta import ModelMeta, remove_meta, write_meta
from insectlib.model.network import write_weights
from insectlib.training.report import report_markdown


def write_model_dir(
    cfg: TrainConfig,
    model: nn.Module,
    meta: ModelMeta,
    validation: dict | None,
    calibration: dict | None = None,
) -> None:
    """Write the model directory `cfg.output`. `calibration`: the temperature fitted on the
    validation split and what it changes (`metrics.confidence.temperature_report`)."""
    remove_meta(cfg.output, cfg.s3)
    metrics = {"epochs": meta.epochs, "validation": validation, "calibration": calibration}
    storage.write_file(cfg.output, METRICS_FILE, json.dumps(metrics, indent=2), cfg.s3)
    storage.write_file(cfg.output, CURVES_FILE, curves_png(meta.epochs), cfg.s3)
    if validation:
        picture = confusion_png(validation, "validation, last epoch")
        storage.write_file(cfg.output, CONFUSION_PNG, picture, cfg.s3)
    if calibration:
        picture = reliability_png(calibration, "validation, last epoch")
        storage.write_file(cfg.output, RELIABILITY_PNG, picture, cfg.s3)
    write_weights(cfg.output, model, meta, cfg.s3)  # sets the model id report.md names
    config = {k: v for k, v in asdict(cfg).items() if k not in ("s3", "address")}
    report = report_markdown(meta, config, validation, calibration)
    storage.write_file(cfg.output, REPORT_FILE, report, cfg.s3)
    write_meta(cfg.output, meta, cfg.s3)
