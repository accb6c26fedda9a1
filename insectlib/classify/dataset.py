"""The Ray Data side of classification: the listing as a streaming source, decoding, the
model-actor pool, and the block size that keeps it all streaming.

list (`data.inputs.InputSource`) -> `image_batch` (read, decode, preprocess) -> `Predictor`
(as `PoolPredictor`) in an actor pool -> Parquet (`pipeline`). With --decode device,
`encoded_batch` reads and checks instead, and the actors decode the JPEGs on their device
(`data.device_decode`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace

import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy

from insectlib import storage
from insectlib.classify import outputs
from insectlib.classify.shape import ActorShape
from insectlib.config import ClassifyConfig, DecodeLimits
from insectlib.data import device_decode, inputs
from insectlib.data.images import eval_transform, load_images, resize_size
from insectlib.errors import ImageError
from insectlib.model.int8 import Int8Model
from insectlib.model.meta import ModelMeta
from insectlib.model.predictor import Predictor, RowFormat, prediction_table
from insectlib.runtime.progress import join_run

# Listing parts read at once, at most: I/O-bound tasks that ask for no CPU, but each is a
# Ray worker process to start, which on few cores holds the first paths back (measured:
# docs/performance.md): no more than half the CPUs.
LISTING_TASKS = 16
SMALL_INPUT_BATCHES = 4  # batches per actor below which an input counts as small
# On CPU, inputs per actor below which blocks hold one batch: each costs the driver
# milliseconds against seconds of model, and keeps every actor busy to the run's end.
CPU_SMALL_INPUTS = 1000
PATH_CHARS = 128  # a long path: blocks sized with it hold one batch of predictions
# Ray Data ends a block once it holds more than the block size and cuts one of 1.5 times it
# or more. A batch of paths weighing this many block sizes is a block of its own, whole,
# from 0.83 to 1.25 times the weight it was sized for:
ONE_BATCH_A_BLOCK = 1.2
# and blocks this many batches of paths large take several whole (a batch added to one under
# the size leaves it under 1.5 times the size) up to 1.25 times the weight sized for.
WHOLE_BATCHES_A_BLOCK = 2.5


def image_batch(
    batch: dict[str, np.ndarray], image_size: int, limits: DecodeLimits, s3, threads: int = 1
) -> dict[str, np.ndarray]:
    """Read and preprocess a Ray Data batch of files, decoding on `threads` threads (the
    CPUs of the actor it runs in: its model waits meanwhile). A file that fails gets an error
    text, never an exception: one bad file must not take the rest of its batch down. Only a
    storage that keeps failing (StorageUnavailable) stops the run."""
    paths, paths_read, errors = batch_inputs(batch)
    todo = [i for i, e in enumerate(errors) if not e]  # folders that could not be listed: no read
    transform, min_side = eval_transform(image_size), resize_size(image_size)
    images = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    found = load_images([paths_read[i] for i in todo], transform, min_side, limits, s3, threads)
    for i, image in zip(todo, found, strict=True):
        if isinstance(image, ImageError):
            errors[i] = str(image)
        else:
            images[i] = image.numpy()
    # "" = fine; Arrow keeps the column a string column
    return {"path": np.array(paths, dtype=object), "image": images, "error": np.array(errors)}


def encoded_batch(
    batch: dict[str, np.ndarray], image_size: int, limits: DecodeLimits, s3
) -> dict[str, np.ndarray]:
    """`image_batch` for --decode device: read the files and check their headers here; the
    JPEGs the model actors' device decodes travel as their bytes, every other file is
    decoded here as `image_batch` does (`data.device_decode`, its host half)."""
    paths, paths_read, errors = batch_inputs(batch)
    prepared: list = list(errors)  # a listing error stays the row's error
    todo = [i for i, e in enumerate(errors) if not e]
    found = storage.read_inputs([paths_read[i] for i in todo], limits.max_file_bytes, s3)
    for i, data in zip(todo, found, strict=True):
        prepared[i] = device_decode.prepare(data, image_size, limits)
    return {"path": np.array(paths, dtype=object), **device_decode.to_columns(prepared)}


def batch_inputs(batch: dict[str, np.ndarray]) -> tuple[list[str], list[str], list[str]]:
    """(paths as the rows show them, paths to read, listing errors: "" where none)."""
    paths = list(batch["path"])
    raw = batch.get("raw_path")
    if raw is not None:  # the OS's own bytes where the shown name had to be escaped
        paths_read = [os.fsdecode(r) if r else p for p, r in zip(paths, raw, strict=True)]
    else:
        paths_read = paths
    unlisted = batch.get("listing_error")
    errors = [e or "" for e in unlisted] if unlisted is not None else [""] * len(paths)
    return paths, paths_read, errors


def read_inputs(
    parts: list[inputs.Part], batch_size: int, s3, progress, block_size: int | None = None
) -> ray.data.Dataset:
    """The inputs' paths as a Ray Data dataset read by one task per part (see `inputs`).

    `block_size`: Ray Data's target_max_block_size for this dataset and every dataset made
    from it (None: Ray Data's own, 128 MiB); see `streaming_block_size`."""
    with block_bytes(block_size):
        return ray.data.read_datasource(
            inputs.InputSource(parts, batch_size, s3, progress),
            # Listing is I/O: it must not wait for the CPUs the model actors hold.
            num_cpus=0,
            concurrency=listing_tasks(len(parts)),
            # One output stream per part. Without it Ray Data asks for at least 200 blocks
            # and cuts each part's blocks into 200 / parts pieces (SplitBlocks): a single
            # part's 32-path blocks became 200 blocks each, and a 10-part input's 20.
            override_num_blocks=len(parts),
        )


def streaming_block_size(
    cfg: ClassifyConfig,
    meta: ModelMeta,
    count: inputs.Count,
    row_format: RowFormat | None = None,
) -> int:
    """The block size in bytes that streams a listing into the model actors in blocks of
    whole batches.

    Ray Data joins what a listing task yields (tables of one batch of paths) into blocks
    of up to target_max_block_size (128 MiB by default), so the task's paths would come out
    only when it ends, in blocks too large to spread over the actors. The same size cuts
    every later stage's output, and each block costs the driver memory and time
    (bench/blocks.py). A block cut inside a batch (see ONE_BATCH_A_BLOCK) ran as two
    batches, the short one padded to a full one when compiled. So a large input gets
    blocks of one batch of predictions and of whole batches of paths of the counted weight;
    a small one (see `is_small`) gets blocks of one batch of paths, which spread over
    every actor to the run's last batch. Not with --embeddings:
    its rows, 8 kB each for VGG-16, would leave the actors one row a block; where the
    count saw the whole input, its blocks of paths are cut to size (`spreads_embeddings`)."""
    row_format = row_format or RowFormat()
    n = cfg.batch_size
    paths = batch_of_paths(cfg, count)
    if is_small(cfg, count.inputs) and not row_format.embedding_size:
        return int(paths / ONE_BATCH_A_BLOCK)
    rows = prediction_table(
        ["/" * PATH_CHARS] * n,
        np.zeros((n, len(meta.classes)), np.float32),
        [None] * n,
        meta,
        row_format,
        np.zeros((n, row_format.embedding_size or 0), np.float32),
    )
    return max(rows.nbytes, int(WHOLE_BATCHES_A_BLOCK * paths))


def batch_of_paths(cfg: ClassifyConfig, count: inputs.Count) -> int:
    """The bytes of a block of one batch of paths of the counted weight."""
    return inputs.path_table(["/" * round(count.path_bytes)] * cfg.batch_size).nbytes


def batches_a_block(block_size: int, cfg: ClassifyConfig, count: inputs.Count) -> int:
    """The most batches of paths a block of `block_size` bytes holds: Ray Data ends a
    block at the batch that takes it over the size (paths of the counted weight)."""
    return block_size // batch_of_paths(cfg, count) + 1


def tasks_of(inputs_: int, batches_a_block: int, cfg: ClassifyConfig, parts: int) -> int:
    """The tasks of the model actors that `inputs_` in blocks of `batches_a_block` batches
    make, estimated. Ray Data joins blocks into a task until it holds a batch: a task
    is one block of up to `batches_a_block` batches, and a part's last, short block shares
    the next one's (its `parts` such blocks). The blocks are sized for the counted paths'
    mean weight, which lighter or heavier parts miss a little either way."""
    n = cfg.batch_size
    least = -(-inputs_ // ((batches_a_block + 1) * n))
    return max(least, (inputs_ - parts * (n - 1)) // (batches_a_block * n))


def tasks_of_cut(inputs_: int, rows: int, cfg: ClassifyConfig) -> int:
    """The tasks of the model actors that `inputs_` `cut` into blocks of `rows` make: a
    block each, the one short block, if under a batch, counted as sharing the task of the
    block after it (blocks reach the actors as the cut's tasks end): one fewer than run
    where it comes last."""
    return max(min(inputs_, 1), inputs_ // rows + (inputs_ % rows >= cfg.batch_size))


def inputs_for(tasks: int, batches_a_block: int, cfg: ClassifyConfig, parts: int) -> int:
    """Inputs that `tasks_of` says make `tasks` tasks at least (up to a task's inputs more
    than the fewest)."""
    n = cfg.batch_size
    return min(tasks * (batches_a_block + 1) * n, tasks * batches_a_block * n + parts * (n - 1))


def spreads_embeddings(cfg: ClassifyConfig, row_format: RowFormat) -> bool:
    """Whether a --embeddings listing the count sees whole is `cut` before the model actors
    start: blocks sized for a batch of its rows hold thousands of paths, each a task of one
    actor, too few to keep a pool busy. Not for a run of one CPU actor at most (--max-actors
    1, or a cluster with room for one): it decodes its own inputs, nothing to spread, and
    cutting waits for the whole listing (a pool the shape rule makes one actor of several
    CPUs is cut all the same)."""
    return bool(row_format.embedding_size) and (cfg.gpu or max_actors(cfg) > 1)


def block_rows(
    cfg: ClassifyConfig, meta: ModelMeta, count: inputs.Count, row_format: RowFormat
) -> int:
    """The paths of a block of `count` inputs listed without embeddings: whole batches, one
    for a small input (see `streaming_block_size`)."""
    plain = streaming_block_size(cfg, meta, count, replace(row_format, embedding_size=None))
    return cfg.batch_size * batches_a_block(plain, cfg, count)


def small_input(cfg: ClassifyConfig) -> int:
    """Inputs per actor below which a run streams blocks of one batch of paths."""
    few = SMALL_INPUT_BATCHES * cfg.batch_size
    return few if cfg.gpu else max(few, CPU_SMALL_INPUTS)


def is_small(cfg: ClassifyConfig, seen: int) -> bool:
    """Whether `seen` inputs are under `small_input` for each actor."""
    return seen < small_input(cfg) * max_actors(cfg)


def listing_tasks(parts: int) -> int:
    """Listing tasks run at once: one per part, at most LISTING_TASKS and half the
    cluster's CPUs (at least 2, so that a slow part does not hold the rest back)."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return max(1, min(parts, LISTING_TASKS, max(2, cpus // 2)))


@contextlib.contextmanager
def block_bytes(size: int | None):
    """Datasets created inside get Ray Data's target_max_block_size `size` (None: as is)."""
    context = ray.data.DataContext.get_current()
    before = context.target_max_block_size
    if size:
        context.target_max_block_size = size
    try:
        yield
    finally:
        context.target_max_block_size = before


def skip_done(listed: ray.data.Dataset, done: outputs.Done, cfg) -> ray.data.Dataset:
    """The listed inputs that have no row yet: an anti-join of the listing with the paths
    already written, hash-partitioned over Ray actors (no process holds every path). It
    runs with `cut`, before the model actors start: the join's actors need CPUs the model
    actors would hold."""
    pa_fs, _ = storage.pyarrow_filesystem(cfg.output, cfg.s3)
    written = ray.data.read_parquet(done.files, filesystem=pa_fs).select_columns(["path"])
    partitions = max(2, min(200, done.rows // 250_000))
    return listed.join(written, join_type="left_anti", on=("path",), num_partitions=partitions)


def cut(listed: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`listed` in blocks of exactly `rows` paths (one shorter), kept in the object store:
    run now, by Ray tasks of 1 CPU each, before the model actors hold the CPUs."""
    return listed.repartition(target_num_rows_per_block=rows, strict=True).materialize()


def quiet_ray_data() -> None:
    """Ray Data's progress and INFO lines go to its log file (the session's
    logs/ray-data/ray-data.log), not to the console, where insect's one bar and summary
    are; its warnings (an operator without outputs for a minute, say) still reach it. Its
    progress bars count blocks and rows of each stage, which says little about images
    done, and where stdout is not a terminal (a job, a redirected run) it printed them as a
    dozen INFO lines every 10 s instead. Before any dataset: each keeps the settings it
    was made with."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_bars_disabled)


def _not_bars_disabled(record: logging.LogRecord) -> bool:
    """False for Ray Data's warning that its progress bars are off (insect turned them off)."""
    return not record.getMessage().startswith("Progress bars disabled")


def prediction_dataset(
    listed: ray.data.Dataset,
    shape: ActorShape,
    cfg: ClassifyConfig,
    image_size: int,
    row_format: RowFormat,
    progress=None,
    int8_model: Int8Model | None = None,
) -> ray.data.Dataset:
    """Path blocks -> rows of `row_format`, in a pool of `shape`. `int8_model`: run int8
    with it."""
    decode_kwargs = {"image_size": image_size, "limits": cfg.limits, "s3": cfg.s3}
    if not cfg.decodes_on_device:
        decode_kwargs["threads"] = cpu_threads(cfg, shape) or 1
    ds = listed.map_batches(
        encoded_batch if cfg.decodes_on_device else image_batch,
        fn_kwargs=decode_kwargs,
        batch_size=cfg.batch_size,
        # On CPU, as many CPUs as a model actor, so that Ray Data fuses decoding into the
        # actor (no copy between processes); on GPU, tasks of their own on every core, which
        # decode (or with --decode device read, check and decode what the GPU will not).
        num_cpus=1 if cfg.gpu else shape.cpus_per_actor,
    )
    return ds.map_batches(
        PoolPredictor,
        fn_constructor_kwargs={
            "model_uri": cfg.model,
            "device": "cuda" if cfg.gpu else "cpu",
            "precision": "int8" if int8_model else cfg.precision,
            "int8_model": int8_model,
            "s3": cfg.s3,
            "threads": cpu_threads(cfg, shape),
            "compile": shape.compile,
            "batch_size": cfg.batch_size,
            "progress": progress,
            "row_format": row_format,
            "limits": cfg.limits,
        },
        batch_size=cfg.batch_size,
        compute=actor_pool(cfg, shape),
        num_cpus=shape.cpus_per_actor,
        num_gpus=1 if cfg.gpu else 0,
    )


class PoolPredictor(Predictor):
    """A Predictor as a model actor of Ray Data's pool: it joins the run's progress first,
    for the driver to stop it when the run ends (`progress.end`), built or not."""

    def __init__(self, **kwargs):
        if kwargs.get("progress") is not None:
            join_run(kwargs["progress"])
        super().__init__(**kwargs)


def cpu_threads(cfg: ClassifyConfig, shape: ActorShape) -> int | None:
    """A CPU model actor's threads, one per CPU: its model's, and its decoding's (fused in
    it, while its model waits). None on GPU, where tasks of one CPU decode."""
    return None if cfg.gpu else max(1, int(shape.cpus_per_actor))


def actor_pool(cfg: ClassifyConfig, shape: ActorShape) -> ActorPoolStrategy:
    """The model actors' pool: `min_actors` to `shape.actors` actors, each given
    `shape.tasks_in_flight` tasks at a time (None: Ray's default, see `tasks_in_flight`)."""
    return ActorPoolStrategy(
        min_size=min_actors(cfg, shape.actors),
        max_size=shape.actors,
        max_tasks_in_flight_per_actor=shape.tasks_in_flight,
    )


def tasks_in_flight(cfg: ClassifyConfig, shape: ActorShape, tasks: int) -> int | None:
    """Tasks each model actor is given at a time, for `tasks` tasks (estimated) to come. A
    full CPU pool of several actors is given 2 where each has MANY_TASKS or more, else 1
    (see MANY_TASKS); an actor alone 1. A growing pool (--min-actors) keeps Ray's default
    (None): Ray grows a pool only while its actors average more than one task in flight
    each. On GPU, batches take milliseconds: the next one on its way (Ray's default too)."""
    least = min_actors(cfg, shape.actors)
    if input_decides_in_flight(cfg, shape.actors, least):
        return 2 if tasks >= MANY_TASKS * shape.actors else 1
    return None if cfg.gpu or least < shape.actors else 1


def input_decides_in_flight(cfg: ClassifyConfig, actors: int, least: int) -> bool:
    """Whether the tasks in flight of a pool of `least` to `actors` actors depend on its
    input: in a full CPU pool of several."""
    return not cfg.gpu and least == actors > 1


def min_actors(cfg: ClassifyConfig, actors: int) -> int:
    """The actors a pool starts with: all of them, since growing it one actor at a time
    costs minutes of idle CPUs on short jobs; --min-actors lets it breathe on a shared
    cluster."""
    return min(cfg.min_actors or actors, actors)


# Tasks each actor of a full CPU pool of several has to come from which it is given 2 at a
# time. With 1, an actor that is done may wait for its next task until another actor's task
# ends; with 2, the first actor ready may take 2 of a few tasks while another has none, and
# one actor may be a task behind at the end: with this many to come, the waits saved
# outweigh that task. An actor alone, given 2, classified slower (docs/performance.md,
# "Tasks in flight").
MANY_TASKS = 8


def max_actors(cfg: ClassifyConfig) -> int:
    """The most actors a run may have: --max-actors, or one per GPU (with --gpu) or per
    --cpus-per-actor CPUs of the cluster (one CPU each where the shape is not set yet)."""
    if cfg.max_actors:
        return cfg.max_actors
    resources = ray.cluster_resources()
    if cfg.gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // (cfg.cpus_per_actor or 1.0)))
