"""Fine-tuning with Ray Train: one TorchTrainer, one plain PyTorch loop per worker."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from insectlib import outputs, storage
from insectlib.confidence import calibration_report
from insectlib.config import TrainConfig
from insectlib.errors import InsectError
from insectlib.labels import LabelledSet, discover
from insectlib.layout import (
    CONFUSION_PNG,
    CURVES_FILE,
    META_FILE,
    METRICS_FILE,
    PROBLEM_FILE,
    RELIABILITY_PNG,
    REPORT_FILE,
    RUN_RECORD,
    STATE_FILE,
    write_file,
)
from insectlib.model import (
    ModelMeta,
    check_arch,
    read_meta,
    remove_meta,
    write_meta,
    write_weights,
)
from insectlib.report import (
    classification_metrics,
    confusion_png,
    curves_png,
    format_number,
    reliability_png,
    report_markdown,
)
from insectlib.runtime import (
    cpus_per_gpu,
    init_ray,
    insect_error_in,
    live_nodes,
    local_path_warnings,
)
from insectlib.worker import TrainingWorker, say

DEFAULT_STORAGE = os.path.expanduser("~/ray_results")  # Ray Train's own default
try:
    # Ray Train's record of a run's checkpoints: where it exists, a run of that name
    # continues. A private name (Ray 2.50-2.60 write "checkpoint_manager_snapshot.json");
    # the fallback keeps `--name`/`--resume` checks working should it move.
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
except ImportError:  # pragma: no cover - a Ray release that moved it
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME = "checkpoint_manager_snapshot.json"
RUN_SNAPSHOT = CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
# The settings a resumed run must share with its start: they shape the model, its weights
# and its training. Others (epochs, workers, precision, paths, ...) may change.
RESUME_FIELDS = (
    "arch",
    "weights",
    "freeze",
    "image_size",
    "seed",
    "val_fraction",
    "augment",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: set up, restore, then train and report each epoch;
    rank 0 writes the model directory at the end."""
    cfg = TrainConfig(**{**config["cfg"], "s3": storage.S3Options(**config["cfg"]["s3"])})
    ctx = ray.train.get_context()
    worker = TrainingWorker(
        cfg,
        config["classes"],
        config["train"],
        config["val"],
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
    )
    state = checkpoint_state(ray.train.get_checkpoint())
    if state:
        say(f"worker {worker.rank}: resuming after epoch {state['epoch']}")
        worker.restore(state)
    predictions: list = []  # the last epoch's validation (labels, logits)
    for epoch in range(worker.start_epoch, cfg.epochs):
        predictions = []
        metrics = worker.run_epoch(epoch, predictions if epoch == cfg.epochs - 1 else None)
        if config["val"] and not metrics["val_images"]:
            # Every worker sees the same summed counts, so all stop here together; the
            # driver turns the reported problem into its error (no retries, no model).
            problem = (
                f"none of the {len(config['val'])} validation images could be read "
                f"({metrics['skipped_images']} unreadable images in epoch {epoch + 1}); no "
                "model was written: fix or remove them (the skipped files are logged above)"
            )
            report_epoch({**metrics, "problem": problem}, {PROBLEM_FILE: problem}, worker.rank)
            return
        worker.history.append(metrics)
        report_epoch(metrics, {STATE_FILE: worker.training_state()}, worker.rank)
        if worker.rank == 0:
            say(_epoch_line(metrics, cfg.epochs))

    pairs = _gather(predictions, worker.world)
    if worker.rank == 0:
        validation = calibration = None
        meta = worker.model_meta(config["data"])
        if pairs:
            y_true = torch.cat([t for t, _ in pairs]).numpy()
            logits = torch.cat([z for _, z in pairs]).numpy()
            validation = classification_metrics(y_true, logits.argmax(1), worker.classes)
            calibration = calibration_report(logits, y_true)
            meta.temperature = calibration["temperature"]
            say(_calibration_line(calibration))
        write_model_dir(cfg, worker.model, meta, validation, calibration)


def checkpoint_state(checkpoint: Checkpoint | None) -> dict | None:
    """The `training_state` in a checkpoint; None for no checkpoint, or for the checkpoint
    of a run stopped by a problem (it holds only PROBLEM_FILE: start over)."""
    if not checkpoint:
        return None
    # A private copy per worker: workers sharing a node would otherwise share one download
    # folder, which a late worker downloads into again while another is reading it.
    with tempfile.TemporaryDirectory() as d:
        checkpoint.to_directory(d)
        path = os.path.join(d, STATE_FILE)
        return torch.load(path, weights_only=True) if os.path.exists(path) else None


