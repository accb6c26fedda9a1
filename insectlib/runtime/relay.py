"""The console of a command whose driver's part runs on the cluster (through a Ray Client
address): insect's own lines come back through a queue and are written here as a local run
writes them, while whatever else the cluster's processes print (which Ray streams to a
client prefixed with their pid, in colour) goes to the command's log on this machine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import ray
from ray.util.queue import Queue

from insectlib.runtime import console

T = TypeVar("T")
POLL_S = 0.2  # how often the client looks for lines; a line's delay, at most
STREAMS = {"out": console.out, "err": console.err}


class QueueStream:
    """A console stream of the driver's part on the cluster: what is written is put on
    the queue at each flush (`print(..., flush=True)`, a progress bar's redraw), as one
    item, so a line and its newline arrive together."""

    encoding = "utf-8"  # what the client's console is written in (tqdm draws by it)

    def __init__(self, lines: Queue, name: str, terminal: bool):
        self.lines, self.name, self.terminal = lines, name, terminal
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        if self.text:
            text, self.text = "".join(self.text), []
            # The client gone (its session ended), the run's own end is not held up by it.
            with contextlib.suppress(ray.exceptions.RayError):
                self.lines.put_nowait((self.name, text))

    def isatty(self) -> bool:  # the client's console, where the bar is drawn
        return self.terminal


def relayed(fn: Callable[..., T], cfg, lines: Queue, terminal: bool, **kwargs) -> T:
    """`fn(cfg, **kwargs)` with its console lines put on `lines` (run on the cluster)."""
    streams = {name: QueueStream(lines, name, terminal) for name in STREAMS}
    with console.writing_to(streams["out"], streams["err"]):
        try:
            return fn(cfg, **kwargs)
        finally:
            for stream in streams.values():
                stream.flush()


def run_relayed(fn: Callable[..., T], cfg, **kwargs) -> T:
    """`fn(cfg, **kwargs)` as a zero-CPU task on the cluster this Ray Client is connected
    to, its console lines written here as they come; its result, or its error."""
    # The queue's actor ends with the client's session, as the task does.
    lines = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(num_cpus=0, max_retries=0, name=fn.__name__)(relayed)
    result = task.remote(fn, cfg, lines, console.is_terminal(), **kwargs)
    done = False
    while not done:
        done = bool(ray.wait([result], timeout=POLL_S)[0])
        _write(lines)  # after the task's end, its last lines too
    return ray.get(result)


def _write(lines: Queue) -> None:
    waiting = lines.qsize()
    for name, text in lines.get_nowait_batch(waiting) if waiting else ():
        stream = STREAMS[name]()
        stream.write(text)
        stream.flush()
