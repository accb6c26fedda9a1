"""The console is the user's: insect's own lines (the plan, one line per epoch, one progress
bar, the result, warnings that matter). Everything else a command's process prints (Ray's
startup and worker lines, its C++ core's warnings, torch's and the libraries' warnings)
goes to a log file, whose path is said once; `--verbose` keeps it all on the console.

How: a command run from the CLI names its log (`command_log`); when Ray starts
(`runtime.connect.init_ray` calls `start_log`), the process's file descriptors 1 and 2 are
pointed at that file, which catches what Python, C++ and forwarded worker output write
there, while insect writes through `say` and `warn` to copies of the original descriptors.
Everything before Ray starts (the checks, their errors) stays on the console. Without a
command log (a library call, a test) `say` and `warn` print to sys.stdout and sys.stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from insectlib import layout, storage
from insectlib.errors import RunStopped
from insectlib.runtime import last_words

_streams: dict[str, TextIO] = {}  # "out", "err": the user's console while a log is open
_watcher: list[tuple[subprocess.Popen, int]] = []  # `last_words`' process and its pipe
_hints: list[str] = []  # how to go on, of each `on_interrupt` block the command is in
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_commands: list[dict] = []  # the running command's log: {"path", "stack"}
_listeners: list[Callable[[str], None]] = []  # told the way on as it changes (`writing_to`)


def out() -> TextIO:
    """Where insect's own lines go."""
    return _streams.get("out", sys.stdout)


def err() -> TextIO:
    """Where insect's warnings, errors and progress bar go."""
    return _streams.get("err", sys.stderr)


_advice = [True]  # whether lines may name flags of the command (the demo's runs have none)


@contextlib.contextmanager
def without_advice() -> Iterator[None]:
    """Within the block, `advice` is empty: the calls run for a command without their flags."""
    _advice.append(False)
    try:
        yield
    finally:
        _advice.pop()


def advice(text: str) -> str:
    """`text`, advice that names flags of the running command; "" in `without_advice`."""
    return text if _advice[-1] else ""


@contextlib.contextmanager
def on_interrupt(hint: str) -> Iterator[Callable[[str], None]]:
    """A Ctrl-C within the block carries `hint` (`advice`: how to go on; the CLI prints it),
    in place of any an inner block gave, and so does a RunStopped; so does the line said
    should the process die (`last_words`), in the command's end too where either ended the
    block. It yields a function that changes the hint (to the one a driver's part on the
    cluster says, `runtime.relay`)."""
    slot = len(_hints)
    _hints.append(advice(hint))

    def change(new: str) -> None:
        _hints[slot] = new
        _tell_watcher()

    stopped = False  # the way on it says stands to the process's end
    try:
        _tell_watcher()  # in the block: a listener's error leaves no hint behind
        yield change
    except KeyboardInterrupt:
        stopped = True
        raise KeyboardInterrupt(_hints[slot]) from None
    except RunStopped as e:
        stopped = True
        e.way_on = _hints[slot]  # an outer block's replaces it, as for a Ctrl-C
        raise
    finally:
        _hints.pop()
        if not stopped:
            _tell_watcher()


def counted(n: float, noun: str, plural: str = "") -> str:
    """`n` with its noun as said: "1 gallery", "3 galleries" (`plural`, or noun + "s");
    whole numbers in full (not 1e+06), others as short as they go (0.5)."""
    number = f"{int(n)}" if float(n).is_integer() else f"{n:g}"
    return f"{number} {noun if n == 1 else plural or noun + 's'}"


def say(text: str) -> None:
    print(text, file=out(), flush=True)


def warn(text: str) -> None:
    print(text, file=err(), flush=True)


def log_path(command: str, output: str | None) -> str:
    """The log file of a `command` run writing to `output`: in the output's LOG_DIR when it
    is local, else (None: none on this machine) in the temporary directory (an s3:// output
    gets no log objects)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{command}-{stamp}-{os.getpid()}.log"
    if output and not storage.is_s3(output):
        return os.path.join(output, layout.LOG_DIR, name)
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), "insect-logs", name)


@contextlib.contextmanager
def command_log(path: str | None, own_process: bool = False) -> Iterator[None]:
    """Within the block, the log of a command: `path` (None: none, as with --verbose),
    opened by `start_log` and closed at the end of the block. In the command's end (its
    result, error or interruption in; Ray shut down) a SIGTERM is let go; after it, the
    handler from before the block is put back, unless the process ends with the command
    (`own_process`: the console script's, a job's), which goes on letting it go."""
    state = {"path": path, "stack": contextlib.ExitStack()}
    handles = threading.current_thread() is threading.main_thread()  # Python's signals
    before = signal.getsignal(signal.SIGTERM) if handles else None
    _commands.append(state)
    try:
        yield
        _tell_watcher(last_words.RESULT)
    finally:
        if handles:
            _let_sigterm_go()
        try:
            _commands.pop()
            state["stack"].close()
        finally:
            if handles and not own_process:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def _let_sigterm_go() -> None:
    """A SIGTERM ignored from now on: Ray's core, shutting down, sets its default action
    (which killed the process, exit 143, after its result), and `connect.shutdown` puts
    this back. A signal pending as the handler changes is handled first: its
    KeyboardInterrupt, too, is let go."""
    while True:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


@contextlib.contextmanager
def writing_to(
    out_stream: TextIO, err_stream: TextIO, way_on: Callable[[str], None]
) -> Iterator[None]:
    """Within the block, `say` and `warn` (and the progress bar) write to these streams, and
    `way_on` is told how to go on as it changes: a driver's part on the cluster, whose
    console is a Ray Client's (`runtime.relay`)."""
    before = dict(_streams)
    _streams.update(out=out_stream, err=err_stream)
    _listeners.append(way_on)
    try:
        yield
    finally:
        _listeners.remove(way_on)
        _streams.clear()
        _streams.update(before)


