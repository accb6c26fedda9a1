"""What a run's Ray workers tell the driver while it runs: lines for the user's console
(training's epoch lines come from rank 0 but are printed by the driver, so they reach the
console and not the log) and counts (images listed and classified, each listing part's
total), and which actors work for the run. One `RunProgress` actor per run, on the
driver's node; `follow` polls it from a thread of the driver.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from insectlib.runtime import console

POLL_S = 0.5
logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class RunProgress:
    """Lines to print and counts by name; each listing part's total, set once per part
    (a retried part sets it again, never twice); the run's model actors, for the driver
    to stop at the end (an actor the pool lets go of mid-run lives on until then)."""

    def __init__(self):
        self.lines: list[str] = []
        self.counts: dict[str, int] = {}
        self.part_totals: dict[int, int] = {}
        self.actors: list = []  # handles: kept alive until `leave_all`, however idle
        self.ended = False

    def joined(self, actor) -> None:
        """`actor` works for this run; one that joins after the run's end is stopped."""
        if self.ended:
            ray.kill(actor)
        else:
            self.actors.append(actor)

    def leave_all(self) -> list:
        """The run has ended: the actors that joined, forgotten here."""
        self.ended = True
        actors, self.actors = self.actors, []
        return actors

    def say(self, line: str) -> None:
        self.lines.append(line)

    def add(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def set_part_total(self, part: int, n: int) -> None:
        self.part_totals[part] = n

    def poll(self) -> tuple[list[str], dict[str, int]]:
        """The lines said since the last poll, and every count."""
        lines, self.lines = self.lines, []
        return lines, dict(self.counts)

    def inputs(self, parts: int) -> int | None:
        """Every part's total, summed; None while a part has not finished."""
        if len(self.part_totals) < parts:
            return None
        return sum(self.part_totals.values())


def start() -> ray.actor.ActorHandle:
    """A RunProgress on the driver's node: the run outlives any other node (a lost worker
    node must not take the counts, and the listing tasks that report to it, along)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RunProgress.options(scheduling_strategy=here).remote()


def join_run(progress) -> None:
    """Tell `progress` that the calling Ray actor works for its run; waits for the answer,
    so that an actor still building its model can be stopped."""
    ray.get(progress.joined.remote(ray.get_runtime_context().current_actor))


def stop_actors(progress, timeout_s: float = 30) -> None:
    """Stop the actors that joined the run. Ray Data's failed execution leaves a model actor
    waiting, holding its CPUs, for the consumer of its block, which is gone: a second run
    in the same process would wait for those CPUs forever."""
    try:
        actors = ray.get(progress.leave_all.remote(), timeout=timeout_s)
    except ray.exceptions.RayError as e:  # the cluster may be gone after a failure
        logger.warning("could not stop the run's actors: %s", e)
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except ray.exceptions.RayError as e:
            logger.warning("could not stop actor %s: %s", actor, e)


def tell(progress, line: str) -> None:
    """Say `line` on the driver's console through `progress`, or here without one."""
    if progress is None:
        console.say(line)
    else:
        progress.say.remote(line)


@contextlib.contextmanager
def follow(progress, on_counts: Callable[[dict[str, int]], None] | None = None) -> Iterator[None]:
    """While the block runs, print the lines said to `progress` and pass its counts to
    `on_counts`, every POLL_S; once more at the end."""
    stop = threading.Event()

    def poll_once():
        lines, counts = ray.get(progress.poll.remote())
        for line in lines:
            console.say(line)
        if on_counts is not None:
            on_counts(counts)

    def loop():
        while not stop.wait(POLL_S):
            poll_once()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # the cluster may be gone after a failure
            poll_once()
