"""Shared fixtures: one local Ray and one trained model per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from insectlib import sample
from insectlib.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's insect and ray executables
SHARED_INSECTS = REPO.parent / "shared" / "data" / "insects"

# Small everything: the suite must stay well under CI's budget on 2 cores.
TEST_IMAGE_SIZE = 64


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd=REPO):
    """Run a command of the venv (insect, ray, python) and capture its output."""
    exe = args[0] if args[0].startswith("/") else str(BIN / args[0])
    return subprocess.run(
        [exe, *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for in-process library calls, started once."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def labelled_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("labelled")
    return sample.make_labelled(str(root), per_class=30, size=(64, 48))


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory) -> dict[str, str]:
    """{path: generating class} of a flat folder of JPEG and PNG files."""
    return sample.make_unlabelled(
        str(tmp_path_factory.mktemp("unlabelled")), count=24, size=(64, 48)
    )


@pytest.fixture(scope="session")
def trained(ray_local, labelled_root, tmp_path_factory):
    """VGG-16 (random trunk) fine-tuned once with 2 workers; returns (config, meta)."""
    work = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(
        data=labelled_root,
        output=str(work / "model"),
        weights="random",
        image_size=TEST_IMAGE_SIZE,
        augment=False,
        lr=0.003,
        batch_size=8,  # more steps: a random trunk's features need them
        workers=2,
        storage=str(work / "runs"),
        name="session",
        keep_checkpoints=0,
    )
    return cfg, fit(cfg)
