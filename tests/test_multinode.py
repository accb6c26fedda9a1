"""Multi-node behaviour on one host: ray.cluster_utils.Cluster, a head plus worker nodes with
one CPU each, driven from a separate process (tests/multinode.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from insectlib import storage
from insectlib.data import synthetic
from insectlib.layout import WEIGHTS_FILE
from insectlib.model.meta import read_meta
from tests.conftest import REPO


def run_multinode(*args: str, timeout: int = 600) -> dict:
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "multinode.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def shapes(model_uri: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's JSON header."""
    data = storage.read_bytes(storage.join(model_uri, WEIGHTS_FILE))
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def test_training_over_two_nodes_then_classification_losing_one(
    s3_server, labelled_root, trained, tmp_path
):
    """Training on two worker nodes (one worker each) with S3 run storage; then
    classification with the model it wrote, one node removed mid-run: every input once."""
    trained_cfg, single_node = trained
    s3_server.client().create_bucket(Bucket="multinode")
    model = "s3://multinode/models/m1"
    images = set(synthetic.make_unlabelled(str(tmp_path / "images"), count=160, size=(64, 48)))
    out = tmp_path / "out"
    result = run_multinode(
        single_node.arch, labelled_root, "s3://multinode/runs", model,
        str(tmp_path / "images"), str(out),
    )  # fmt: skip
    assert result["train"]["epochs"] == [1, 2]
    meta = read_meta(model)
    assert meta.classes == single_node.classes and meta.arch == single_node.arch
    assert shapes(model) == shapes(trained_cfg.output)
    checkpoints = storage.filesystem("s3://multinode/runs/multinode")[0].ls(
        "multinode/runs/multinode"
    )
    assert sum("checkpoint_" in c and not c.endswith(".json") for c in checkpoints) >= 1

    classified = result["classify"]
    assert classified["node_removed_before_the_end"], "the node must be lost mid-run"
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert classified["rows"] == classified["inputs"] == len(paths) == len(set(paths))
    assert set(paths) == images
    assert os.path.exists(out / "_SUCCESS")
