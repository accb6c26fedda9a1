"""The training driver's first phase: every check that needs no cluster, those of the
paths before torch is imported, so that a wrong folder is refused in about a second (the
CLI runs this before it imports `trainer`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time

from insectlib import storage
from insectlib.config import TrainConfig
from insectlib.data import label_table
from insectlib.data.labels import LabelledSet, check_root
from insectlib.errors import ImageError, InsectError
from insectlib.layout import INT8_FILES, META_FILE, MODEL_FILES, SUCCESS_FILE
from insectlib.training.run_storage import (
    check_run_folder,
    check_run_name,
    check_run_record,
)


def named(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with a run name of its own where it has none (a --resume without --name is
    refused by `validate`)."""
    if cfg.name or cfg.resume:
        return cfg
    return dataclasses.replace(cfg, name=new_run_name())


def new_run_name() -> str:
    """A run name of its own: the time it starts, and a random part for runs started in
    the same second."""
    return f"insect-train-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def preflight(cfg: TrainConfig) -> LabelledSet:
    """Check everything that can be checked before Ray starts; returns the labelled set.
    The paths first, without torch; then --arch, which imports it; then the data's whole
    listing (minutes on a large bucket); ImageNet weights last (perhaps a download)."""
    cfg.validate()
    check_locations(cfg)
    check_model_output(cfg)
    check_run_folder(cfg)
    check_run_name(cfg)
    check_weights_path(cfg)
    if cfg.data:
        check_root(cfg.data, cfg.s3)
    if cfg.labels:
        label_table.check_table(cfg.labels, cfg.s3)
    from insectlib.model import network  # torch and torchvision: once the paths are right

    network.check_arch(cfg.arch)
    network.check_image_size(cfg.arch, cfg.image_size)
    if cfg.weights.endswith(".safetensors"):  # its header says its shapes; a pickle, the workers
        shapes = network.safetensors_shapes(cfg.weights, cfg.s3)
        network.check_trunk(cfg.weights, shapes or {}, cfg.arch)
    labelled = label_table.training_set(
        cfg.data, cfg.labels, cfg.val_fraction, cfg.seed, cfg.new_classes, cfg.s3
    )
    if labelled.table:
        check_table_images(cfg, labelled)
    if cfg.resume:
        check_run_record(cfg, labelled)
    if cfg.weights == "imagenet":
        # Here, once, rather than failing in every worker; last: perhaps a download.
        network.ensure_imagenet_weights(cfg.arch)
    return labelled


def check_table_images(cfg: TrainConfig, labelled: LabelledSet) -> None:
    """A table's images may lie anywhere: the output never among them, and every bucket
    they name within reach, as a worker reads them (else the workers' first reads stop the
    run, a minute in): one image of each read. A file that cannot be read is skipped and
    counted, as in a folder."""
    uris = [uri for uri, _ in labelled.train + labelled.val]
    # The folders as they are (listed files', no patterns), the output's key found once.
    folder = storage.folder_holding(cfg.output, sorted({os.path.dirname(u) for u in uris}))
    if folder:
        storage.check_not_inside(cfg.output, folder, "a folder of the table's images")
    first: dict[str, str] = {}
    for uri in uris:
        if storage.is_s3(uri):
            first.setdefault(storage.bucket_and_key(uri)[0], uri)
    for uri in first.values():
        with contextlib.suppress(ImageError):  # StorageUnavailable: no credentials, ...
            storage.read_input(uri, cfg.max_file_bytes, cfg.s3)


def check_locations(cfg: TrainConfig) -> None:
    """--output and --storage apart from the data: its pictures inside the labelled tree
    would be read as images by the next run."""
    inputs = {"the data": cfg.data, "the labels table": cfg.labels}
    protected = {what: uri for what, uri in inputs.items() if uri}
    for flag in ("--output", "--storage"):
        location = getattr(cfg, flag[2:])
        if location:
            storage.check_location(location, protected, ("the data",), cfg.s3, flag)
            storage.check_bucket(location, cfg.s3)


def check_weights_path(cfg: TrainConfig) -> None:
    """A --weights file is there, not a folder, and begins as its name says."""
    if cfg.weights in ("imagenet", "random"):
        return
    if not storage.exists(cfg.weights, cfg.s3):
        raise InsectError(f"--weights file not found: {cfg.weights}")
    if storage.is_dir(cfg.weights, cfg.s3):
        raise InsectError(
            f"--weights {cfg.weights} is a folder; give a state-dict file of {cfg.arch} "
            "(.safetensors or a torch pickle)"
        )
    check_weights_file(cfg.weights, cfg.s3)


def check_weights_file(uri: str, s3: storage.S3Options | None = None) -> None:
    """Refuse at once a file that `load_state_dict_file` would not read as the format its
    name says, by its first bytes: a .safetensors file starts with a header length, then
    JSON; any other, as torch.save writes, with a zip archive or a pickle."""
    head = storage.read_head(uri, 9, s3)
    if uri.endswith(".safetensors"):
        if head[8:9] != b"{":
            raise InsectError(f"--weights {uri} is not a safetensors file")
    elif not head.startswith((b"PK\x03\x04", b"\x80")):
        raise InsectError(
            f"--weights {uri} is not a weights file as torch.save writes one (a "
            "safetensors file must be named .safetensors)"
        )


def check_model_output(cfg: TrainConfig) -> None:
    """`--output` is absent or empty, or holds only what insect writes into a model
    directory, and a model (or an unfinished one) only with --overwrite: never a user's
    own files, whatever their names."""
    names = {storage.entry_name(e) for e in storage.list_entries(cfg.output, cfg.s3)}
    foreign = sorted(names - set(MODEL_FILES) - set(INT8_FILES))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        what = "files insect did not write"
        if SUCCESS_FILE in foreign:
            what = "the predictions of insect classify, not a model"
        raise InsectError(
            f"--output {cfg.output} holds {what} ({shown}); choose an empty or new folder for "
            "the model"
        )
    if names and not cfg.overwrite:
        what = "a model" if META_FILE in names else "an unfinished model (no meta.json)"
        raise InsectError(f"{cfg.output} already holds {what}; pass --overwrite to replace it")
