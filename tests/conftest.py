"""Shared fixtures: one local Ray and one trained model per test session."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from filelock import FileLock
from PIL import Image

from insectlib import storage
from insectlib.config import TrainConfig
from insectlib.data import synthetic
from insectlib.model.meta import read_meta, write_meta
from insectlib.training.trainer import fit
from tests.s3server import MotoServer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's insect and ray executables
SHARED_INSECTS = REPO.parent / "shared" / "data" / "insects"

# Small everything: the suite must stay well under CI's budget on 2 cores.
TEST_IMAGE_SIZE = 64
SESSION_ARCH = "resnet18"  # the session's model (`trained`), and what compares with it
# Ray Train starts an actor per training run that watches for spot-instance preemption
# notices, which never come here: a process start (2 s of CPU) in each of the suite's runs,
# its own Ray's and the CLI's (they inherit this environment).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Two pytest workers share the 2 cores, each with torch processes of 2 OpenMP threads:
# threads that spin while they wait for work (OpenMP's default) take the CPU the other
# worker's processes need. Its Ray workers and CLIs inherit this (README, Development).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The modules that take minutes, longest first (a full run's `--durations=0`, summed per
# module). xdist hands whole modules out in collection order (`--dist loadscope
# --no-loadscope-reorder`, the Makefile's): one of these left for last keeps a worker busy
# while the other has nothing to do. Its own order would put the one-test modules last.
LONG_MODULES = (
    "test_faults",
    "test_cluster",
    "test_user_path",
    "test_operator_mistakes",
    "test_s3",
    "test_console",
    "test_int8",
    "test_multinode",
    "test_vgg16",
    "test_scale",
)


def pytest_collection_modifyitems(items):
    """Mark each test by what it needs (see pyproject's markers): `make test-fast` leaves
    out those on Ray or S3. Then the long modules first (`LONG_MODULES`), the others after
    them in their own order."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
        if "s3_server" in item.fixturenames:
            item.add_marker(pytest.mark.s3)
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd=REPO):
    """Run a command of the venv (insect, ray, python) and capture its output."""
    exe = args[0] if args[0].startswith("/") else str(BIN / args[0])
    try:
        return subprocess.run(
            [exe, *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"")[-4000:], (e.stderr or b"")[-4000:]
        pytest.fail(f"{' '.join(args)} ran over {timeout} s; output: {output}")


def expect_cli_error(capsys, argv: list[str]) -> str:
    """Run `insect ARGV` in-process; it must fail within a minute with one error line, which
    is returned. (Other stderr lines may come from the test session's own Ray.)"""
    from insectlib.cli.main import main

    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    # Lines like "(TrainController pid=1) ..." are forwarded from the session's own Ray.
    own = [line for line in err.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", line)]
    assert not any("Traceback" in line for line in own), err
    lines = [line for line in own if line.startswith("insect: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def assert_refused_before_torch(cases: list[tuple[str, list[str]]], cwd) -> None:
    """Each of `cases`, (text, command line), exits 2 with one `insect: error:` line holding
    the text, before torch or torchvision is imported. One fresh interpreter runs them all:
    the first case to import torch fails, and every case after it."""
    code = (
        "import contextlib, io, json, sys\n"
        "from insectlib.cli.main import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    torch = any(m in sys.modules for m in ('torch', 'torchvision'))\n"
        "    print(json.dumps([code, torch, err.getvalue().splitlines()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps([argv for _, argv in cases])],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(found) == len(cases), result.stderr[-3000:]
    for (expected, argv), (code, torch, lines) in zip(cases, found, strict=True):
        assert (code, torch) == (2, False), (argv, lines)
        assert len(lines) == 1 and lines[0].startswith("insect: error: "), (argv, lines)
        assert expected in lines[0], (argv, lines)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port; its credentials go into os.environ, where
    Ray workers and subprocesses find them as they would real AWS credentials."""
    server = MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    os.environ.update(server.env)
    yield server
    server.stop()


def upload_tree(client, local_root: str, bucket: str, prefix: str) -> list[str]:
    """Copy a local folder into s3://bucket/prefix/; returns the keys."""
    keys = []
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(path, local_root)}"
            client.upload_file(path, bucket, key)
            keys.append(key)
    return keys


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster for in-process library calls, started once (after the S3
    credentials are in the environment, so that its workers inherit them)."""
    # Ray Train's controller polls its workers every 2 s: every training run here ends up
    # to 2 s after its last epoch, dozens of times a session.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        logging_level="WARNING",
        # Idle workers are kept for the next run (by default Ray kills those beyond num_cpus
        # after 1 s idle): a new worker process costs a second or more of CPU, and each run
        # here needs several (its read, write and join tasks), a tenth of the suite's CPU.
        _system_config={
            "num_workers_soft_limit": 6,
            "idle_worker_killing_time_threshold_ms": 60_000,
        },
    )
    yield
    ray.shutdown()


def made_once(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """The folder `name` that `make(folder)` fills, made by the first pytest-xdist worker of
    the run to ask, under a lock, and shared by the others (pytest-xdist's own recipe): the
    session's images and models, the same for every worker, cost each worker's CPUs once
    (a model is a training run; the cores are busy to the suite's end)."""
    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # under xdist: the folder the workers' own are in
        base = base.parent
    folder, made = base / name, base / f"{name}.made"
    with FileLock(str(base / f"{name}.lock")):
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker's attempt that failed
            folder.mkdir()
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def labelled_root(tmp_path_factory, worker_id) -> str:
    def make(root: Path) -> None:
        synthetic.make_labelled(str(root), per_class=30, size=(64, 48))

    return str(made_once(tmp_path_factory, worker_id, "labelled", make))


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory) -> dict[str, str]:
    """{path: generating class} of a flat folder of JPEG and PNG files."""
    return synthetic.make_unlabelled(
        str(tmp_path_factory.mktemp("unlabelled")), count=24, size=(64, 48)
    )


@pytest.fixture(scope="session")
def trained(ray_local, labelled_root, tmp_path_factory, worker_id):
    """A ResNet-18 (random trunk) fine-tuned once with 2 workers; returns (config, meta).
    Not VGG-16: a tenth of its compute and weights, in every run that uses this model (the
    README's commands train and classify the default VGG-16)."""
    return trained_once(
        tmp_path_factory, worker_id, "trained",
        labelled_root, arch=SESSION_ARCH, lr=0.003, workers=2, name="session",
    )  # fmt: skip


@pytest.fixture(scope="session")
def trained_vgg(ray_local, labelled_root, tmp_path_factory, worker_id):
    """VGG-16, the product's default (random trunk), fine-tuned once with one worker, for
    the tests about VGG-16 itself (feature maps, int8, bf16 and compiled against fp32
    eager, temperature scaling of an over-confident head); returns (config, meta)."""
    return trained_once(
        tmp_path_factory, worker_id, "trained-vgg", labelled_root, lr=0.003, name="vgg"
    )


def trained_once(tmp_path_factory, worker_id, folder: str, data: str, **overrides):
    """(config, meta) of `small_train_config(data, ...)`, trained by one xdist worker
    (`made_once`); the workers do not change a session model (a test copies it first)."""
    work = made_once(
        tmp_path_factory, worker_id, folder,
        lambda made: fit(small_train_config(data, made, **overrides)),
    )  # fmt: skip
    cfg = small_train_config(data, work, **overrides)
    return cfg, read_meta(cfg.output)


@pytest.fixture(scope="session")
def calibrated(trained, tmp_path_factory):
    """The session's model with a temperature of 1.7 in its meta.json (training fits none
    on its 18 validation images: too few); returns (model dir, meta)."""
    cfg, meta = trained
    folder = str(tmp_path_factory.mktemp("calibrated") / "model")
    shutil.copytree(cfg.output, folder)
    meta = dataclasses.replace(meta, temperature=1.7)
    write_meta(folder, meta)
    return folder, meta


def small_train_config(data: str, work, **overrides) -> TrainConfig:
    """The tests' training run: random weights, TEST_IMAGE_SIZE, no augmentation, batches
    of 8 (more steps: a random trunk's features need them), one worker (each costs a
    process start: seconds here), every checkpoint kept, the model and run storage under
    `work` (a folder or s3:// prefix); `overrides` for what a test is about."""
    settings = dict(
        data=data,
        workers=1,
        output=storage.join(str(work), "model"),
        weights="random",
        image_size=TEST_IMAGE_SIZE,
        augment=False,
        batch_size=8,
        storage=storage.join(str(work), "runs"),
        keep_checkpoints=0,
    )
    return TrainConfig(**{**settings, **overrides})


def assert_picture(path) -> None:
    """A real picture: opens, a sensible size, and not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 200 and image.height >= 150
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 5, f"{path} looks blank"


def wait_for(condition, timeout: float = 180, what: str = "condition"):
    """`condition()`'s first true value, polled every 0.1 s; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` was started (through any chain) by process `ancestor`."""
    while pid > 0:  # the ancestor may be PID 1 (pytest in a container without an init)
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def ray_worker(title: str, ancestor: int | None = None) -> int | None:
    """The pid of a Ray worker process whose title holds `title`, started by process
    `ancestor` (this one by default); None while there is none."""
    ancestor = os.getpid() if ancestor is None else ancestor
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(cmdline.split("/")[2])
        try:
            text = Path(cmdline).read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # Of `ancestor`: by default the session's own cluster's or a CLI run's worker, not
        # one of another session's (nor of a `ray start` head: init adopts its processes).
        if text.startswith("ray::") and title in text and descends_from(pid, ancestor):
            return pid
    return None


def kill_ray_worker(title: str) -> int:
    """SIGKILL the first Ray worker process of this session whose title holds `title`;
    returns its pid."""
    pid = wait_for(lambda: ray_worker(title), what=f"a Ray worker {title}")
    os.kill(pid, signal.SIGKILL)
    return pid


@contextlib.contextmanager
def killing(title: str, ready, what: str):
    """Run the block while a thread waits for `ready()` (described by `what`), then kills
    the Ray worker `title`; after the block, asserts that one was killed."""
    killed = []

    def killer():
        wait_for(ready, what=what)
        killed.append(kill_ray_worker(title))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    yield
    thread.join(timeout=5)
    assert killed, f"no {title} was killed while the job ran"
