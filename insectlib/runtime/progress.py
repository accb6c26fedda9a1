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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from insectlib.runtime import console

POLL_S = 0.5
# The end of a run waits this long for its last lines: the cluster may be gone (a SIGTERM to
# the command's process group stops the Ray it started too), and Ray's get waited for good.
POLL_TIMEOUT_S = 5.0
# A write under way renews its lease every WRITE_RENEW_S; `end` waits while any lease is
# younger than WRITE_LEASE_S. A writer that died (or whose end was cancelled with its task)
# stops renewing: the run's end waits for it that long, not for good, and one that is alive
# is waited for however long its retries take.
WRITE_RENEW_S = 5.0
WRITE_LEASE_S = 30.0
WAIT_SAID_S = 10.0  # a wait for the writes this long is said on the console
T = TypeVar("T")
logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class RunProgress:
    """Lines to print and counts by name; each listing part's total, set once per part
    (a retried part sets it again, never twice); the run's model actors, for the driver
    to stop at the end (an actor the pool lets go of mid-run lives on until then); the
    writes under way, none begun after the end (see `fenced`)."""

    def __init__(self):
        self.lines: list[str] = []
        self.counts: dict[str, int] = {}
        self.part_totals: dict[int, int] = {}
        self.actors: list = []  # handles: kept alive until `end`, however idle
        self.ended = False
        self.writing: dict[str, float] = {}  # a write's lease: when it was last renewed
        self.began = 0

    def joined(self, actor) -> None:
        """`actor` works for this run; one that joins after the run's end is stopped."""
        if self.ended:
            ray.kill(actor)
        else:
            self.actors.append(actor)

    def end(self) -> list:
        """The run has ended: no write begins from now on. The actors that joined,
        forgotten here."""
        self.ended = True
        actors, self.actors = self.actors, []
        return actors

    def begin_write(self, name: str) -> str | None:
        """The lease of a write of `name` (each attempt its own: a retried task's and a
        lost one's are two), or None once the run has ended: the write must not begin."""
        if self.ended:
            return None
        self.began += 1
        lease = f"{name} #{self.began}"
        self.writing[lease] = time.monotonic()
        return lease

    def renew_write(self, lease: str) -> None:
        if lease in self.writing:
            self.writing[lease] = time.monotonic()

    def end_write(self, lease: str) -> None:
        self.writing.pop(lease, None)

    def writes(self, lease_s: float = WRITE_LEASE_S) -> tuple[int, list[str]]:
        """The writes under way (begun, not ended, renewed within `lease_s`), and the
        leases of those that stopped renewing without ending."""
        now = time.monotonic()
        lost = [lease for lease, renewed in self.writing.items() if now - renewed >= lease_s]
        return len(self.writing) - len(lost), lost

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


def end(progress, timeout_s: float = 30, lease_s: float = WRITE_LEASE_S) -> None:
    """End the run, finished or failed: no write of it begins any more, its actors are
    stopped, and the writes under way are waited for. Ray Data's failed execution leaves a
    model actor waiting, holding its CPUs, for the consumer of its block, which is gone (a
    second run in the same process would wait for those CPUs forever), and a write task
    going: its part could land after the driver had reported the failure, under the rows
    a --resume writes again."""
    try:
        actors = ray.get(progress.end.remote(), timeout=timeout_s)
    except ray.exceptions.RayError as e:  # the cluster may be gone after a failure
        logger.warning("could not end the run: %s", e)
        actors = []
    for actor in actors:
        try:
            ray.kill(actor)
        except ray.exceptions.RayError as e:
            logger.warning("could not stop actor %s: %s", actor, e)
    wait_for_writes(progress, lease_s)


