"""Classification as one streaming Ray Data pipeline: list -> read+decode -> model -> Parquet."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import ray
import ray.data
from ray.data import ActorPoolStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from insectlib import inputs, int8, outputs, storage
from insectlib.config import INT8_AGREEMENT_MIN, ClassifyConfig, DecodeLimits
from insectlib.errors import ImageError, InsectError
from insectlib.images import eval_transform, load_images, resize_size
from insectlib.model import (
    ModelMeta,
    check_model_id,
    check_weights,
    embedding_size,
    read_meta,
    versions,
)
from insectlib.precision import cpu_runs_int8_fast
from insectlib.predict import Predictor, RowFormat, prediction_table
from insectlib.runtime import init_ray, insect_error_in, live_nodes, local_path_warnings
from insectlib.summary import summarize, write_summary

# torch.compile costs each actor ~10 s (up to a minute on a cold cache) and saves ~25 ms
# per VGG-16 image on a CPU core: worth it from about a thousand images per actor.
COMPILE_MIN_IMAGES_PER_ACTOR = 1000
# Listing parts read at once, at most: I/O-bound tasks that ask for no CPU, but each is a
# Ray worker process to start (about 2 CPU-seconds here). 16 of them on 2 cores held the
# first block of paths back 36 s, 4 for 8 s, 2 for 5 s: no more than half the CPUs.
LISTING_TASKS = 16
SMALL_INPUT_BATCHES = 4  # batches per actor below which an input counts as small
PATH_CHARS = 128  # a long path: blocks sized with it hold one batch of predictions


@dataclass
class ClassifySummary:
    inputs: int
    rows: int
    errors: int
    seconds: float
    output: str
    model: str  # the id in the rows' `model` column (with int8, the int8 model's)

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def image_batch(
    batch: dict[str, np.ndarray], image_size: int, limits: DecodeLimits, s3
) -> dict[str, np.ndarray]:
    """Read and preprocess a Ray Data batch of files. A file that fails gets an error text,
    never an exception: one bad file must not take the rest of its batch down. Only a
    storage that keeps failing (StorageUnavailable) stops the run."""
    paths = list(batch["path"])
    raw = batch.get("raw_path")
    if raw is not None:  # the OS's own bytes where the shown name had to be escaped
        paths_read = [os.fsdecode(r) if r else p for p, r in zip(paths, raw, strict=True)]
    else:
        paths_read = paths
    transform, min_side = eval_transform(image_size), resize_size(image_size)
    images = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    errors = [""] * len(paths)  # "" = fine; Arrow keeps the column a string column
    for i, image in enumerate(load_images(paths_read, transform, min_side, limits, s3)):
        if isinstance(image, ImageError):
            errors[i] = str(image)
        else:
            images[i] = image.numpy()
    return {"path": np.array(paths, dtype=object), "image": images, "error": np.array(errors)}


def classify(cfg: ClassifyConfig, paths: list[str] | None = None) -> ClassifySummary:
    """Classify every image under `cfg.input` (or in `cfg.manifest`, or exactly `paths`,
    when given) and write one Parquet row per file.

    The input streams (see `inputs`): classification starts with the first listed files.
    Nothing in the output is removed before the model directory is checked and the input
    is known to hold images, and then only insect's own files."""
    cfg.validate()
    quiet_ray_data()
    meta = read_meta(cfg.model, cfg.s3)
    check_weights(cfg.model, meta, cfg.s3)
    row_format = row_format_for(cfg, meta)
    source = cfg.manifest or cfg.input
    outputs.check_location(cfg.output, {"the input": source, "the model": cfg.model})
    storage.check_bucket(cfg.output, cfg.s3)
    removal = plan_output(cfg)
    int8_model = int8_for_run(cfg, meta)
    model_id = int8_model.record.int8_model_id if int8_model else meta.model_id
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat()
    if paths is not None:
        parts = inputs.plan_paths(paths)
    elif cfg.manifest:
        parts = inputs.plan_manifest(cfg.manifest, cfg.s3)
    else:
        parts = inputs.plan_listing(cfg.input, cfg.s3)
    init_ray(cfg.address)
    for warning in local_path_warnings({"--output": cfg.output}, live_nodes()):
        print(warning, file=sys.stderr, flush=True)
    # A first look, bounded: is there anything to classify, and is it worth compiling for?
    big = COMPILE_MIN_IMAGES_PER_ACTOR * max_actors(cfg)
    seen = inputs.count_inputs(parts, cfg.s3, big)
    if not seen:
        raise InsectError(f"no image files found in {source}")
    if removal:
        check_model_id(cfg.model, meta, cfg.s3)  # the actors would refuse it, too late
        outputs.remove(cfg.output, removal, cfg.s3)
    done = None
    if cfg.resume:
        done = outputs.resume_state(
            cfg.output, model_id, cfg.s3, asdict(row_format), asdict(RowFormat())
        )

    # On the driver's node: the run outlives any other node (a lost worker node must not
    # take the counts, and with them the listing tasks that report to it, along).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = Counter.options(scheduling_strategy=here).remote()
    resuming = done is not None and done.rows > 0
    block_size = None if resuming else streaming_block_size(cfg, meta, seen, row_format)
    listed = read_inputs(parts, cfg.batch_size, cfg.s3, counter, block_size)
    with ray_task_errors():  # these run the listing now: its errors in one line
        if resuming:
            print(f"resuming: {done.rows} inputs already done; finding those without a row")
            listed = skip_done(listed, done, cfg)
        elif row_format.embedding_size and is_small(cfg, seen):
            # Blocks of a batch of embeddings hold a small input's every path in one block:
            # cut them into batches here, before the model actors take the CPUs it needs.
            listed = listed.repartition(target_num_rows_per_block=cfg.batch_size).materialize()
    print(f"classifying {source} with model {model_id} ({len(parts)} listing parts)")
    pa_fs, pa_path = storage.pyarrow_filesystem(cfg.output, cfg.s3)
    already = done.rows if done is not None else 0
    with progress_bar(counter, already), ray_task_errors():
        predictions = prediction_dataset(
            listed, seen, cfg, meta.image_size, row_format, counter, int8_model
        )
        predictions.write_parquet(
            pa_path,
            filesystem=pa_fs,
            filename_provider=outputs.PartNames(),
            # Every part gets this schema, with the row format in its metadata, whatever
            # its blocks held (Ray Data would otherwise unify the blocks' own schemas).
            schema=row_format.schema(),
            # One file per write task, of --rows-per-file rows up to one block more (a block
            # is a batch or a few; only the run's last file may hold fewer), whatever the cluster
            # size: bytes per file follow from it. A maximum as well cut each task's rows
            # into full files plus a remainder: at 1M inputs 44% of the files held 2-6 rows.
            min_rows_per_file=cfg.rows_per_file,
            # Writing is light I/O; asking for a CPU would hold it back until the actors,
            # which take every CPU, are done, and nothing would be on disk before the end.
            ray_remote_args={"num_cpus": 0},
        )
    seconds = time.perf_counter() - started
    total = ray.get(counter.inputs.remote(len(parts)))
    if total is None:
        raise InsectError(f"the listing of {source} did not finish; run again with --resume")

    report = summarize(cfg.output, cfg.s3, meta.classes)
    rows, errors = report["rows"], report["errors"]
    summary = ClassifySummary(total, rows, errors, seconds, cfg.output, model_id)
    if rows != total:
        raise InsectError(
            f"{cfg.output} has {rows} rows for {total} inputs, so no {outputs.SUCCESS_FILE} "
            "was written: inputs were added or removed since the run began, or rows are "
            "missing; run again with --resume (or --overwrite to start over)"
        )
    # Written last, and only when every input has its row: readers can trust the output.
    manifest = {
        "inputs": total,
        "rows": rows,
        "errors": errors,
        "model": model_id,
        "input": source,
        "started": started_at,
        "finished": datetime.now(timezone.utc).isoformat(),
        "resumed": done is not None,
        "versions": versions(),
    }
    storage.write_bytes(
        storage.join(cfg.output, outputs.SUCCESS_FILE),
        json.dumps(manifest, indent=2).encode(),
        cfg.s3,
    )
    classified = total - already
    report.update(
        inputs=total,
        model=model_id,
        input=source,
        row_format=asdict(row_format),
        seconds=seconds,
        images_per_second=classified / seconds if seconds else None,
        already_done=already,  # rows of the runs this one resumed
    )
    write_summary(cfg.output, report, cfg.s3)
    if cfg.max_error_fraction is not None and errors > cfg.max_error_fraction * total:
        raise InsectError(
            f"{errors} of {total} images ({errors / total:.1%}) could not be classified, more "
            f"than --max-error-fraction {cfg.max_error_fraction}; every row is in {cfg.output}"
        )
    return summary


