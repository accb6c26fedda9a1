"""Running a trained model on batches: a plain class, usable with or without Ray.

`Predictor` is what the Ray Data actor pool runs in `classify` (as `PoolPredictor`); it is
also how a test or a GPU machine without Ray checks the model path directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from insectlib import storage
from insectlib.config import DecodeLimits
from insectlib.data import device_decode
from insectlib.data.images import normalize
from insectlib.layout import ROW_FORMAT_KEY
from insectlib.model import int8
from insectlib.model.meta import ModelMeta
from insectlib.model.network import WithEmbedding, load_model
from insectlib.model.precision import compile_frozen, quiet_compile_chatter, resolve_precision

# The Parquet schema of `insect classify`: one row per input file. `RowFormat` adds the
# optional columns.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # null when the file could not be classified
        pa.field("label_index", pa.int32()),
        pa.field("score", pa.float32()),  # probability of `label`
        pa.field("probabilities", pa.list_(pa.float32())),  # in meta.json class order
        pa.field("error", pa.string()),  # null when the image was classified
        pa.field("model", pa.string(), nullable=False),  # model id
    ]
)
# With --min-score: false where the top probability is below it (label and label_index are
# then null, the probabilities kept), null on error rows. A column of its own: no class
# name can collide with it.
DECIDED = pa.field("decided", pa.bool_())
TOP_LABELS = pa.field("top_labels", pa.list_(pa.string()))  # --top-k: best first
TOP_SCORES = pa.field("top_scores", pa.list_(pa.float32()))
# --embeddings: the head's input. float16: half the bytes of float32, and its 3 significant
# digits keep cosine similarities to about 1e-3.
EMBEDDING = pa.field("embedding", pa.list_(pa.float16()))


@dataclass(frozen=True)
class RowFormat:
    """How a run makes its rows: the temperature dividing the logits, and the optional
    columns. It is stored in every Parquet part (schema metadata ROW_FORMAT_KEY), so that
    `--resume` continues only an output whose rows were made the same way."""

    temperature: float | None = None  # None: the raw softmax
    top_k: int | None = None
    min_score: float | None = None
    embedding_size: int | None = None  # None: no embedding column

    def schema(self) -> pa.Schema:
        """PREDICTION_SCHEMA, the columns this format adds, and the format as metadata."""
        extra = [
            field
            for field, wanted in (
                (DECIDED, self.min_score is not None),
                (TOP_LABELS, self.top_k),
                (TOP_SCORES, self.top_k),
                (EMBEDDING, self.embedding_size),
            )
            if wanted
        ]
        metadata = {ROW_FORMAT_KEY: json.dumps(asdict(self), sort_keys=True)}
        return pa.schema([*PREDICTION_SCHEMA, *extra], metadata=metadata)


class Predictor:
    """Class probabilities (and embeddings) for uint8 NCHW image batches from a model
    directory; `__call__` turns a Ray Data batch into rows of `row_format`."""

    def __init__(
        self,
        model_uri: str,
        device: str = "cpu",
        precision: str = "auto",
        s3: storage.S3Options | None = None,
        threads: int | None = None,
        compile: bool = False,
        batch_size: int = 32,
        progress=None,
        int8_model: int8.Int8Model | None = None,
        row_format: RowFormat | None = None,
        limits: DecodeLimits | None = None,
    ):
        quiet_compile_chatter()  # first: int8 imports torchao, compiling imports more
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress  # a `runtime.progress.RunProgress`; None without Ray
        self.row_format = row_format or RowFormat()
        self.limits = limits or DecodeLimits()  # for the JPEGs this device cannot decode
        model, self.meta = load_model(model_uri, s3)
        model = WithEmbedding(model)  # (logits, embedding): the embedding costs nothing
        if precision == "int8":
            # Rebuilt from the fp32 weights and the int8 statistics (see `int8`);
            # only compiled does it run int8 kernels. Its rows carry the int8 model's id.
            if int8_model is None or self.device.type != "cpu":
                raise ValueError("--precision int8 needs int8 statistics and a CPU")
            self.dtype = torch.float32
            self.meta = dataclasses.replace(self.meta, model_id=int8_model.record.int8_model_id)
            self.model = int8.quantize(model, int8_model.stats, self.meta.image_size, batch_size)
            del model  # its fp32 weights: not held while compiling
            compile, settings = True, int8.inductor_settings()
        else:
            settings = {}
            self.dtype = resolve_precision(precision, self.device)
            # Weights stored in the compute dtype rather than autocast: no per-batch weight
            # casts (about 10% faster on CPU) and half the memory per actor in bf16/fp16.
            self.model = model.to(self.device, self.dtype, memory_format=torch.channels_last)
        self.compiled = None
        if compile:
            size = self.meta.image_size
            with torch.inference_mode():  # as in `predict`: another tensor kind recompiles
                example = self._model_input(
                    torch.zeros((batch_size, 3, size, size), dtype=torch.uint8)
                )
            self.compiled = compile_frozen(self.model, example, **settings)

    def _model_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A uint8 (N, 3, H, W) batch as the model takes it: normalized, in its dtype,
        channels-last, on its device."""
        x = torch.as_tensor(images)
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()  # page-locked: the copy runs asynchronously
        x = x.to(self.device, non_blocking=True)
        return normalize(x).to(self.dtype).contiguous(memory_format=torch.channels_last)

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor | np.ndarray, embeddings: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, embeddings) for a uint8 (N, 3, H, W) batch: (N, C) float32
        softmax of the logits divided by the row format's temperature, and with
        `embeddings` the (N, E) float32 inputs of the head (else None: not copied off the
        device)."""
        x = self._model_input(images)
        logits, features = [], []
        for chunk in x.split(self.batch_size):
            n = len(chunk)
            if self.compiled is not None and n < self.batch_size:
                # One shape for the compiled graph: a short last batch would recompile.
                pad = chunk.new_zeros((self.batch_size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
            out, embedding = (self.model if self.compiled is None else self.compiled)(chunk)
            logits.append(out[:n].float())
            if embeddings:
                features.append(embedding[:n].float())
        scaled = torch.cat(logits) / (self.row_format.temperature or 1.0)
        found = torch.cat(features).cpu().numpy() if embeddings else None
        return torch.softmax(scaled, dim=1).cpu().numpy(), found

    def probabilities(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, C) float32 class probabilities for a uint8 (N, 3, H, W) batch."""
        return self.predict(images)[0]

    def images(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor | np.ndarray, list]:
        """(uint8 images of the rows without an error, every row's error or None) of a Ray
        Data batch: {path, image, error}, or the columns of `device_decode.to_columns`,
        whose JPEGs are decoded here, on this predictor's device."""
        if "data" not in batch:
            errors = [e or None for e in batch["error"]]
            ok = [e is None for e in errors]
            return (np.stack(batch["image"][ok]) if any(ok) else np.zeros(0)), errors
        size = self.meta.image_size
        prepared = device_decode.from_columns(batch, size)
        images, errors = device_decode.finish(prepared, size, self.device, self.limits)
        ok = torch.tensor([e is None for e in errors], device=images.device)
        return images[ok], errors

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Ray Data batch (see `images`) -> rows of `row_format`.

        An empty or null `error` means the image decoded; other rows skip the model."""
        images, errors = self.images(batch)
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.zeros((len(errors), len(self.classes)), dtype=np.float32)
        embeddings = None
        if self.row_format.embedding_size:
            embeddings = np.zeros((len(errors), self.row_format.embedding_size), np.float32)
        if ok.any():
            wanted = embeddings is not None
            found, found_embeddings = self.predict(images, wanted)
            probs[ok] = found
            if wanted:
                embeddings[ok] = found_embeddings
        if self.progress is not None:
            self.progress.add.remote("classified", len(errors))
        return prediction_table(
            batch["path"], probs, errors, self.meta, self.row_format, embeddings
        )


def _lists(values: np.ndarray, value_type: pa.DataType, mask: np.ndarray) -> pa.ListArray:
    """A (N, K) array as N lists of K values; null where `mask`."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(mask))


