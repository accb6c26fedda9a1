"""The model-actor pool's shape: the rule for each CPU and precision (docs/performance.md
holds the measurements it follows), and what overrides it."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time

import pytest

from insectlib.classify import shape
from insectlib.config import ClassifyConfig
from tests.conftest import REPO

ZEN3 = frozenset({"avx2", "fma"})  # AVX2 only: fp32, and int8 on vpmaddubsw
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_int8"}
TWO_CORES = shape.Cluster(cpus=2, gpus=0, node_cpus=(2,))
BIG = 32 * 1000  # enough inputs for any pool
NOISE = 0.05  # of the model alone's time per image: a compile that gains less gains nothing


def _cfg(**settings) -> ClassifyConfig:
    return ClassifyConfig(input="in", model="m", output="o", **settings)


@pytest.mark.parametrize(
    ("flags", "precision", "threads"),
    [
        (ZEN3, "fp32", 1),  # AVX2 only
        (ZEN3, "int8", 1),
        (ZEN4, "fp32", 2),  # AVX-512: threads share the fp32 weights
        (ZEN4, "bf16", 1),
        (ZEN4, "int8", 1),
        (SAPPHIRE_RAPIDS, "fp32", 2),
        (SAPPHIRE_RAPIDS, "bf16", 1),  # AMX tiles, one thread per actor all the same
        (SAPPHIRE_RAPIDS, "int8", 1),
    ],
)
def test_threads_follow_the_precision_and_the_cpu(flags, precision, threads):
    pool = shape.choose(_cfg(), precision, TWO_CORES, BIG, flags)
    assert (pool.actors, pool.cpus_per_actor) == (2 // threads, threads)
    assert precision in pool.why and str(pool.actors) in pool.line()


def test_many_cores_get_several_actors_of_at_most_most_threads():
    node = shape.Cluster(cpus=64, gpus=0, node_cpus=(16,) * 4)
    pool = shape.choose(_cfg(), "fp32", node, BIG, ZEN4)
    assert pool.cpus_per_actor == shape.MOST_THREADS and pool.actors == 64 // shape.MOST_THREADS
    assert shape.choose(_cfg(), "bf16", node, BIG, SAPPHIRE_RAPIDS).actors == 64


@pytest.mark.parametrize(
    ("cluster", "batches", "actors", "threads"),
    [
        (TWO_CORES, 1, 1, 2),  # one batch: one actor, both cores its threads
        (TWO_CORES, 2, 2, 1),
        (shape.Cluster(16, 0, (16,)), 5, 5, 3),
        (shape.Cluster(16, 0, (16,)), 1, 1, 4),  # MOST_THREADS
        (shape.Cluster(2, 0, (2,), free_cpus=1.9), 1, 1, 1),  # a CPU other runs hold
        (shape.Cluster(16, 0, (16,), free_cpus=3.9), 1, 1, 3),
        (shape.Cluster(2.5, 0, (2,)), 1, 1, 1),  # and a node of half a CPU
        # Several nodes: an actor restarted after losing a node must fit on the others.
        (shape.Cluster(20, 0, (16, 4)), 2, 2, 1),
    ],
)
def test_fewer_batches_than_cpus_share_a_nodes_free_cpus_out(cluster, batches, actors, threads):
    pool = shape.choose(_cfg(), "fp32", cluster, 32 * batches - 5, ZEN3)
    assert (pool.actors, pool.cpus_per_actor) == (actors, threads)
    shared = "fp32: fewer batches than CPUs, their actors share them as threads"
    assert (pool.why == shared) == (threads > 1)
    big = shape.choose(_cfg(), "fp32", cluster, BIG, ZEN3)
    assert (big.actors, big.cpus_per_actor) == (sum(cluster.node_cpus), 1.0)


def test_only_a_small_input_shares_the_cpus_out():
    """--max-actors keeps the rule's threads (it bounds what a run takes of a shared
    cluster); a full fp32 pool keeps MOST_THREADS even where CPUs are left over; a small
    input's actors share a node's CPUs out, MOST_THREADS each at most."""
    pool = shape.choose(_cfg(max_actors=1), "fp32", TWO_CORES, BIG, ZEN3)
    assert (pool.actors, pool.cpus_per_actor) == (1, 1.0)
    six = shape.Cluster(6, 0, (6,))
    fp32 = shape.choose(_cfg(), "fp32", six, BIG, ZEN4)
    assert (fp32.actors, fp32.cpus_per_actor) == (1, 4.0)
    assert fp32.why == "fp32 on this CPU: threads share the weights"
    nodes = shape.Cluster(18, 0, (6, 6, 6))  # 4 actors of 4 would not fit on them
    assert shape.choose(_cfg(), "fp32", nodes, BIG, ZEN4).actors == 3
    one = shape.choose(_cfg(), "bf16", shape.Cluster(8, 0, (8,)), 20, SAPPHIRE_RAPIDS)
    assert (one.actors, one.cpus_per_actor) == (1, 4.0)
    assert one.why == "bf16: fewer batches than CPUs, their actors share them as threads"


def test_flags_override_the_rule_and_small_inputs_get_fewer_actors():
    pool = shape.choose(_cfg(max_actors=1, cpus_per_actor=2.0), "fp32", TWO_CORES, BIG, ZEN3)
    assert (pool.actors, pool.cpus_per_actor) == (1, 2.0)
    assert "--cpus-per-actor" in pool.why and "--max-actors" in pool.why
    assert shape.choose(_cfg(), "fp32", TWO_CORES, 20, ZEN3).actors == 1  # one batch
    gpu = shape.choose(_cfg(gpu=True), "bf16", shape.Cluster(32, 4, (8,) * 4), BIG, ZEN4)
    assert (gpu.actors, gpu.cpus_per_actor, gpu.why) == (4, 1.0, "one actor per GPU")


def test_compile_auto_pays_only_on_long_enough_runs():
    for precision, flags in (("fp32", ZEN3), ("fp32", ZEN4), ("bf16", SAPPHIRE_RAPIDS)):
        threshold = shape.COMPILE_FROM[shape.compile_kind(precision, flags)]
        actors = shape.choose(_cfg(), precision, TWO_CORES, BIG, flags).actors
        short = shape.choose(_cfg(), precision, TWO_CORES, threshold * actors - 1, flags)
        long = shape.choose(_cfg(), precision, TWO_CORES, threshold * actors, flags)
        assert not short.compile and long.compile
    gpus = shape.Cluster(cpus=8, gpus=2, node_cpus=(8,))
    limit = shape.GPU_COMPILE_FROM * 2
    assert not shape.choose(_cfg(gpu=True), "bf16", gpus, limit - 1, ZEN3).compile
    assert shape.choose(_cfg(gpu=True), "bf16", gpus, limit, ZEN3).compile
    # bf16 on Zen 4's vector units gained nothing compiled: never on its own, still on
    # request.
    assert not shape.choose(_cfg(), "bf16", TWO_CORES, BIG * 100, ZEN4).compile
    assert shape.choose(_cfg(compile="on"), "bf16", TWO_CORES, 32, ZEN4).compile
    assert shape.choose(_cfg(compile="on"), "fp32", TWO_CORES, 32, SAPPHIRE_RAPIDS).compile
    assert shape.choose(_cfg(compile="on"), "fp32", TWO_CORES, 32, ZEN3).compile
    assert shape.choose(_cfg(), "int8", TWO_CORES, 32, ZEN3).compile  # int8 runs compiled


def _performance_page():
    path = REPO / "bench" / "performance_page.py"
    spec = importlib.util.spec_from_file_location("performance_page", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_compile_threshold_follows_the_measured_break_even():
    """COMPILE_FROM is within 25% of where compiling repaid its start-up in the shape the
    rule picks (the median over the committed bench/shapes.py results that measured both
    ways, for the kind of CPU and precision); None where compiling saved less than the
    bench's noise per image (the median again: single runs moved from -5% to +9%)."""
    page, measured = _performance_page(), {}
    for path in sorted((REPO / "bench" / "results").glob("shapes-*.json")):
        data = json.loads(path.read_text())
        flags, cluster = _machine(data)
        for precision in data["precisions"]:
            pool = shape.choose(_cfg(), precision, cluster, BIG, flags)
            key = f"{pool.actors}x{pool.cpus_per_actor:g}"
            found = page.compile_break_even(data, precision, key)
            if found:
                extra, saved, _ = found
                eager = data["model_alone"][f"{precision} eager"][key] / pool.actors
                kind = shape.compile_kind(precision, flags)
                break_even = extra / saved if saved > 0 else float("inf")
                measured.setdefault(kind, []).append((break_even, saved * eager))
    assert set(measured) >= {"compute-bound", "fast arithmetic, AMX", "fast arithmetic"}
    for kind, found in measured.items():
        break_even = statistics.median(b for b, _ in found)
        gain = statistics.median(g for _, g in found)
        threshold = shape.COMPILE_FROM[kind]
        if threshold is None:
            assert gain < NOISE, (kind, found)
        else:
            assert gain >= NOISE and 0.75 < threshold / break_even < 1.25, (kind, found)