def read_inputs(
    parts: list[inputs.Part], batch_size: int, s3, counter, block_size: int | None = None
) -> ray.data.Dataset:
    """The inputs' paths as a Ray Data dataset read by one task per part (see `inputs`).

    `block_size`: Ray Data's target_max_block_size for this dataset and every dataset made
    from it (None: Ray Data's own, 128 MiB); see `streaming_block_size`."""
    with block_bytes(block_size):
        return ray.data.read_datasource(
            inputs.InputSource(parts, batch_size, s3, counter),
            # Listing is I/O: it must not wait for the CPUs the model actors hold.
            num_cpus=0,
            concurrency=listing_tasks(len(parts)),
            # One output stream per part. Without it Ray Data asks for at least 200 blocks
            # and cuts each part's blocks into 200 / parts pieces (SplitBlocks): a single
            # part's 32-path blocks became 200 blocks each, and a 10-part input's 20.
            override_num_blocks=len(parts),
        )


def streaming_block_size(
    cfg: ClassifyConfig, meta: ModelMeta, seen: int, row_format: RowFormat | None = None
) -> int:
    """The block size in bytes that streams a listing into the model actors.

    Ray Data joins what a listing task yields into blocks of up to target_max_block_size
    (128 MiB by default), so the task's paths would come out only when it ends, in blocks
    too large to spread over the actors. The same size cuts every later stage's output, and
    each block costs the driver memory and time (bench/blocks.py: 30,000 rows in 8-row
    blocks took 83.6 s and +46 MB of driver RSS, in 32-row blocks 28.6 s and +20 MB). So a
    large input gets blocks of one batch of predictions (listing blocks then hold 2-4
    batches of paths, filled in milliseconds); a small one (under SMALL_INPUT_BATCHES
    batches an actor) gets blocks of one batch of paths, which spread over every actor.
    Not with --embeddings: its rows, 8 kB each for VGG-16, would leave the actors one row a
    block (the run took 1.2x as long on 180 photos); such a small input is cut into batches
    by `classify` instead."""
    row_format = row_format or RowFormat()
    if is_small(cfg, seen) and not row_format.embedding_size:
        return cfg.batch_size * inputs.BLOCK_BYTES_PER_PATH
    n = cfg.batch_size
    rows = prediction_table(
        ["/" * PATH_CHARS] * n,
        np.zeros((n, len(meta.classes)), np.float32),
        [None] * n,
        meta,
        row_format,
        np.zeros((n, row_format.embedding_size or 0), np.float32),
    )
    return rows.nbytes


