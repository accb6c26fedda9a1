"""`insect classify`: one streaming Ray Data pipeline, list -> read+decode -> model -> Parquet,
in three phases: `plan_run` (checks everything it can, writes nothing), `list_inputs` and
`run_pipeline` (the rows), `finish` (verifies every input has exactly one row, then
`_SUCCESS`, the summary and the error budget)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import ray
import torch
from tqdm import tqdm

from insectlib import storage
from insectlib.classify import dataset, outputs, shape
from insectlib.classify.checks import check_run, plan_classify_output
from insectlib.classify.summary import record_holds, summarize, write_summary
from insectlib.config import INT8_AGREEMENT_MIN, ClassifyConfig
from insectlib.data import inputs
from insectlib.errors import InsectError, RunStopped
from insectlib.layout import SUCCESS_FILE
from insectlib.model import int8, int8_statistics
from insectlib.model.meta import ModelMeta, read_meta, versions
from insectlib.model.network import check_model_id, check_weights, embedding_size
from insectlib.model.precision import cpu_runs_int8_fast, resolve_precision
from insectlib.model.predictor import RowFormat
from insectlib.runtime import console, progress
from insectlib.runtime.connect import (
    actor_class,
    dead_actor_error,
    init_ray,
    insect_error_in,
    live_nodes,
    local_path_warnings,
    why_actor_died,
)
from insectlib.runtime.resources import NodesWait, check_resources
from insectlib.storage.lock import output_lock

LOG_EVERY_S = 30  # the progress line's period where the console is not a terminal


@dataclass
class ClassifySummary:
    inputs: int
    rows: int
    errors: int
    seconds: float
    output: str
    model: str  # the id in the rows' `model` column (with int8, the int8 model's)
    already_done: int = 0  # rows of the interrupted runs this one resumed
    shape: dict | None = None  # the model-actor pool (`shape.ActorShape`)

    @property
    def images_per_second(self) -> float:
        """Images classified by this run per second (a resumed run's earlier rows aside)."""
        return (self.inputs - self.already_done) / self.seconds if self.seconds else 0.0


@dataclass
class RunPlan:
    """Everything decided before a run changes anything (`plan_run`)."""

    cfg: ClassifyConfig
    meta: ModelMeta
    row_format: RowFormat
    parts: list[inputs.Part]
    int8_model: int8.Int8Model | None
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def model_id(self) -> str:
        return self.int8_model.record.int8_model_id if self.int8_model else self.meta.model_id


def classify(
    cfg: ClassifyConfig, paths: list[str] | None = None, parts: list[inputs.Part] | None = None
) -> ClassifySummary:
    """Classify every image under `cfg.input` (or in `cfg.manifest`, or exactly `paths`,
    when given) and write one Parquet row per file. `parts`: what `checks.check_run`
    returned for this `cfg`, where it ran already.

    The input streams (see `data.inputs`): classification starts with the first listed
    files. Nothing in the output is removed before the model directory is checked and the
    input is known to hold images, and then only insect's own files."""
    plan = plan_run(cfg, paths, parts)
    with output_lock(cfg.output, "classify", cfg.s3, console.say) as lock, resumable(cfg):
        started = time.perf_counter()
        init_ray(cfg.address)
        for warning in local_path_warnings({"--output": cfg.output}, cfg.address, live_nodes()):
            console.warn(warning)
        count, done = prepare_output(plan)
        run = progress.start()
        wait = NodesWait(cfg.wait_for_nodes)  # one wait for every check below
        listing = list_inputs(plan, count, done, run, wait)
        pool = None
        if done and done.rows and not listing.inputs:  # a resume with every input done
            console.say("every input has its row already; nothing to classify")
        else:
            pool = actor_shape(plan, listing)
            check_capacity(cfg, pool, wait)
            if done is not None:
                outputs.drop_record(cfg.output, done, cfg.s3)  # rows are added: not final
            run_pipeline(plan, listing.dataset, done, run, pool)
        inputs_total = listing_total(plan, run)
        lock.check()  # another run took the output over: write no _SUCCESS
        return finish(plan, inputs_total, done, time.perf_counter() - started, pool)


def plan_run(
    cfg: ClassifyConfig, paths: list[str] | None = None, parts: list[inputs.Part] | None = None
) -> RunPlan:
    """Check the settings, the paths (`checks.check_run`, unless its `parts` are given) and
    the model, decide the row format and the int8 model, and check a --resume's parts
    against them; nothing is written (but int8 statistics measured for the first time, kept
    beside the model)."""
    parts = parts if parts is not None else check_run(cfg, paths)
    dataset.quiet_ray_data()
    meta = read_meta(cfg.model, cfg.s3)
    check_weights(cfg.model, meta, cfg.s3)
    check_model_id(cfg.model, meta, cfg.s3)  # here, not in the actors: before anything starts
    found = outputs.read_parts(cfg.output, cfg.s3) if cfg.resume else None
    resumed = outputs.models_in(cfg.output, cfg.s3, found[1]) if found else None
    int8_model = int8_for_run(cfg, meta, resumed)
    plan = RunPlan(cfg, meta, row_format_for(cfg, meta), parts, int8_model)
    if found:  # its refusals before Ray starts; checked again under the lock
        formats = resume_formats(plan)
        outputs.check_resume(cfg.output, plan.model_id, cfg.s3, *formats, parts=found)
    return plan


def prepare_output(plan: RunPlan) -> tuple[inputs.Count, outputs.Done | None]:
    """A first, bounded look at the input (is there anything to classify; is it worth
    compiling for; see `count_for_choices`), then the output made ready: the old run
    removed (--overwrite) or its finished parts found (--resume). Returns the count and
    what is already done."""
    cfg = plan.cfg
    count = count_for_choices(plan)
    removal = plan_classify_output(cfg)  # again, under the lock: another run may have ended since
    if removal:
        outputs.remove(cfg.output, removal, cfg.s3)
    if not cfg.resume:
        return count, None
    done = outputs.resume_state(cfg.output, plan.model_id, cfg.s3, *resume_formats(plan))
    return count, done


def resume_formats(plan: RunPlan) -> tuple[dict, dict]:
    """The run's row format, and the format of parts that do not say (written before insect
    recorded it), as `outputs.resume_state` compares them."""
    return asdict(plan.row_format), asdict(RowFormat())


def count_for_choices(plan: RunPlan) -> inputs.Count:
    """The input counted as far as a choice depends on it: compiling and small-input
    blocks, then the tasks in flight (whether each of as many actors as the cluster's
    CPUs may hold has MANY_TASKS tasks to come) where that takes no more than MOST_COUNTED
    inputs (else a pool is given 1 at a time); with --embeddings, up to MOST_COUNTED, to
    cut an input seen whole into blocks that spread (`dataset.spreads_embeddings`)."""
    cfg = plan.cfg
    thresholds = [n for n in shape.COMPILE_FROM.values() if n]
    per_actor = max(*thresholds, shape.GPU_COMPILE_FROM, dataset.small_input(cfg))
    actors = dataset.max_actors(cfg)
    big = per_actor * actors

    def further(count: inputs.Count) -> int:
        if dataset.spreads_embeddings(cfg, plan.row_format):
            return MOST_COUNTED  # seen whole, its blocks are cut to spread (see list_inputs)
        if not dataset.input_decides_in_flight(cfg, actors, dataset.min_actors(cfg, actors)):
            return big
        size = dataset.streaming_block_size(cfg, plan.meta, count, plan.row_format)
        # A batch a block to spare: the mean weight of the longer count may come out lighter.
        batches = dataset.batches_a_block(size, cfg, count) + 1
        need = dataset.inputs_for(dataset.MANY_TASKS * actors, batches, cfg, len(plan.parts))
        return need if need <= MOST_COUNTED else big

    return inputs.count_inputs(plan.parts, cfg.s3, big, further=further)


# Inputs the driver counts at most, for the tasks in flight or to see a --embeddings input
# whole: about a hundred S3 listing requests (blocks of many batches, a many-class model's,
# may need more: such a run's pool is given 1 task at a time).
MOST_COUNTED = 100_000


@dataclass
class Listing:
    """The inputs to classify (`list_inputs`): their blocks of paths, how many inputs (as
    counted, which stops where no choice depends on more; exactly where they were cut) and
    how many tasks of the model actors they make."""

    dataset: ray.data.Dataset
    inputs: int
    tasks: int

    @classmethod
    def of(
        cls,
        listed: ray.data.Dataset,
        counted: int,
        batches_a_block: int,
        cfg: ClassifyConfig,
        parts: int,
    ) -> Listing:
        """`counted` inputs streaming in blocks of `batches_a_block` batches from `parts`
        parts (`dataset.tasks_of`)."""
        return cls(listed, counted, dataset.tasks_of(counted, batches_a_block, cfg, parts))

    @classmethod
    def of_cut(cls, cut: ray.data.Dataset, rows: int, cfg: ClassifyConfig) -> Listing:
        """Inputs `dataset.cut` into blocks of `rows`, counted exactly (a list naming a
        path twice lists it once)."""
        todo = cut.count()
        return cls(cut, todo, dataset.tasks_of_cut(todo, rows, cfg))


def list_inputs(
    plan: RunPlan,
    count: inputs.Count,
    done: outputs.Done | None,
    run,
    wait: NodesWait | None = None,
) -> Listing:
    """The inputs to classify as blocks of paths, and how many there are to size the pool
    for: streaming as listed, and as counted; or listed and cut into blocks here, before
    any model actor starts, and counted exactly: on a resume those without a row (its
    anti-join runs here too), in blocks of a batch; with --embeddings an input the count
    saw whole, in the blocks a run without embeddings makes (`dataset.spreads_embeddings`).
    `wait`: the run's --wait-for-nodes (None: its own)."""
    cfg, row_format = plan.cfg, plan.row_format
    resuming = done is not None and done.rows > 0
    block_size = None
    if not resuming:
        block_size = dataset.streaming_block_size(cfg, plan.meta, count, row_format)
    listed = dataset.read_inputs(plan.parts, cfg.batch_size, cfg.s3, run, block_size)
    if not resuming and not (count.whole and dataset.spreads_embeddings(cfg, row_format)):
        batches = dataset.batches_a_block(block_size, cfg, count)
        return Listing.of(listed, count.inputs, batches, cfg, len(plan.parts))
    # Ray tasks of 1 CPU each: Ray Data would wait for ever for a CPU the cluster lacks
    advice = "connect to a cluster with CPUs"
    wait = wait or NodesWait(cfg.wait_for_nodes)
    check_resources({"CPU": 1}, 1, "preparing the inputs", advice, wait)
    with ray_task_errors():  # these run the listing now: its errors in one line
        if resuming:
            already = console.counted(done.rows, "input")
            console.say(f"resuming: {already} already done; finding those without a row")
            listed = dataset.skip_done(listed, done, cfg)
            # A batch a block: its stages keep Ray's block size, which holds a task's output
            # in one block, so tasks of one batch keep a first run's blocks of predictions.
            rows = cfg.batch_size
        else:
            rows = dataset.block_rows(cfg, plan.meta, count, row_format)
        return Listing.of_cut(dataset.cut(listed, rows), rows, cfg)


def run_pipeline(
    plan: RunPlan, listed: ray.data.Dataset, done: outputs.Done | None, run, pool: shape.ActorShape
) -> None:
    """Classify the listed inputs into Parquet parts."""
    cfg, row_format = plan.cfg, plan.row_format
    console.say(
        f"classifying {plan.cfg.source} with model {plan.model_id} ({len(plan.parts)} listing "
        f"parts); starting {pool.line()}"
    )
    # Files written as they fill, each of one write task: --rows-per-file rows up to one
    # block more (a block is a batch or a few; only the run's last may hold fewer).
    parts = outputs.PartsDatasink(cfg.output, cfg.s3, row_format.schema(), cfg.rows_per_file, run)
    with ending(run), progress_bar(run, done.rows if done else 0), ray_task_errors():
        predictions = dataset.prediction_dataset(
            listed, pool, cfg, plan.meta.image_size, row_format, run, plan.int8_model
        )
        # Writing is light I/O; asking for a CPU would hold it back until the actors,
        # which take every CPU, are done, and nothing would be on disk before the end.
        predictions.write_datasink(parts, ray_remote_args={"num_cpus": 0})


def listing_total(plan: RunPlan, run) -> int:
    """How many inputs the listing found (every listing part's total, once it has run)."""
    total = ray.get(run.inputs.remote(len(plan.parts)))
    if total is None:
        raise InsectError(
            f"the listing of {plan.cfg.source} did not finish; run again with --resume"
        )
    return total


def finish(
    plan: RunPlan,
    total: int,
    done: outputs.Done | None,
    seconds: float,
    pool: shape.ActorShape | None = None,
) -> ClassifySummary:
    """Count the rows on disk; only when every input has its row, write `_SUCCESS` (last:
    readers can trust an output that has one) and the summary; then the error budget."""
    cfg = plan.cfg
    footers = outputs.part_footers(cfg.output, cfg.s3)  # read once, for the counts and check
    report = summarize(cfg.output, cfg.s3, plan.meta.classes, footers)
    rows, errors = report["rows"], report["errors"]
    already = done.rows if done is not None else 0
    summary = ClassifySummary(total, rows, errors, seconds, cfg.output, plan.model_id, already)
    summary.shape = pool.record() if pool else None
    # A resume with nothing to do keeps a finished run's record while it holds; any other
    # goes before the rows are checked, so that a refused output has none.
    keep = done is not None and pool is None and bool(done.record)
    keep = keep and record_holds(cfg.output, cfg.s3, rows, total)
    if done is not None and not keep:
        outputs.drop_record(cfg.output, done, cfg.s3)
    check_rows(cfg, rows, total, footers)
    if keep:
        console.say("the run had finished: its _SUCCESS and summary are kept as they were")
    else:
        write_success(plan, report, summary)
    if cfg.max_error_fraction is not None and errors > cfg.max_error_fraction * total:
        raise InsectError(
            f"{errors} of {total} images ({errors / total:.1%}) could not be classified, more "
            f"than --max-error-fraction {cfg.max_error_fraction}; every row is in {cfg.output}"
        )
    return summary


def write_success(plan: RunPlan, report: dict, summary: ClassifySummary) -> None:
    """`_SUCCESS` (the run's record: readers trust an output that has one), then the
    summary with this run's speed and shape."""
    cfg = plan.cfg
    manifest = {
        "inputs": summary.inputs,
        "rows": summary.rows,
        "errors": summary.errors,
        "model": plan.model_id,
        "input": cfg.source,
        "started": plan.started_at,
        "finished": datetime.now(timezone.utc).isoformat(),
        "resumed": cfg.resume,
        "versions": versions(),
    }
    storage.write_file(cfg.output, SUCCESS_FILE, json.dumps(manifest, indent=2), cfg.s3)
    report.update(
        inputs=summary.inputs,
        model=plan.model_id,
        input=cfg.source,
        row_format=asdict(plan.row_format),
        seconds=summary.seconds,
        images_per_second=summary.images_per_second,
        already_done=summary.already_done,
        actor_shape=summary.shape,
    )
    write_summary(cfg.output, report, cfg.s3)


def check_rows(cfg: ClassifyConfig, rows: int, total: int, footers: dict) -> None:
    """Refuse (no `_SUCCESS`) an output whose rows are not one per listed input, saying
    what mends it (`footers`: its parts', `outputs.part_footers`)."""
    doubled = outputs.duplicated_paths(cfg.output, cfg.s3, footers)
    if rows > total and not doubled:  # each path once: rows of paths the listing lost
        raise InsectError(
            f"{cfg.output} has {rows} rows for {total} inputs, so no {SUCCESS_FILE} was "
            f"written: it holds rows of {console.counted(rows - total, 'input')} no longer in "
            f"{cfg.source} (removed since the run began), which --resume keeps; --overwrite "
            "classifies it anew"
        )
    if rows != total or doubled:
        raise InsectError(
            f"{cfg.output} has {rows} rows for {total} inputs"
            + (
                f", {console.counted(len(doubled), 'path')} with more than one row"
                if doubled
                else ""
            )
            + f", so no {SUCCESS_FILE} was written: inputs were added or removed since the "
            "run began, or rows are missing or repeated; run again with --resume (it removes "
            "repeated rows and classifies what has no row), or --overwrite to start over"
        )


def row_format_for(cfg: ClassifyConfig, meta: ModelMeta) -> RowFormat:
    """What each row of this run holds (see `model.predictor.RowFormat`)."""
    if cfg.top_k is not None and cfg.top_k > len(meta.classes):
        raise InsectError(
            f"--top-k {cfg.top_k} is more than the {len(meta.classes)} classes of {cfg.model}"
        )
    return RowFormat(
        temperature=meta.temperature if cfg.use_temperature else None,
        top_k=cfg.top_k,
        min_score=cfg.min_score,
        embedding_size=embedding_size(meta) if cfg.embeddings else None,
    )


def actor_shape(plan: RunPlan, listing: Listing) -> shape.ActorShape:
    """The model-actor pool for this run on the connected cluster (see `shape`), and the
    tasks each actor is given at a time for its input (`dataset.tasks_in_flight`)."""
    cfg = plan.cfg
    if plan.int8_model:
        precision = "int8"
    else:
        dtype = resolve_precision(cfg.precision, torch.device("cuda" if cfg.gpu else "cpu"))
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    pool = shape.choose(cfg, precision, cluster_size(), listing.inputs)
    return replace(pool, tasks_in_flight=dataset.tasks_in_flight(cfg, pool, listing.tasks))


def cluster_size() -> shape.Cluster:
    """The connected cluster's CPUs, GPUs, CPUs of each node, and on a cluster of one node
    (where only they are shared out) its CPUs free now."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    with_cpus = tuple(int(n["CPU"]) for n in nodes if n.get("CPU", 0) >= 1)
    cpus, gpus = (sum(n.get(name, 0) for n in nodes) for name in ("CPU", "GPU"))
    cluster = shape.Cluster(cpus, gpus, with_cpus)
    return replace(cluster, free_cpus=free_cpus(cpus)) if cluster.one_node else cluster


def free_cpus(cpus: float, settle_s: float = 1.0) -> float:
    """The cluster's free CPUs. Ray's count lags CPUs just given back (the tasks and actors
    of a resume's anti-join, a previous run's actors): while under `cpus`, it is read again
    for up to `settle_s`."""
    deadline = time.monotonic() + settle_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < cpus and time.monotonic() < deadline:
        time.sleep(0.1)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def check_capacity(cfg: ClassifyConfig, pool: shape.ActorShape, wait: NodesWait) -> None:
    """Refuse, before the actors start, a pool the cluster cannot hold (Ray Data would wait
    for it for ever); with --wait-for-nodes, wait for an autoscaler first, what is left of
    the run's `wait`."""
    actors = dataset.min_actors(cfg, pool.actors)
    what = console.counted(actors, "model actor")
    per_actor = {"CPU": pool.cpus_per_actor, **({"GPU": 1} if cfg.gpu else {})}
    advice = "ask for less with --max-actors or --cpus-per-actor"
    check_resources(per_actor, actors, what, advice, wait)


# The actors of a run by what Ray names their class: Ray Data's pool is of model actors.
ACTOR_NAMES = {"MapWorker": "model actor", "RunProgress": "progress actor"}


@contextlib.contextmanager
def ray_task_errors():
    """An InsectError raised in a Ray task (StorageUnavailable from a reader) reaches the
    driver wrapped in Ray's exceptions: re-raise it as itself, for the CLI to print. An
    actor that died and that Ray could not restart (its owner's node gone with the
    cluster's head, where Ray's core has not ended the driver first) stops the run, to be
    resumed."""
    try:
        yield
    except Exception as e:
        cause = insect_error_in(e)
        dead = dead_actor_error(e) if cause is None else None
        if dead is not None:
            actor = ACTOR_NAMES.get(actor_class(dead), "Ray actor")
            cause = RunStopped(
                f"a {actor} of the run died and was not replaced ({why_actor_died(dead)})"
            )
        if cause is None or cause is e:
            raise
        raise cause from None


def resumable(cfg: ClassifyConfig):
    """A Ctrl-C within the block says how to finish the run (the CLI prints it)."""
    instead = " instead of --overwrite" if cfg.overwrite else ""
    return console.on_interrupt(
        f"the same command with --resume{instead} classifies only the inputs without a row"
    )


@contextlib.contextmanager
def ending(run):
    """The run ended when the block ends, however it ends (`progress.end`): its model actors
    stopped, its writes over."""
    try:
        yield
    finally:
        progress.end(run)


@contextlib.contextmanager
def progress_bar(run, already: int = 0):
    """One tqdm bar on the console's error stream (images classified of those listed so
    far, less the `already` done ones of a resumed run; images per second), following the
    run's `RunProgress` while the block runs (Ray Data's own progress: `quiet_ray_data`)."""
    interactive = console.is_terminal()
    bar = tqdm(
        total=0,
        unit="img",
        desc="classified",
        mininterval=0.5 if interactive else LOG_EVERY_S,
        maxinterval=10 if interactive else LOG_EVERY_S,  # tqdm's own 10 s redraw otherwise
        file=console.err() if interactive else console.LogLines(console.err()),
        ascii=not interactive,
    )

    def show(counts: dict[str, int]) -> None:
        # A retried batch (after an actor died) counts twice: never show more than all.
        bar.total = max(counts.get("listed", 0) - already, 0)
        bar.update(min(bar.total, counts.get("classified", 0)) - bar.n)

    try:
        with progress.follow(run, show):
            yield bar
    finally:
        bar.close()


def auto_int8(
    cfg: ClassifyConfig, meta: ModelMeta, resumed: set[str] | None
) -> int8.Int8Model | None:
    """--precision auto's int8 model (see `int8_for_run`), or None. A resume of int8 rows
    that auto would not run as int8 this time is refused, saying why and what resumes it
    (the refusal of another model's rows could only name the flags the user passed)."""
    prefix = int8.int8_id_prefix(meta.model_id)
    rows = sorted(m for m in resumed or () if m.startswith(prefix))
    if cfg.gpu and not rows:
        return None
    kept = int8.load(cfg.model, meta, cfg.s3)
    usable = kept is not None and kept.record.trusted and cpu_runs_int8_fast() and not cfg.gpu
    if usable and (not resumed or kept.record.int8_model_id in resumed):
        return kept
    if not rows:
        return None
    finish, again = "finish it with --precision int8", "start it again with --overwrite"
    if kept is None:
        why, fix = "the model's folder holds no int8 statistics usable here", again
    elif kept.record.int8_model_id != rows[0]:
        why, fix = "the model's int8 statistics were measured again since", again
    elif cfg.gpu:
        why, fix = "int8 runs on CPU only", f"{finish}, without --gpu"
    elif not kept.record.trusted:
        why, fix = f"its top-1 agreement with fp32 was below {INT8_AGREEMENT_MIN:.0%}", finish
    else:
        why, fix = "this CPU does not run int8 fast", finish
    raise InsectError(
        f"{cfg.output} holds rows of {rows[0]}, the int8 form of model {meta.model_id}, "
        f"which --precision auto does not run here ({why}): {fix}, or write elsewhere"
    )


def int8_for_run(
    cfg: ClassifyConfig, meta: ModelMeta, resumed: set[str] | None = None
) -> int8.Int8Model | None:
    """The int8 model the actors run; None: they run cfg.precision.

    int8: the statistics kept in the model directory, or new ones (kept there for the next
    run). auto: int8 only on a CPU that runs it fast with kept statistics whose agreement
    with fp32 passed, and, resuming (`resumed`: the model ids of the rows written), only
    where those rows are int8's too: statistics measured since would otherwise make the
    resume another model's; otherwise the actors resolve auto themselves (bf16 or fp32 on
    CPU, as the hardware allows)."""
    if cfg.precision == "auto":
        return auto_int8(cfg, meta, resumed)
    if cfg.gpu or cfg.precision != "int8":
        return None
    kept = int8.load(cfg.model, meta, cfg.s3)
    images = cfg.int8_images
    if resumed and not any(m.startswith(int8.int8_id_prefix(meta.model_id)) for m in resumed):
        # Before statistics are measured (minutes) for rows that were never int8's.
        raise InsectError(
            f"{cfg.output} holds predictions of model {sorted(resumed)[0]}, not of its int8 "
            "form: resume with the --precision it began with, or write elsewhere"
        )
    if kept is None or (images and kept.record.images_from != images):
        console.say("measuring int8 statistics (once per model and set of images)")
        kept = int8_statistics.measure(cfg.model, meta, images, cfg.batch_size, cfg.limits, cfg.s3)
    r = kept.record
    console.say(
        f"int8 model {r.int8_model_id}: top-1 agreement with fp32 {r.top1_agreement:.1%} on "
        f"{r.agreement_images} held-out images of {r.images_from} (largest probability "
        f"difference {r.max_probability_difference:.3f})"
    )
    if not r.trusted:
        console.warn(
            f"warning: agreement below {INT8_AGREEMENT_MIN:.0%}: --precision auto will not "
            "choose this int8 model"
        )
    return kept


def print_summary(s: ClassifySummary) -> None:
    before = f" ({s.already_done} done before)" if s.already_done else ""
    speed = f", {s.images_per_second:.1f} images/s{before}"
    if s.already_done >= s.inputs:  # nothing classified by this run
        speed = " (every one done before)"
    console.say(
        f"{s.inputs} images -> {s.rows} rows ({s.errors} with errors) in {s.seconds:.1f} s"
        f"{speed}; predictions in {s.output}"
    )
