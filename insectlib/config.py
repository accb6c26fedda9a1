"""Every setting of every command, written once: the config dataclasses with each field's
default, choices, bounds and help text. Nothing here imports torch, Ray or a storage
library, so the CLI builds and checks its flags (`insectlib.cli.main`) in a fraction of a
second, before anything heavy starts.

A field's metadata (`setting`) may hold `help`, `choices`, `at_least`, `at_most`
and `flag` (when the command-line name is not `--` + the field name with dashes, or
`--no-` + it for a setting that is on by default). `check_settings` enforces them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from insectlib.errors import InsectError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the hardware runs it fast
# Classification on CPU may also run int8 (see `insectlib.model.int8`); auto picks it only
# where the model directory holds int8 statistics that agree with fp32.
CLASSIFY_PRECISIONS = (*PRECISIONS, "int8")
# New int8 statistics are measured on up to this many images: half fit the quantization,
# half are held out to measure agreement with fp32 (128 of them: steps of 0.8%).
INT8_IMAGES = 256
INT8_AGREEMENT_MIN = 0.99  # top-1 agreement with fp32 that lets --precision auto pick int8
# Temperatures training may fit (`metrics.confidence.fit_temperature`) and meta.json may
# hold: far wider than real models need (0.5-5), and narrow enough that logits / T stay
# finite.
TEMPERATURE_RANGE = (0.05, 20.0)
FREEZE_POLICIES = ("trunk", "none")  # trunk: only the new head trains; none: everything trains
OPTIMIZERS = ("adam", "sgd")
LEAST_CPUS = 0.0001  # Ray's smallest share of a resource: a task or actor asking less fails
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
COMPILE_CHOICES = ("auto", "on", "off")
# Where the model actors' JPEGs are decoded (see `insectlib.data.device_decode`).
DECODE_CHOICES = ("auto", "cpu", "device")
IMAGE_SIZES = range(16, 4097)  # model input sizes, in pixels, that a model directory may hold
BATCH_SIZE = 32  # images per training worker step and per model-actor call
# A bound that refuses numbers no run can use (past 2**63 they overflowed deep in a run);
# memory bounds a batch long before it.
MOST_BATCH_SIZE = 65_536
# Pillow's own threshold (89.5M pixels; it warns above it and refuses above twice it).
# Insect refuses above it: a decoded RGB image of that size holds 268 MB. JPEGs count at
# the reduced size their draft decoding produces, so camera photos of any size pass.
MAX_PIXELS = 89_478_485
MAX_FILE_BYTES = 256 * 2**20  # far above any photo; bounds what one read may hold
MOST_FILE_BYTES = 2**40  # --max-file-bytes at most: no image is a terabyte (2**63 overflowed)
MODEL_HELP = "model directory written by insect train (or s3://)"
# Fields naming a local path or an s3:// URI: `absolute_paths` fixes local ones to the
# directory the command ran in, before anything reaches Ray.
PATH_FIELDS = (
    "data",
    "input",
    "image",
    "predictions",
    "output",
    "model",
    "manifest",
    "storage",
    "labels",
    "int8_images",
    "weights",
    "html",
)
# Those of them a command writes to.
WRITTEN_FIELDS = ("output", "storage", "html")


def setting(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A config field with its default, help text and the rules of `check_settings`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


# Fields given as positional arguments on the command line; every other field is a --flag.
# A positional whose field has a default may be left out (classify --manifest, train --labels).
POSITIONAL = ("data", "input", "image", "predictions")


def flag_name(f: dataclasses.Field) -> str:
    """The command-line name of config field `f`: `--no-NAME` for a setting on by default,
    NAME for a positional argument."""
    if f.name in POSITIONAL:
        return f.name.upper()
    if "flag" in f.metadata:
        return f.metadata["flag"]
    stem = f.name.replace("_", "-")
    return f"--no-{stem}" if f.default is True else f"--{stem}"


def check_settings(cfg: Any) -> None:
    """Refuse a value outside its field's choices or bounds, or a float that is not a
    number (nan, inf), naming the flag."""
    for f in dataclasses.fields(cfg):
        value, rules, flag = getattr(cfg, f.name), f.metadata, flag_name(f)
        if "choices" in rules and value not in rules["choices"]:
            raise InsectError(
                f"unknown {flag} {value!r}: choose one of {', '.join(rules['choices'])}"
            )
        blank = f.name in PATH_FIELDS and isinstance(value, str) and not value.strip()
        if blank and (value or f.default != ""):  # "" where it may be left out
            raise InsectError(f"{flag} is empty: name a folder, a file or an s3:// location")
        if isinstance(value, float) and not math.isfinite(value):
            raise InsectError(f"{flag} must be a finite number, got {value}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = rules.get("at_least"), rules.get("at_most")
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if high is None else f"at most {high}")
            )
            raise InsectError(f"{flag} must be {bound}, got {value}")


def escapes(name: str) -> bool:
    """Whether a folder name (a/b allowed) leaves the folder it is joined to, or is it."""
    return name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/"))


def settings_of(cfg: Any, group: type) -> dict[str, Any]:
    """The values of `cfg` for the fields of `group`, one of its base classes: to pass the
    settings commands share from one config to another."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(group)}