def is_small(cfg: ClassifyConfig, seen: int) -> bool:
    """Whether `seen` inputs make under SMALL_INPUT_BATCHES batches for each actor."""
    return seen < SMALL_INPUT_BATCHES * cfg.batch_size * max_actors(cfg)


def row_format_for(cfg: ClassifyConfig, meta: ModelMeta) -> RowFormat:
    """What each row of this run holds (see `predict.RowFormat`)."""
    if cfg.top_k is not None and cfg.top_k > len(meta.classes):
        raise InsectError(
            f"--top-k {cfg.top_k} is more than the {len(meta.classes)} classes of {cfg.model}"
        )
    return RowFormat(
        temperature=meta.temperature if cfg.calibration else None,
        top_k=cfg.top_k,
        min_score=cfg.min_score,
        embedding_size=embedding_size(meta) if cfg.embeddings else None,
    )


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
    already written, hash-partitioned over Ray actors (no process holds every path), cut
    into blocks of one batch and kept in the object store. It runs before the model actors
    start: the join's actors and the repartition tasks need CPUs the model actors would
    hold."""
    pa_fs, _ = storage.pyarrow_filesystem(cfg.output, cfg.s3)
    written = ray.data.read_parquet(done.files, filesystem=pa_fs).select_columns(["path"])
    partitions = max(2, min(200, done.rows // 250_000))
    todo = listed.join(written, join_type="left_anti", on=("path",), num_partitions=partitions)
    return todo.repartition(target_num_rows_per_block=cfg.batch_size).materialize()


def plan_output(cfg: ClassifyConfig) -> list[str]:
    """Check the output location before any work: it must be empty unless --overwrite or
    --resume. Returns what --overwrite will remove once the run can start (see
    `outputs.overwrite_plan`); refuses at once what it would not remove."""
    if cfg.resume:
        return []  # `outputs.resume_state` checks what is there
    alternative = " or --resume to finish an interrupted run"
    if not outputs.entries_to_replace(cfg.output, cfg.s3, cfg.overwrite, alternative):
        return []
    return outputs.overwrite_plan(cfg.output, cfg.s3)


@contextlib.contextmanager
def ray_task_errors():
    """An InsectError raised in a Ray task (StorageUnavailable from a reader) reaches the
    driver wrapped in Ray's exceptions: re-raise it as itself, for the CLI to print."""
    try:
        yield
    except InsectError:
        raise
    except Exception as e:
        cause = insect_error_in(e)
        if cause is None:
            raise
        raise cause from None


