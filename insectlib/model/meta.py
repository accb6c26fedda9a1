"""meta.json: what a model directory says about its model (classes, arch, head, image
size, normalisation, temperature, training history, versions) and its id."""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass, field

from insectlib import __version__, storage
from insectlib.config import IMAGE_SIZES, TEMPERATURE_RANGE
from insectlib.data.images import IMAGENET_MEAN, IMAGENET_STD
from insectlib.errors import InsectError
from insectlib.layout import META_FILE

# The fields of meta.json that decide a prediction: the model id covers them.
ID_FIELDS = ("classes", "arch", "head", "image_size", "mean", "std", "temperature")
ID_VERSION = 2


@dataclass
class ModelMeta:
    """The contents of meta.json."""

    classes: list[str]
    arch: str
    image_size: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # What identifies the model (the `model` column of every row): a hash of the weights
    # and of every field that decides a prediction (ID_FIELDS), so that an edited meta.json
    # is refused, never a new model under an old id. `id_version` 1: meta.json written
    # before that, whose id is the weights file's hash alone.
    model_id: str = ""
    weights_sha256: str = ""  # of the weights file
    id_version: int = 1
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

    def content_id(self) -> str:
        """The model id this meta.json's content gives (ID_VERSION): the weights' hash and
        the fields that decide a prediction."""
        decisive = {name: getattr(self, name) for name in ID_FIELDS}
        text = json.dumps({"weights_sha256": self.weights_sha256, **decisive}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def sealed(self, weights_sha256: str) -> ModelMeta:
        """This meta with the weights' hash and the model id of its content set (in place)."""
        self.weights_sha256, self.id_version = weights_sha256, ID_VERSION
        self.model_id = self.content_id()
        return self

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
        if self.id_version >= ID_VERSION and self.content_id() != self.model_id:
            raise InsectError(
                f"{where} was changed after training: its content is no longer model "
                f"{self.model_id} (a model id covers the weights and {', '.join(ID_FIELDS)}); "
                "restore the file or train again"
            )


def versions() -> dict[str, str]:
    """The versions of what made a model, a calibration or a run's rows."""
    import ray
    import torch
    import torchvision

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
    import torchvision  # here: this module is read before torch is imported (`check_model_dir`)

    return torchvision.models.list_models(module=torchvision.models)


def write_meta(uri: str, meta: ModelMeta, s3=None) -> None:
    """Write meta.json (last of all: a directory with a meta.json is complete), with the
    model id of its content."""
    if meta.weights_sha256:
        meta.sealed(meta.weights_sha256)
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
            raise not_a_model(meta_uri) from None
    return ModelMeta.from_json(data.decode(errors="replace"), meta_uri)


def check_model_dir(uri: str, s3: storage.S3Options | None = None) -> None:
    """Refuse a folder without a meta.json, without reading it: `read_meta` validates the
    file, which imports torchvision for its list of models."""
    meta_uri = storage.join(uri, META_FILE)
    with storage.user_errors(meta_uri):
        if not storage.exists(meta_uri, s3):
            storage.check_bucket(uri, s3)  # a bucket that is not there: said so
            raise not_a_model(meta_uri)


def not_a_model(meta_uri: str) -> InsectError:
    return InsectError(f"not a model directory: {meta_uri} does not exist")


def model_id(weights: bytes) -> str:
    """The id of a model whose meta.json has id_version 1: a prefix of its weights file's
    SHA-256."""
    return hashlib.sha256(weights).hexdigest()[:16]
