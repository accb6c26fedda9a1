"""Bucket scale: the input streams from parallel listing tasks, manifests replace listings,
and resume finds what is left without holding the finished paths in one process."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.orc
import pyarrow.parquet as pq
import pytest
import ray
import ray.data

from insectlib import layout, storage
from insectlib.classify import dataset, outputs, pipeline, shape
from insectlib.classify.dataset import (
    MANY_TASKS,
    actor_pool,
    cpu_threads,
    read_inputs,
    streaming_block_size,
    tasks_in_flight,
)
from insectlib.classify.pipeline import classify
from insectlib.classify.shape import ActorShape
from insectlib.cli.main import main
from insectlib.config import ClassifyConfig
from insectlib.data import inputs
from insectlib.errors import InsectError
from insectlib.model.meta import ModelMeta
from insectlib.model.predictor import prediction_table
from insectlib.runtime import resources
from insectlib.runtime.progress import RunProgress
from tests.conftest import expect_cli_error
from tests.standins import ModelStandIn

S3 = storage.S3Options()


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _listed(root: str, s3=S3) -> list[str]:
    parts = inputs.plan_listing(root, s3)
    return [
        p
        for i, part in enumerate(parts)
        for table in inputs.read_part(i, part, 7, s3, None)
        for p in table.column("path").to_pylist()
    ]


@pytest.mark.parametrize(("level_limit", "max_parts"), [(10_000, 1024), (3, 1024), (10_000, 5)])
def test_parallel_listing_lists_every_file_exactly_once(
    tmp_path, monkeypatch, level_limit, max_parts
):
    """Files at the root, one and two levels down and deeper, hidden ones and a folder
    named like an image: every image in exactly one part, whether the levels are split
    into parts or (over the limit) listed as one stream."""
    monkeypatch.setattr(inputs, "LEVEL_LIMIT", level_limit)
    monkeypatch.setattr(inputs, "MAX_PARTS", max_parts)
    names = ["r1.jpg", "r2.png", "a/a1.jpg", "a/x/ax1.jpg", "a/x/deep/er/ax2.jpg"]
    names += ["b/y/by1.jpg", "b/y/by2.JPG", "b/z/bz1.webp", "c/c.tif", "c/d/e/f/g/h.jpg"]
    names += [
        f"year=2024/cam{i}/day{j}/{k}.jpg" for i in range(3) for j in range(4) for k in range(5)
    ]
    for name in [*names, "notes.txt", ".hidden.jpg", "a/.git/x.jpg", "b/y/readme.md"]:
        _touch(tmp_path / name)
    (tmp_path / "dir.jpg").mkdir()
    listed = _listed(str(tmp_path))
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(str(tmp_path / n) for n in names)
    parts = inputs.plan_listing(str(tmp_path), S3)
    assert len(parts) <= max_parts
    if level_limit > 100 and max_parts > 100:
        assert len(parts) > 5  # split into sub-prefixes


def test_parallel_listing_on_s3_exactly_once(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="insect-prefixed")
    keys = [
        f"img/cam{i}/2024-0{j}/{k}.jpg" for i in range(4) for j in range(1, 4) for k in range(6)
    ]
    keys += ["img/top.jpg", "img/cam1/loose.jpg", "img/cam2/2024-01/deep/er/x.jpg"]
    keys += ["img/cam3//empty-segment.jpg"]  # a prefix "img/cam3//" no URI names
    hidden = ["img/.cache/a.jpg", "img/cam0/2024-01/.thumbs/b.jpg", "img/cam1/x/.t/c.jpg"]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda k: client.put_object(Bucket="insect-prefixed", Key=k, Body=b"x"),
                keys + hidden + ["img/cam2/folder-marker/"],
            )
        )
    parts = inputs.plan_listing("s3://insect-prefixed/img", S3)
    assert {p.kind for p in parts} == {"level", "tree"} and len(parts) >= 12
    listed = _listed("s3://insect-prefixed/img")
    assert sorted(listed) == sorted(f"s3://insect-prefixed/{k}" for k in keys)


SHORT_PATH = "s3://bucket/x/0000001.jpg"
LONG_PATH = "s3://a-bucket-with-a-long-name/" + "x" * 90 + ".jpg"  # 124 characters


def streaming_blocks(seen: int, classes: int = 3, path_bytes: float = len(SHORT_PATH)) -> int:
    """The block size classify streams `seen` inputs with (two actors), their paths
    `path_bytes` long on average."""
    cfg = ClassifyConfig(input="in", model="m", output="o", max_actors=2)
    meta = ModelMeta(classes=[f"c{i}" for i in range(classes)], arch="vgg16", image_size=32)
    meta.model_id = "0" * 16
    return streaming_block_size(cfg, meta, inputs.Count(seen, path_bytes))


def whole_batches_of(path: str, block_size: int) -> bool:
    """Whether Ray Data, with `block_size`, keeps a listing's tables of 32 such paths whole
    (it ends a block once it holds more than the size, and cuts one of 1.5 times it): each a
    block of its own, or several to a block."""
    table = inputs.path_table([path] * 32).nbytes
    return block_size < table < 1.5 * block_size or 2 * table < block_size


@pytest.mark.parametrize("classes", [3, 1000])
def test_large_inputs_stream_blocks_of_one_batch_of_predictions(classes):
    """Ray Data cuts every stage's output at one block size: a large input's must hold one
    batch of predictions whole (8-row blocks: 2.9x the time, 2.3x the driver memory),
    and a listing block at least one batch of paths; a small input's blocks hold one batch
    of paths, so that they spread over the actors."""
    size = streaming_blocks(10_000, classes)
    meta = ModelMeta(classes=[f"c{i}" for i in range(classes)], arch="vgg16", image_size=32)
    meta.model_id = "0" * 16
    n = 32
    batch = prediction_table([LONG_PATH] * n, np.zeros((n, classes), np.float32), [None] * n, meta)
    assert batch.nbytes <= size < 2 * batch.nbytes
    assert whole_batches_of(SHORT_PATH, size)
    # Long names: larger blocks, still whole batches of paths.
    assert whole_batches_of(LONG_PATH, streaming_blocks(10_000, classes, len(LONG_PATH)))
    # A small input's block is one batch of paths, whole, for short and long names, and
    # for names 15% shorter or 20% longer than the counted mean.
    for path in (SHORT_PATH, "/home/someone/photos/2024/camera-07/IMG_0123.jpg", LONG_PATH):
        small = streaming_blocks(100, path_bytes=len(path))
        for chars in (0.85 * len(path), len(path), 1.2 * len(path)):
            table = inputs.path_table(["x" * round(chars)] * n).nbytes
            assert small < table < 1.5 * small, (path, chars)


def test_cpu_runs_get_blocks_of_one_batch_up_to_many_batches_an_actor():
    """On CPU a batch takes seconds: a run of 8 batches on 2 actors streams blocks of one
    batch of paths (larger ones left one actor idle while the other took every block), and
    a full pool of few tasks is given one task an actor at a time; a growing pool keeps
    Ray's default (with one in flight it would never grow). On GPU the same run gets blocks
    of predictions."""
    meta = ModelMeta(classes=["a", "b", "c"], arch="vgg16", image_size=32)
    meta.model_id = "0" * 16
    cpu = ClassifyConfig(input="in", model="m", output="o", max_actors=2)
    gpu = ClassifyConfig(input="in", model="m", output="o", max_actors=2, gpu=True)
    paths = inputs.path_table([SHORT_PATH] * 32).nbytes
    small, large = inputs.Count(256, len(SHORT_PATH)), inputs.Count(1000 * 2, len(SHORT_PATH))
    assert streaming_block_size(cpu, meta, small) < paths  # one batch of paths a block
    assert streaming_block_size(gpu, meta, small) > 2 * paths
    assert streaming_block_size(cpu, meta, large) > 2 * paths
    pool = ActorShape(2, 1.0, False, "")
    assert tasks_in_flight(cpu, pool, 8) == 1
    growing = ClassifyConfig(input="in", model="m", output="o", max_actors=2, min_actors=1)
    assert tasks_in_flight(growing, pool, 10_000) is None
    assert tasks_in_flight(gpu, pool, 10_000) is None
    strategy = actor_pool(growing, replace(pool, tasks_in_flight=None))
    assert (strategy.min_size, strategy.max_size) == (1, 2)
    assert strategy.max_tasks_in_flight_per_actor is None
    # An actor decodes on each of its CPUs.
    assert cpu_threads(cpu, ActorShape(1, 2.0, False, "")) == 2
    assert cpu_threads(gpu, ActorShape(1, 2.0, False, "")) is None


def test_several_actors_are_given_two_tasks_each_where_each_has_many_to_come():
    """With one task in flight an actor that is done waits until another's task ends;
    with two, one may be a task behind at the end: 2 only where each of several actors has
    MANY_TASKS to come; an actor alone is given 1 (it classified slower with 2)."""
    cpu = ClassifyConfig(input="in", model="m", output="o", max_actors=2)
    pool = ActorShape(2, 1.0, False, "")
    assert tasks_in_flight(cpu, pool, MANY_TASKS * 2) == 2
    assert tasks_in_flight(cpu, pool, MANY_TASKS * 2 - 1) == 1
    assert tasks_in_flight(cpu, ActorShape(1, 2.0, False, ""), 10_000) == 1
    strategy = actor_pool(cpu, replace(pool, tasks_in_flight=2))
    assert (strategy.min_size, strategy.max_size, strategy.max_tasks_in_flight_per_actor) == (
        2,
        2,
        2,
    )


def _tasks_run(listing: pipeline.Listing, cfg: ClassifyConfig) -> int:
    """The tasks a model actor runs for `listing`, as Ray Data counts them."""
    ran = listing.dataset.map_batches(
        ModelStandIn,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
    ).materialize()
    return int(re.search(r"MapBatches\(ModelStandIn\): (\d+) tasks executed", ran.stats())[1])


def _names(folder, count, chars=5, start=0):
    for i in range(start, start + count):
        _touch(folder / f"{i:0{chars}d}.jpg")


@pytest.mark.parametrize(
    "layout,classes",
    [("300", 3), ("17x31", 3), ("2600", 3), ("3600", 60), ("250 long, 250 short", 3)],
)
def test_the_tasks_estimated_for_the_pool_are_close_to_those_its_actors_run(
    ray_local, tmp_path, layout, classes
):
    """The tasks a listing is estimated to make (which decide the tasks in flight) are no
    more than the model actors run, and at least two thirds of them, whatever the blocks:
    one batch each for a small input, a part's last one short (17 folders); several for a
    large one, more with many classes (blocks hold a batch of their rows), where the count
    goes on past the compile threshold's until it proves MANY_TASKS an actor; names of two
    lengths in two parts."""
    folder = tmp_path / "in"
    if "x" in layout:
        for k in range(17):
            _names(folder / f"f{k:02d}", 31, start=31 * k)
    elif "long" in layout:
        _names(folder / "a", 250, chars=80)
        _names(folder / "b", 250, chars=3)
    else:
        _names(folder, int(layout))
    images = sum(1 for _ in folder.rglob("*.jpg"))
    cfg = ClassifyConfig(input=str(folder), model="m", output="o", max_actors=2, cpus_per_actor=1.0)
    names = [f"c{i}" for i in range(classes)]
    meta = ModelMeta(classes=names, arch="vgg16", image_size=32, model_id="0" * 16)
    parts = inputs.plan_listing(cfg.input, S3)
    plan = pipeline.RunPlan(cfg, meta, pipeline.row_format_for(cfg, meta), parts, None)
    count = pipeline.count_for_choices(plan)
    listing = pipeline.list_inputs(plan, count, None, None)
    tasks = _tasks_run(listing, cfg)
    assert listing.inputs == count.inputs <= images
    # Names of two lengths (80 and 3 characters) make blocks off the mean's size: the
    # estimate may be a little high there (13 for 11), never elsewhere.
    assert listing.tasks <= (1.25 if "long" in layout else 1) * tasks, (listing.tasks, tasks)
    if count.inputs < images:  # the count stopped where it proved as many as the rule needs
        assert listing.tasks >= 2 * MANY_TASKS
    else:
        assert listing.tasks >= 2 / 3 * tasks, (listing.tasks, tasks)
    if classes > 3:  # past the compile threshold's count (2,400 for 2 actors)
        assert count.inputs > 2400
    pool = pipeline.actor_shape(plan, listing)
    assert pool.actors == 2
    assert pool.tasks_in_flight == (2 if listing.tasks >= 2 * MANY_TASKS else 1)


def test_embeddings_spread_over_the_actors_as_rows_without_them(ray_local, tmp_path, monkeypatch):
    """Blocks sized for a batch of embeddings (8 kB a row) hold the paths of dozens of
    batches: 2,600 images were one task of one actor. An input the count sees whole is cut
    into the blocks of a run without embeddings: as many tasks, estimated to the one short
    block; a list naming each path twice counted once. One the count does not see whole
    (past MOST_COUNTED) streams in the large blocks, as counted. A cluster without a CPU
    for the cut is refused in one line (Ray Data would wait for it for ever)."""
    _names(tmp_path / "in", 2600)
    meta = ModelMeta(classes=["a", "b", "c"], arch="vgg16", image_size=32, model_id="0" * 16)

    def listed(embeddings: bool, parts=None, run=True) -> tuple[int, int, int | None, ActorShape]:
        cfg = ClassifyConfig(
            input=str(tmp_path / "in"), model="m", output="o", max_actors=2,
            cpus_per_actor=1.0, embeddings=embeddings,
        )  # fmt: skip
        parts = parts or inputs.plan_listing(cfg.input, S3)
        plan = pipeline.RunPlan(cfg, meta, pipeline.row_format_for(cfg, meta), parts, None)
        listing = pipeline.list_inputs(plan, pipeline.count_for_choices(plan), None, None)
        # numbers only: a Listing's repr is a table
        return (
            listing.inputs,
            listing.tasks,
            _tasks_run(listing, cfg) if run else None,
            pipeline.actor_shape(plan, listing),
        )

    _, _, plain_tasks, _ = listed(False)
    inputs_, estimated, tasks, pool = listed(True)
    assert inputs_ == 2600 and abs(tasks - plain_tasks) <= 1, (tasks, plain_tasks)
    assert estimated <= tasks <= estimated + 1 and estimated >= 2 * MANY_TASKS, (estimated, tasks)
    assert pool.actors == 2 and pool.tasks_in_flight == 2
    paths = sorted(str(p) for p in (tmp_path / "in").glob("*.jpg"))[:1300]
    inputs_, estimated, _, pool = listed(True, inputs.plan_paths(paths + paths), run=False)
    assert inputs_ == 1300 and estimated < 2 * MANY_TASKS, (inputs_, estimated)
    assert pool.tasks_in_flight == 1  # fewer than MANY_TASKS for each of 2 actors

    one = ClassifyConfig(input="i", model="m", output="o", max_actors=1, embeddings=True)
    rows = pipeline.row_format_for(one, meta)  # one actor on CPU: nothing to spread
    assert not dataset.spreads_embeddings(one, rows)
    assert dataset.spreads_embeddings(replace(one, gpu=True), rows)
    monkeypatch.setattr(resources, "_nodes", lambda: [{"GPU": 1.0}])
    with pytest.raises(
        InsectError,
        match=r"^preparing the inputs \(1 CPU\) does not fit the "
        r"cluster: it has 0 CPUs and 1 GPU on 1 node; connect to a cluster",
    ):
        listed(True)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "MOST_COUNTED", 2500)
    inputs_, estimated, _, pool = listed(True, run=False)  # as counted: not cut
    assert inputs_ == 2500 and estimated < MANY_TASKS and pool.tasks_in_flight == 1


def test_a_resumes_inputs_left_are_counted_exactly_and_estimated_to_the_one_short_block(
    ray_local, tmp_path
):
    """A resume's inputs without a row (the anti-join's) are counted exactly and cut into
    blocks of a batch (tasks of one batch keep its stages' blocks of predictions one batch
    each under Ray's block size): the tasks estimated are those run, or one fewer (before:
    about half)."""
    _names(tmp_path / "in", 2600)
    out = tmp_path / "out"
    out.mkdir()
    listed = sorted(str(p) for p in (tmp_path / "in").glob("*.jpg"))
    pq.write_table(pa.table({"path": listed[:400]}), out / "part-0.parquet")
    done = outputs.Done([str(out / "part-0.parquet")], 400)
    cfg = ClassifyConfig(
        input=str(tmp_path / "in"), model="m", output=str(out), max_actors=2, cpus_per_actor=1.0
    )
    meta = ModelMeta(classes=["a", "b", "c"], arch="vgg16", image_size=32, model_id="0" * 16)
    parts = inputs.plan_listing(cfg.input, S3)
    plan = pipeline.RunPlan(cfg, meta, pipeline.row_format_for(cfg, meta), parts, None)
    listing = pipeline.list_inputs(plan, pipeline.count_for_choices(plan), done, None)
    todo, estimated, tasks = listing.inputs, listing.tasks, _tasks_run(listing, cfg)
    assert todo == 2200 and estimated <= tasks <= estimated + 1, (todo, estimated, tasks)
    assert estimated == 2200 // cfg.batch_size  # 68 batches and one of 24 inputs
    assert pipeline.actor_shape(plan, listing).tasks_in_flight == 2


def test_a_runs_checks_share_one_wait_for_nodes(monkeypatch):
    """The checks of one run share --wait-for-nodes, counting only the time they waited for
    nodes: time spent elsewhere, or in a check that passes at once, takes nothing from it;
    the first check asks the autoscaler, waits it out and refuses, saying how long; the
    next one refuses at once, saying the wait went before it."""
    monkeypatch.setattr(resources, "_nodes", lambda: [{"GPU": 1.0}])
    monkeypatch.setattr(resources, "POLL_S", 0.05)
    asked = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles: asked.append(1))
    wait = resources.NodesWait(0.3)
    time.sleep(0.3)  # an anti-join, say: not a wait for nodes
    began = time.monotonic()
    with pytest.raises(InsectError, match=r"does not fit the cluster after waiting 0.3 s"):
        resources.check_resources({"CPU": 1}, 1, "x", "y", wait)
    assert 0.3 <= time.monotonic() - began < 2 and asked == [1]  # the sleeps end at 0.3 s
    with pytest.raises(InsectError, match=r"after waiting 0.3 s \(all of it before this check"):
        resources.check_resources({"CPU": 1}, 2, "x", "y", wait)
    assert asked == [1]  # it asked for nothing more: no wait was left
    passed = resources.NodesWait(0.3)
    monkeypatch.setattr(resources, "_nodes", lambda: [{"CPU": 2.0}])
    resources.check_resources({"CPU": 1}, 1, "x", "y", passed)
    assert passed.waited == 0  # a check that passes at once takes nothing from the wait


def test_a_count_goes_on_once_to_the_limit_its_first_count_asks_for(tmp_path, monkeypatch):
    """At its limit the count asks how far to go on, given the count so far, once, and
    lists each path once: its weight is that of every path counted."""
    _names(tmp_path / "a", 40, chars=3)
    _names(tmp_path / "b", 40, chars=30)
    parts = inputs.plan_listing(str(tmp_path), S3)
    in_order = [p for part in parts for p in inputs.part_paths(part, S3)]
    listed, asked = [], []
    part_paths = inputs.part_paths

    def listing(part, s3):
        for path in part_paths(part, s3):
            listed.append(path)
            yield path

    def further(count):
        asked.append(count.inputs)
        return 60

    monkeypatch.setattr(inputs, "part_paths", listing)
    count = inputs.count_inputs(parts, S3, 10, further)
    assert count.inputs == 60 and asked == [10] and listed == in_order[:60]
    assert count.path_bytes == sum(map(inputs.path_bytes, in_order[:60])) / 60
    assert inputs.count_inputs(parts, S3, 10, lambda _: 5).inputs == 10
    assert inputs.count_inputs(parts, S3, 1000, further).inputs == 80 and asked == [10]


def test_the_count_goes_on_only_where_the_input_decides_the_tasks_in_flight(
    ray_local, tmp_path, monkeypatch
):
    """Past the compile thresholds' count (the largest, an actor) the driver counts on only
    for a full CPU pool of several actors, and only where MOST_COUNTED inputs can prove
    MANY_TASKS an actor: a growing pool, a GPU pool and one actor take no more listing
    (but with --embeddings a pool of several)."""
    most = max(*(n for n in shape.COMPILE_FROM.values() if n), shape.GPU_COMPILE_FROM)
    assert most <= 1200  # 4,000 inputs prove the rest
    _names(tmp_path / "in", 4000)
    names = [f"c{i}" for i in range(60)]  # blocks of a batch of 60-class rows: 5 of paths
    meta = ModelMeta(classes=names, arch="vgg16", image_size=32, model_id="0" * 16)
    parts = inputs.plan_listing(str(tmp_path / "in"), S3)

    def counted(**settings) -> int:
        cfg = ClassifyConfig(input=str(tmp_path / "in"), model="m", output="o", **settings)
        plan = pipeline.RunPlan(cfg, meta, pipeline.row_format_for(cfg, meta), parts, None)
        return pipeline.count_for_choices(plan).inputs

    assert 2400 < counted(max_actors=2, cpus_per_actor=1.0) < 4000
    assert counted(max_actors=2, cpus_per_actor=1.0, min_actors=1) == 2 * most
    assert counted(max_actors=2, gpu=True) == 2 * most
    assert counted(max_actors=1) == most
    # --embeddings: on to the whole input, to cut it into blocks that spread (a pool of
    # several actors, GPU too)
    assert counted(max_actors=2, gpu=True, embeddings=True) == 4000
    assert counted(max_actors=1, embeddings=True) == most
    monkeypatch.setattr(pipeline, "MOST_COUNTED", 2500)
    assert counted(max_actors=2, cpus_per_actor=1.0) == 2 * most
    assert counted(max_actors=2, cpus_per_actor=1.0, embeddings=True) == 2500


def test_the_first_block_is_out_before_the_listing_ends(ray_local, s3_server):
    """A flat prefix of 6,000 keys is one part listed in six requests: its first block
    reaches the consumer while its read task is still listing, with the block size of a
    large input."""
    client = s3_server.client()
    client.create_bucket(Bucket="insect-flat")
    keys = [f"flat/{i:05d}.jpg" for i in range(6000)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="insect-flat", Key=k, Body=b"x"), keys))
    parts = inputs.plan_listing("s3://insect-flat/flat", S3)
    counter = RunProgress.remote()
    ds = read_inputs(parts, 32, S3, counter, streaming_blocks(6000))
    sizes, listing_done_at_first = [], None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if listing_done_at_first is None:
            listing_done_at_first = ray.get(counter.inputs.remote(len(parts))) is not None
        sizes.append(batch.num_rows)
    assert sum(sizes) == 6000 and ray.get(counter.inputs.remote(len(parts))) == 6000
    assert listing_done_at_first is False
    assert max(sizes) <= 256  # blocks of a few batches: they spread over the model actors
    assert all(s % 32 == 0 for s in sizes[:-1])  # whole batches: none run as two


def test_the_count_weighs_paths_as_their_blocks_hold_them(tmp_path):
    """A path's weight is its bytes in a block of paths: UTF-8, and a name that is not
    UTF-8 twice (escaped to show, and as it is to read)."""
    for name in ("plain.jpg", "日本語の名前.jpg", os.fsdecode(b"caf\xe9.jpg")):
        path = os.path.join(str(tmp_path), name)
        weight = inputs.path_table([path] * 32).nbytes - inputs.path_table([""] * 32).nbytes
        assert abs(inputs.path_bytes(path) * 32 - weight) <= 8, name  # 8: a validity bitmap


def test_a_small_input_streams_blocks_of_one_whole_batch(ray_local, tmp_path):
    """Every block of a small listing is one batch of 32 paths (a part's last one
    shorter), for names of mixed lengths: none is cut inside a batch, which the model
    actors would run as two, the short one padded to a full batch when compiled."""
    for i in range(200):
        _touch(tmp_path / "in" / (f"{i:04d}.jpg" if i % 3 else f"IMG_{i:04d}_camera.jpg"))
    parts = inputs.plan_listing(str(tmp_path / "in"), S3)
    count = inputs.count_inputs(parts, S3, 10_000)
    cfg = ClassifyConfig(input=str(tmp_path / "in"), model="m", output="o", max_actors=2)
    meta = ModelMeta(classes=["a", "b"], arch="vgg16", image_size=32, model_id="0" * 16)
    ds = read_inputs(parts, 32, S3, None, streaming_block_size(cfg, meta, count))
    sizes = [len(b["path"]) for b in ds.iter_batches(batch_size=None)]
    assert sum(sizes) == 200 and sum(s != 32 for s in sizes) <= len(parts), sizes


@pytest.fixture(scope="module")
def manifests(unlabelled, tmp_path_factory, s3_server):
    """The unlabelled images listed in every manifest format, plus one missing file each."""
    where = tmp_path_factory.mktemp("manifests")
    images = sorted(unlabelled)
    missing = str(where / "gone.jpg")
    listed = [*images, missing]
    # With a byte-order mark, as Windows Notepad saves UTF-8.
    (where / "list.txt").write_text("\ufeff" + "\n".join(listed) + "\n\n", encoding="utf-8")
    with open(where / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([i, p] for i, p in enumerate(listed))
    with open(where / "list-cr.csv", "w", newline="") as f:  # Excel's "CSV (Macintosh)"
        csv.writer(f, lineterminator="\r").writerows([["path"], *([p] for p in listed)])
    pq.write_table(
        pa.table({"path": listed, "n": list(range(len(listed)))}), where / "list.parquet"
    )
    # An S3 Inventory report of a bucket with odd names, in each of its three formats.
    client = s3_server.client()
    client.create_bucket(Bucket="insect-inventory")
    keys = ["photos/with space.jpg", "photos/ünï+code.jpg", "photos/plain.jpg"]
    for key, source in zip(keys, images, strict=False):
        client.upload_file(source, "insect-inventory", key)
    gone = "photos/deleted since.jpg"
    rows = [("insect-inventory", k, "true", "false") for k in [*keys, gone, "photos/a.txt"]]
    rows.append(("insect-inventory", "photos/plain.jpg", "false", "false"))  # an old version
    rows.append(("insect-inventory", "photos/marker.jpg", "true", "true"))  # a delete marker
    schema = "Bucket, Key, IsLatest, IsDeleteMarker"
    buf = io.StringIO()
    csv.writer(buf).writerows((b, _form_encode(k), latest, m) for b, k, latest, m in rows)
    client.put_object(
        Bucket="insect-inventory",
        Key="inv/data/a.csv.gz",
        Body=gzip.compress(buf.getvalue().encode()),
    )
    table = pa.table(
        {
            "bucket": [r[0] for r in rows],
            "key": [r[1] for r in rows],
            "is_latest": [r[2] == "true" for r in rows],
            "is_delete_marker": [r[3] == "true" for r in rows],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    client.put_object(Bucket="insect-inventory", Key="inv/data/a.parquet", Body=sink.getvalue())
    sink = io.BytesIO()
    pyarrow.orc.write_table(table, sink)
    client.put_object(Bucket="insect-inventory", Key="inv/data/a.orc", Body=sink.getvalue())
    for fmt, data_key in (("CSV", "a.csv.gz"), ("Parquet", "a.parquet"), ("ORC", "a.orc")):
        manifest = {
            "sourceBucket": "insect-inventory",
            "destinationBucket": "arn:aws:s3:::insect-inventory",
            "fileFormat": fmt,
            "fileSchema": schema,
            "files": [{"key": f"inv/data/{data_key}", "size": 1, "MD5checksum": "x"}],
        }
        client.put_object(
            Bucket="insect-inventory", Key=f"inv/{fmt}/manifest.json", Body=json.dumps(manifest)
        )
    inventory = [f"s3://insect-inventory/{k}" for k in [*keys, gone]]
    return {"dir": where, "listed": listed, "missing": missing, "inventory": inventory}


def _form_encode(key: str) -> str:
    """Keys as S3 Inventory CSV reports write them (form encoding: a space is '+')."""
    return urllib.parse.quote_plus(key, safe="/")


MANIFESTS = ["list.txt", "list.csv", "list-cr.csv", "list.parquet", "CSV", "Parquet", "ORC"]


def _manifest(manifests: dict, name: str) -> tuple[str, list[str]]:
    """The manifest's URI, and the paths it names that must each get a row."""
    if name in ("CSV", "Parquet", "ORC"):  # S3 Inventory reports
        return f"s3://insect-inventory/inv/{name}/manifest.json", manifests["inventory"]
    return str(manifests["dir"] / name), manifests["listed"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_format_lists_exactly_its_inputs(manifests, name):
    """What a run's listing tasks read from each format (the read tasks Ray Data is given,
    pickled and called here, without Ray): every path once, an old version, a delete marker
    and a non-image key of an inventory left out."""
    uri, expected = _manifest(manifests, name)
    tasks = inputs.InputSource(inputs.plan_manifest(uri, S3), 4, S3).get_read_tasks(1)
    tables = [t for task in tasks for t in ray.cloudpickle.loads(ray.cloudpickle.dumps(task))()]
    listed = [p for t in tables for p in t.column("path").to_pylist()]
    assert sorted(listed) == sorted(expected)


# Through Ray: a local list and an S3 Inventory report (the formats differ only in what
# their listing tasks read, above).
@pytest.mark.parametrize("name", ["list.txt", "CSV"])
def test_manifest_inputs(trained, manifests, tmp_path, name):
    cfg, meta = trained
    uri, expected = _manifest(manifests, name)
    out = tmp_path / "out"
    s = classify(ClassifyConfig(input="", manifest=uri, model=cfg.output, output=str(out)))
    assert s.inputs == s.rows == len(expected)
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted(expected)
    missing = [p for p in expected if "gone" in p or "deleted" in p]
    assert len(missing) == 1 and "not found" in rows[missing[0]]["error"]
    assert all(rows[p]["label"] in meta.classes for p in expected if p not in missing)


def test_malformed_manifests_are_clear_errors(trained, tmp_path, capsys):
    cfg, _ = trained
    base = ["classify", "--model", cfg.output, "--output", str(tmp_path / "o")]
    (tmp_path / "rel.txt").write_text("/abs/a.jpg\nrelative/b.jpg\n")
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "rel.txt")])
    assert "rel.txt, line 2" in err and "not an absolute path" in err
    (tmp_path / "nul.txt").write_bytes(b"/abs/a.jpg\n/abs/b\0.jpg\n")
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "nul.txt")])
    assert "nul.txt, line 2: '/abs/b\\x00.jpg' holds a NUL character, which no path can" in err
    (tmp_path / "cols.csv").write_text("\ufeffPath,label\n/a.jpg,x\n")
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "cols.csv")])
    assert "cols.csv has no 'path' column (its columns: Path, label)" in err
    (tmp_path / "twice.csv").write_text("path,path\n/a.jpg,/b.jpg\n")  # /b.jpg got no row
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "twice.csv")])
    assert "twice.csv has 2 columns named 'path'" in err
    pq.write_table(pa.table({"PATH": ["/abs/a.jpg"]}), tmp_path / "upper.parquet")
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "upper.parquet")])
    assert "upper.parquet has no 'path' column (its columns: PATH)" in err
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "ints.parquet")
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "ints.parquet")])
    assert "ints.parquet: its 'path' column holds int64 values, not paths" in err
    pq.write_table(pa.table({"path": ["/abs/a.jpg", None]}), tmp_path / "null.parquet")
    # A pandas category (dictionary-encoded) column of paths, then a null in it.
    paths = pa.array(["/abs/a.jpg", None]).dictionary_encode()
    pq.write_table(pa.table({"path": paths}), tmp_path / "category.parquet")
    (tmp_path / "empty.csv").write_text("path,label\n/abs/a.jpg,x\n,y\n")
    for name in ("null.parquet", "category.parquet", "empty.csv"):
        err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / name)])
        assert f"{name}, row 2: no path in it" in err
    # A quote never closed: the rows after it would have been one path, with line breaks
    # (the old Mac's CR ones too).
    for ending in ("\n", "\r"):
        rows = ["path", "/abs/a.jpg", '"/abs/b.jpg', "/abs/c.jpg", "/abs/d.jpg"]
        (tmp_path / "quote.csv").write_bytes(ending.join(rows).encode())
        err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "quote.csv")])
        assert "quote.csv, row 2: its path holds a line break, as when a quote" in err
    (tmp_path / "x.bin").write_bytes(b"\0")
    assert "unknown format" in expect_cli_error(
        capsys, [*base, "--manifest", str(tmp_path / "x.bin")]
    )
    (tmp_path / "manifest.json").write_text('{"files": []}')
    err = expect_cli_error(capsys, [*base, "--manifest", str(tmp_path / "manifest.json")])
    assert "not an S3 Inventory manifest.json" in err
    both = ["classify", str(tmp_path), "--manifest", str(tmp_path / "rel.txt"), *base[1:]]
    assert "either INPUT or --manifest" in expect_cli_error(capsys, both)


