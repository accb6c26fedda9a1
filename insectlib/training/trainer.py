"""Fine-tuning with Ray Train: one TorchTrainer, one plain PyTorch loop per worker
(`worker.TrainingWorker`). The driver's phases: `preflight.preflight` (every check that
needs no cluster), `fit` (size the workers, run Ray Train, read the model back)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from insectlib import storage
from insectlib.config import TrainConfig
from insectlib.data import label_table
from insectlib.data.labels import LabelledSet
from insectlib.errors import InsectError, RunStopped
from insectlib.layout import PROBLEM_FILE, STATE_FILE
from insectlib.metrics.confidence import temperature_report
from insectlib.metrics.scores import classification_metrics, format_number
from insectlib.model.meta import ModelMeta, read_meta
from insectlib.runtime import console, progress
from insectlib.runtime.connect import (
    cpus_per_gpu,
    init_ray,
    insect_error_in,
    live_nodes,
    local_path_warnings,
    what_failed,
    why_actor_died,
)
from insectlib.runtime.resources import check_resources
from insectlib.storage.lock import output_lock
from insectlib.training.model_dir import write_model_dir
from insectlib.training.preflight import check_model_output, named, preflight
from insectlib.training.run_storage import (
    ANOTHER_NAME,
    DEFAULT_STORAGE,
    check_run_name,
    remove_unrecorded_checkpoints,
    resume_hint,
    run_location,
    write_run_record,
)
from insectlib.training.worker import CLASS_IMAGES, TrainingWorker


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: set up, restore, then train and report each epoch;
    rank 0 writes the model directory at the end."""
    cfg = TrainConfig(**{**config["cfg"], "s3": storage.S3Options(**config["cfg"]["s3"])})
    ctx = ray.train.get_context()
    run = config["progress"]
    try:
        worker = TrainingWorker(
            cfg,
            config["classes"],
            config["train"],
            config["val"],
            rank=ctx.get_world_rank(),
            world=ctx.get_world_size(),
            device=ray.train.torch.get_device(),
            prepare_model=ray.train.torch.prepare_model,
            tell=lambda line: progress.tell(run, line),
        )
    except InsectError as e:  # the user's to fix (weights, an arch): no retries
        report_epoch({"problem": str(e)}, {PROBLEM_FILE: str(e)}, ctx.get_world_rank())
        return
    state = checkpoint_state(ray.train.get_checkpoint())
    if state:
        if worker.rank == 0:
            progress.tell(run, f"resuming after epoch {state['epoch']}")
        worker.restore(state)
    predictions = train_epochs(worker, config)
    if predictions is not None:
        finish_on_rank_0(worker, config, _gather(predictions, worker.world))


def train_epochs(worker: TrainingWorker, config: dict) -> list | None:
    """Every epoch left, each reported; the last epoch's validation (labels, logits), or
    None when the run stopped on a problem (reported, for the driver to raise)."""
    cfg, predictions = worker.cfg, []
    if worker.start_epoch >= cfg.epochs:  # resumed after its last epoch was recorded
        return worker.last_validation()
    for epoch in range(worker.start_epoch, cfg.epochs):
        predictions = []
        metrics = worker.run_epoch(epoch, predictions if epoch == cfg.epochs - 1 else None)
        by_class = metrics.pop(CLASS_IMAGES)
        problem = unreadable_split(config, metrics, epoch) or unreadable_class(
            config, by_class, epoch
        )
        if problem:
            # Every worker sees the same summed counts, so all stop here together; the
            # driver turns the reported problem into its error (no retries, no model).
            report_epoch({**metrics, "problem": problem}, {PROBLEM_FILE: problem}, worker.rank)
            return None
        worker.history.append(metrics)
        report_epoch(metrics, {STATE_FILE: worker.training_state()}, worker.rank)
        if worker.rank == 0:
            worker.tell(_epoch_line(metrics, cfg.epochs))
    return predictions


def unreadable_split(config: dict, metrics: dict, epoch: int) -> str | None:
    """The problem when not one image of a split could be read, else None."""
    for split in ("train", "val"):
        if config[split] and not metrics[f"{split}_images"]:
            what = "training" if split == "train" else "validation"
            return (
                f"none of the {len(config[split])} {what} images could be read "
                f"({metrics['skipped_images']} unreadable images in epoch {epoch + 1}); no "
                "model was written: fix or remove them (the workers' logs name the files)"
            )
    return None


def unreadable_class(config: dict, seen: list[int], epoch: int) -> str | None:
    """The problem when not one training image of a class could be read (`seen`: images
    seen of each class), else None: the model could not learn it."""
    listed = Counter(label for _, label in config["train"])
    empty = [
        f"{config['classes'][c]} ({n} listed)" for c, n in sorted(listed.items()) if not seen[c]
    ]
    if not empty:
        return None
    named = f"{'classes' if len(empty) > 1 else 'class'} {', '.join(empty[:10])}"
    return (
        f"no training image could be read in epoch {epoch + 1} of {named}; no model was "
        f"written: fix or remove them, or mark them skip in a --labels table (the workers' "
        "logs name the files)"
    )


