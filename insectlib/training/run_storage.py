"""A training run in Ray Train's run storage (`--storage`/`--name`): where it is, and the
record of what it began with, which `--resume` must find unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shlex

from insectlib import storage
from insectlib.config import TrainConfig
from insectlib.data.labels import LabelledSet
from insectlib.errors import InsectError
from insectlib.layout import PROBLEM_FILE, RUN_RECORD, STATE_FILE
from insectlib.runtime import console
from insectlib.storage.lock import refuse_if_held

DEFAULT_STORAGE = os.path.expanduser("~/ray_results")  # Ray Train's own default
# Ray Train's record of a run's checkpoints: where it exists, a run of that name continues.
# Ray's private CHECKPOINT_MANAGER_SNAPSHOT_FILENAME (Ray 2.50-2.60), written out rather
# than imported: importing ray.train takes seconds before a wrong path could be refused.
# A test holds it to Ray's.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"
ANOTHER_NAME = "choose another --name"  # a new run's other way where the name is taken
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


def run_location(cfg: TrainConfig) -> str:
    """The folder of run `cfg.name` in the run storage."""
    return storage.join(cfg.storage or DEFAULT_STORAGE, cfg.name)


def check_run_name(cfg: TrainConfig, held: bool = False) -> bool:
    """Ray Train continues a run whose folder it finds in storage: make that explicit.
    Returns whether a --resume starts at epoch 1 (its run stopped before recording one).
    `held`: this process holds the run folder's lock (else a run going on there is said)."""
    if not cfg.name:
        return False
    run = run_location(cfg)
    found = storage.exists(storage.join(run, RUN_SNAPSHOT), cfg.s3)
    if cfg.resume and not found:
        if storage.exists(storage.join(run, RUN_RECORD), cfg.s3):
            return True
        raise InsectError(f"no run to resume at {run}: check --storage and --name")
    if found and not cfg.resume:
        if not held:  # a run of this name going on now: to wait for, not to --resume
            refuse_if_held(run, cfg.s3, ANOTHER_NAME)
        raise InsectError(
            f"run {run} already exists; pass --resume to continue it or {ANOTHER_NAME}"
        )
    return False


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
    storage.write_file(run_location(cfg), RUN_RECORD, text, cfg.s3)


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse a run folder (`--storage`/`--name`) that cannot be one (a file, a link to
    nothing, under a file) or that overlaps `--output`: Ray Train's checkpoints and the
    model would mix there."""
    run = run_location(cfg)
    why = storage.folder_problem(run, cfg.s3)
    if why:
        raise InsectError(
            f"the run folder {run} (--storage, --name) {why}; choose another --storage or --name"
        )
    if storage.within(cfg.output, run) or storage.within(run, cfg.output):
        raise InsectError(
            f"--output {cfg.output} and the run folder {run} (--storage, --name) overlap, "
            "where the model and Ray Train's checkpoints would mix: choose another --output"
        )


def check_run_record(cfg: TrainConfig, labelled: LabelledSet) -> None:
    """Refuse to resume run `cfg.name` with other settings, weights or data than it began
    with, naming what differs."""
    uri = storage.join(run_location(cfg), RUN_RECORD)
    if not storage.exists(uri, cfg.s3):
        console.warn(
            f"warning: {uri} is missing (a run from an older insect): the configuration "
            "of the resumed run cannot be checked"
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


CHECKPOINT_FILES = {STATE_FILE, PROBLEM_FILE}  # what a checkpoint of insect's holds


def resume_hint(cfg: TrainConfig) -> str:
    """How to continue run `cfg` (named) after it stopped: said when it is interrupted."""
    where = f" --storage {shlex.quote(cfg.storage)}" if cfg.storage else ""
    return f"--resume --name {shlex.quote(cfg.name)}{where} continues from its last recorded epoch"


def remove_unrecorded_checkpoints(cfg: TrainConfig, recorded: set[str]) -> list[str]:
    """Remove the checkpoint folders of run `cfg.name` not among the `recorded` names
    (those Ray Train keeps): the epochs an interrupted run wrote after the last one Ray
    Train recorded, which no resume reads and --keep-checkpoints never prunes. Only folders
    of insect's own checkpoint files; returns the names removed."""
    run = run_location(cfg)
    fs, _ = storage.filesystem(run, cfg.s3)
    removed = []
    with storage.user_errors(run, "clean up"):
        for entry in storage.list_entries(run, cfg.s3):
            name = storage.entry_name(entry)
            if entry["type"] != "directory" or name in recorded:
                continue
            files = fs.ls(entry["name"], detail=True)
            if not files or {storage.entry_name(f) for f in files} - CHECKPOINT_FILES:
                continue
            for file in files:
                fs.rm_file(file["name"])
            if not storage.is_s3(run):  # S3 has no folder to remove
                fs.rmdir(entry["name"])
            removed.append(name)
    return removed