@ray.remote(num_cpus=0)
class Counter:
    """Inputs listed and images through the model so far, for the progress bar; and each
    listing part's total, for the count of inputs (a retried part sets it again, never
    twice)."""

    def __init__(self):
        self.listed = self.classified = 0
        self.part_totals: dict[int, int] = {}

    def add_listed(self, n: int) -> None:
        self.listed += n

    def set_part_total(self, part: int, n: int) -> None:
        self.part_totals[part] = n

    def add(self, n: int) -> None:
        self.classified += n

    def get(self) -> tuple[int, int]:
        return self.listed, self.classified

    def inputs(self, parts: int) -> int | None:
        """Every part's total, summed; None while a part has not finished."""
        if len(self.part_totals) < parts:
            return None
        return sum(self.part_totals.values())


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


@contextlib.contextmanager
def progress_bar(counter, already: int = 0):
    """A tqdm bar on stderr (images classified of those listed so far, less the `already`
    done ones of a resumed run; images per second) that follows `counter` while the block
    runs (Ray Data's own progress: `quiet_ray_data`)."""
    interactive = sys.stderr.isatty()
    bar = tqdm(total=0, unit="img", desc="classified", mininterval=0.5 if interactive else 10)
    stop = threading.Event()

    def follow():
        while not stop.wait(0.5):
            listed, classified = ray.get(counter.get.remote())
            # A retried batch (after an actor died) counts twice: never show more than all.
            bar.total = max(listed - already, 0)
            bar.update(min(bar.total, classified) - bar.n)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
        stop.set()
        thread.join()
        listed, _ = ray.get(counter.get.remote())
        bar.total = max(listed - already, bar.n)
        bar.update(bar.total - bar.n)  # the pipeline is done: every image went through
    finally:
        stop.set()
        thread.join()
        bar.close()


