"""The checks of a classification or an evaluation that need neither torch nor a cluster,
so that a wrong path is refused in about a second: the CLI runs them before it imports the
pipeline, and `pipeline.plan_run` and `evaluate.evaluate` run them where it did not."""

from __future__ import annotations

import json
import os

from insectlib import storage
from insectlib.classify import outputs
from insectlib.config import ClassifyConfig, EvaluateConfig
from insectlib.data import inputs
from insectlib.data.images import is_image_name
from insectlib.data.labels import check_root
from insectlib.errors import InsectError
from insectlib.layout import EVALUATION_FILES, INT8_FILES, INT8_RECORD, PREDICTIONS_DIR
from insectlib.model.meta import check_model_dir
from insectlib.runtime import console


def check_run(cfg: ClassifyConfig, paths: list[str] | None = None) -> list[inputs.Part]:
    """The settings, the model directory's meta.json, the output's place and what it
    holds, and an image in the input (exactly `paths`, when given); returns the input's
    parts. Writes nothing."""
    cfg.validate()
    check_model_dir(cfg.model, cfg.s3)
    protected = {"the input": cfg.source, "the model": cfg.model}
    storage.check_location(cfg.output, protected, tuple(protected), cfg.s3)
    storage.check_bucket(cfg.output, cfg.s3)
    plan_classify_output(cfg)  # refusals before anything starts (planned again under the lock)
    if paths is not None:
        parts = inputs.plan_paths(paths)
    elif cfg.manifest:
        parts = inputs.plan_manifest(cfg.manifest, cfg.s3)
    else:
        parts = inputs.plan_listing(cfg.input, cfg.s3)
    first = inputs.first_inputs(parts, cfg.s3, MANIFEST_LOOK if cfg.manifest else 1)
    if not first:  # a missing or empty input
        raise InsectError(f"no image files found in {cfg.source}")
    if cfg.manifest:  # its folders are known as it streams: those of its first images
        folder = storage.folder_holding(cfg.output, sorted({os.path.dirname(p) for p in first}))
        if folder:  # said, not refused: the folder may be $HOME, a bucket, ..., no input
            console.warn(inside_images_warning("--output", cfg.output, folder, "the manifest's"))
    check_int8_images(cfg)
    return parts


# The paths of a manifest whose folders the output is checked against before the run.
MANIFEST_LOOK = 1000


def inside_images_warning(flag: str, location: str, folder: str, whose: str) -> str:
    """The warning for an output in a folder of images it was not given as an input."""
    return (
        f"warning: {flag} {location} lies in {folder}, a folder of {whose} images: a "
        "classification of that folder would read what is written there as images"
    )


def check_int8_images(cfg: ClassifyConfig | EvaluateConfig) -> None:
    """--int8-images names a folder, glob or prefix with an image in it (the first one found
    is enough: the statistics' own listing samples them, after torch and the model load),
    unless the model's kept statistics were measured there: `int8_for_run` uses them again
    without reading it, so it may be gone."""
    images, s3 = cfg.int8_images, cfg.s3
    if not images or kept_statistics_from(cfg.model, s3) == images:
        return
    try:
        found = any(is_image_name(uri) for uri in storage.iter_files(images, s3))
    except InsectError as e:
        raise InsectError(f"--int8-images: {e}") from None
    if not found:
        raise InsectError(f"--int8-images: no image files found in {images}")


def kept_statistics_from(model: str, s3) -> str | None:
    """Where the int8 statistics kept in `model` (both files) were measured, their record's
    images_from, read without torch (`int8.load` judges whether they are used); None where
    none are kept."""
    record = storage.join(model, INT8_RECORD)
    try:
        if all(storage.exists(storage.join(model, name), s3) for name in INT8_FILES):
            return json.loads(storage.read_bytes(record, s3)).get("images_from")
    except (InsectError, OSError, ValueError, AttributeError):  # not a record to go by
        pass
    return None


def plan_classify_output(cfg: ClassifyConfig) -> list[str]:
    """Check the output location before any work: it must be empty unless --overwrite or
    --resume. Returns what --overwrite will remove once the run can start (see
    `outputs.overwrite_plan`); refuses at once what it would not remove."""
    if cfg.resume:  # `outputs.resume_state` checks the parts, under the lock
        outputs.check_same_input(cfg.output, cfg.source, cfg.s3)
        outputs.resume_entries(cfg.output, cfg.s3)  # another's files: refused before Ray
        return []
    alternative = " or --resume to finish an interrupted run"
    if not outputs.entries_to_replace(cfg.output, cfg.s3, cfg.overwrite, alternative):
        return []
    return outputs.overwrite_plan(cfg.output, cfg.s3)


def check_evaluation(cfg: EvaluateConfig) -> None:
    """The settings, the model directory's meta.json, the output's place and what it
    holds, and the labelled data's root (`evaluate` lists it whole once the model is
    checked). Writes nothing."""
    cfg.validate()
    check_model_dir(cfg.model, cfg.s3)  # first, as classify's: a mistyped model is named so
    # Its pictures inside the labelled tree would be read as images by the next run.
    storage.check_location(
        cfg.output,
        {"the input": cfg.data, "the model": cfg.model},
        apart=("the input", "the model"),
        s3=cfg.s3,
    )
    plan_evaluation_output(cfg)  # its refusals (planned again under the lock)
    check_root(cfg.data, cfg.s3)
    check_int8_images(cfg)  # before --overwrite removes the last evaluation


def plan_evaluation_output(cfg: EvaluateConfig) -> list[str]:
    """What --overwrite will remove (only files an evaluation writes); refuses a non-empty
    output without it, or one holding anything else. A `predictions/` folder holding
    nothing but a killed run's lock and log (which `outputs.list_entries` leaves out) is no
    output."""
    predictions = storage.join(cfg.output, PREDICTIONS_DIR)
    folder = storage.is_dir(predictions, cfg.s3)
    unused = (PREDICTIONS_DIR,) if folder and not outputs.list_entries(predictions, cfg.s3) else ()
    entries = outputs.entries_to_replace(cfg.output, cfg.s3, cfg.overwrite, unused=unused)
    if not entries:
        return []
    why = outputs.OVERWRITE_REFUSED
    outputs.refuse_foreign(cfg.output, entries, why, EVALUATION_FILES, (PREDICTIONS_DIR,))
    own = [e["name"] for e in entries if e["type"] == "file"]
    return own + outputs.overwrite_plan(predictions, cfg.s3)