def test_resume_with_a_large_done_set(trained, unlabelled, tmp_path):
    """5,000 inputs already have rows (in parts written as an interrupted run would have),
    24 do not: resume classifies exactly the 24, with the pool sized for them (one actor for
    one batch, nothing compiled for 24 images), and the output then holds one row each."""
    cfg, meta = trained
    folder = tmp_path / "in"
    first = sorted(unlabelled)[0]
    done_dir = folder / "done"
    done_dir.mkdir(parents=True)
    done = [str(done_dir / f"{i:05d}.jpg") for i in range(5000)]
    for path in done:
        os.link(first, path)  # distinct paths, one image on disk
    shutil.copytree(os.path.dirname(first), folder / "new")
    out = tmp_path / "out"
    out.mkdir()
    n = len(meta.classes)
    for k in range(5):
        chunk = done[k * 1000 : (k + 1) * 1000]
        table = pa.table(
            {
                "path": chunk,
                "label": [meta.classes[0]] * len(chunk),
                "label_index": pa.array([0] * len(chunk), pa.int32()),
                "score": pa.array([1.0] * len(chunk), pa.float32()),
                "probabilities": pa.array(
                    [[1.0] + [0.0] * (n - 1)] * len(chunk), pa.list_(pa.float32())
                ),
                "error": pa.array([None] * len(chunk), pa.string()),
                "model": [meta.model_id] * len(chunk),
            }
        )
        pq.write_table(table, out / f"part-{'0' * 31}{k}-000000-0.parquet")
    argv = ["classify", str(folder), "--model", cfg.output, "--output", str(out), "--resume"]
    assert main(argv) == 0
    table = pq.read_table(out, columns=["path", "score"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 5000 + len(unlabelled)
    manifest = json.loads((out / layout.SUCCESS_FILE).read_text())
    assert manifest["inputs"] == manifest["rows"] == 5000 + len(unlabelled)
    new = [p for p in paths if "/new/" in p]
    assert len(new) == len(unlabelled)
    pool = json.loads((out / layout.SUMMARY_JSON).read_text())["actor_shape"]
    assert pool["actors"] == 1 and not pool["compile"] and pool["tasks_in_flight"] == 1, pool