def prediction_dataset(
    listed: ray.data.Dataset,
    seen: int,
    cfg: ClassifyConfig,
    image_size: int,
    row_format: RowFormat,
    counter=None,
    int8_model: int8.Int8Model | None = None,
) -> ray.data.Dataset:
    """Path blocks -> rows of `row_format`. `seen`: inputs counted before the run (at most
    the compile threshold), which sizes small jobs. `int8_model`: run int8 with it (see
    `int8_for_run`)."""
    # No more actors than batches: one would idle, after loading the model for nothing.
    actors = min(max_actors(cfg), math.ceil(seen / cfg.batch_size))
    compile_model = cfg.compile == "on" or (
        cfg.compile == "auto" and seen >= COMPILE_MIN_IMAGES_PER_ACTOR * actors
    )
    # A pool that starts at full size: growing it one actor at a time costs minutes of idle
    # CPUs on short jobs; --min-actors lets it breathe on a shared cluster.
    min_actors = min(cfg.min_actors or actors, actors)
    ds = listed.map_batches(
        image_batch,
        fn_kwargs={"image_size": image_size, "limits": cfg.limits, "s3": cfg.s3},
        batch_size=cfg.batch_size,
        # On CPU, as many CPUs as a model actor, so that Ray Data fuses decoding into the
        # actor (no copy between processes); on GPU, decode tasks of their own on every core.
        num_cpus=1 if cfg.gpu else cfg.cpus_per_actor,
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": cfg.model,
            "device": "cuda" if cfg.gpu else "cpu",
            "precision": "int8" if int8_model else cfg.precision,
            "int8_model": int8_model,
            "s3": cfg.s3,
            "threads": None if cfg.gpu else max(1, int(cfg.cpus_per_actor)),
            "compile": compile_model,
            "batch_size": cfg.batch_size,
            "counter": counter,
            "row_format": row_format,
        },
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(min_size=min_actors, max_size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.gpu else 0,
    )


def int8_for_run(cfg: ClassifyConfig, meta: ModelMeta) -> int8.Int8Model | None:
    """The int8 calibration the actors run with; None: they run cfg.precision.

    int8: the calibration kept in the model directory, or a new one (stored there for the
    next run). auto: int8 only on a CPU that runs it fast with a kept calibration whose
    agreement with fp32 passed; otherwise the actors resolve auto themselves (bf16 or fp32
    on CPU, as the hardware allows)."""
    if cfg.gpu or cfg.precision not in ("int8", "auto"):
        return None
    kept = int8.load(cfg.model, meta, cfg.s3)
    if cfg.precision == "auto":
        if kept and kept.record.trusted and cpu_runs_int8_fast():
            return kept
        return None
    images = cfg.int8_calibration
    if kept is None or (images and kept.record.calibration != images):
        print("calibrating int8 (once per model and calibration set)", flush=True)
        kept = int8.calibrate(cfg.model, meta, images, cfg.batch_size, cfg.limits, cfg.s3)
    r = kept.record
    print(
        f"int8 model {r.int8_model_id}: top-1 agreement with fp32 {r.top1_agreement:.1%} on "
        f"{r.agreement_images} held-out images of {r.calibration} (largest probability "
        f"difference {r.max_probability_difference:.3f})",
        flush=True,
    )
    if not r.trusted:
        print(
            f"warning: agreement below {INT8_AGREEMENT_MIN:.0%}: --precision auto will not "
            "choose this int8 model",
            file=sys.stderr,
        )
    return kept


def max_actors(cfg: ClassifyConfig) -> int:
    """--max-actors, or one per GPU (with --gpu) or per --cpus-per-actor CPUs of the
    cluster."""
    if cfg.max_actors:
        return cfg.max_actors
    resources = ray.cluster_resources()
    if cfg.gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // cfg.cpus_per_actor))


def print_summary(s: ClassifySummary) -> None:
    print(
        f"{s.inputs} images -> {s.rows} rows ({s.errors} with errors) in {s.seconds:.1f} s, "
        f"{s.images_per_second:.1f} images/s; predictions in {s.output}",
        flush=True,
    )