def is_local(uri: str | None) -> bool:
    return bool(uri) and "://" not in uri


def absolute_paths(cfg: Any, cwd: str | None = None, job: bool = False) -> Any:
    """`cfg` with every local path among PATH_FIELDS made absolute against `cwd` (the
    command's working directory) and `~` expanded: what the user meant in their shell,
    whichever process later reads it (a Ray worker's working directory is not theirs).
    s3:// URIs and the words `imagenet` and `random` of --weights stay as they are. In a
    Ray `job`, a relative path to write to is refused: the job's folder is Ray's."""
    try:  # asked even where every path is absolute: Ray's processes would start there too
        cwd = cwd or os.getcwd()
    except FileNotFoundError:
        raise InsectError(
            "the current folder no longer exists (removed after the shell went into it): "
            "cd to one that does"
        ) from None
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not is_local(value):
            continue
        if name == "weights" and value in ("imagenet", "random"):
            continue
        if job and name in WRITTEN_FIELDS and not os.path.isabs(os.path.expanduser(value)):
            flag = flag_name(next(f for f in dataclasses.fields(cfg) if f.name == name))
            raise InsectError(
                f"{flag} {value} is relative, and a Ray job runs in a folder of Ray's ({cwd}; "
                "with --working-dir, its copy, deleted with it): give an absolute path or s3://"
            )
        changes[name] = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
    return dataclasses.replace(cfg, **changes) if changes else cfg


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Credentials always come from the standard AWS chain, never from here."""

    endpoint_url: str | None = setting(
        None,
        flag="--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint URL (MinIO, Ceph, ...); default $AWS_ENDPOINT_URL",
    )
    anonymous: bool = setting(False, help="unsigned S3 requests (public buckets)")


@dataclass(frozen=True)
class DecodeLimits:
    """What one input file may cost: bytes read and pixels decoded (`--max-file-bytes`,
    `--max-pixels`). Files over a limit get an error row instead of the memory."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_pixels: int = MAX_PIXELS


@dataclass(kw_only=True)
class InputLimits:
    """The limits on each input file: classify, evaluate and train."""

    max_file_bytes: int = setting(
        MAX_FILE_BYTES,
        at_least=1,
        at_most=MOST_FILE_BYTES,
        help=(
            "input files larger than this are not read (classify: an error row; train: "
            "skipped; report: no thumbnail)"
        ),
    )
    max_pixels: int = setting(
        MAX_PIXELS,
        at_least=1,
        help=(
            "images with more pixels are not decoded (classify: an error row; train: "
            "skipped; report: no thumbnail); "
            "JPEGs count at the reduced scale they are decoded at"
        ),
    )

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_file_bytes, self.max_pixels)


