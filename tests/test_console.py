"""The console is the user's: insect's own lines, one progress bar, no colour codes where the
output is not a terminal; Ray's and torch's own lines go to the run's log file, or to the
console with --verbose."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import ray
from tqdm import tqdm

from insectlib.errors import RunStopped
from insectlib.layout import LOCK_FILE
from insectlib.runtime import console
from insectlib.runtime.console import LogLines, counted
from insectlib.runtime.last_words import after_result
from tests.conftest import BIN, run_cli, wait_for

ANSI = re.compile(r"\x1b\[")
RAYS_OWN = re.compile(
    r"^\(\w+ pid=|core_worker|TrainingReport|Checkpoint successfully|Moving model to device"
    r"|Started a local Ray|raylet|Traceback"
)


def _lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@pytest.mark.slow
def test_the_demo_prints_only_its_own_lines(tmp_path):
    """`insect demo` (what `make demo` runs once installed): at most 25 lines, none of them
    Ray's, no colour codes; Ray's lines are in the log file it names."""
    workdir = tmp_path / "demo"
    argv = [str(BIN / "insect"), "demo", "--workdir", str(workdir)]
    first = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    # A second demo into its workdir meanwhile is refused: it would rewrite the images the
    # first one reads.
    wait_for(lambda: (workdir / LOCK_FILE).exists() or first.poll() is not None, what="the lock")
    second = run_cli("insect", "demo", "--workdir", str(workdir), cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    said = f"insect: error: {re.escape(str(workdir))} is in use by insect demo .*\n"
    assert re.fullmatch(said, second.stderr), second.stderr[-3000:]
    stdout, stderr = first.communicate(timeout=600)
    result = subprocess.CompletedProcess(argv, first.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    every = _lines(result)
    lines = [line for line in every if not line.startswith("classified: ")]
    assert len(every) <= 25, "\n".join(every)
    assert not [line for line in every if RAYS_OWN.search(line) or ANSI.search(line)], every
    assert "--resume" not in result.stdout, "advice names flags insect demo does not have"
    assert sum(line.startswith("epoch ") and "train loss" in line for line in lines) == 4
    log = re.search(r"^log: (\S+) ", result.stdout, flags=re.M)
    assert log and os.path.exists(log.group(1)), result.stdout
    assert log.group(1).startswith(str(tmp_path / "demo" / "_logs"))
    logged = open(log.group(1)).read()
    assert RAYS_OWN.search(logged), "Ray's lines are in the log"
    # Training's Ray has its dashboard, whose State API Ray Train asks about the run.
    assert "Failed to query Ray Train Controller" not in logged


def test_verbose_keeps_rays_lines_on_the_console(trained, unlabelled, tmp_path):
    """--verbose: no log file taken; whatever Ray and torch print stays on the console (the
    quiet run beside it is the README's, in test_user_path)."""
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = tmp_path / "verbose"
    argv = ["classify", images, "--model", str(cfg.output), "--output", str(out), "--verbose"]
    run = run_cli("insect", *argv, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (out / "_logs").exists() and not any("log: " in line for line in _lines(run))


def test_a_bar_in_a_log_is_lines_not_redraws():
    """Where the console is not a terminal, each redraw of the bar is a line of its own; the
    redraw before anything is counted and a repeat of the last count are left out."""
    log = io.StringIO()
    bar = tqdm(total=0, desc="classified", unit="img", file=LogLines(log), mininterval=0)
    bar.total = 64
    bar.update(32)
    bar.update(32)
    bar.close()  # draws 64/64 again
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [re.search(r"\d+/\d+", line).group() for line in lines] == ["32/64", "64/64"], lines


def test_a_terminal_gets_the_bar_in_place_and_no_colour_codes(trained, unlabelled, tmp_path):
    """On a terminal the bar redraws in place, and nothing writes a colour code: Ray's
    colorama.init(strip=False) registered a reset that wrote ESC[0m after the last line."""
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    argv = ["classify", images, "--model", cfg.output, "--output", str(tmp_path / "o")]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    text, code = _on_a_terminal([str(BIN / "insect"), *argv], tmp_path, env)
    assert code == 0, text[-3000:]
    assert not ANSI.search(text), repr(text[-300:])
    assert "\rclassified:" in text and f"{len(unlabelled)} rows (0 with errors)" in text


def _on_a_terminal(
    command: list[str], cwd, env: dict | None = None, timeout_s: float = 300
) -> tuple[str, int]:
    """`command` with a pseudo-terminal as its console: what was written there (by it, and
    by what writes there a moment after it ends), and its exit code."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=secondary, stdout=secondary, stderr=secondary, cwd=cwd, env=env
    )
    os.close(secondary)
    out, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([primary], [], [], 1)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(primary)
    return out.decode(errors="replace"), proc.wait(timeout=30)


def test_counts_are_said_with_their_noun():
    assert counted(1, "gallery", "galleries") == "1 gallery"
    assert counted(0, "gallery", "galleries") == "0 galleries"
    assert counted(2, "model actor") == "2 model actors"
    assert counted(1.0, "CPU") == "1 CPU" and counted(0.5, "CPU") == "0.5 CPUs"
    assert counted(1_234_567, "row") == "1234567 rows"  # not 1.23457e+06


# A command whose log is open, in a process of its own, within two blocks that say how to
# go on (as evaluate's holds classify's); then, as argv[2] says, its process dies at once
# as Ray ends a driver (a signal to its process group first, say), or the command ends.
DYING = """
import os, signal, sys
from insectlib.errors import RunStopped
from insectlib.runtime import console
log, how = sys.argv[1:3]
with console.command_log(log):
    console.start_log()
    if how.startswith("dies in its end"):  # in Ray's shutdown, say
        console.on_close(lambda: os._exit(1))
    if how == "dies in its end, after an error":
        raise ValueError("its error")
    with console.on_interrupt("the outer way on"), console.on_interrupt("the inner way on"):
        print("what Ray says", flush=True)
        if how == "dies on a terminal":  # mid-bar: tqdm ends its line when it closes
            print("classified: 5/10", end="", file=console.err(), flush=True)
        if how == "dies after a Ctrl-C to its group":  # which it ignores
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.killpg(0, signal.SIGINT)
        if how in ("is interrupted", "dies in its end, interrupted"):
            raise KeyboardInterrupt
        if how == "dies in its end, its run stopped":  # its cluster's head gone, say
            raise RunStopped("a Ray actor of the run died")
        if how in ("dies", "dies on a terminal", "dies after a Ctrl-C to its group"):
            os._exit(1)
    if how == "dies after its blocks":
        os._exit(1)
    console.say("done")
"""


def _dying(log, how: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", DYING, str(log), how]
    return subprocess.run(argv, capture_output=True, text=True, start_new_session=True)


@pytest.mark.parametrize("how", ["dies", "dies after a Ctrl-C to its group"])
def test_a_process_that_dies_without_a_word_gets_one_line(tmp_path, how):
    """Ray's core ends a driver at once (exit 1, no Python code runs) when its cluster's head
    stops under it; what it said went to the log. The console gets one line: that the
    command stopped, how to go on (the outermost block's way, as a Ctrl-C says), the log.
    What watches for it is not stopped by a Ctrl-C to the command's process group."""
    log = tmp_path / "command.log"
    dies = _dying(log, how)
    assert dies.returncode == 1
    said = dies.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith("insect: error: stopped at once"), said
    assert said[0].endswith(f"; the outer way on; its log: {log}"), said
    assert "what Ray says" in log.read_text()


def test_a_stopped_run_is_said_with_the_outermost_blocks_way_on():
    """As a Ctrl-C is: evaluate's way on, not that of the classify it runs; none where the
    command names no flags (the demo's)."""
    with (
        pytest.raises(RunStopped) as stopped,
        console.on_interrupt("evaluate again"),
        console.on_interrupt("resume"),
    ):
        raise RunStopped("the head went")
    assert str(stopped.value) == "the head went; once the cluster is up, evaluate again"
    with pytest.raises(RunStopped) as stopped, console.without_advice(), console.on_interrupt("x"):
        raise RunStopped("the head went")
    assert str(stopped.value) == "the head went"


def test_the_way_on_in_the_last_words_is_the_one_the_command_would_say(tmp_path):
    """Out of the blocks, no way on is said. Dead in its end after an error, before saying
    it: the line, where the error would have been. Dead in its end after a Ctrl-C or a stop
    to resume from (the cluster's head gone), before saying it: the line, with the way on
    that the command would have said."""
    log = tmp_path / "command.log"
    said = _dying(log, "dies after its blocks").stderr.splitlines()
    assert len(said) == 1 and said[0].endswith(f" as a signal does); its log: {log}")
    said = _dying(log, "dies in its end, after an error").stderr.splitlines()
    assert len(said) == 1 and said[0].startswith("insect: error: stopped at once"), said
    for ending in ("dies in its end, interrupted", "dies in its end, its run stopped"):
        said = _dying(log, ending).stderr.splitlines()
        assert len(said) == 1 and said[0].endswith(f"; the outer way on; its log: {log}"), said


def test_a_command_that_ends_gets_no_last_words(tmp_path):
    """Ended, interrupted, or with a log that cannot be opened (a folder there): no line
    from what watches for a death; the console is the console again."""
    ends = _dying(tmp_path / "command.log", "ends")
    assert ends.returncode == 0 and ends.stderr == "" and ends.stdout.splitlines()[-1] == "done"
    interrupted = _dying(tmp_path / "command.log", "is interrupted")
    assert "KeyboardInterrupt" in interrupted.stderr and "stopped at once" not in interrupted.stderr
    (tmp_path / "folder.log").mkdir()
    cannot = _dying(tmp_path / "folder.log", "ends")
    assert "IsADirectoryError" in cannot.stderr and "stopped at once" not in cannot.stderr


def test_a_command_that_dies_in_its_end_after_its_result_says_its_result_stands(tmp_path):
    """Its result said (the block ended), a death in its end (Ray's core ending the driver
    as its cluster goes, say) is said as such: the result stands; not "error"."""
    log = tmp_path / "command.log"
    ends = _dying(log, "dies in its end, its result said")
    assert ends.returncode == 1 and ends.stdout.splitlines()[-1] == "done"
    assert ends.stderr.splitlines() == [after_result(str(log))], ends.stderr
    assert "insect: stopped at once after its result, which stands (" in ends.stderr


# A command with a Ray of its own whose end, once Ray is shut down (its core puts back
# SIGTERM's default action as it does), gets a SIGTERM, as from a supervisor; then, after
# `entry`'s main has returned, its process gets one more (at exit, before Python's end).
SHUT_DOWN = """
import atexit, os, signal, sys
from insectlib.runtime import connect, console
from insectlib.cli.main import entry
atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))
with console.command_log(None):  # as with --verbose: no log, whose end resets handlers
    console.on_close(lambda: os.kill(os.getpid(), signal.SIGTERM))  # after Ray's shutdown
    connect.init_ray()
    console.say("its result")
print("went on", flush=True)
entry(["train", sys.argv[1], "--output", sys.argv[2]])
"""


def test_a_commands_end_lets_sigterm_go_and_then_puts_back_the_handler_before_it():
    """In a command's end SIGTERM is ignored; after it, a library's caller has its own
    handler back (not the one insect put there for the command), and a process that ends
    with the command goes on ignoring it."""

    def callers(signum, frame):
        raise AssertionError("not called")

    outside = signal.signal(signal.SIGTERM, callers)
    try:
        in_its_end = []
        with console.command_log(None):
            signal.signal(signal.SIGTERM, lambda *_: None)  # as init_ray's, for the command
            console.on_close(lambda: in_its_end.append(signal.getsignal(signal.SIGTERM)))
        assert in_its_end == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGTERM) is callers
        with console.command_log(None, own_process=True):
            pass
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, outside)


def test_a_sigterm_in_a_commands_end_is_let_go(tmp_path):
    """Ray's core puts back SIGTERM's default action as it shuts down, and Python does at
    its end: a SIGTERM after a command's result killed its process (exit 143), and its last
    words said that it had stopped without a word. From the command's end on it is let go:
    the command ends with its own status."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    argv = [sys.executable, "-c", SHUT_DOWN, str(tmp_path / "none"), str(tmp_path / "model")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]  # entry's status: no such folder
    assert done.stdout.splitlines()[-2:] == ["its result", "went on"], done.stdout
    # Ray's own lines before (no log takes them), and no interruption or traceback after.
    assert done.stderr.splitlines()[-1] == f"insect: error: not found: {tmp_path / 'none'}"
    assert "Traceback" not in done.stderr and "interrupted" not in done.stderr, done.stderr


def test_on_a_terminal_the_line_is_a_line_of_its_own(tmp_path):
    argv = [sys.executable, "-c", DYING, str(tmp_path / "log"), "dies on a terminal"]
    text, code = _on_a_terminal(argv, tmp_path, timeout_s=60)
    assert code == 1
    assert "classified: 5/10\r\ninsect: error: stopped at once" in text, repr(text)
