"""One Ray Train worker's training, as plain PyTorch: the data feed, the model, one epoch,
validation, the frozen-trunk feature cache and the checkpoint state. Nothing here imports
Ray, so each part runs in a test, a benchmark or on a GPU machine without it; `train`
wraps it in Ray Train.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from insectlib import storage
from insectlib.config import DecodeLimits, TrainConfig
from insectlib.data import device_decode
from insectlib.data.images import (
    eval_transform,
    load_images,
    normalize,
    resize_size,
    train_transform,
)
from insectlib.errors import ImageError
from insectlib.model.meta import ModelMeta
from insectlib.model.network import apply_freeze, build_model, head_name, set_train_mode
from insectlib.model.precision import autocast, resolve_precision
from insectlib.runtime import console

# The label of a sample repeated only to give every worker as many steps (`ShardSampler`):
# the loss ignores it, and it counts as no image seen.
PADDING = -100

SUMS = 4  # an epoch's sums (`_batch_sums`) before the images seen of each class
CLASS_IMAGES = "train_images_by_class"  # an epoch's metric, checked (trainer), not kept


def log_line(text: str) -> None:
    """Write one line to this process's log (a Ray worker's log file; the console only with
    --verbose). Not print(): Ray Train routes a worker's print to a logger that echoes it
    twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class ImageFiles(Dataset):
    """(uint8 image, label) pairs read through `images.load_images`, as classify reads them;
    None for a file that cannot be used (skipped and counted). `min_side`: decode JPEGs at
    reduced scale (see `decode`), for the evaluation transform.

    With `device_half` (--decode device) a sample's image is what
    `device_decode.prepare` makes of the file instead: a JPEG for the worker's device to
    decode (its bytes as a tensor, which DataLoader passes through shared memory) or an
    image decoded here; `augment` says which transform either side applies."""

    def __init__(
        self,
        items: list[tuple[str, int]],
        transform,
        min_side: int | None,
        limits: DecodeLimits,
        s3: storage.S3Options,
        device_half: tuple[int, bool] | None = None,  # (image size, augment)
    ):
        self.items, self.transform, self.min_side = items, transform, min_side
        self.limits, self.s3, self.device_half = limits, s3, device_half

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The samples of one batch, read together (DataLoader asks for a batch at a time):
        on S3 their reads overlap, as classify's do (`images.load_images`). An index past
        the end is a `ShardSampler` padding: that image again, labelled PADDING."""
        n = len(self.items)
        items = [self.items[i] if i < n else (self.items[i - n][0], PADDING) for i in indices]
        uris = [uri for uri, _ in items]
        if self.device_half:
            reads = storage.read_inputs(uris, self.limits.max_file_bytes, self.s3)
            images = map(self._prepare, reads)
        else:
            images = load_images(uris, self.transform, self.min_side, self.limits, self.s3)
        samples = []
        for (uri, label), image in zip(items, images, strict=True):
            if not isinstance(image, (ImageError, str)):
                samples.append((image, label))
            elif label == PADDING:  # counted where it was not padding
                samples.append(())
            else:
                log_line(f"skipping {storage.printable(uri)}: {image}")
                samples.append(None)
        return samples

    def _prepare(self, data: bytes | ImageError):
        """`device_decode.prepare` of one read file, a JPEG's bytes as a tensor."""
        size, augment = self.device_half
        found = device_decode.prepare(data, size, self.limits, augment)
        if isinstance(found, device_decode.DeviceJpeg):
            data = torch.frombuffer(bytearray(found.data), dtype=torch.uint8)
            found = dataclasses.replace(found, data=data)
        return found


class ShardSampler(DistributedSampler):
    """A DistributedSampler whose padding is marked. To give every worker as many steps,
    DistributedSampler repeats the first indices of its order up to a multiple of the
    workers; here a repeated index i comes as i + len(dataset), which `ImageFiles` labels
    PADDING, so that it counts nowhere (loss, accuracy, images seen)."""

    def __iter__(self):
        n = len(self.dataset)
        order = list(range(n))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        padding = self.total_size - n
        repeated = (order * math.ceil(padding / n))[:padding] if n else []
        marked = order + [n + i for i in repeated]
        return iter(marked[self.rank : self.total_size : self.num_replicas])