def wait_for_writes(progress, lease_s: float = WRITE_LEASE_S, timeout_s: float = 60) -> None:
    """Wait while a write of the run holds a lease renewed within `lease_s` (said on the
    console once it takes WAIT_SAID_S); `timeout_s`: for each answer of the run's actor."""
    started, said = time.monotonic(), False
    try:
        while True:
            under_way, lost = ray.get(progress.writes.remote(lease_s), timeout=timeout_s)
            if not under_way:
                break
            if not said and time.monotonic() - started > WAIT_SAID_S:
                console.warn(f"waiting for {under_way} part(s) under way to be written")
                said = True
            time.sleep(POLL_S)
    except ray.exceptions.RayError as e:  # no RunProgress: no write can begin or renew
        logger.warning("could not wait for the run's writes: %s", e)
        return
    if lost:  # a writer that died, or was cut off: what it wrote, if anything, may land late
        logger.warning("writes that stopped renewing their lease: %s", ", ".join(lost))


def fenced(progress, name: str, write: Callable[[], T]) -> T | None:
    """`write()` as a write of `name` by `progress`'s run, from a Ray task: None, not begun,
    once the run has ended; once begun, its lease renewed until it ends, even when Ray
    cancels the task meanwhile (a cancelled wait would leave it going in a library's I/O
    thread, to land after `end` had returned)."""
    held: list[str] = []

    def fenced_write() -> T | None:
        lease = ray.get(progress.begin_write.remote(name))
        if lease is None:
            return None
        held.append(lease)
        try:
            return write()
        finally:
            progress.end_write.remote(lease)

    def renew() -> None:
        for lease in held:
            progress.renew_write.remote(lease)

    return uninterrupted(fenced_write, renew)


def uninterrupted(fn: Callable[[], T], every: Callable[[], object] | None = None) -> T:
    """`fn()` on a thread of its own, waited for to its end through KeyboardInterrupts (Ray's
    way to cancel a running task; it arrives as a wait ends), which are raised again once
    it has ended; `every()` each WRITE_RENEW_S meanwhile."""
    interrupted = False

    def step(do: Callable[[], object]) -> None:
        nonlocal interrupted
        try:
            do()
        except KeyboardInterrupt:
            interrupted = True

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        while not future.done():
            step(lambda: wait([future], timeout=WRITE_RENEW_S))
            if every is not None and not future.done():
                step(every)
    if interrupted and future.exception() is None:
        raise KeyboardInterrupt
    return future.result()


def tell(progress, line: str) -> None:
    """Say `line` on the driver's console through `progress`, or here without one."""
    if progress is None:
        console.say(line)
    else:
        progress.say.remote(line)


@contextlib.contextmanager
def follow(progress, on_counts: Callable[[dict[str, int]], None] | None = None) -> Iterator[None]:
    """While the block runs, print the lines said to `progress` and pass its counts to
    `on_counts`, every POLL_S; at the end, once more (the poll under way, then a new one),
    waiting POLL_TIMEOUT_S at most for each."""
    stop = threading.Event()
    pending: list[ray.ObjectRef] = []  # a poll sent and not answered: the lines are in it

    def poll(timeout_s: float) -> bool:
        """Print what the poll under way, or a new one, answers within `timeout_s`;
        whether it answered (one not answered stays under way: none is let go)."""
        if not pending:
            pending.append(progress.poll.remote())
        if not ray.wait(pending, timeout=timeout_s)[0]:
            return False
        lines, counts = ray.get(pending.pop())
        for line in lines:
            console.say(line)
        if on_counts is not None:
            on_counts(counts)
        return True

    def loop():
        while not stop.wait(POLL_S):
            try:
                poll(POLL_S)
            except Exception as e:  # a Ray gone, a closed console: the run's end says why
                logger.warning("could not follow the run: %s", e)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        under_way = bool(pending)  # then one more: the lines said since it was sent
        try:  # the cluster may be gone: the block's own exception is the one to raise
            if not (poll(POLL_TIMEOUT_S) and (not under_way or poll(POLL_TIMEOUT_S))):
                logger.warning("the run's last lines did not come in %s s", POLL_TIMEOUT_S)
        except Exception as e:  # as above: logged, for the block's own exception
            logger.warning("could not read the run's last lines: %s", e)
