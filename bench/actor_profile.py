"""Inside a model actor at steady state: where each of its two working threads spends its
time while `insect classify` runs with the default settings, sampled by py-spy (installed
with Ray) from every model actor at once.

  model thread  the thread Ray Data runs the model's calls in (`PoolPredictor`): predict
                (the batch to a tensor, the model, the softmax), the rest of the call (the
                rows, as Arrow), and waiting for its next batch
  task thread   the thread that runs the actor's tasks: reading and decoding the batch
                (`image_batch`, fused into the actor), waiting on the model thread, Ray
                Data's own work between them, and Ray core's (returning the rows, taking
                the next task) or waiting for the next task, which py-spy cannot tell apart

    .venv/bin/python bench/actor_profile.py [--images 640] [--precision bf16]
                                            [--seconds 30] [--warm-up 20]

VGG-16 at 224 px, random weights, on high-entropy 1024x768 camera JPEGs (bench/shapes.py's)
and on the shared insect photos scaled up to 1024x768, one run each; sampling starts
--warm-up seconds after the actors start (their model built, their first batches done),
and must end before the run does (more --images where it did not).
Writes bench/results/actor-profile-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import subprocess
import sys
import tempfile
import threading
import time

from common import result_path, write_result
from shapes import camera_jpegs, classify_once, insect_photos, make_model

from insectlib.model.precision import cpu_name

RATE = 50  # samples a second
WHOLE = 0.95  # of a window's samples, at least: py-spy stops early where its actor ends
ACTOR = "PoolPredictor"  # in a model actor's process title
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")  # Ray's dependency, in the venv

# (thread, what it does, the frames of a sample that say so): the first that matches
KINDS = (
    ("model thread", "predict", ("Predictor.predict (",)),
    ("model thread", "rest of the call", ("Predictor.__call__ (",)),
    ("model thread", "waiting for a batch", ()),
    ("task thread", "decoding", ("image_batch (",)),
    ("task thread", "waiting on the model", ("_SingleThreadedWrapper.__call__ (",)),
    ("task thread", "Ray Data", ("_map_task (",)),
    ("task thread", "Ray core, or waiting for a task", ()),
)


def role(stacks: list[list[str]]) -> str | None:
    """Which of the two working threads a thread is, by its samples (None: one of Ray's,
    or one decoding for the task thread)."""
    if any(frames[0].startswith("<module> (ray/_private/workers/default_worker.py")
           for frames in stacks):  # fmt: skip
        return "task thread"
    if any("Predictor.__call__ (" in f for frames in stacks for f in frames):
        return "model thread"
    return None


def what_of(thread: str, frames: list[str]) -> str:
    return next(
        what
        for kind_thread, what, marks in KINDS
        if kind_thread == thread and all(any(m in f for f in frames) for m in marks)
    )


def counts(raw: str) -> dict[str, collections.Counter]:
    """py-spy's raw output by thread (`thread (tid): name;frame;... count` a line) as
    {thread: {what: samples}}."""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        tid, *frames = stack.split(";")
        threads[tid].append((frames, int(n)))
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for samples in threads.values():
        thread = role([frames for frames, _ in samples if frames])
        for frames, n in samples if thread else ():
            found[thread][what_of(thread, frames)] += n
    return found


def split(raw: str) -> dict[str, dict[str, float]]:
    """`counts` as {thread: {what: share of its samples}}."""
    return {t: {w: n / sum(c.values()) for w, n in c.items()} for t, c in counts(raw).items()}


def actor_pids(besides: set[int]) -> set[int]:
    """This process's model actors (the bench's own cluster's), less `besides`."""
    pids = set()
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(cmdline.split("/")[2])
        try:
            if ACTOR.encode() in open(cmdline, "rb").read() and descends_from(pid, os.getpid()):
                pids.add(pid)
        except OSError:  # gone meanwhile
            continue
    return pids - besides


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
    return False


def sample_actors(args, out: str, seen: set[int], found: list) -> None:
    """Once a model actor not in `seen` (an earlier run's) exists, wait --warm-up s, then
    sample every new one for --seconds; each whole window, or the run ended first."""
    while not actor_pids(seen):
        time.sleep(0.5)
    time.sleep(args.warm_up)
    pids = sorted(actor_pids(seen))  # every actor of the pool by now
    seen.update(pids)
    spies = [spy(pid, args.seconds, f"{out}-{pid}.txt") for pid in pids]
    for pid, process in zip(pids, spies, strict=True):
        raw = open(f"{out}-{pid}.txt").read() if process.wait() == 0 else ""
        sampled = sum(counts(raw)["model thread"].values())
        if sampled >= WHOLE * args.seconds * RATE:
            found.append(split(raw))
        else:  # the run left out below
            print(f"actor {pid}: {sampled} samples, not a whole window: the run ended first")


def spy(pid: int, seconds: float, output: str) -> subprocess.Popen:
    """py-spy sampling process `pid` for `seconds`, idle threads too, into `output`."""
    argv = [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", str(RATE), "--idle", "--threads", "--format", "raw", "--output", output]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile(folder: str, model: str, out: str, args, seen: set[int]) -> dict:
    """One default classify run of `folder`, its actors sampled meanwhile."""
    actors: list = []
    sampler = threading.Thread(target=sample_actors, args=(args, out, seen, actors), daemon=True)
    sampler.start()
    summary, seconds = classify_once(folder, model, out, precision=args.precision)
    sampler.join(timeout=args.seconds + args.warm_up)
    if len(actors) < summary.shape["actors"]:
        raise SystemExit(
            "not every model actor was sampled for a whole window: give more --images (or "
            "less --warm-up, --seconds)"
        )
    return {"whole": summary.inputs / seconds, "shape": summary.shape, "actors": actors,
            "mean": mean_of(actors)}  # fmt: skip


def mean_of(actors: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The actors' shares averaged, in KINDS' order (a share an actor lacks counts as 0)."""
    mean: dict[str, dict[str, float]] = {}
    for thread, what, _ in KINDS:
        shares = [a.get(thread, {}).get(what, 0.0) for a in actors]
        if any(shares):
            mean.setdefault(thread, {})[what] = sum(shares) / len(actors)
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warm-up", type=float, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(os.path.join(tmp, "model"))
        sources = {
            "camera JPEGs": camera_jpegs(os.path.join(tmp, "camera"), args.images),
            "insect photos": insect_photos(os.path.join(tmp, "photos"), args.images),
        }
        seen: set[int] = set()  # the actors of the runs before
        for name, folder in sources.items():
            if folder:
                out = os.path.join(tmp, f"out-{len(runs)}")
                runs[name] = profile(folder, model, out, args, seen)
                print(name, runs[name]["mean"], flush=True)
    write_result(
        args.out or result_path("actor-profile"),
        {
            "benchmark": "actor_profile",
            "images": args.images,
            "precision": args.precision,
            "seconds": args.seconds,
            "warm_up": args.warm_up,
            "model": "vgg16 224 px",
            "cpu": cpu_name(),
            "kinds": [[thread, what] for thread, what, _ in KINDS],  # the page's rows
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