def finish_on_rank_0(worker: TrainingWorker, config: dict, pairs: list) -> None:
    """Rank 0: fit the temperature on the validation logits and write the model directory."""
    if worker.rank != 0:
        return
    validation = calibration = None
    meta = worker.model_meta(config["data"])
    if pairs:
        y_true = torch.cat([t for t, _ in pairs]).numpy()
        logits = torch.cat([z for _, z in pairs]).numpy()
        validation = classification_metrics(y_true, logits.argmax(1), worker.classes)
        calibration = temperature_report(logits, y_true)
        meta.temperature = calibration["temperature"]
        worker.tell(_temperature_line(calibration))
    write_model_dir(worker.cfg, worker.model, meta, validation, calibration)


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


def _temperature_line(c: dict) -> str:
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


def fit(cfg: TrainConfig, labelled: LabelledSet | None = None) -> ModelMeta:
    """Fine-tune per `cfg` with Ray Train and write the model directory; returns its meta.
    `labelled`: what `preflight` returned for this `cfg`, where it ran already."""
    cfg = named(cfg)
    labelled = labelled or preflight(cfg)
    console.say(
        f"{len(labelled.classes)} classes ({', '.join(labelled.classes)}): "
        f"{len(labelled.train)} training and {len(labelled.val)} validation images "
        f"({labelled.split})"
    )
    if labelled.table:
        console.say(label_table.describe(labelled.table))
    # One run per run folder too: two runs of one --name (or two resumes of one run) would
    # mix their checkpoints there. Its lock first: a resume of a running run is told to wait.
    another = None if cfg.resume else ANOTHER_NAME
    with (
        output_lock(run_location(cfg), "train", cfg.s3, console.say, another) as run_held,
        output_lock(cfg.output, "train", cfg.s3, console.say) as output_held,
    ):
        check_model_output(cfg)  # again, now that no other run can write there
        # Ray Train asks the dashboard's State API each second whether the run's controller
        # lives (its placement group cleaner): without one, a warning each time.
        init_ray(cfg.address, dashboard=True)
        cfg = sized_run(cfg, labelled)
        begin_run(cfg, labelled)
        run = progress.start()
        with progress.follow(run):
            result = run_trainer(cfg, labelled, run)
        if (result.metrics or {}).get("problem"):
            raise InsectError(result.metrics["problem"])
        for held in (run_held, output_held):  # taken over (S3): not ours to clean up
            held.check()
        clean_up_checkpoints(cfg, result)
        meta = read_meta(cfg.output, cfg.s3)
    accuracy = meta.epochs[-1]["val_accuracy"]
    console.say(
        f"validation accuracy {format_number(accuracy, '.4f')}; "
        f"model {meta.model_id} written to {cfg.output}"
    )
    return meta


def clean_up_checkpoints(cfg: TrainConfig, result: ray.train.Result) -> None:
    """Remove the run's checkpoints Ray Train did not record (see
    `remove_unrecorded_checkpoints`); the model is written, so a failure only warns."""
    recorded = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints or []}
    if not recorded:  # nothing known to keep: remove nothing
        return
    try:
        remove_unrecorded_checkpoints(cfg, recorded)
    except InsectError as e:
        console.warn(f"warning: {e}")


def sized_run(cfg: TrainConfig, labelled: LabelledSet) -> TrainConfig:
    """`cfg` sized for the connected cluster."""
    locations = {"--storage": cfg.storage or DEFAULT_STORAGE, "--output": cfg.output}
    for warning in local_path_warnings(locations, cfg.address, live_nodes()):
        console.warn(warning)
    cfg = cfg.sized(cpus_per_gpu())
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}
    what = console.counted(cfg.workers, "training worker")
    advice = "ask for less with --workers or --cpus-per-worker"
    check_resources(per_worker, cfg.workers, what, advice, cfg.wait_for_nodes, cfg.placement)
    if cfg.gpu:
        console.say(
            f"{console.counted(cfg.workers, 'GPU worker')}, "
            f"{console.counted(cfg.cpus_per_worker, 'CPU')} each: "
            f"{console.counted(cfg.loader_workers, 'decoding process', 'decoding processes')} "
            "per worker"
        )
    return cfg


def begin_run(cfg: TrainConfig, labelled: LabelledSet) -> None:
    """With the run folder held: a new run's record written, and where the run is said.
    Its name is checked again, as another run may have taken it since the preflight."""
    if check_run_name(cfg, held=True):
        console.say(f"run {run_location(cfg)} recorded no epoch before it stopped: from epoch 1")
    if not cfg.resume:
        write_run_record(cfg, labelled)
        advice = console.advice(f"; if it stops, {resume_hint(cfg)}")
        console.say(f"run {run_location(cfg)}{advice}")


