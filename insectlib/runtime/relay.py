"""The console of a command whose driver's part runs on the cluster (through a Ray Client
address): insect's own lines come back through a queue and are written here as a local run
writes them, while whatever else the cluster's processes print (which Ray streams to a
client prefixed with their pid, in colour) goes to the command's log on this machine."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import ray
from ray.util.queue import Queue

from insectlib.errors import RunStopped
from insectlib.runtime import console

T = TypeVar("T")
POLL_S = 0.2  # how often the client looks for lines; a line's delay, at most
STREAMS = {"out": console.out, "err": console.err}
WAY_ON = "way on"  # the queue's item for the way on, beside the streams' names


class QueueStream:
    """A console stream of the driver's part on the cluster: what is written is put on
    the queue at each flush (`print(..., flush=True)`, a progress bar's redraw), as one
    item, so a line and its newline arrive together. Should the queue be gone (its actor's
    process or node lost), the process's own stream takes the text, which Ray streams to
    the client's log: the run goes on."""

    encoding = "utf-8"  # what the client's console is written in (tqdm draws by it)

    def __init__(self, lines: Queue, name: str, terminal: bool):
        self.lines, self.name, self.terminal = lines, name, terminal
        self.text: list[str] = []
        self.lock = threading.Lock()  # the progress thread writes too

    def write(self, text: str) -> int:
        with self.lock:
            self.text.append(text)
        return len(text)

    def flush(self) -> None:
        with self.lock:
            text, self.text = "".join(self.text), []
        if not text:
            return
        try:
            self.lines.put_nowait((self.name, text))
        except ray.exceptions.RayError:
            stream = sys.__stdout__ if self.name == "out" else sys.__stderr__
            stream.write(text)
            stream.flush()

    def isatty(self) -> bool:  # the client's console, where the bar is drawn
        return self.terminal


def relayed(fn: Callable[..., T], cfg, lines: Queue, terminal: bool, **kwargs) -> T:
    """`fn(cfg, **kwargs)` with its console lines and its way on (what a Ctrl-C or the
    last words say) put on `lines` (run on the cluster)."""
    streams = {name: QueueStream(lines, name, terminal) for name in STREAMS}

    def flush() -> None:
        for stream in streams.values():
            stream.flush()

    def way_on(hint: str) -> None:
        flush()  # the lines before it first
        with contextlib.suppress(ray.exceptions.RayError):  # the queue gone: none to say
            lines.put_nowait((WAY_ON, hint))

    with console.writing_to(streams["out"], streams["err"], way_on):
        try:
            return fn(cfg, **kwargs)
        finally:
            flush()


def run_relayed(fn: Callable[..., T], cfg, **kwargs) -> T:
    """`fn(cfg, **kwargs)` as a zero-CPU task on the cluster this Ray Client is connected
    to, its console lines written here as they come; its result, or its error."""
    # The queue's actor ends with the client's session, as the task does.
    with console.on_interrupt("") as way_on:  # the part on the cluster says its own
        try:
            lines = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(num_cpus=0, max_retries=0, name=fn.__name__)(relayed)
            result = task.remote(fn, cfg, lines, console.is_terminal(), **kwargs)
            done, relaying = False, True
            while not done:
                done = bool(ray.wait([result], timeout=POLL_S)[0])
                # After the task's end, its last lines too.
                relaying = relaying and _write(lines, way_on)
            return ray.get(result)
        except BrokenPipeError:  # this console's (`| head`): as a local run's
            raise
        except ConnectionError as e:  # Ray Client's, its server (the head) gone mid-run
            raise RunStopped(
                f"lost the connection to the cluster (Ray Client: {e}), the run with it"
            ) from None


def _write(lines: Queue, way_on: Callable[[str], None]) -> bool:
    """Write the lines waiting on the queue, and take the way on it says; False, once
    said, where its actor is gone: the run goes on, its lines from then on in the log."""
    try:
        waiting = lines.qsize()
        batch = lines.get_nowait_batch(waiting) if waiting else []
    except ray.exceptions.RayActorError as e:
        why = str(e).strip().splitlines()[0]
        console.warn(
            f"the run goes on, its lines in the log from now on: their queue's actor died ({why})"
        )
        return False
    for name, text in batch:
        if name == WAY_ON:
            way_on(text)
            continue
        stream = STREAMS[name]()
        stream.write(text)
        stream.flush()
    return True