def _machine(data: dict) -> tuple[frozenset[str], shape.Cluster]:
    """The CPU flags and the one-node cluster of the machine a result was measured on."""
    flags = frozenset(data["machine"].rsplit("(", 1)[1].rstrip(")").split())
    cores = int(data["machine"].split(", ")[-1].split()[0])
    return flags, shape.Cluster(cpus=cores, gpus=0, node_cpus=(cores,))


def _measured_shapes(data: dict, precision: str) -> dict[tuple[str, bool], float]:
    """{("AxT", compiled): classify's best steady rate} on the camera JPEGs of one result."""
    rates: dict[tuple[str, bool], float] = {}
    for key, run in data["classify"].items():
        if key.startswith(f"{precision} camera "):
            tried = (
                f"{run['shape']['actors']}x{run['shape']['cpus_per_actor']:g}",
                run["shape"]["compile"],
            )
            rates[tried] = max(rates.get(tried, 0.0), run["steady"])
    return rates


def test_the_rule_picks_a_shape_that_classified_fastest():
    """On every CPU with a committed bench/shapes.py result, the shape the rule picks for
    each precision classified within 10% of the fastest shape tried there compiled alike
    (a compiled run against an eager one compares compiling, not shapes), and, in a result
    of 3 rounds or more, had the highest median. Where a CPU and precision have results
    whose runs record their tasks in flight, only those count: the older ones were made
    before a full pool of several actors got 2 tasks each, which its actors waited without."""
    results: dict[tuple, list] = {}
    for path in sorted((REPO / "bench" / "results").glob("shapes-*.json")):
        data = json.loads(path.read_text())
        current = all("tasks_in_flight" in run["shape"] for run in data["classify"].values())
        flags, cluster = _machine(data)
        for precision in data["precisions"]:
            results.setdefault((flags, precision), []).append((current, path.name, data, cluster))
    compared = []
    for (flags, precision), found in results.items():
        newest = [r for r in found if r[0]] or found
        for _, name, data, cluster in newest:
            pool = shape.choose(_cfg(), precision, cluster, BIG, flags)
            picked = f"{pool.actors}x{pool.cpus_per_actor:g}"
            rates = _measured_shapes(data, precision)
            for (tried, compiled), rate in rates.items():
                alike = [r for (_, c), r in rates.items() if c == compiled]
                if tried == picked and len(alike) > 1:
                    assert rate >= 0.9 * max(alike), (name, precision, rates)
                    if data.get("rounds", 1) >= 3:
                        assert rate == max(alike), (name, precision, rates)
                    compared.append((name, precision))
    assert len({name for name, _ in compared}) >= 5 and len(compared) >= 9


