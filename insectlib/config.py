"""Every setting of every command, written once: the config dataclasses and their defaults,
choice lists and bounds. Torch-free, so the CLI can build its flags from these fields (the
way Ray's benchmark configs do) without importing a model.

A field's metadata may hold `choices`, `at_least`, `at_most`, `above` and `flag` (when the
command-line name is not `--` + the field name with dashes). `check_settings` enforces them;
`insectlib.cli` turns them into `choices=`, `default=` and `type=` and adds only help text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from insectlib import storage
from insectlib.errors import InsectError
from insectlib.storage import S3Options

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the hardware runs it fast
# Classification on CPU may also run int8 (see `insectlib.int8`); auto picks it only where
# the model directory holds a calibration that agrees with fp32.
CLASSIFY_PRECISIONS = (*PRECISIONS, "int8")
# A new int8 calibration reads up to this many images: half fit the quantization, half are
# held out to measure agreement with fp32 (128 of them: steps of 0.8%).
CALIBRATION_IMAGES = 256
INT8_AGREEMENT_MIN = 0.99  # top-1 agreement with fp32 that lets --precision auto pick int8
# Temperatures training may fit (`confidence.fit_temperature`) and meta.json may hold: far
# wider than real models need (0.5-5), and narrow enough that logits / T stay finite.
TEMPERATURE_RANGE = (0.05, 20.0)
FREEZE_POLICIES = ("trunk", "none")  # trunk: only the new head trains; none: everything trains
OPTIMIZERS = ("adam", "sgd")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
COMPILE_CHOICES = ("auto", "on", "off")
IMAGE_SIZES = range(16, 4097)  # model input sizes, in pixels, that a model directory may hold
BATCH_SIZE = 32  # images per training worker step and per model-actor call
# Pillow's own threshold (89.5M pixels; it warns above it and refuses above twice it).
# Insect refuses above it: a decoded RGB image of that size holds 268 MB. JPEGs count at
# the reduced size their draft decoding produces, so camera photos of any size pass.
MAX_PIXELS = 89_478_485
MAX_FILE_BYTES = 256 * 2**20  # far above any photo; bounds what one read may hold


def setting(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A config field with its default and the rules of `check_settings` (`choices`,
    `at_least`, `at_most`, `above`, `flag`)."""
    return field(default=default, metadata=rules)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line name of config field `f`."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def check_settings(cfg: Any) -> None:
    """Refuse a value outside its field's choices or bounds, naming the flag."""
    for f in dataclasses.fields(cfg):
        value, rules, flag = getattr(cfg, f.name), f.metadata, flag_name(f)
        if "choices" in rules and value not in rules["choices"]:
            raise InsectError(
                f"unknown {flag} {value!r}: choose one of {', '.join(rules['choices'])}"
            )
        if value is None:
            continue
        low, high = rules.get("at_least"), rules.get("at_most")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if high is None else f"at most {high}")
            )
            raise InsectError(f"{flag} must be {bound}, got {value}")
        if "above" in rules and not value > rules["above"]:
            raise InsectError(f"{flag} must be more than {rules['above']}, got {value}")


def settings_of(cfg: Any, group: type) -> dict[str, Any]:
    """The values of `cfg` for the fields of `group`, one of its base classes: to pass the
    settings commands share from one config to another."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(group)}


@dataclass(frozen=True)
class DecodeLimits:
    """What one input file may cost: bytes read and pixels decoded (`--max-file-bytes`,
    `--max-pixels`). Files over a limit get an error row instead of the memory."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_pixels: int = MAX_PIXELS


@dataclass(kw_only=True)
class InputLimits:
    """The limits on each input file: classify, evaluate and train."""

    max_file_bytes: int = setting(MAX_FILE_BYTES, at_least=1)  # larger inputs are not read
    max_pixels: int = setting(MAX_PIXELS, at_least=1)  # larger images are not decoded

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_file_bytes, self.max_pixels)


@dataclass(kw_only=True)
class RaySettings(InputLimits):
    """What every command that runs on Ray shares."""

    precision: str = setting("auto", choices=PRECISIONS)
    gpu: bool = False  # one GPU per training worker / model actor
    overwrite: bool = False  # replace an existing output
    address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray
    s3: S3Options = field(default_factory=S3Options)


@dataclass(kw_only=True)
class ActorSettings(RaySettings):
    """The model-actor pool of classify and evaluate."""

    precision: str = setting("auto", choices=CLASSIFY_PRECISIONS)
    # int8: images to fit the quantization on; None: the model's validation images
    int8_calibration: str | None = None
    batch_size: int = setting(BATCH_SIZE, at_least=1)
    max_actors: int | None = setting(None, at_least=1)  # None: as the cluster allows
    cpus_per_actor: float = setting(1.0, above=0)

    def validate(self) -> None:
        check_settings(self)
        if self.precision == "int8" and self.gpu:
            raise InsectError("--precision int8 runs on CPUs: drop --gpu or choose bf16/fp16")
        if self.int8_calibration and self.precision != "int8":
            raise InsectError("--int8-calibration is for --precision int8")