def report_epoch(metrics: dict, files: dict[str, object], rank: int) -> None:
    """`ray.train.report` the metrics of every worker, with a checkpoint of `files` from
    rank 0 (Ray Train keeps only the metrics of reports with a checkpoint for the driver).
    A str is written as text, anything else with torch.save."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            for name, content in files.items():
                if isinstance(content, str):
                    with open(os.path.join(d, name), "w") as f:
                        f.write(content)
                else:
                    torch.save(content, os.path.join(d, name))
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _gather(items: list, world: int) -> list:
    """Every worker's `items`, concatenated in rank order (on every worker)."""
    if not torch.distributed.is_initialized():
        return list(items)
    shards = [None] * world
    torch.distributed.all_gather_object(shards, items)
    return [item for shard in shards for item in shard]


def write_model_dir(
    cfg: TrainConfig,
    model: nn.Module,
    meta: ModelMeta,
    validation: dict | None,
    calibration: dict | None = None,
) -> None:
    """Write the model directory `cfg.output` in the order `layout.MODEL_FILES` states:
    meta.json (the completeness marker) is removed first and written last. `calibration`:
    the temperature fitted on the validation split (`confidence.calibration_report`)."""
    remove_meta(cfg.output, cfg.s3)
    metrics = {"epochs": meta.epochs, "validation": validation, "calibration": calibration}
    write_file(cfg.output, METRICS_FILE, json.dumps(metrics, indent=2), cfg.s3)
    write_file(cfg.output, CURVES_FILE, curves_png(meta.epochs), cfg.s3)
    if validation:
        picture = confusion_png(validation, "validation, last epoch")
        write_file(cfg.output, CONFUSION_PNG, picture, cfg.s3)
    if calibration:
        picture = reliability_png(calibration, "validation, last epoch")
        write_file(cfg.output, RELIABILITY_PNG, picture, cfg.s3)
    write_weights(cfg.output, model, meta, cfg.s3)  # sets the model id report.md names
    config = {k: v for k, v in asdict(cfg).items() if k not in ("s3", "address")}
    report = report_markdown(meta, config, validation, calibration)
    write_file(cfg.output, REPORT_FILE, report, cfg.s3)
    write_meta(cfg.output, meta, cfg.s3)


def _calibration_line(c: dict) -> str:
    if not c["temperature"]:
        return f"no temperature fitted: {c['note']}"
    return (
        f"temperature {c['temperature']:.3f} fitted on {c['images']} validation images: "
        f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, "
        f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}"
    )


def _epoch_line(m: dict, epochs: int) -> str:
    f = format_number
    return (
        f"epoch {m['epoch']}/{epochs}: train loss {f(m['train_loss'], '.4f')} "
        f"acc {f(m['train_accuracy'], '.3f')} | val loss {f(m['val_loss'], '.4f')} "
        f"acc {f(m['val_accuracy'], '.3f')} | {f(m['images_per_second'], '.1f')} img/s"
        + (" (head on cached trunk features)" if m.get("cached_features") else "")
        + (f" | {m['skipped_images']} unreadable images skipped" if m["skipped_images"] else "")
    )


def preflight(cfg: TrainConfig) -> LabelledSet:
    """Check everything that can be checked before Ray starts; returns the labelled set."""
    cfg.validate()
    check_arch(cfg.arch)
    # Its pictures inside the labelled tree would be read as images by the next run.
    outputs.check_location(cfg.output, {"the data": cfg.data}, apart=("the data",))
    for location in (cfg.output, cfg.storage):
        if location:
            storage.check_bucket(location, cfg.s3)
    if storage.exists(storage.join(cfg.output, META_FILE), cfg.s3) and not cfg.overwrite:
        raise InsectError(f"{cfg.output} already holds a model; pass --overwrite to replace it")
    if cfg.name:
        # Ray Train continues a run whose folder it finds in storage: make that explicit.
        run = run_location(cfg)
        found = storage.exists(storage.join(run, RUN_SNAPSHOT), cfg.s3)
        if cfg.resume and not found:
            raise InsectError(f"no run to resume at {run}: check --storage and --name")
        if found and not cfg.resume:
            raise InsectError(
                f"run {run} already exists; pass --resume to continue it or choose another --name"
            )
    labelled = discover(cfg.data, cfg.val_fraction, cfg.seed, cfg.s3)
    if cfg.resume:
        check_run_record(cfg, labelled)
    return labelled