@dataclass(kw_only=True)
class RaySettings(InputLimits):
    """What every command that runs on Ray shares."""

    precision: str = setting(
        "auto",
        choices=PRECISIONS,
        help="compute precision; auto: bf16 where the hardware runs it fast",
    )
    gpu: bool = setting(False, help="one GPU per training worker / model actor")
    overwrite: bool = setting(False, help="replace an existing output")
    address: str | None = setting(
        None,
        help=(
            "Ray cluster to use: auto, HOST:PORT or ray://HOST:PORT (default: $RAY_ADDRESS, "
            "as set by `ray job submit`, else a new local Ray)"
        ),
    )
    wait_for_nodes: float = setting(
        0.0,
        at_least=0,
        help=(
            "seconds an autoscaling cluster may take to add the nodes the run needs (0: a run "
            "the cluster cannot hold now is refused at once)"
        ),
    )
    verbose: bool = setting(
        False,
        help="show Ray's and torch's own messages here rather than in the run's log file",
    )
    s3: S3Options = field(default_factory=S3Options)


@dataclass(kw_only=True)
class ActorSettings(RaySettings):
    """The model-actor pool of classify and evaluate."""

    precision: str = setting(
        "auto",
        choices=CLASSIFY_PRECISIONS,
        help=(
            "compute precision; int8 (CPU): post-training quantization, its statistics "
            "measured once and kept in the model directory; auto: int8 on an x86 CPU where "
            "the model directory holds int8 statistics that agree with fp32 on at least "
            f"{INT8_AGREEMENT_MIN * 100:.0f}%% of their held-out images, else bf16 where the "
            "hardware runs it fast, else fp16 on a GPU and fp32 on a CPU"
        ),
    )
    int8_images: str | None = setting(
        None,
        help=(
            "int8: images like those to classify, to measure the int8 statistics on (a "
            f"folder, glob or s3:// prefix; up to {INT8_IMAGES} are sampled, half to fit "
            "and half to measure agreement with fp32); default: the model's own validation "
            "images"
        ),
    )
    batch_size: int = setting(
        BATCH_SIZE,
        at_least=1,
        at_most=MOST_BATCH_SIZE,
        help=f"images per model call, at most {MOST_BATCH_SIZE:,}",
    )
    max_actors: int | None = setting(
        None,
        at_least=1,
        help=(
            "model actors, at most (default: one per GPU with --gpu, else one per "
            "--cpus-per-actor CPUs of the cluster)"
        ),
    )
    cpus_per_actor: float | None = setting(
        None,
        at_least=LEAST_CPUS,
        help=(
            "CPUs per model actor, on CPU its torch threads, a whole number (default: 1 "
            "with --gpu; on CPU the actor shape this CPU and precision run best, a small "
            "input's actors sharing out a single node's free CPUs; see "
            "docs/classification.md)"
        ),
    )
    decode: str = setting(
        "auto",
        choices=DECODE_CHOICES,
        help=(
            "where JPEGs are decoded: cpu (Pillow, in tasks on every core), device (in "
            "the model actors, on their device: nvJPEG on a GPU; every file the device "
            "cannot decode exactly as Pillow would goes the cpu way); auto: device with "
            "--gpu, else cpu"
        ),
    )

    @property
    def decodes_on_device(self) -> bool:
        """Whether the model actors decode the JPEGs (see --decode)."""
        return self.decode == "device" or (self.decode == "auto" and self.gpu)

    def validate(self) -> None:
        check_settings(self)
        if self.precision == "int8" and self.gpu:
            raise InsectError("--precision int8 runs on CPUs: drop --gpu or choose bf16/fp16")
        # A fraction gave one thread per actor and as many actors as fit: 20,000 for 0.0001.
        cpus = self.cpus_per_actor
        if cpus is not None and not self.gpu and not float(cpus).is_integer():
            raise InsectError(
                f"--cpus-per-actor {cpus}: on CPU it is each actor's torch threads, a "
                "whole number (a fraction is for the CPU share of --gpu actors)"
            )
        if self.int8_images and self.precision != "int8":
            raise InsectError("--int8-images is for --precision int8")