def start_log() -> None:
    """Open the running command's log, if it has one that is not open yet: from now on,
    what the process prints goes there, and insect's own lines to the console."""
    if not _commands or not _commands[-1]["path"] or _streams:
        return
    path = _commands[-1]["path"]
    say(f"log: {path} (Ray's and torch's own messages; --verbose shows them here)")
    _commands[-1]["stack"].enter_context(log_to_file(path))


def on_close(fn) -> bool:
    """Call `fn` as the running command ends, before its log closes: Ray's shutdown, whose
    last lines (its workers' too) belong in the log. Whether it will (not outside a
    command)."""
    if _commands:
        _commands[-1]["stack"].callback(fn)
    return bool(_commands)


@contextlib.contextmanager
def log_to_file(path: str) -> Iterator[None]:
    """Within the block, descriptors 1 and 2 write to `path` and `say`/`warn` to the
    console they wrote to before. A Ctrl-C while they move waits for them to be in place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    watcher, saved = None, {}
    try:
        with _signals_deferred():
            log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            watcher = _start_watcher(path)  # while descriptor 2 is the console: its stderr
            saved = {fd: os.dup(fd) for fd in (1, 2)}
            for fd in (1, 2):
                os.dup2(log, fd)
            os.close(log)
            # A stream that is not the descriptor's own (pytest's capture) stays the console.
            _streams["out"] = _console(sys.stdout, saved[1], sys.__stdout__)
            _streams["err"] = _console(sys.stderr, saved[2], sys.__stderr__)
        yield
    finally:
        with _signals_deferred():
            _end_watcher(watcher)
            _console_back(saved)


def _console_back(saved: dict[int, int]) -> None:
    """Descriptors 1 and 2 back to the console (`saved`: their copies), and `say`/`warn` to
    sys.stdout and sys.stderr again."""
    for stream in (sys.stdout, sys.stderr, *_streams.values()):
        with contextlib.suppress(Exception):
            stream.flush()
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)
    for name in ("out", "err"):
        stream = _streams.pop(name, None)
        if stream not in (None, sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader gone (`| head`): nothing to flush to
                stream.close()  # the copy of a descriptor (closes it)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A Ctrl-C or SIGTERM within the block is handled at its end (in the main thread, the
    one Python runs handlers in): the console's descriptors are not left half moved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {n: signal.signal(n, lambda got, _: caught.append(got)) for n in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in caught[:1]:
            signal.raise_signal(number)  # to the handler it would have gone to


def _start_watcher(path: str) -> tuple[subprocess.Popen, int] | None:
    """Start `last_words`' process, which says on the console that the command stopped,
    should its process die without a word; the process and the pipe to it. Where it cannot
    start, None: the command runs on."""
    read, write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", last_words.__file__, path],
            stdin=read, stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except OSError:
        os.close(write)
        return None
    finally:
        os.close(read)
    _watcher.append((process, write))
    _tell_watcher()
    return process, write


def _tell_watcher(line: bytes | None = None) -> None:
    """Tell `last_words`' process, if one runs, `line`, or how to go on as of now: the
    outermost block's hint, as a Ctrl-C says it (and so `writing_to`'s listener)."""
    way_on = (_hints[:1] or [""])[0]
    if line is None:
        for listener in _listeners:
            listener(way_on)
    if _watcher:
        hint = way_on.replace("\n", " ").replace("\r", " ")
        line = line or last_words.HINT + hint.encode(errors="replace")
        with contextlib.suppress(OSError):  # it is gone: nothing to tell
            os.write(_watcher[-1][1], line + b"\n")


def _end_watcher(watcher: tuple[subprocess.Popen, int] | None) -> None:
    """The command ends, its process alive: `last_words`' process has nothing to say."""
    if watcher is None:
        return
    _watcher.remove(watcher)
    process, write = watcher
    with contextlib.suppress(OSError):
        os.write(write, last_words.DONE + b"\n")
    os.close(write)
    with contextlib.suppress(subprocess.TimeoutExpired):  # it ends at once; no zombie left
        process.wait(timeout=1)


def _console(current: TextIO, saved_fd: int, original: TextIO | None) -> TextIO:
    if current is not original:
        return current
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")


def is_terminal() -> bool:
    """Whether the console's error stream is a terminal (progress bars redraw there)."""
    try:
        return err().isatty()
    except (AttributeError, ValueError):
        return False


class LogLines:
    """A progress bar's stream where the console is not a terminal (a log file, a pipe):
    each redraw on a line of its own instead of after a carriage return; a redraw before
    anything is counted, or of the count the last line showed (again at the end), left out."""

    COUNT = re.compile(r"\b\d+/\d+\b")

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last: str | None = None

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        count = self.COUNT.search(line)
        if count and count.group() != self.last:
            self.last = count.group()
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