def run_location(cfg: TrainConfig) -> str:
    """The folder of run `cfg.name` in the run storage."""
    return storage.join(cfg.storage or DEFAULT_STORAGE, cfg.name)


def run_record(cfg: TrainConfig, labelled: LabelledSet) -> dict:
    """What a run must keep to be resumed: the settings that shape the model and its
    training, the weights it started from and a fingerprint of its data."""
    record = {name: getattr(cfg, name) for name in RESUME_FIELDS}
    if cfg.weights not in ("imagenet", "random"):
        record["weights_sha256"] = storage.sha256(cfg.weights, cfg.s3)
    record["classes"] = labelled.classes
    items = sorted(f"{storage.printable(u)}\t{y}" for u, y in labelled.train + labelled.val)
    record["data_sha256"] = hashlib.sha256("\n".join(items).encode()).hexdigest()
    record["images"] = len(items)
    return record


def write_run_record(cfg: TrainConfig, labelled: LabelledSet) -> None:
    text = json.dumps(run_record(cfg, labelled), indent=2)
    storage.write_bytes(storage.join(run_location(cfg), RUN_RECORD), text.encode(), cfg.s3)


def check_run_record(cfg: TrainConfig, labelled: LabelledSet) -> None:
    """Refuse to resume run `cfg.name` with other settings, weights or data than it began
    with, naming what differs."""
    uri = storage.join(run_location(cfg), RUN_RECORD)
    if not storage.exists(uri, cfg.s3):
        print(
            f"warning: {uri} is missing (a run from an older insect): the configuration "
            "of the resumed run cannot be checked",
            file=sys.stderr,
            flush=True,
        )
        return
    with storage.user_errors(uri):
        before = json.loads(storage.read_bytes(uri, cfg.s3))
    now = run_record(cfg, labelled)
    differ = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(
            f"{k}: {_short(before.get(k))} then, {_short(now.get(k))} now" for k in differ
        )
        raise InsectError(
            f"cannot resume run {run_location(cfg)} with a different configuration ({shown}); "
            "resume with the flags and data it began with, or start a new --name"
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def fit(cfg: TrainConfig, labelled: LabelledSet | None = None) -> ModelMeta:
    """Fine-tune per `cfg` with Ray Train and write the model directory; returns its meta."""
    labelled = labelled or preflight(cfg)
    print(
        f"{len(labelled.classes)} classes ({', '.join(labelled.classes)}): "
        f"{len(labelled.train)} training and {len(labelled.val)} validation images "
        f"({labelled.split})",
        flush=True,
    )
    init_ray(cfg.address)
    locations = {"--storage": cfg.storage or DEFAULT_STORAGE, "--output": cfg.output}
    for warning in local_path_warnings(locations, live_nodes()):
        print(warning, file=sys.stderr, flush=True)
    cfg = cfg.sized(cpus_per_gpu())
    if cfg.gpu:
        say(
            f"{cfg.workers} GPU workers, {cfg.cpus_per_worker:g} CPUs each: "
            f"{cfg.loader_workers} decoding processes per worker"
        )
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=f"insect-train-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume:
        write_run_record(cfg, labelled)
    run_config = RunConfig(
        name=cfg.name,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )
    if cfg.storage:
        run_config.storage_filesystem, run_config.storage_path = storage.pyarrow_filesystem(
            cfg.storage, cfg.s3
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": asdict(cfg),
            "classes": labelled.classes,
            "train": labelled.train,
            "val": labelled.val,
            # root, val_fraction and seed find the validation images again (int8 calibration)
            "data": {
                "root": cfg.data,
                "split": labelled.split,
                "val_fraction": cfg.val_fraction,
                "seed": cfg.seed,
                "counts": labelled.counts(),
            },
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement,
        ),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = insect_error_in(e)
        if cause:
            raise cause from None
        raise
    if (result.metrics or {}).get("problem"):
        raise InsectError(result.metrics["problem"])
    meta = read_meta(cfg.output, cfg.s3)
    accuracy = meta.epochs[-1]["val_accuracy"]
    print(
        f"validation accuracy {format_number(accuracy, '.4f')}; "
        f"model {meta.model_id} written to {cfg.output}",
        flush=True,
    )
    return meta