@dataclass(kw_only=True)
class TrainConfig(RaySettings):
    """Every knob of `insect train`."""

    data: str | None = setting(
        None,
        help=(
            "labelled root: ROOT/<class>/* or ROOT/{train,val}/<class>/*, local or s3:// "
            "(optional with --labels)"
        ),
    )
    # --- training from a labels table (issue 28) ---
    labels: str | None = setting(
        None,
        help=(
            "a table of path,label rows (CSV or Parquet, local or s3://), such as the "
            "corrections `insect report`'s page downloads: alone, or added to ROOT (a path in "
            "both takes the table's label); the label 'skip' leaves the image out"
        ),
    )
    new_classes: bool = setting(
        False, help="--labels may name classes ROOT has no folder for (refused otherwise)"
    )
    # --- end of training from a labels table ---
    output: str = setting("insect-model", help="model directory to write (or s3://)")
    arch: str = setting("vgg16", help="torchvision classification model")
    weights: str = setting(
        "imagenet",
        help=(
            "imagenet (IMAGENET1K_V1 via the torch hub cache), random, or a state-dict file "
            "(.pth/.pt loaded weights_only, or .safetensors), local or s3://"
        ),
    )
    freeze: str = setting(
        "trunk",
        choices=FREEZE_POLICIES,
        help="trunk: train only the new final layer; none: train every layer",
    )
    image_size: int = setting(
        224,
        at_least=IMAGE_SIZES.start,
        at_most=IMAGE_SIZES.stop - 1,
        help="model input size in pixels",
    )
    val_fraction: float = setting(
        0.2,
        at_least=0,
        at_most=1,
        help=(
            "held out per class when ROOT has no train/ + val/ folders (there, more than 0 "
            "and less than 1)"
        ),
    )
    seed: int = setting(
        0,
        at_least=0,
        at_most=2**32 - 1,  # what every generator it seeds (numpy's too) accepts
        help="seed of the split, the new layer's weights and the shuffling",
    )
    epochs: int = setting(4, at_least=1, help="passes over the training images")
    batch_size: int = setting(
        BATCH_SIZE,
        at_least=1,
        at_most=MOST_BATCH_SIZE,
        help=(
            f"images per worker per step, at most {MOST_BATCH_SIZE:,}; the global batch is "
            "workers x this"
        ),
    )
    optimizer: str = setting("adam", choices=OPTIMIZERS, help="optimisation algorithm")
    # Upper bounds: larger values only diverge, and past float32's range torch fails mid-run.
    lr: float = setting(0.001, at_least=0, at_most=10, help="learning rate")
    momentum: float = setting(0.9, at_least=0, at_most=1, help="SGD momentum")
    weight_decay: float = setting(0.0, at_least=0, at_most=1, help="L2 penalty")
    augment: bool = setting(
        True,
        help=(
            "no random crops and flips on the training split; with the trunk frozen, its "
            "outputs then never change, so they are computed once and every epoch trains the "
            "head on them (several times faster; see --no-cache-features)"
        ),
    )
    cache_features: bool = setting(
        True,
        help=(
            "run the frozen trunk on every image every epoch even when its outputs cannot "
            "change (the cache holds one feature vector per image in each worker's memory)"
        ),
    )
    workers: int = setting(2, at_least=1, help="Ray Train workers")
    cpus_per_worker: float | None = setting(
        None,
        at_least=LEAST_CPUS,
        help=(
            "CPUs per worker, also its torch threads on CPU (default: 1; with --gpu, a GPU "
            "node's CPUs per GPU, so that decoding gets every core the GPUs leave)"
        ),
    )
    placement: str = setting(
        "PACK",
        choices=PLACEMENTS,
        help=(
            "how Ray places the workers: PACK fills nodes first (fast collectives), SPREAD "
            "across nodes (survives a node loss with fewer restarts), STRICT_* insist"
        ),
    )
    loader_workers: int | None = setting(
        None,
        at_least=0,
        help=(
            "DataLoader processes decoding for each worker (default: with --gpu, "
            "--cpus-per-worker - 1; on CPU 0, as the model is the bottleneck there)"
        ),
    )
    decode: str = setting(
        "auto",
        choices=DECODE_CHOICES,
        help=(
            "where the training JPEGs are decoded: cpu (Pillow, in the DataLoader "
            "processes), device (on the worker's device, with random crops and flips there: "
            "nvJPEG on a GPU; the processes only read and check, and decode what the device "
            "cannot decode exactly as Pillow would); auto: cpu until the GPU check's "
            "figures show the device feed faster (docs/clusters.md, The GPU path)"
        ),
    )
    storage: str | None = setting(
        None, help="Ray Train run storage, local or s3:// (default ~/ray_results)"
    )
    name: str | None = setting(
        None, help="run name under --storage (default: insect-train-<time>-<random>)"
    )
    resume: bool = setting(
        False, help="continue the stopped run --name in --storage from its latest checkpoint"
    )
    progress_every: float = setting(
        10.0, at_least=0, help="seconds between progress lines (step, images/s) within an epoch"
    )
    max_failures: int = setting(
        2,
        at_least=-1,
        help="worker failures survived by restarting from the latest checkpoint (-1: no limit)",
    )
    keep_checkpoints: int = setting(
        2, at_least=0, help="checkpoints kept in the run storage (0: all)"
    )

    @property
    def decodes_on_device(self) -> bool:
        """Whether the worker decodes the JPEGs on its device (see --decode)."""
        return self.decode == "device"

    @property
    def caches_features(self) -> bool:
        """Whether the frozen trunk's outputs are computed once and reused every epoch: only
        when they cannot change, i.e. the trunk is frozen and no augmentation is applied."""
        return self.cache_features and self.freeze == "trunk" and not self.augment

    def sized(self, cpus_per_gpu: float | None = None) -> TrainConfig:
        """This config with the automatic sizes of the workers filled in. With --gpu, each
        worker gets the CPUs its node has per GPU (`cpus_per_gpu`, the smallest over the
        GPU nodes) and decodes with all but one of them in DataLoader processes: a GPU
        trains far faster than one core decodes (see docs/performance.md). On CPU, one CPU
        and no extra processes: the model is the bottleneck there, and decoding processes
        would only take cores from torch."""
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
        if self.name is not None and (escapes(self.name) or not self.name.isprintable()):
            raise InsectError(f"--name must be a folder under --storage, got {self.name!r}")
        if not self.data and not self.labels:
            raise InsectError("give the labelled ROOT, a --labels table, or both")
        if self.new_classes and not self.labels:
            raise InsectError("--new-classes is for classes a --labels table adds")