def collate(samples, image_size: int, device_half: bool = False):
    """Stack the decodable samples; also return how many were skipped (None: an unreadable
    file; (): its padding repeat, not counted again). A batch whose files all failed is an
    empty batch, not a missing one: every DDP worker must take every step. `device_half`:
    the images stay a list, for `TrainingWorker.device_batches` to decode."""
    good = [s for s in samples if s]
    skipped = sum(1 for s in samples if s is None)
    if device_half:
        labels = torch.tensor([s[1] for s in good], dtype=torch.long)
        return [s[0] for s in good], labels, skipped
    if not good:
        empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        return empty, torch.zeros(0, dtype=torch.long), skipped
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good])
    return images, labels, skipped


def make_loaders(
    cfg: TrainConfig,
    train_items: list[tuple[str, int]],
    val_items: list[tuple[str, int]],
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    """The feed of worker `rank` of `world`: (sampler, training loader, validation loader)
    yielding (uint8 images, labels, skipped files) batches of `cfg.batch_size`, decoded in
    `cfg.loader_workers` processes (0: in this one). The sampler pads the training shards
    to one length, so that every worker takes as many steps; validation shards are not
    padded, so the summed counts are exact.

    Why DataLoader processes rather than Ray Data ingest: measured (bench/feed.py,
    bench/gpu_train.py), they deliver 83-99% of the cores' decode limit on 2 cores and 78-80%
    with 15 processes beside an H200, where training then runs at the feed's rate, 8.2x the
    in-process feed; and they keep the exact sharding above, which Ray Data's equal splits
    would trade for dropped rows. Ray Data would pay on GPU nodes with too few cores."""
    # Evaluation-style preprocessing decodes exactly as `insect classify` does (JPEG draft).
    evaluation = (eval_transform(cfg.image_size), resize_size(cfg.image_size))
    device = cfg.decodes_on_device  # --decode device: the worker decodes (`device_batches`)
    train_set = ImageFiles(
        train_items,
        *((train_transform(cfg.image_size), None) if cfg.augment else evaluation),
        limits=cfg.limits,
        s3=cfg.s3,
        device_half=(cfg.image_size, cfg.augment) if device else None,
    )
    val_set = ImageFiles(
        val_items[rank::world],
        *evaluation,
        limits=cfg.limits,
        s3=cfg.s3,
        device_half=(cfg.image_size, False) if device else None,
    )
    sampler = ShardSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    workers = cfg.loader_workers or 0
    loader_args = dict(
        batch_size=cfg.batch_size,
        collate_fn=functools.partial(collate, image_size=cfg.image_size, device_half=device),
        num_workers=workers,
        pin_memory=pin_memory,
        # Batches in flight per process: enough to hide one slow S3 batch.
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,  # no process start-up every epoch
    )
    return (
        sampler,
        DataLoader(train_set, sampler=sampler, **loader_args),
        DataLoader(val_set, **loader_args),
    )


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class TrainingWorker:
    """One worker's part of a training run, in the shape of Ray's benchmark `TrainLoopRunner`:
    the constructor sets up model, optimizer and data; `restore` and `training_state` move a
    checkpoint's state in and out; `run_epoch` trains and validates one epoch and returns
    its metrics summed over all workers; `model_meta` describes the result.

    Plain PyTorch: Ray Train enters only through the rank, world size, device and
    `prepare_model` (DDP) it is given, so every part runs in a test without Ray.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        classes: list[str],
        train_items: list[tuple[str, int]],
        val_items: list[tuple[str, int]],
        *,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
        tell: Callable[[str], None] = console.say,
    ):
        cfg = cfg.sized()  # where the driver has not sized it for a cluster
        self.cfg, self.classes, self.rank, self.world = cfg, classes, rank, world
        self.tell = tell  # a line for the user's console (rank 0's progress lines)
        self.device = device or torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.dtype = resolve_precision(cfg.precision, self.device)

        torch.manual_seed(cfg.seed)  # identical random weights on every worker
        model = build_model(cfg.arch, len(classes), cfg.weights, cfg.s3)
        apply_freeze(model, cfg.freeze)
        self.head = head_name(model)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.head_module = self.model.get_submodule(self.head)
        # Whether the head trains on cached trunk features (see TrainConfig.caches_features).
        self.cached = cfg.caches_features
        # DDP (when world > 1) over what is trained: the whole model, or only the head.
        self.ddp_model = prepare_model(self.head_module if self.cached else self.model)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(cfg, self.trainable.values())
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum", ignore_index=PADDING)
        self.start_epoch, self.history = 0, []
        self.train_cache = self.val_cache = None

        self.sampler, self.train_loader, self.val_loader = make_loaders(
            cfg, train_items, val_items, rank, world, pin_memory=self.device.type == "cuda"
        )
        self.steps = math.ceil(len(self.sampler) / cfg.batch_size)  # the same on every worker

    def restore(self, state: dict) -> None:
        """Continue from a `training_state`."""
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.history = state["epoch"], state["history"]

    def training_state(self) -> dict:
        """What a checkpoint holds: the trainable weights, optimizer and history so far."""
        return {
            "trainable": {n: p.detach().cpu() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": len(self.history),
            "history": self.history,
        }

    def device_batches(self, loader: DataLoader) -> Iterator:
        """(normalised images, labels, skipped files) batches on the device."""
        for batch, labels, skipped in loader:
            if isinstance(batch, list):  # --decode device: files to decode here
                batch, labels, skipped = self.decoded(batch, labels, skipped, loader.dataset)
            batch, labels = batch.to(self.device, non_blocking=True), labels.to(self.device)
            yield normalize(batch).contiguous(memory_format=torch.channels_last), labels, skipped

    def decoded(self, prepared: list, labels: torch.Tensor, skipped: int, files: ImageFiles):
        """A batch of `device_decode.prepare`d files decoded on this worker's device with
        its dataset's transform; a file that fails there too is skipped and counted."""
        size, augment = files.device_half
        images, errors = device_decode.finish(prepared, size, self.device, self.cfg.limits, augment)
        for error in filter(None, errors):
            log_line(f"skipping a file the device could not decode: {error}")
        keep = torch.tensor([e is None for e in errors], dtype=torch.bool)
        lost = int((~keep & (labels != PADDING)).sum())  # a padding repeat counts nowhere
        return images[keep.to(images.device)], labels[keep], skipped + lost

    def with_progress(self, batches: Iterable, what: str, total: int) -> Iterator:
        """The batches; meanwhile rank 0 says "WHAT: step i/TOTAL, x img/s" (all workers'
        images) at most every `cfg.progress_every` seconds."""
        started = last = time.perf_counter()
        seen = 0
        for step, batch in enumerate(batches, 1):
            now = time.perf_counter()
            if self.rank == 0 and now - last >= self.cfg.progress_every:
                last = now
                rate = seen * self.world / (now - started)
                self.tell(f"{what}: step {step}/{total}, {rate:.1f} img/s")
            seen += len(batch[1])
            yield batch

    def trunk_features(self, loader: DataLoader, what: str) -> tuple:
        """(head inputs, labels, skipped files) for every image of `loader`: one trunk pass."""
        inputs, targets, skipped = [], [], 0
        hook = self.head_module.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        with torch.no_grad(), autocast(self.device, self.dtype):
            for x, labels, n in self.with_progress(self.device_batches(loader), what, len(loader)):
                self.model(x)  # the head runs too: negligible next to the trunk
                targets.append(labels)
                skipped += n
        hook.remove()
        return torch.cat(inputs), torch.cat(targets), skipped

    def feature_batches(self, cache: tuple, steps: int, seed: int | None) -> Iterator:
        """`steps` batches from cached features, shuffled with `seed`; as many steps on
        every worker (some may be empty where files were unreadable) to keep DDP in step."""
        x, y, skipped = cache
        order = torch.arange(len(y))
        if seed is not None:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        size = self.cfg.batch_size
        for step in range(steps):
            idx = order[step * size : (step + 1) * size].to(self.device)
            yield x[idx], y[idx], skipped if step == 0 else 0

    def epoch_batches(self, epoch: int) -> tuple[Iterator, Iterator]:
        """This epoch's (training, validation) batches: images through the loaders, or the
        cached trunk features, computed in the first epoch of this run."""
        if not self.cached:
            self.sampler.set_epoch(epoch)
            return self.device_batches(self.train_loader), self.device_batches(self.val_loader)
        if self.train_cache is None:
            self.model.eval()
            self.sampler.set_epoch(0)  # a fixed shard per worker, reshuffled within below
            what = f"epoch {epoch + 1}/{self.cfg.epochs}: trunk features"
            self.train_cache = self.trunk_features(self.train_loader, f"{what}, training images")
            self.val_cache = self.trunk_features(self.val_loader, f"{what}, validation images")
        val_steps = max(1, math.ceil(len(self.val_cache[1]) / self.cfg.batch_size))
        return (
            self.feature_batches(self.train_cache, self.steps, seed=self.cfg.seed + epoch),
            self.feature_batches(self.val_cache, val_steps, seed=None),
        )

    def train_one_epoch(self, batches: Iterable) -> torch.Tensor:
        """Train on `batches`; this worker's shard's sums (`_batch_sums`)."""
        sums = torch.zeros(SUMS + len(self.classes), dtype=torch.float64)
        for x, labels, skipped in batches:
            with autocast(self.device, self.dtype):
                logits = self.ddp_model(x)
                loss = self.loss_fn(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            seen = int((labels != PADDING).sum())
            (loss / max(1, seen)).backward()  # an empty batch adds zero gradients
            self.optimizer.step()
            sums += _batch_sums(loss, logits, labels, skipped)
        return sums

    def evaluate(self, batches: Iterable, predictions: list | None = None) -> torch.Tensor:
        """This worker's validation shard's sums (`_batch_sums`);
        appends (labels, float32 logits) to `predictions` when given."""
        # Validation shards differ in length between workers: no DDP wrapper, no collectives.
        forward = self.head_module if self.cached else self.model
        sums = torch.zeros(SUMS + len(self.classes), dtype=torch.float64)
        with torch.no_grad(), autocast(self.device, self.dtype):
            for x, labels, skipped in batches:
                logits = forward(x)
                sums += _batch_sums(self.loss_fn(logits.float(), labels), logits, labels, skipped)
                if predictions is not None:
                    predictions.append((labels.cpu(), logits.float().cpu()))
        return sums

    def last_validation(self) -> list:
        """The last epoch's validation (labels, logits) again, on the restored weights: for
        a run resumed after its last epoch was recorded (a worker lost while the model was
        being written), whose model directory needs it."""
        predictions: list = []
        _, val_batches = self.epoch_batches(self.cfg.epochs - 1)
        self.model.eval()
        self.evaluate(val_batches, predictions)
        return predictions

    def run_epoch(self, epoch: int, predictions: list | None = None) -> dict:
        """Train and validate epoch `epoch` (from 0); its metrics over all workers.
        Appends this worker's validation (labels, logits) to `predictions` if given."""
        started = time.perf_counter()
        train_batches, val_batches = self.epoch_batches(epoch)
        set_train_mode(self.model, self.cfg.freeze)
        what = f"epoch {epoch + 1}/{self.cfg.epochs}"
        train = self.train_one_epoch(self.with_progress(train_batches, what, self.steps))
        train_seconds = time.perf_counter() - started
        self.model.eval()
        val = self.evaluate(val_batches, predictions)
        seconds = torch.tensor([train_seconds, time.perf_counter() - started])
        train, val, seconds = _sum_over_workers(train), _sum_over_workers(val), _max(seconds)
        return {
            "epoch": epoch + 1,
            "train_loss": _ratio(train[0], train[2]),
            "train_accuracy": _ratio(train[1], train[2]),
            "val_loss": _ratio(val[0], val[2]),
            "val_accuracy": _ratio(val[1], val[2]),
            "train_images": int(train[2]),
            "val_images": int(val[2]),
            "skipped_images": int(train[3] + val[3]),
            CLASS_IMAGES: [int(n) for n in train[SUMS:]],
            "images_per_second": _ratio(train[2], seconds[0]),
            "seconds": float(seconds[1]),
            "cached_features": self.cached,
        }

    def model_meta(self, data: dict) -> ModelMeta:
        """The meta.json of the trained model; `data` describes its training data."""
        return ModelMeta(
            classes=self.classes,
            arch=self.cfg.arch,
            image_size=self.cfg.image_size,
            head=self.head,
            base_weights=self.cfg.weights,
            freeze=self.cfg.freeze,
            epochs=self.history,
            # Each epoch reads every file, so the last epoch's count is the number of bad files.
            data={**data, "skipped_images": self.history[-1]["skipped_images"]},
        )


def _batch_sums(loss, logits, labels, skipped: int) -> torch.Tensor:
    """(loss, correct, seen, skipped) of one batch, then the images seen of each class;
    PADDING samples are not seen."""
    real = labels != PADDING
    correct = ((logits.argmax(1) == labels) & real).sum().item()
    sums = torch.tensor([loss.item(), correct, real.sum().item(), skipped], dtype=torch.float64)
    by_class = torch.bincount(labels[real].cpu(), minlength=logits.shape[1])
    return torch.cat([sums, by_class.to(torch.float64)])


def _sum_over_workers(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `t` over the workers."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def _ratio(a, b) -> float | None:
    return float(a / b) if b else None