@contextlib.contextmanager
def fit_stops(cfg: TrainConfig) -> Iterator[None]:
    """How Ray Train's run stops, said as insect says it: an interruption, and workers or
    the controller lost (a RunStopped), with the run's way on (`resume_hint`), which the
    last words keep should the process die; an InsectError a worker raised, as itself."""
    with console.on_interrupt(resume_hint(cfg)):
        try:
            yield
        except SystemExit:  # how fit() ends after Ray Train's Ctrl-C handler aborted the run
            raise KeyboardInterrupt from None
        except ray.train.TrainingFailedError as e:
            cause = insect_error_in(e)
            if cause:
                raise cause from None
            if lost_workers(e):
                raise RunStopped(workers_lost(e, cfg)) from None
            raise
        except ray.exceptions.ActorDiedError as e:  # its controller's: the head stopped, say
            raise controller_died(e) from None


def controller_died(error: ray.exceptions.ActorDiedError) -> InsectError:
    """What to say when Ray Train's controller actor died: why, as Ray says it after the
    actor's ids; a run to resume, unless it died starting (its run folder's record
    unreadable, say), where a resume would fail alike."""
    why = why_actor_died(error)
    if error.actor_init_failed:
        return InsectError(f"Ray Train's controller could not start the training run: {why}")
    return RunStopped(f"Ray Train's controller died ({why})")


# gloo's text when a collective's peer went away (its process killed, its node lost)
PEER_LOST = "This is typically caused by a remote worker crashing"


def lost_workers(error: ray.train.TrainingFailedError) -> dict[int, Exception]:
    """The failed workers that were lost (their actor died: the process or its node gone),
    by rank; where none is among the failures yet, and every failure is a lost peer (gloo:
    "Connection closed by peer"), those. Empty otherwise: a failure of the training code
    itself (a bug, an object Ray could not send), whose traceback is what to read."""
    if not isinstance(error, ray.train.WorkerGroupError):
        return {}
    failures = error.worker_failures
    died = {rank: f for rank, f in failures.items() if actor_died(f)}
    peers = {rank: f for rank, f in failures.items() if PEER_LOST in str(f)}
    return died or (peers if len(peers) == len(failures) else {})


def actor_died(failure: Exception) -> bool:
    """Whether a worker's failure is its actor's death: Ray Train reports it as a failed
    health check holding the RayActorError."""
    return isinstance(getattr(failure, "health_check_failure", None), ray.exceptions.RayActorError)


def workers_lost(error: ray.train.TrainingFailedError, cfg: TrainConfig) -> str:
    """What to say when training workers were lost more times than --max-failures allows."""
    failures = lost_workers(error)
    ranks = ", ".join(str(rank) for rank in sorted(failures))
    first = failures[min(failures)]
    lost = (
        f"worker {ranks} lost ({how_lost(first)})"
        if actor_died(first)
        else f"a worker was lost (worker {ranks} lost its peer: {what_failed(first)[:200]})"
    )
    return f"training stopped: {lost}, past the restarts --max-failures {cfg.max_failures} allows"


def how_lost(failure: Exception) -> str:
    """Why Ray says a worker was lost, and where it ran: its text's sentence on why the
    actor is dead (else its first), then the worker's pid and node, not its whole record."""
    text = what_failed(failure)
    dead = re.search(r"The actor is dead because (.+?)\.", text)
    why = dead[1] if dead else text.split(". ")[0][:200]
    pid, node = re.search(r"\bpid=(\d+)", text), re.search(r"\bnode_ip='([^']+)'", text)
    where = f"; pid {pid[1]}" if pid else ""
    return why + where + (f" on {node[1]}" if node else "")


def run_trainer(cfg: TrainConfig, labelled: LabelledSet, run) -> ray.train.Result:
    """Ray Train's run of `train_loop_per_worker`; an InsectError a worker raised is raised
    here as itself."""
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
            "progress": run,
            # root, val_fraction and seed find the validation images again (int8 statistics)
            "data": {
                "root": cfg.data,
                "split": labelled.split,
                "held_out": labelled.held_out,
                "val_fraction": cfg.val_fraction,
                "seed": cfg.seed,
                "counts": labelled.counts(),
                # --labels (issue 28): the table and what it did, which int8 reads back
                **({"labels": labelled.table} if labelled.table else {}),
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
    before = signal.getsignal(signal.SIGINT)
    try:
        with fit_stops(cfg):
            return trainer.fit()
    finally:  # Ray Train's handler outlives the run: a later Ctrl-C would exit 0 through it
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)
