"""Running a trained model on batches: a plain class, usable with or without Ray.

`Predictor` is what the Ray Data actor pool instantiates in `classify`; it is also how a
test or a GPU machine without Ray checks the model path directly.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pyarrow as pa
import torch

from insectlib import int8, storage
from insectlib.images import normalize
from insectlib.model import ModelMeta, load_model
from insectlib.precision import compile_frozen, resolve_precision

# The Parquet schema of `insect classify`: one row per input file.
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


class Predictor:
    """Class probabilities for uint8 NCHW image batches from a model directory."""

    def __init__(
        self,
        model_uri: str,
        device: str = "cpu",
        precision: str = "auto",
        s3: storage.S3Options | None = None,
        threads: int | None = None,
        compile: bool = False,
        batch_size: int = 32,
        counter=None,
        int8_model: int8.Int8Model | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.counter = counter  # a Ray actor with add(n), for progress; None without Ray
        model, self.meta = load_model(model_uri, s3)
        if precision == "int8":
            # Rebuilt from the fp32 weights and the calibration statistics (see `int8`);
            # only compiled does it run int8 kernels. Its rows carry the int8 model's id.
            if int8_model is None or self.device.type != "cpu":
                raise ValueError("--precision int8 needs calibration statistics and a CPU")
            self.dtype = torch.float32
            self.meta = dataclasses.replace(self.meta, model_id=int8_model.record.int8_model_id)
            self.model = int8.quantize(model, int8_model.stats, self.meta.image_size, batch_size)
            compile = True
        else:
            self.dtype = resolve_precision(precision, self.device)
            # Weights stored in the compute dtype rather than autocast: no per-batch weight
            # casts (about 10% faster on CPU) and half the memory per actor in bf16/fp16.
            self.model = model.to(self.device, self.dtype, memory_format=torch.channels_last)
        self.compiled = None
        if compile:
            self.compiled = compile_frozen(self.model)
        self._compile_checked = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(x)
        if self._compile_checked:
            return self.compiled(x)
        try:  # compilation happens on the first call; it needs a C++ compiler (Triton on GPU)
            out = self.compiled(x)
        except Exception as e:
            print(f"torch.compile failed, running the model eagerly: {e}", file=sys.stderr)
            self.compiled = None
            return self.model(x)
        self._compile_checked = True
        return out

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, C) float32 class probabilities for a uint8 (N, 3, H, W) batch."""
        x = torch.as_tensor(images)
        if self.device.type == "cuda":
            x = x.pin_memory()  # page-locked: the copy runs asynchronously
        x = x.to(self.device, non_blocking=True)
        x = normalize(x).to(self.dtype).contiguous(memory_format=torch.channels_last)
        chunks = []
        for chunk in x.split(self.batch_size):
            n = len(chunk)
            if self.compiled is not None and n < self.batch_size:
                # One shape for the compiled graph: a short last batch would recompile.
                pad = chunk.new_zeros((self.batch_size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
            chunks.append(self._forward(chunk)[:n].float())
        return torch.softmax(torch.cat(chunks), dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Ray Data batch {path, image, error} -> rows of PREDICTION_SCHEMA.

        An empty or null `error` means the image decoded; other rows skip the model."""
        errors = [e or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.zeros((len(errors), len(self.classes)), dtype=np.float32)
        if ok.any():
            probs[ok] = self.probabilities(np.stack(batch["image"][ok]))
        if self.counter is not None:
            self.counter.add.remote(len(errors))
        return prediction_table(batch["path"], probs, errors, self.meta)


def prediction_table(paths, probs: np.ndarray, errors: list, meta: ModelMeta) -> pa.Table:
    """Rows of PREDICTION_SCHEMA; a row with an error has nulls where predictions go."""
    ok = np.array([e is None for e in errors], dtype=bool)
    index = probs.argmax(axis=1).astype(np.int32)
    score = probs[np.arange(len(index)), index].astype(np.float32)
    classes = np.array(meta.classes, dtype=object)
    flat = pa.array(probs.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, probs.size + 1, probs.shape[1], dtype=np.int32))
    mask = pa.array(~ok)
    return pa.Table.from_arrays(
        [
            pa.array(list(paths), type=pa.string()),
            pa.array(classes[index], type=pa.string(), mask=~ok),
            pa.array(index, type=pa.int32(), mask=~ok),
            pa.array(score, type=pa.float32(), mask=~ok),
            pa.ListArray.from_arrays(offsets, flat, mask=mask),
            pa.array(errors, type=pa.string()),
            pa.array([meta.model_id] * len(index), type=pa.string()),
        ],
        schema=PREDICTION_SCHEMA,
    )