def prediction_table(
    paths,
    probs: np.ndarray,
    errors: list,
    meta: ModelMeta,
    row_format: RowFormat | None = None,
    embeddings: np.ndarray | None = None,
) -> pa.Table:
    """Rows of `row_format.schema()`; a row with an error has nulls where predictions go,
    and one below --min-score has no label (see DECIDED)."""
    row_format = row_format or RowFormat()
    failed = np.array([e is not None for e in errors], dtype=bool)
    index = probs.argmax(axis=1).astype(np.int32)
    score = probs[np.arange(len(index)), index].astype(np.float32)
    undecided = np.zeros(len(index), dtype=bool)
    if row_format.min_score is not None:
        undecided = ~failed & ~(score >= row_format.min_score)  # NaN: not decided
    classes = np.array(meta.classes, dtype=object)
    columns = {
        "path": pa.array(list(paths), type=pa.string()),
        "label": pa.array(classes[index], type=pa.string(), mask=failed | undecided),
        "label_index": pa.array(index, type=pa.int32(), mask=failed | undecided),
        "score": pa.array(score, type=pa.float32(), mask=failed),
        "probabilities": _lists(probs.astype(np.float32), pa.float32(), failed),
        "error": pa.array(errors, type=pa.string()),
        "model": pa.array([meta.model_id] * len(index), type=pa.string()),
        "decided": pa.array(~undecided, type=pa.bool_(), mask=failed),
    }
    if row_format.top_k:
        top = np.argsort(-probs, axis=1, kind="stable")[:, : row_format.top_k]
        columns["top_labels"] = _lists(classes[top], pa.string(), failed)
        columns["top_scores"] = _lists(
            np.take_along_axis(probs, top, axis=1).astype(np.float32), pa.float32(), failed
        )
    if row_format.embedding_size:
        columns["embedding"] = _lists(embeddings.astype(np.float16), pa.float16(), failed)
    schema = row_format.schema()
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
