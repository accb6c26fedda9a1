"""Faults lose nothing: a killed driver, model actor or training worker, and odd file names."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from insectlib.classify.pipeline import classify, resumable
from insectlib.config import ClassifyConfig, TrainConfig
from insectlib.data import synthetic
from insectlib.errors import InsectError
from insectlib.layout import META_FILE, METRICS_FILE, RUN_RECORD, STATE_FILE
from insectlib.model.meta import ModelMeta
from insectlib.model.network import build_model, save_model
from insectlib.runtime import connect, console, progress
from insectlib.training.run_storage import RUN_SNAPSHOT, check_run_name, resume_hint
from insectlib.training.trainer import fit
from tests.conftest import (
    BIN,
    expect_cli_error,
    kill_ray_worker,
    killing,
    ray_worker,
    small_train_config,
    wait_for,
)


def complete_parquet_files(out: Path) -> list[str]:
    files = []
    for f in glob.glob(str(out / "*.parquet")):
        try:
            pq.read_metadata(f)
            files.append(f)
        except Exception:  # a file still being written
            pass
    return files


# Runs a command with Ctrl-C's default: a pytest-xdist worker ignores SIGINT, and a child
# that starts with it ignored never gets a KeyboardInterrupt (as a shell's background job).
SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start_driver(log: Path, *args: str) -> subprocess.Popen:
    """`insect ARGS` as a second driver on the session's Ray cluster, to be interrupted or
    killed."""
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-c", SIGINT_DEFAULT, str(BIN / "insect"), *args]
    with open(log, "w") as f:
        return subprocess.Popen([*argv, "--address", address], stdout=f, stderr=f)


def wait_while_running(driver: subprocess.Popen, log: Path, condition, what: str):
    def check():
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) first: {log.read_text()[-3000:]}")
        return condition()

    return wait_for(check, what=what)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(3)  # Ray reaps the dead driver's workers


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> set[str]:
    root = tmp_path_factory.mktemp("many")
    return set(synthetic.make_unlabelled(str(root), count=400, size=(64, 48)))


def read_paths(out: Path) -> list[str]:
    return pq.read_table(out, columns=["path"]).column("path").to_pylist()


def test_classify_resume_after_driver_killed(trained, many_images, tmp_path, capsys):
    cfg, meta = trained
    folder = os.path.dirname(next(iter(many_images)))
    out = tmp_path / "out"
    args = ["classify", folder, "--model", cfg.output, "--output", str(out), "--batch-size", "4"]
    args += ["--rows-per-file", "40"]
    # Ctrl-C (SIGINT): one line says how to finish the run, exit 130.
    log = tmp_path / "interrupted.log"
    driver = start_driver(log, *args)
    wait_while_running(driver, log, lambda: complete_parquet_files(out), "the first Parquet file")
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "insect: interrupted; the same command with --resume classifies only" in log.read_text()
    # SIGTERM (`ray job stop`, a supervisor) as Ctrl-C: ray.init's handler exited 15 silently.
    done = len(complete_parquet_files(out))
    log = tmp_path / "terminated.log"
    driver = start_driver(log, *args, "--resume")
    more = lambda: len(complete_parquet_files(out)) > done  # noqa: E731
    wait_while_running(driver, log, more, "a Parquet file of the resumed run")
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "insect: interrupted; the same command with --resume classifies only" in log.read_text()
    first = len(complete_parquet_files(out))
    # A killed driver (SIGKILL) of the resumed run.
    log = tmp_path / "killed.log"
    driver = start_driver(log, *args, "--resume")
    more = lambda: len(complete_parquet_files(out)) > first  # noqa: E731
    wait_while_running(driver, log, more, "a Parquet file of the resumed run")
    sigkill(driver)
    assert not (out / "_SUCCESS").exists()
    before = sum(pq.read_metadata(f).num_rows for f in complete_parquet_files(out))
    assert 0 < before < len(many_images), "the kill must land mid-run"

    argv = ["classify", folder, "--model", cfg.output, "--output", str(out)]
    assert "pass --overwrite to replace it or --resume" in expect_cli_error(capsys, argv)

    s = classify(ClassifyConfig(input=folder, model=cfg.output, output=str(out), resume=True))
    paths = read_paths(out)
    assert len(paths) == len(set(paths)) == s.rows == s.inputs
    assert set(paths) == many_images
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["rows"] == len(many_images) and manifest["resumed"]
    assert "already done" in capsys.readouterr().out

    # Resuming a finished run does nothing and keeps it whole.
    s = classify(ClassifyConfig(input=folder, model=cfg.output, output=str(out), resume=True))
    assert sorted(read_paths(out)) == sorted(paths) and (out / "_SUCCESS").exists()

    # Resuming with another model is refused, and the output stays whole, manifest included.
    other = str(tmp_path / "other-model")
    save_model(
        other,
        build_model("resnet18", len(meta.classes), "random"),
        ModelMeta(classes=meta.classes, arch="resnet18", image_size=meta.image_size),
    )
    argv = ["classify", folder, "--model", other, "--output", str(out), "--resume"]
    assert f"holds predictions of model {meta.model_id}" in expect_cli_error(capsys, argv)
    assert sorted(read_paths(out)) == sorted(paths) and (out / "_SUCCESS").exists()


STARTS, CLASSIFIES = "while Ray starts", "while it classifies"
# Ray holds the signal while ray.init waits for its raylet to register: its loop of 30 s,
# plus the call to the GCS, gone, that it is in. Later the command ends on its own (10-19 s
# on 2 vCPUs, most of it in ray.shutdown), or Ray's core ends it: at once as its raylet
# goes, or once its processes give up on their GCS (connect.GCS_GONE_S).
WITHIN_S = {STARTS: 30 + 15, CLASSIFIES: connect.GCS_GONE_S + 15}
RESUME = "the same command with --resume classifies only the inputs without a row"
SAID = {130: "insect: interrupted; ", 1: "insect: error: stopped at once, without a word"}


@pytest.mark.parametrize("moment", [STARTS, CLASSIFIES])
def test_a_sigterm_to_the_group_stops_the_command_with_its_word(
    trained, many_images, tmp_path, moment
):
    """`timeout`, `kill -- -PGID` and supervisors signal the whole process group, the Ray
    the command started with it. Ray's handler during ray.init ended the command without a
    word (exit 15); while it classified, it waited 60 s on its Ray, gone, until Ray's core
    ended it (exit 1) without a word. It says it was interrupted and how to go on (exit
    130), or, where Ray's core ends it first (exit 1), the last words say so."""
    cfg, _ = trained
    folder = os.path.dirname(next(iter(many_images)))
    out = tmp_path / "out"
    argv = [str(BIN / "insect"), "classify", folder, "--model", cfg.output, "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    driver = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert driver.stdout.readline().startswith("log: ")  # said as Ray starts
        if moment == STARTS:
            wait_for(lambda: "gcs_server" in _children(driver.pid), what="Ray's GCS started")
        else:  # the run under way: the driver follows its progress actor
            wait_for(lambda: ray_worker("MapWorker", driver.pid), what="a model actor")
        signalled = time.monotonic()
        os.killpg(driver.pid, signal.SIGTERM)
        _, err = driver.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its Ray too, should the test fail
            os.killpg(driver.pid, signal.SIGKILL)
    took = time.monotonic() - signalled  # Ray's wait for a GCS gone was 60 s
    assert took < WITHIN_S[moment] and driver.returncode in SAID, (took, err[-2000:])
    assert SAID[driver.returncode] in err and RESUME in err, err[-2000:]
    assert not (out / "_SUCCESS").exists(), "the signal must land mid-run"


def _children(pid: int) -> list[str]:
    """The names of the processes whose parent is `pid`."""
    names = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            name, rest = open(stat).read().rsplit(")", 1)
        except OSError:
            continue
        if int(rest.split()[1]) == pid:
            names.append(name.split("(", 1)[1])
    return names


def test_classify_survives_a_killed_model_actor(trained, many_images, tmp_path):
    cfg, _ = trained
    folder = os.path.dirname(next(iter(many_images)))
    out = tmp_path / "out"
    with killing("Predictor", lambda: complete_parquet_files(out), "the first Parquet file"):
        s = classify(
            ClassifyConfig(
                input=folder, model=cfg.output, output=str(out), batch_size=4, rows_per_file=40
            )
        )
    paths = read_paths(out)
    assert len(paths) == len(set(paths)) == s.rows == s.inputs == len(many_images)
    assert set(paths) == many_images


def train_config(data: str, tmp_path: Path, **kw) -> TrainConfig:
    settings = dict(
        epochs=3,
        # One worker, as the CLI runs below are given: a lost worker stops or restarts the
        # whole group either way, and each worker is a process of seconds of CPU to start.
        workers=1,
        name="run",
        cache_features=False,  # every epoch takes its time: room for a kill mid-run
    )
    return small_train_config(data, tmp_path, **{**settings, **kw})


def test_the_run_snapshot_is_the_file_ray_train_writes():
    """insect writes Ray Train's private file name out (importing it costs seconds before a
    path check); the resume tests below see Ray write it, this one names a rename."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert RUN_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


# Epochs of the resume test: room for a checkpoint in each of its three runs, and for
# epochs after the last kill.
EPOCHS = 6


def checkpoints(cfg: TrainConfig) -> list[str]:
    """The checkpoint folders Ray Train has recorded for the run, oldest first (a folder
    alone may be a report still in flight, which a restart rightly ignores): those its
    snapshot (RUN_SNAPSHOT) lists."""
    run = os.path.join(cfg.storage, cfg.name)
    try:
        with open(os.path.join(run, RUN_SNAPSHOT)) as f:
            recorded = json.load(f)["checkpoint_results"]
    except (OSError, ValueError):  # none yet, or being rewritten
        return []
    return [os.path.join(run, c["checkpoint_dir_name"]) for c in recorded]


def test_a_lost_training_controller_says_how_to_resume(ray_local, labelled_root, tmp_path):
    """Its actor dead (the head stopped, say): a Ray traceback and exit 1 before; one line
    saying how to continue the run now. From the CLI, whose exit frees what the run's
    workers held (in this process it would hold them for the tests after)."""
    cfg = train_config(labelled_root, tmp_path)
    args = [
        "train", labelled_root, "--output", cfg.output, "--weights", "random",
        "--image-size", str(cfg.image_size), "--no-augment", "--batch-size", "8",
        "--epochs", "3", "--storage", cfg.storage, "--name", cfg.name, "--workers", "1",
    ]  # fmt: skip
    log = tmp_path / "lost.log"
    driver = start_driver(log, *args)
    wait_while_running(driver, log, lambda: checkpoints(cfg), "the first checkpoint")
    kill_ray_worker("TrainController")
    assert driver.wait(timeout=120) == 2, log.read_text()[-3000:]
    said = "insect: error: Ray Train's controller died (.*); once the cluster is up, --resume "
    assert re.search(said + f"--name {cfg.name} ", log.read_text()), log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


def test_train_resume_continues_a_stopped_run(ray_local, labelled_root, tmp_path, capsys):
    """A run stopped by Ctrl-C, then, resumed, by a lost worker that --max-failures 0
    allows no restart for, then resumed with a restart allowed through another lost worker:
    each stop says in one line how to continue, each resume starts from the last recorded
    epoch, and every epoch is reported once, restored rather than trained again."""
    cfg = train_config(labelled_root, tmp_path, epochs=EPOCHS)
    args = [
        "train", labelled_root, "--output", cfg.output, "--weights", "random",
        "--image-size", str(cfg.image_size), "--no-augment", "--batch-size", "8",
        "--epochs", str(EPOCHS), "--no-cache-features", "--max-failures", "0",
        "--workers", str(cfg.workers),
        "--storage", cfg.storage, "--name", cfg.name, "--keep-checkpoints", "0",
    ]  # fmt: skip
    # Ctrl-C (SIGINT): Ray Train aborts the run; one line says how to continue it, exit 130.
    log = tmp_path / "interrupted.log"
    driver = start_driver(log, *args)
    wait_while_running(driver, log, lambda: checkpoints(cfg), "the first checkpoint")
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    hint = f"--resume --name {cfg.name} --storage {cfg.storage} continues"
    assert f"insect: interrupted; {hint}" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert "pid=" not in log.read_text(), "Ray's lines go to the run's log, to its end"
    done = checkpoints(cfg)
    # The output folder exists (the run's log is in it), but holds no model.
    model_written = (Path(cfg.output) / META_FILE).exists()
    assert 1 <= len(done) < EPOCHS - 2 and not model_written, "the interrupt must land mid-run"
    assert "pass --resume to continue it" in expect_cli_error(capsys, args)
    err = expect_cli_error(capsys, [*args[:-4], "--name", "nope", "--resume"])
    assert "no run to resume at" in err and "nope" in err

    # A worker lost with no restart allowed: one line naming it and how to continue, exit 2.
    log = tmp_path / "lost.log"
    driver = start_driver(log, *args, "--resume")
    more = lambda: len(checkpoints(cfg)) > len(done)  # noqa: E731
    wait_while_running(driver, log, more, "a checkpoint of the resumed run")
    kill_ray_worker("RayTrainWorker")
    assert driver.wait(timeout=120) == 2, log.read_text()[-3000:]
    lost = r"^insect: error: training stopped: worker \d lost \(its worker process has died"
    assert re.search(lost, log.read_text(), re.M), log.read_text()[-3000:]
    assert f"--max-failures 0 allows; once the cluster is up, {hint}" in log.read_text()
    assert "Traceback" not in log.read_text()
    done = checkpoints(cfg)
    assert len(done) < EPOCHS - 1, "the kill must land mid-run"

    # A checkpoint written after the last one Ray Train recorded (as an interrupt can
    # leave): the finished run removes it; a folder holding the user's own file stays.
    run = Path(cfg.storage) / cfg.name
    (run / "checkpoint_unrecorded").mkdir()
    (run / "checkpoint_unrecorded" / STATE_FILE).write_bytes(Path(done[0], STATE_FILE).read_bytes())
    (run / "checkpoint_mine").mkdir()
    (run / "checkpoint_mine" / "notes.txt").write_text("mine")
    # Resumed with a restart allowed: Ray Train restarts the workers when one is lost. With
    # two workers (a resume may change their number): each restores the recorded epoch.
    handler = signal.getsignal(signal.SIGINT)
    resumed = train_config(
        labelled_root, tmp_path, epochs=EPOCHS, resume=True, max_failures=1, workers=2
    )
    more = lambda: len(checkpoints(cfg)) > len(done)  # noqa: E731
    with killing("RayTrainWorker", more, "a checkpoint of the run resumed again"):
        meta = fit(resumed)
    # Ray Train's Ctrl-C handler is gone with its run (through it a Ctrl-C exited 0).
    assert signal.getsignal(signal.SIGINT) is handler
    assert [e["epoch"] for e in meta.epochs] == list(range(1, EPOCHS + 1))
    # --keep-checkpoints 0: every recorded epoch's stays, each holding the epochs reported
    # up to it (an epoch trained again after a restart would differ from its record); the
    # folders the kills left unrecorded are gone, the user's own stays.
    assert len(checkpoints(cfg)) == EPOCHS
    on_disk = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    assert on_disk == {Path(c).name for c in checkpoints(cfg)} | {"checkpoint_mine"}
    for checkpoint in checkpoints(cfg):
        state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=True)
        assert state["history"] == meta.epochs[: state["epoch"]], checkpoint
    # Resumed after its last epoch (as a worker lost while the model was written leaves
    # it): the model directory again, its validation made again on the restored weights.
    again = dataclasses.replace(resumed, output=str(tmp_path / "again"))
    assert fit(again).epochs == meta.epochs
    metrics = [json.loads((Path(c.output) / METRICS_FILE).read_text()) for c in (cfg, again)]
    assert metrics[1] == metrics[0] and metrics[0]["validation"], metrics


NAMES = [
    'it\'s "quoted".jpg',
    "new\nline.jpg",
    "$(touch PWNED).jpg",
    "`touch PWNED`.png",
    "semi; rm -rf ~.jpg",
    "back\\slash.JPG",
]


def test_file_names_are_data(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    folder = tmp_path / "names"
    folder.mkdir()
    sample_file = next(iter(synthetic.make_unlabelled(str(tmp_path / "src"), count=1)))
    expected = set()
    for name in NAMES:
        (folder / name).write_bytes(Path(sample_file).read_bytes())
        expected.add(str(folder / name).replace("\\", "\\\\"))  # written twice: docs/safety.md
    (folder / "dir.jpg").mkdir()  # a folder named like an image is a folder: walked into
    (folder / "dir.jpg" / "inside.jpg").write_bytes(Path(sample_file).read_bytes())
    expected.add(str(folder / "dir.jpg" / "inside.jpg"))
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    expected.add(str(folder / "dangling.jpg"))
    monkeypatch.chdir(tmp_path)

    classify(ClassifyConfig(input=str(folder), model=cfg.output, output=str(tmp_path / "out")))
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == expected
    assert "unreadable file" in rows[str(folder / "dangling.jpg")]["error"]
    assert all(r["error"] is None for p, r in rows.items() if "dangling" not in p)
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_gets_an_error_row(trained, tmp_path):
    cfg, _ = trained
    folder = tmp_path / "locked"
    folder.mkdir()
    locked = folder / "locked.jpg"
    sample_file = next(iter(synthetic.make_unlabelled(str(tmp_path / "src"), count=1)))
    locked.write_bytes(Path(sample_file).read_bytes())
    locked.chmod(0)
    classify(ClassifyConfig(input=str(folder), model=cfg.output, output=str(tmp_path / "out")))
    (row,) = pq.read_table(tmp_path / "out").to_pylist()
    assert row["label"] is None and "unreadable file: Permission denied" in row["error"]


@ray.remote(num_cpus=1)
class _Joiner:
    """An actor of a run, as a model actor joins it: first thing in its constructor."""

    def __init__(self, run):
        progress.join_run(run)

    def ping(self) -> bool:
        return True


def test_a_runs_actors_are_stopped_at_its_end_late_ones_too(ray_local):
    """The actors that joined a run are stopped when it ends (Ray Data may leave one
    waiting, holding its CPUs); one joining after the end, still building when the run
    failed, is stopped as it joins."""
    run = progress.start()
    early = _Joiner.remote(run)
    assert ray.get(early.ping.remote())
    progress.end(run)
    wait_for(lambda: _stopped(early), timeout=60, what="the run's actor to stop")
    late = _Joiner.remote(run)
    wait_for(lambda: _stopped(late), timeout=60, what="the late actor to stop")


def _stopped(actor) -> bool:
    """Whether `actor` is gone. ray.kill lands moments after it returns: a call made in
    between may still be answered (the suite saw it once, under load)."""
    try:
        ray.get(actor.ping.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


@ray.remote(num_cpus=0)
class _SlowProgress:
    """A run's progress actor on a busy node: its first poll answers after `seconds`."""

    def __init__(self, seconds: float):
        self.lines, self.seconds = [], seconds

    def ready(self) -> bool:
        return True

    def say(self, line: str) -> None:
        self.lines.append(line)

    def poll(self) -> tuple[list[str], dict[str, int]]:
        time.sleep(self.seconds)
        self.seconds = 0
        lines, self.lines = self.lines, []
        return lines, {}


def test_a_run_followed_through_late_polls_prints_every_line_once(ray_local, capsys, monkeypatch):
    """A poll answering later than POLL_TIMEOUT_S is waited for, not given up on: the lines
    it took from the actor (training's epoch lines) are printed all the same, once."""
    monkeypatch.setattr(progress, "POLL_TIMEOUT_S", 2 * progress.POLL_S)
    slow = _SlowProgress.remote(3 * progress.POLL_TIMEOUT_S)
    assert ray.get(slow.ready.remote(), timeout=120)
    lines = [f"epoch {n}" for n in range(1, 9)]
    with progress.follow(slow):
        for line in lines:
            slow.say.remote(line)
            time.sleep(progress.POLL_S)
    assert capsys.readouterr().out.splitlines() == lines


@ray.remote(num_cpus=0)
def _fenced_write(run, path: str, seconds: float):
    """A write task of `run`, as a classify run writes its parts."""

    def write() -> str:
        time.sleep(seconds)
        Path(path).write_text("written")
        return "written"

    return progress.fenced(run, Path(path).name, write)


def test_a_runs_end_waits_for_its_writes_and_refuses_later_ones(ray_local, tmp_path):
    """Nothing of a run is written after its end: a write under way is waited for, however
    long it renews its lease and even when Ray cancels its task (as Ray Data does to a
    failed run's: the write went on in a library's thread and its part landed under a
    --resume's rows); one that would begin after the end writes nothing; a writer that
    died holds the end back only until its lease runs out."""
    run = progress.start()
    assert ray.get(run.begin_write.remote("died"))  # begun by a writer that is gone
    under_way = _fenced_write.remote(run, str(tmp_path / "under-way"), 15)
    forever = 10**6  # every lease, fresh or not
    wait_for(lambda: ray.get(run.writes.remote(forever))[0] == 2, 60, "the write begun")
    ray.cancel(under_way)
    started = time.monotonic()
    progress.end(run, lease_s=10)  # shorter than the write: renewed, it is waited for
    assert (tmp_path / "under-way").read_text() == "written"
    assert time.monotonic() - started < 45
    under_way_now, _ = ray.get(run.writes.remote(forever))
    assert under_way_now == 1  # the one that died; the write ended its own lease
    try:  # Ray may deliver its cancel only once the write is done, or not at all
        assert ray.get(under_way, timeout=60) == "written"
    except ray.exceptions.TaskCancelledError:
        pass
    assert ray.get(_fenced_write.remote(run, str(tmp_path / "late"), 0), timeout=60) is None
    assert not (tmp_path / "late").exists()


def test_a_run_stopped_before_its_first_epoch_is_resumed_from_the_start(tmp_path):
    """Ctrl-C (or a kill) before Ray Train recorded an epoch leaves the run's record and no
    checkpoint: the --resume its line advises starts at epoch 1, where it said 'no run'."""
    cfg = TrainConfig(data="d", storage=str(tmp_path / "runs"), name="r 1", resume=True)
    (tmp_path / "runs" / "r 1").mkdir(parents=True)
    (tmp_path / "runs" / "r 1" / RUN_RECORD).write_text("{}")
    assert check_run_name(cfg) is True  # starts at epoch 1 (begin_run says so)
    with pytest.raises(InsectError, match="no run to resume at"):
        check_run_name(dataclasses.replace(cfg, name="r2"))
    # The advice, pasted into a shell, names this run.
    assert f"--resume --name 'r 1' --storage {tmp_path}/runs continues" in resume_hint(cfg)


def test_the_advice_after_a_ctrl_c_fits_the_command():
    """After --overwrite the advice is --resume instead of it (the two exclude each other);
    within insect demo, which has neither flag, there is none."""
    cfg = ClassifyConfig(input="i", model="m", output="o", overwrite=True)
    with pytest.raises(KeyboardInterrupt, match="with --resume instead of --overwrite"):
        with resumable(cfg):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as stopped, console.without_advice(), resumable(cfg):
        raise KeyboardInterrupt
    assert str(stopped.value) == ""
