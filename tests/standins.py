"""Stand-ins that the tests' Ray workers run. A worker imports the module of the class it
runs, and a test module imports torch (seconds of CPU in every such worker): this one
imports numpy only."""

from __future__ import annotations

import os

import numpy as np


class ModelStandIn:
    """A model actor's stand-in (for Ray Data's count of the tasks it ran)."""

    def __call__(self, batch):
        return {"n": np.array([len(batch["path"])] * len(batch["path"]))}


class DyingActor:
    """An actor whose process dies at its first batch (as a node going does)."""

    def __call__(self, batch):
        os._exit(1)


def console_lines(cfg: int | None) -> int:
    """A driver's part that writes as insect's do (a line, a warning, a bar's redraws, a
    last write never flushed), then returns `cfg` doubled (None: fails, after writing)."""
    from insectlib.runtime import console

    console.say("planned")
    console.warn("a warning")
    for i in (1, 2):
        console.err().write(f"\rbar {i}/2")
        console.err().flush()
    console.err().write(f"\nterminal: {console.is_terminal()}\n")
    return cfg * 2


def lines_after_their_queue_died(cfg: int) -> int:
    """A driver's part whose relay queue's actor dies under it (as on a node lost): it
    says a line after, and returns `cfg`."""
    import ray

    from insectlib.runtime import console

    ray.kill(console.out().lines.actor)
    console.say("after")
    return cfg


def part_with_a_way_on(cfg: float) -> None:
    """A driver's part that says how to go on, then a line, then runs `cfg` seconds."""
    import time

    from insectlib.runtime import console

    with console.on_interrupt("the way on"):
        console.say("ready")
        time.sleep(cfg)
