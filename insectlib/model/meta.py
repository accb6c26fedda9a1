"""meta.json: what a model directory says about its model (classes, arch, head, image
size, normalisation, temperature, training history, versions) and its id."""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass, field

import torch
import torchvision

from insectlib import __version__, storage
from insectlib.config import IMAGE_SIZES, TEMPERATURE_RANGE
from insectlib.data.images import IMAGENET_MEAN, IMAGENET_STD
from insectlib.errors import InsectError
from insectlib.layout import META_FILE


@dataclass
class ModelMeta:
    """The contents of meta.json."""

    classes: list[str]
    arch: str
    image_size: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    model_id: str = ""  # sha256 prefix of the weights file
    head: str = ""  # module name of the replaced final Linear layer
    base_weights: str = ""
    freeze: str = "trunk"
    epochs: list[dict] = field(default_factory=list)  # metrics reported each epoch
    data: dict = field(default_factory=dict)  # split and counts per class
    versions: dict = field(default_factory=dict)
    # Temperature scaling fitted on the validation split (see `confidence`): classify
    # divides the logits by it. None: not calibrated (no validation split, an older model).
    temperature: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelMeta:
        try:
            raw = json.loads(text)
            meta = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
            meta.validate(where)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise InsectError(f"{where} is not a valid insect meta.json: {e}") from None
        return meta

    def validate(self, where: str) -> None:
        problems = []
        if not (
            isinstance(self.classes, list)
            and len(self.classes) >= 2
            and all(isinstance(c, str) and c for c in self.classes)
            and len(set(self.classes)) == len(self.classes)
        ):
            problems.append("'classes' must list at least 2 distinct names")
        if self.arch not in available_archs():
            problems.append(f"unknown arch {self.arch!r}")
        if not isinstance(self.image_size, int) or self.image_size not in IMAGE_SIZES:
            problems.append(f"bad image_size {self.image_size!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (
                isinstance(values, list)
                and len(values) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
                and (name == "mean" or all(v > 0 for v in values))
            ):
                rule = "3 finite numbers" + (" above 0" if name == "std" else "")
                problems.append(f"'{name}' must be {rule}")
        if not isinstance(self.model_id, str) or not isinstance(self.head, str):
            problems.append("'model_id' and 'head' must be strings")
        t, (low, high) = self.temperature, TEMPERATURE_RANGE
        if t is not None and not (
            isinstance(t, (int, float)) and not isinstance(t, bool) and low <= t <= high
        ):
            problems.append(f"'temperature' must be between {low} and {high} or null, got {t!r}")
        if problems:
            raise InsectError(f"{where} is not a valid insect meta.json: {'; '.join(problems)}")


def versions() -> dict[str, str]:
    """The versions of what made a model, a calibration or a run's rows."""
    import ray

    return {
        "insect": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "torchao": _installed("torchao"),  # int8's graph and observers
    }


def _installed(package: str) -> str:
    """The installed version of `package`, without importing it (torchao: about 0.5 s)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def available_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def write_meta(uri: str, meta: ModelMeta, s3=None) -> None:
    """Write meta.json: last of all, as a directory with a meta.json is complete."""
    storage.write_file(uri, META_FILE, meta.to_json(), s3)


def remove_meta(uri: str, s3=None) -> None:
    """Remove meta.json, first of all when a model directory is rewritten: until the new
    one is written last, the directory is not a model, rather than old meta beside new
    weights."""
    fs, path = storage.filesystem(storage.join(uri, META_FILE), s3)
    with storage.user_errors(uri):
        if fs.exists(path):
            fs.rm_file(path)


def read_meta(uri: str, s3: storage.S3Options | None = None) -> ModelMeta:
    """Read and validate a model directory's meta.json."""
    meta_uri = storage.join(uri, META_FILE)
    with storage.user_errors(meta_uri):
        try:
            data = storage.read_bytes(meta_uri, s3)
        except FileNotFoundError:
            raise InsectError(f"not a model directory: {meta_uri} does not exist") from None
    return ModelMeta.from_json(data.decode(errors="replace"), meta_uri)


def model_id(weights: bytes) -> str:
    """The id of a model: a prefix of its safetensors file's SHA-256."""
    return hashlib.sha256(weights).hexdigest()[:16]
