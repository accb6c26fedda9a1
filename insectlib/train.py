"""Fine-tuning with Ray Train: one TorchTrainer, one plain PyTorch loop per worker."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from insectlib import outputs, storage
from insectlib.errors import ImageError, InsectError
from insectlib.images import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    DecodeLimits,
    eval_transform,
    load_image,
    normalize,
    resize_size,
    train_transform,
)
from insectlib.labels import LabelledSet, discover
from insectlib.model import (
    META_FILE,
    ModelMeta,
    apply_freeze,
    build_model,
    check_arch,
    check_image_size,
    head_name,
    read_meta,
    remove_meta,
    set_train_mode,
    write_meta,
    write_weights,
)
from insectlib.predict import PRECISIONS, autocast, resolve_precision
from insectlib.report import classification_metrics, confusion_png, curves_png, report_markdown
from insectlib.runtime import init_ray, insect_error_in, live_nodes, local_path_warnings
from insectlib.storage import S3Options

OPTIMIZERS = ("sgd", "adam")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement strategies
METRICS_FILE, CURVES_FILE = "metrics.json", "training_curves.png"
CONFUSION_FILE, REPORT_FILE = "confusion_matrix.png", "report.md"
DEFAULT_STORAGE = os.path.expanduser("~/ray_results")  # Ray Train's own default
# Ray Train's record of a run's checkpoints: where it exists, a run of that name continues.
RUN_SNAPSHOT = CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
PROBLEM_FILE = "problem.txt"  # the checkpoint of a run that stopped on a problem
RUN_RECORD = "insect-run.json"  # beside it: what `--resume` must find unchanged
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


@dataclass
class TrainConfig:
    """Every knob of `insect train`; the CLI flags map one to one onto these fields."""

    data: str
    output: str = "insect-model"
    arch: str = "vgg16"
    weights: str = "imagenet"  # imagenet | random | path or s3:// URI of a state dict
    freeze: str = "trunk"
    epochs: int = 4
    batch_size: int = 32  # per worker
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.2
    seed: int = 0
    image_size: int = 224
    augment: bool = True
    workers: int = 2
    gpu: bool = False
    placement: str = "PACK"  # Ray placement strategy of the workers: PACK, SPREAD, ...
    cpus_per_worker: float = 1.0
    loader_workers: int = 0  # DataLoader processes per training worker
    precision: str = "auto"
    storage: str | None = None  # Ray Train run storage; None: ~/ray_results
    name: str | None = None  # run name under storage
    keep_checkpoints: int = 2  # 0 keeps all
    cache_features: bool = True  # frozen trunk, no augmentation: one trunk pass per run
    progress_every: float = 10.0  # seconds between progress lines within an epoch
    max_failures: int = 2  # worker failures survived by restoring the latest checkpoint
    max_file_bytes: int = MAX_FILE_BYTES  # larger images are skipped and counted
    max_pixels: int = MAX_PIXELS  # images with more pixels are skipped and counted
    resume: bool = False  # continue the run `name` found in `storage`
    overwrite: bool = False
    address: str | None = None
    s3: S3Options = field(default_factory=S3Options)

    @property
    def caches_features(self) -> bool:
        """Whether the frozen trunk's outputs are computed once and reused every epoch: only
        when they cannot change, i.e. the trunk is frozen and no augmentation is applied."""
        return self.cache_features and self.freeze == "trunk" and not self.augment

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_file_bytes, self.max_pixels)

    def validate(self) -> None:
        check_arch(self.arch)
        for flag, value, low in (
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 1),
            ("--workers", self.workers, 1),
            ("--max-file-bytes", self.max_file_bytes, 1),
            ("--max-pixels", self.max_pixels, 1),
        ):
            if value < low:
                raise InsectError(f"{flag} must be at least {low}, got {value}")
        check_image_size(self.image_size)
        if not self.cpus_per_worker > 0:
            raise InsectError(f"--cpus-per-worker must be more than 0, got {self.cpus_per_worker}")
        if self.placement not in PLACEMENTS:
            raise InsectError(f"unknown --placement {self.placement!r}: choose {PLACEMENTS}")
        if self.optimizer not in OPTIMIZERS:
            raise InsectError(f"unknown --optimizer {self.optimizer!r}: choose {OPTIMIZERS}")
        if self.precision not in PRECISIONS:
            raise InsectError(f"unknown --precision {self.precision!r}: choose {PRECISIONS}")
        if self.resume and not self.name:
            raise InsectError("--resume needs the --name of the run to continue")
        if self.weights not in ("imagenet", "random") and not storage.exists(self.weights, self.s3):
            raise InsectError(f"--weights file not found: {self.weights}")


class ImageFiles(Dataset):
    """(uint8 image, label) pairs read through `images.load_image`, as classify reads them;
    None for a file that cannot be used (skipped and counted). `min_side`: decode JPEGs at
    reduced scale (see `decode`), for the evaluation transform."""

    def __init__(
        self,
        items: list[tuple[str, int]],
        transform,
        min_side: int | None,
        limits: DecodeLimits,
        s3: storage.S3Options,
    ):
        self.items, self.transform, self.min_side = items, transform, min_side
        self.limits, self.s3 = limits, s3

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        uri, label = self.items[i]
        try:
            image = load_image(uri, self.transform, self.min_side, self.limits, self.s3)
        except ImageError as e:
            sys.stdout.write(f"skipping {storage.printable(uri)}: {e}\n")
            return None
        return image, label


def collate(samples, image_size: int):
    """Stack the decodable samples; also return how many were skipped. A batch whose files
    all failed is an empty batch, not a missing one: every DDP worker must take every step."""
    good = [s for s in samples if s is not None]
    if not good:
        empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        return empty, torch.zeros(0, dtype=torch.long), len(samples)
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good])
    return images, labels, len(samples) - len(good)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build, restore, then train and report each epoch."""
    cfg = TrainConfig(**{**config["cfg"], "s3": storage.S3Options(**config["cfg"]["s3"])})
    classes: list[str] = config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    dtype = resolve_precision(cfg.precision, device)

    torch.manual_seed(cfg.seed)  # identical random weights on every worker
    model = build_model(cfg.arch, len(classes), cfg.weights, cfg.s3)
    apply_freeze(model, cfg.freeze)
    head = head_name(model)
    model = model.to(device, memory_format=torch.channels_last)
    cached = cfg.caches_features
    # DDP (when world > 1) over what is trained: the whole model, or only the head when it
    # trains on cached trunk features.
    head_module = model.get_submodule(head)
    ddp_model = ray.train.torch.prepare_model(head_module if cached else model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(trainable.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            trainable.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # A private copy per worker: workers sharing a node would otherwise share one download
        # folder, which a late worker downloads into again while another is reading it.
        with tempfile.TemporaryDirectory() as d:
            checkpoint.to_directory(d)
            state = None  # a run stopped by a problem left only PROBLEM_FILE: start over
            if os.path.exists(os.path.join(d, "state.pt")):
                state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        if state:
            sys.stdout.write(f"worker {rank}: resuming after epoch {state['epoch']}\n")
            model.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = state["epoch"], state["history"]

    # Evaluation-style preprocessing decodes exactly as `insect classify` does (JPEG draft).
    evaluation = (eval_transform(cfg.image_size), resize_size(cfg.image_size))
    train_set = ImageFiles(
        config["train"],
        *((train_transform(cfg.image_size), None) if cfg.augment else evaluation),
        limits=cfg.limits,
        s3=cfg.s3,
    )
    # Validation shards without padding, so the summed counts are exact.
    val_set = ImageFiles(config["val"][rank::world], *evaluation, limits=cfg.limits, s3=cfg.s3)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    loader_args = dict(
        batch_size=cfg.batch_size,
        collate_fn=functools.partial(collate, image_size=cfg.image_size),
        num_workers=cfg.loader_workers,
        pin_memory=device.type == "cuda",
    )
    train_loader = DataLoader(train_set, sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, **loader_args)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def images(loader):
        """(normalised images, labels, skipped files) batches on the device."""
        for batch, labels, skipped in loader:
            batch, labels = batch.to(device, non_blocking=True), labels.to(device)
            yield normalize(batch).contiguous(memory_format=torch.channels_last), labels, skipped

    def with_progress(batches, what: str, total: int):
        """The batches; meanwhile rank 0 prints "WHAT: step i/TOTAL, x img/s" (all workers'
        images) at most every `cfg.progress_every` seconds."""
        started = last = time.perf_counter()
        seen = 0
        for step, batch in enumerate(batches, 1):
            now = time.perf_counter()
            if rank == 0 and now - last >= cfg.progress_every:
                last = now
                rate = seen * world / (now - started)
                sys.stdout.write(f"{what}: step {step}/{total}, {rate:.1f} img/s\n")
                sys.stdout.flush()
            seen += len(batch[1])
            yield batch

    def features(loader, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The head's inputs for every decodable image of `loader`: one trunk pass."""
        inputs, targets, skipped = [], [], 0
        hook = head_module.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        with torch.no_grad(), autocast(device, dtype):
            for x, labels, n in with_progress(images(loader), what, len(loader)):
                model(x)  # the head runs too: negligible next to the trunk
                targets.append(labels)
                skipped += n
        hook.remove()
        return torch.cat(inputs), torch.cat(targets), skipped

    def feature_batches(cache, steps: int, seed: int | None):
        """`steps` batches from cached features, shuffled with `seed`; as many steps on
        every worker (some may be empty where files were unreadable) to keep DDP in step."""
        x, y, skipped = cache
        order = torch.arange(len(y))
        if seed is not None:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].to(device)
            yield x[idx], y[idx], skipped if step == 0 else 0

    def run(batches, train: bool, predictions: list | None = None):
        """Sums of (loss, correct, seen, skipped) over this worker's shard; appends
        (labels, predicted labels) to `predictions` when given."""
        sums = torch.zeros(4, dtype=torch.float64)
        # Validation shards differ in length between workers: no DDP wrapper, no collectives.
        forward = ddp_model if train else (head_module if cached else model)
        for x, labels, skipped in batches:
            sums[3] += skipped
            with torch.set_grad_enabled(train), autocast(device, dtype):
                logits = forward(x)
                loss = loss_fn(logits.float(), labels)
            if train:
                optimizer.zero_grad(set_to_none=True)
                (loss / max(1, len(labels))).backward()  # an empty batch adds zero gradients
                optimizer.step()
            sums[0] += loss.item()
            sums[1] += (logits.argmax(1) == labels).sum().item()
            sums[2] += len(labels)
            if predictions is not None:
                predictions.append((labels.cpu(), logits.argmax(1).cpu()))
        return sums

    train_cache = val_cache = None
    steps = math.ceil(len(sampler) / cfg.batch_size)  # the same on every worker
    predictions: list = []  # the last epoch's validation (labels, predictions)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        if cached:
            if train_cache is None:  # the first epoch of this run pays for one trunk pass
                model.eval()
                sampler.set_epoch(0)  # a fixed shard per worker, reshuffled within below
                what = f"epoch {epoch + 1}/{cfg.epochs}: trunk features"
                train_cache = features(train_loader, f"{what}, training images")
                val_cache = features(val_loader, f"{what}, validation images")
            train_batches = feature_batches(train_cache, steps, seed=cfg.seed + epoch)
            val_steps = max(1, math.ceil(len(val_cache[1]) / cfg.batch_size))
            val_batches = feature_batches(val_cache, val_steps, seed=None)
        else:
            sampler.set_epoch(epoch)
            train_batches, val_batches = images(train_loader), images(val_loader)
        set_train_mode(model, cfg.freeze)
        what = f"epoch {epoch + 1}/{cfg.epochs}"
        train_sums = run(with_progress(train_batches, what, steps), train=True)
        train_seconds = time.perf_counter() - started
        model.eval()
        predictions = [] if epoch == cfg.epochs - 1 else None
        val_sums = run(val_batches, train=False, predictions=predictions)
        seconds = torch.tensor([train_seconds, time.perf_counter() - started])
        train_sums, val_sums = _sum_over_workers(train_sums), _sum_over_workers(val_sums)
        seconds = _max_over_workers(seconds)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": _ratio(train_sums[0], train_sums[2]),
            "train_accuracy": _ratio(train_sums[1], train_sums[2]),
            "val_loss": _ratio(val_sums[0], val_sums[2]),
            "val_accuracy": _ratio(val_sums[1], val_sums[2]),
            "train_images": int(train_sums[2]),
            "val_images": int(val_sums[2]),
            "skipped_images": int(train_sums[3] + val_sums[3]),
            "images_per_second": _ratio(train_sums[2], seconds[0]),
            "seconds": float(seconds[1]),
            "cached_features": cached,
        }
        if config["val"] and not metrics["val_images"]:
            # Every worker sees the same summed counts, so all stop here together; the
            # driver turns the reported problem into its error (no retries, no model).
            problem = (
                f"none of the {len(config['val'])} validation images could be read "
                f"({metrics['skipped_images']} unreadable images in epoch {epoch + 1}); no "
                "model was written: fix or remove them (the skipped files are logged above)"
            )
            with tempfile.TemporaryDirectory() as d:
                # Ray Train keeps only the metrics of reports with a checkpoint for the driver.
                checkpoint = None
                if rank == 0:
                    with open(os.path.join(d, PROBLEM_FILE), "w") as f:
                        f.write(problem)
                    checkpoint = Checkpoint.from_directory(d)
                ray.train.report({**metrics, "problem": problem}, checkpoint=checkpoint)
            return
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = {
                    "trainable": {n: p.detach().cpu() for n, p in trainable.items()},
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                }
                torch.save(state, os.path.join(d, "state.pt"))
                checkpoint = Checkpoint.from_directory(d)
                # Not print(): Ray Train routes print to a logger that echoes it twice.
                sys.stdout.write(_epoch_line(metrics, cfg.epochs) + "\n")
                sys.stdout.flush()
            ray.train.report(metrics, checkpoint=checkpoint)

    shards = [predictions or []]
    if torch.distributed.is_initialized():
        shards = [None] * world
        torch.distributed.all_gather_object(shards, predictions or [])
    pairs = [pair for shard in shards for pair in shard]
    if rank == 0:
        validation = None
        if pairs:
            y_true = torch.cat([t for t, _ in pairs]).numpy()
            y_pred = torch.cat([p for _, p in pairs]).numpy()
            validation = classification_metrics(y_true, y_pred, classes)
        meta = ModelMeta(
            classes=classes,
            arch=cfg.arch,
            image_size=cfg.image_size,
            head=head,
            base_weights=cfg.weights,
            freeze=cfg.freeze,
            epochs=history,
            # Each epoch reads every file, so the last epoch's count is the number of bad files.
            data={**config["data"], "skipped_images": history[-1]["skipped_images"]},
        )
        write_model_dir(cfg, model, meta, validation)


def write_model_dir(
    cfg: TrainConfig, model: nn.Module, meta: ModelMeta, validation: dict | None
) -> None:
    """Write the model directory `cfg.output`. meta.json marks a complete directory: an old
    one is removed first and the new one written last, so that a crash in between leaves
    no directory that looks complete (old classes and id beside new weights)."""
    remove_meta(cfg.output, cfg.s3)
    metrics = {"epochs": meta.epochs, "validation": validation}
    write_model_file(cfg, METRICS_FILE, json.dumps(metrics, indent=2))
    write_model_file(cfg, CURVES_FILE, curves_png(meta.epochs))
    if validation:
        picture = confusion_png(validation, "validation, last epoch")
        write_model_file(cfg, CONFUSION_FILE, picture)
    write_weights(cfg.output, model, meta, cfg.s3)  # sets the model id report.md names
    config = {k: v for k, v in asdict(cfg).items() if k not in ("s3", "address")}
    write_model_file(cfg, REPORT_FILE, report_markdown(meta, config, validation))
    write_meta(cfg.output, meta, cfg.s3)


def write_model_file(cfg: TrainConfig, name: str, data: str | bytes) -> None:
    """Write one file of the model directory."""
    data = data.encode() if isinstance(data, str) else data
    storage.write_bytes(storage.join(cfg.output, name), data, cfg.s3)


def _sum_over_workers(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _max_over_workers(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None


def _epoch_line(m: dict, epochs: int) -> str:
    def f(x, spec):
        return "n/a" if x is None or math.isnan(x) else format(x, spec)

    return (
        f"epoch {m['epoch']}/{epochs}: train loss {f(m['train_loss'], '.4f')} "
        f"acc {f(m['train_accuracy'], '.3f')} | val loss {f(m['val_loss'], '.4f')} "
        f"acc {f(m['val_accuracy'], '.3f')} | {f(m['images_per_second'], '.1f')} img/s"
        + (" (head on cached trunk features)" if m.get("cached_features") else "")
        + (f" | {m['skipped_images']} unreadable images skipped" if m["skipped_images"] else "")
    )


def prepare(cfg: TrainConfig) -> LabelledSet:
    """Check everything that can be checked before Ray starts; returns the labelled set."""
    cfg.validate()
    # Its pictures inside the labelled tree would be read as images by the next run.
    outputs.check_location(cfg.output, {"the data": cfg.data}, apart=("the data",))
    for location in (cfg.output, cfg.storage):
        if location:
            storage.check_bucket(location, cfg.s3)
    if storage.exists(storage.join(cfg.output, META_FILE), cfg.s3) and not cfg.overwrite:
        raise InsectError(f"{cfg.output} already holds a model; pass --overwrite to replace it")
    if cfg.name:
        # Ray Train continues a run whose folder it finds in storage: make that explicit.
        run = run_location(cfg)
        found = storage.exists(storage.join(run, RUN_SNAPSHOT), cfg.s3)
        if cfg.resume and not found:
            raise InsectError(f"no run to resume at {run}: check --storage and --name")
        if found and not cfg.resume:
            raise InsectError(
                f"run {run} already exists; pass --resume to continue it or choose another --name"
            )
    labelled = discover(cfg.data, cfg.val_fraction, cfg.seed, cfg.s3)
    if cfg.resume:
        check_run_record(cfg, labelled)
    return labelled


def run_location(cfg: TrainConfig) -> str:
    """The folder of run `cfg.name` in the run storage."""
    return storage.join(cfg.storage or DEFAULT_STORAGE, cfg.name)


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
    storage.write_bytes(storage.join(run_location(cfg), RUN_RECORD), text.encode(), cfg.s3)


def check_run_record(cfg: TrainConfig, labelled: LabelledSet) -> None:
    """Refuse to resume run `cfg.name` with other settings, weights or data than it began
    with, naming what differs."""
    uri = storage.join(run_location(cfg), RUN_RECORD)
    if not storage.exists(uri, cfg.s3):
        print(
            f"warning: {uri} is missing (a run from an older insect): the configuration "
            "of the resumed run cannot be checked",
            file=sys.stderr,
            flush=True,
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


def fit(cfg: TrainConfig, labelled: LabelledSet | None = None) -> ModelMeta:
    """Fine-tune per `cfg` with Ray Train and write the model directory; returns its meta."""
    labelled = labelled or prepare(cfg)
    print(
        f"{len(labelled.classes)} classes ({', '.join(labelled.classes)}): "
        f"{len(labelled.train)} training and {len(labelled.val)} validation images "
        f"({labelled.split})",
        flush=True,
    )
    init_ray(cfg.address)
    locations = {"--storage": cfg.storage or DEFAULT_STORAGE, "--output": cfg.output}
    for warning in local_path_warnings(locations, live_nodes()):
        print(warning, file=sys.stderr, flush=True)
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=f"insect-train-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume:
        write_run_record(cfg, labelled)
    run_config = RunConfig(
        name=cfg.name,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )
    if cfg.storage:
        run_config.storage_filesystem, run_config.storage_path = storage.pyarrow_filesystem(
            cfg.storage, cfg.s3
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": asdict(cfg),
            "classes": labelled.classes,
            "train": labelled.train,
            "val": labelled.val,
            "data": {"root": cfg.data, "split": labelled.split, "counts": labelled.counts()},
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement,
        ),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = insect_error_in(e)
        if cause:
            raise cause from None
        raise
    if (result.metrics or {}).get("problem"):
        raise InsectError(result.metrics["problem"])
    meta = read_meta(cfg.output, cfg.s3)
    accuracy = meta.epochs[-1]["val_accuracy"]
    print(
        f"validation accuracy {'n/a' if accuracy is None else format(accuracy, '.4f')}; "
        f"model {meta.model_id} written to {cfg.output}",
        flush=True,
    )
    return meta