@dataclass(kw_only=True)
class RowSettings:
    """What each row of a classification holds (see `model.predictor.RowFormat`)."""

    use_temperature: bool = setting(
        True,
        flag="--no-temperature",
        help=(
            "probabilities from the raw softmax, not divided by the temperature that "
            "training fitted on the validation split (meta.json 'temperature')"
        ),
    )
    top_k: int | None = setting(
        None,
        at_least=1,
        help="add top_labels and top_scores: the K most probable classes, best first",
    )
    embeddings: bool = setting(
        False,
        help=(
            "add 'embedding': the classifier head's input (4096 float16 values for VGG-16), "
            "for near-duplicate search and clustering"
        ),
    )
    min_score: float | None = setting(
        None,
        at_least=0,
        at_most=1,
        help=(
            "rows whose top probability is below this are not decided: decided=false, "
            "label and label_index null, probabilities kept"
        ),
    )


@dataclass(kw_only=True)
class ClassifyConfig(ActorSettings, RowSettings):
    """Every knob of `insect classify`."""

    input: str = setting("", help="directory, glob or s3:// prefix of images")
    manifest: str | None = setting(
        None,
        help=(
            "instead of INPUT, a list of the inputs (local or s3://): a text file (.txt, .lst: "
            "one absolute path or s3:// URI a line), a CSV or Parquet file with a 'path' "
            "column, or an S3 Inventory report's manifest.json (CSV, ORC or Parquet); every "
            "line gets a row, those that do not exist an error row"
        ),
    )
    model: str = setting(help=MODEL_HELP)
    output: str = setting(help="directory or s3:// prefix for Parquet files")
    min_actors: int | None = setting(
        None,
        at_least=1,
        help=(
            "model actors, at least: the pool grows from here when busy (default: "
            "--max-actors, a full pool from the start)"
        ),
    )
    compile: str = setting(
        "auto",
        choices=COMPILE_CHOICES,
        help=(
            "torch.compile the model in each actor (faster batches after seconds to a "
            "minute of compiling); auto: on where a run has enough images an actor to "
            "repay it, never where compiling gained nothing (bf16 on AVX-512 without AMX; "
            "the gains per CPU: docs/performance.md)"
        ),
    )
    rows_per_file: int = setting(
        1000,
        at_least=1,
        help=(
            "rows per Parquet file, at least (the last may hold fewer); files are written as "
            "they fill, and --resume redoes only rows that are not in a file yet"
        ),
    )
    resume: bool = setting(
        False, help="finish an interrupted run: classify only the inputs without a row in --output"
    )
    max_error_fraction: float | None = setting(
        None,
        at_least=0,
        at_most=1,
        help=(
            "exit non-zero (after writing every row) when more than this fraction of the "
            "inputs cannot be classified"
        ),
    )

    def validate(self) -> None:
        super().validate()
        if self.max_actors is not None and not (self.min_actors or 1) <= self.max_actors:
            raise InsectError("need 1 <= --min-actors <= --max-actors")
        if bool(self.input) == bool(self.manifest):
            raise InsectError("give either INPUT or --manifest (one of them)")
        if self.overwrite and self.resume:
            raise InsectError("--overwrite and --resume exclude each other")

    @property
    def source(self) -> str:
        """What the run classifies, as given: the --manifest, or INPUT."""
        return self.manifest or self.input


