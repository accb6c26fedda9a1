"""Measuring int8 statistics: the activation ranges of a model on images like those it will
classify (fit on half of them), and the agreement of the int8 model with fp32 (on the
other half), measured through `Predictor` exactly as the model actors run it. Kept beside
the model (`layout.INT8_FILES`) for every later run; `int8` rebuilds the model from them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict

import numpy as np
import torch

from insectlib import layout, storage
from insectlib.config import INT8_IMAGES, DecodeLimits
from insectlib.data import label_table
from insectlib.data.images import eval_transform, is_image_name, load_images, normalize, resize_size
from insectlib.errors import ImageError, InsectError
from insectlib.model.int8 import (
    INT8_FORMAT,
    Int8Model,
    Int8Record,
    activation_stats,
    forget_graphs,
    prepare,
)
from insectlib.model.meta import ModelMeta, versions
from insectlib.model.network import WithEmbedding, load_model
from insectlib.model.precision import cpu_name, speed_flags
from insectlib.model.predictor import Predictor
from insectlib.runtime import console

MIN_IMAGES = 8


def statistics_images(
    meta: ModelMeta, images: str | None, s3, count: int = INT8_IMAGES
) -> tuple[list[str], str]:
    """Up to `count` image URIs to measure the statistics on, sampled with a fixed seed, and
    where they came from: `images` (a folder, prefix or glob), or else the model's own
    validation images when meta.json says where its data was."""
    if images:
        source = images
        uris = [u for u in storage.iter_files(images, s3) if is_image_name(u)]
    else:
        data = meta.data
        table = (data.get("labels") or {}).get("table")  # trained with --labels
        if not (data.get("root") or table) or "val_fraction" not in data:
            raise InsectError(
                "this model directory does not say where its validation images are: give "
                "--int8-images with a few hundred images like those to classify"
            )
        source = f"validation images of {data.get('root') or table}"
        try:
            found = label_table.training_set(
                data.get("root"), table, data["val_fraction"], data.get("seed", 0), True, s3
            )
        except InsectError as e:
            raise InsectError(
                f"the model's {source} cannot be read ({e}): give --int8-images"
            ) from None
        uris = [u for u, _ in found.val]
    uris = sorted(uris)
    random.Random(0).shuffle(uris)
    return uris[:count], source


def measure(
    model_uri: str,
    meta: ModelMeta,
    images: str | None,
    batch_size: int,
    limits: DecodeLimits,
    s3=None,
) -> Int8Model:
    """Fit the statistics on half of the images, measure the int8 model's agreement with
    fp32 on the other half, and store both beside the model (a model directory that
    cannot be written keeps none: the run still uses them)."""
    uris, source = statistics_images(meta, images, s3)
    decoded = _decode(uris, meta.image_size, limits, s3)
    if len(decoded) < MIN_IMAGES:
        raise InsectError(
            f"{source} holds {len(decoded)} readable images; measuring int8 statistics needs "
            f"at least {MIN_IMAGES} (a few hundred is best)"
        )
    half = (len(decoded) + 1) // 2
    fit, held_out = decoded[:half], decoded[half:]
    stats = _fit(model_uri, meta, fit, batch_size, s3)
    data = _tensor_bytes(stats)
    record = Int8Record(
        model_id=meta.model_id,
        stats_sha256=hashlib.sha256(data).hexdigest(),
        images_from=source,
        fit_images=len(fit),
        agreement_images=len(held_out),
        top1_agreement=0.0,
        max_probability_difference=0.0,
        cpu=f"{cpu_name()} ({' '.join(speed_flags())})",
        versions=versions(),
        format_version=INT8_FORMAT,
    )
    _measure_agreement(model_uri, Int8Model(stats, record), held_out, batch_size, s3)
    try:  # the statistics first: a record names only statistics that exist
        storage.write_file(model_uri, layout.INT8_STATS, data, s3)
        storage.write_file(model_uri, layout.INT8_RECORD, json.dumps(asdict(record), indent=2), s3)
    except (OSError, InsectError) as e:
        console.warn(f"could not store the int8 statistics in {model_uri}: {e}")
    return Int8Model(stats, record)


def _fit(model_uri: str, meta: ModelMeta, images: torch.Tensor, batch_size: int, s3) -> dict:
    """The activation statistics of the model on `images`."""
    model, _ = load_model(model_uri, s3)
    # The form `Predictor` quantizes: (logits, embedding), so that the observers match.
    prepared = prepare(WithEmbedding(model).eval(), meta.image_size, batch_size)
    with torch.no_grad():
        for batch in images.split(batch_size):
            prepared(normalize(batch))
    stats = activation_stats(prepared)
    del prepared, model
    forget_graphs()
    return stats


def _measure_agreement(
    model_uri: str, int8_model: Int8Model, images: torch.Tensor, batch_size: int, s3
) -> None:
    """Top-1 agreement and the largest probability difference with fp32 on `images`,
    through `Predictor` as each model actor runs it; into `int8_model.record`."""
    reference = Predictor(model_uri, precision="fp32", s3=s3, batch_size=batch_size)
    quantized = Predictor(
        model_uri, precision="int8", s3=s3, batch_size=batch_size, int8_model=int8_model
    )
    fp32, int8 = (p.probabilities(images.numpy()) for p in (reference, quantized))
    int8_model.record.top1_agreement = float((fp32.argmax(1) == int8.argmax(1)).mean())
    int8_model.record.max_probability_difference = float(np.abs(fp32 - int8).max())


def _decode(uris: list[str], image_size: int, limits: DecodeLimits, s3) -> torch.Tensor:
    transform, min_side = eval_transform(image_size), resize_size(image_size)
    decoded = [
        image
        for image in load_images(uris, transform, min_side, limits, s3)
        if not isinstance(image, ImageError)
    ]
    if not decoded:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    return torch.stack(decoded)


def _tensor_bytes(stats: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sorted(stats.items())})