def test_the_free_cpus_are_read_again_until_ray_counts_those_given_back(monkeypatch):
    """Ray's count of free CPUs lags CPUs just given back (a resume's anti-join): a
    reading under the total is taken again, for at most the time allowed."""
    import ray

    from insectlib.classify import pipeline

    readings = iter([{"CPU": 1.0}, {}, {"CPU": 1.99}, {"CPU": 2.0}, {"CPU": 0.0}])
    monkeypatch.setattr(ray, "available_resources", lambda: next(readings))
    assert pipeline.free_cpus(2.0) == 2.0
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    assert pipeline.free_cpus(2.0, settle_s=0.3) == 1.0  # another run holds one


def test_only_a_cluster_of_one_node_waits_for_its_free_cpus(monkeypatch):
    """The free CPUs are shared out on one node only: elsewhere nothing waits to read them."""
    import ray

    from insectlib.classify import pipeline

    def node(cpus):
        return {"Alive": True, "Resources": {"CPU": cpus}}

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "nodes", lambda: [node(2.0)])
    assert pipeline.cluster_size() == shape.Cluster(2.0, 0, (2,), 1.0)
    monkeypatch.setattr(ray, "nodes", lambda: [node(2.0), node(2.0)])
    began = time.monotonic()
    assert pipeline.cluster_size() == shape.Cluster(4.0, 0, (2, 2))
    assert time.monotonic() - began < 0.5


def _bench(name: str):
    """A bench/ script as a module (its own imports from bench/ found)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_the_actor_profile_sorts_each_threads_samples_by_what_it_does():
    """bench/actor_profile.py's reading of py-spy's raw output (`--threads`): the task
    thread, the model thread, and the actor's other threads (a decoding pool's, Ray's)
    left out."""
    worker = "thread (1): MainThread;<module> (ray/_private/workers/default_worker.py:323)"
    task = f"{worker};Worker.main_loop (ray/_private/worker.py:1069);_map_task (m.py:879)"
    pool = "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83)"
    model = f"thread (2): ThreadPoolExecutor-0_0;{pool}"
    raw = "\n".join([
        f"{model};_WorkItem.run (c.py:58);Predictor.__call__ (p.py:198);Predictor.predict (p.py:160);Conv2d.forward (c.py:565) 90",  # noqa: E501
        f"{model};_WorkItem.run (c.py:58);Predictor.__call__ (p.py:200) 2",
        "thread (2): ThreadPoolExecutor-0_0;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 8",  # noqa: E501
        f"{task};image_batch (d.py:68);ImageFile.load (PIL/ImageFile.py:425) 6",
        f"{task};_SingleThreadedWrapper.__call__ (u.py:123);Condition.wait (t.py:327) 92",
        f"{task};pickle (p.py:1) 1",
        f"{worker};Worker.main_loop (ray/_private/worker.py:1069) 1",
        f"thread (3): ThreadPoolExecutor-1_0;{pool};decode (insectlib/data/images.py:9) 50",
        "thread (4): Thread-2;Thread.run (threading.py:982);PythonGCThread.run (g.py:29) 100",
    ])  # fmt: skip
    got = _bench("actor_profile").split(raw)
    assert got == {
        "model thread": {"predict": 0.9, "rest of the call": 0.02, "waiting for a batch": 0.08},
        "task thread": {
            "decoding": 0.06, "waiting on the model": 0.92, "Ray Data": 0.01,
            "Ray core, or waiting for a task": 0.01,
        },
    }  # fmt: skip