@dataclass(kw_only=True)
class TrainConfig(RaySettings):
    """Every knob of `insect train`."""

    data: str
    output: str = "insect-model"
    arch: str = "vgg16"  # checked against torchvision's models in `train.prepare`
    weights: str = "imagenet"  # imagenet | random | path or s3:// URI of a state dict
    freeze: str = setting("trunk", choices=FREEZE_POLICIES)
    epochs: int = setting(4, at_least=1)
    batch_size: int = setting(BATCH_SIZE, at_least=1)  # per worker
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    lr: float = setting(0.001, at_least=0)
    momentum: float = setting(0.9, at_least=0)
    weight_decay: float = setting(0.0, at_least=0)
    val_fraction: float = setting(0.2, at_least=0, at_most=1)
    seed: int = 0
    image_size: int = setting(224, at_least=IMAGE_SIZES.start, at_most=IMAGE_SIZES.stop - 1)
    augment: bool = True
    cache_features: bool = True  # frozen trunk, no augmentation: one trunk pass per run
    workers: int = setting(2, at_least=1)
    cpus_per_worker: float | None = setting(None, above=0)  # None: see `sized`
    placement: str = setting("PACK", choices=PLACEMENTS)
    loader_workers: int | None = setting(None, at_least=0)  # None: see `sized`
    storage: str | None = None  # Ray Train run storage; None: ~/ray_results
    name: str | None = None  # run name under storage
    resume: bool = False  # continue the run `name` found in `storage`
    progress_every: float = setting(10.0, at_least=0)  # seconds between progress lines
    max_failures: int = setting(2, at_least=-1)  # worker failures survived; -1: no limit
    keep_checkpoints: int = setting(2, at_least=0)  # 0 keeps all

    @property
    def caches_features(self) -> bool:
        """Whether the frozen trunk's outputs are computed once and reused every epoch: only
        when they cannot change, i.e. the trunk is frozen and no augmentation is applied."""
        return self.cache_features and self.freeze == "trunk" and not self.augment

    def sized(self, cpus_per_gpu: float | None = None) -> TrainConfig:
        """This config with the automatic sizes of the workers filled in. With --gpu, each
        worker gets the CPUs its node has per GPU (`cpus_per_gpu`, the smallest over the
        GPU nodes) and decodes with all but one of them in DataLoader processes: a GPU
        trains VGG-16 at hundreds to thousands of images/s, one core decodes ~181 camera
        JPEGs/s. On CPU, one CPU and no extra processes: the model itself, a few images/s
        per core, is the bottleneck there, and decoding processes would only take cores
        from torch."""
        cpus = self.cpus_per_worker
        if cpus is None:
            cpus = max(1.0, cpus_per_gpu or 1.0) if self.gpu else 1.0
        loaders = self.loader_workers
        if loaders is None:
            loaders = max(0, int(cpus) - 1) if self.gpu else 0
        return dataclasses.replace(self, cpus_per_worker=cpus, loader_workers=loaders)

    def validate(self) -> None:
        check_settings(self)
        if self.resume and not self.name:
            raise InsectError("--resume needs the --name of the run to continue")
        if self.weights not in ("imagenet", "random") and not storage.exists(self.weights, self.s3):
            raise InsectError(f"--weights file not found: {self.weights}")


@dataclass(kw_only=True)
class ClassifyConfig(ActorSettings):
    """Every knob of `insect classify`."""

    input: str = ""  # a folder, prefix, file or glob; "" with a manifest
    manifest: str | None = None  # a list of the inputs instead of `input` (see inputs.py)
    model: str
    output: str
    min_actors: int | None = setting(None, at_least=1)  # None: start with max_actors
    compile: str = setting("auto", choices=COMPILE_CHOICES)  # auto: on for big jobs
    rows_per_file: int = setting(1000, at_least=1)  # at least, per file (the last may hold fewer)
    resume: bool = False  # classify only the inputs that have no row in the output yet
    max_error_fraction: float | None = setting(None, at_least=0, at_most=1)
    # What each row holds (see `predict.RowFormat`).
    calibration: bool = True  # divide the logits by the model's fitted temperature
    top_k: int | None = setting(None, at_least=1)  # add the K best labels and scores
    embeddings: bool = False  # add the head's input
    min_score: float | None = setting(None, at_least=0, at_most=1)  # below: not decided

    def validate(self) -> None:
        super().validate()
        if self.max_actors is not None and not (self.min_actors or 1) <= self.max_actors:
            raise InsectError("need 1 <= --min-actors <= --max-actors")
        if bool(self.input) == bool(self.manifest):
            raise InsectError("give either INPUT or --manifest (one of them)")
        if self.overwrite and self.resume:
            raise InsectError("--overwrite and --resume exclude each other")


@dataclass(kw_only=True)
class EvaluateConfig(ActorSettings):
    """Every knob of `insect evaluate`."""

    data: str
    model: str
    output: str = "evaluation"


@dataclass(kw_only=True)
class VisualizeConfig:
    """Every knob of `insect visualize`."""

    image: str
    model: str
    layers: list[int]
    output: str = "feature-maps"
    max_maps: int = setting(64, at_least=1)  # channels drawn per layer
    s3: S3Options = field(default_factory=S3Options)

    def validate(self) -> None:
        check_settings(self)


@dataclass(kw_only=True)
class SummaryConfig:
    """Every knob of `insect summary`."""

    predictions: str  # a classification output
    s3: S3Options = field(default_factory=S3Options)

    def validate(self) -> None:
        check_settings(self)


@dataclass(kw_only=True)
class DemoConfig:
    """Every knob of `insect demo`."""

    workdir: str = "demo-output"
    image_size: int = setting(128, at_least=IMAGE_SIZES.start, at_most=IMAGE_SIZES.stop - 1)

    def validate(self) -> None:
        check_settings(self)