@dataclass(kw_only=True)
class EvaluateConfig(ActorSettings):
    """Every knob of `insect evaluate`."""

    data: str = setting(help="labelled root, local or s3://")
    model: str = setting(help=MODEL_HELP)
    output: str = setting("evaluation", help="directory or s3:// prefix")


@dataclass(kw_only=True)
class VisualizeConfig:
    """Every knob of `insect visualize`."""

    image: str = setting(help="image file, local or s3://")
    model: str = setting(help=MODEL_HELP)
    layers: list[int] = setting(help="comma-separated layer numbers, e.g. 5,30 (see above)")
    output: str = setting("feature-maps", help="directory or s3:// prefix")
    max_maps: int = setting(64, at_least=1, help="channels drawn per layer")
    s3: S3Options = field(default_factory=S3Options)

    def validate(self) -> None:
        check_settings(self)
        if not self.layers:
            raise InsectError("--layers names no layer; give numbers such as 5,30")


@dataclass(kw_only=True)
class SummaryConfig:
    """Every knob of `insect summary`."""

    predictions: str = setting(help="the --output of insect classify (a directory or s3:// prefix)")
    s3: S3Options = field(default_factory=S3Options)

    def validate(self) -> None:
        check_settings(self)


# --- insect report (issue 28) ---
@dataclass(kw_only=True)
class ReportConfig(InputLimits):
    """Every knob of `insect report`."""

    predictions: str = setting(
        help="the --output of insect classify or insect evaluate (a directory or s3:// prefix)"
    )
    html: str = setting(
        help=(
            "folder to write the page into (index.html, its script, style and thumbs/), local "
            "or s3://; open index.html in a browser, no server needed"
        )
    )
    gallery_size: int = setting(
        60,
        at_least=1,
        help=(
            "images shown per gallery (each predicted class, the images below --min-score, "
            "each cell of an evaluation's confusion matrix), the least confident first"
        ),
    )
    overwrite: bool = setting(
        False, help="replace the page in --html (only the files insect report writes there)"
    )
    address: str | None = setting(
        None,
        help=(
            "Ray cluster to make the thumbnails on: auto, HOST:PORT or ray://HOST:PORT "
            "(default: $RAY_ADDRESS, else a new local Ray)"
        ),
    )
    verbose: bool = setting(
        False, help="show Ray's own messages here rather than in the run's log file"
    )
    s3: S3Options = field(default_factory=S3Options)

    def validate(self) -> None:
        check_settings(self)


# --- end of insect report ---


@dataclass(kw_only=True)
class DemoConfig:
    """Every knob of `insect demo`."""

    workdir: str = setting("demo-output", help="where the demo writes everything")
    image_size: int = setting(
        128,
        at_least=IMAGE_SIZES.start,
        at_most=IMAGE_SIZES.stop - 1,
        help="model input size in pixels",
    )
    verbose: bool = setting(
        False,
        help="show Ray's and torch's own messages here rather than in the demo's log file",
    )

    def validate(self) -> None:
        check_settings(self)
