"""Runs insect on a multi-node Ray cluster made on this host with ray.cluster_utils.Cluster.

A separate process from pytest's, which holds its own local Ray (a process joins one Ray
cluster at a time). Usage, from tests/test_multinode.py:

    python tests/multinode.py ARCH DATA STORAGE MODEL IMAGES PREDICTIONS

trains MODEL (a torchvision ARCH) on two worker nodes, then classifies IMAGES with it into
PREDICTIONS while one of the nodes is removed (one cluster for both: its start is most of
the time).

Prints one JSON line of results last.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 200 << 20}


def start_cluster(workers: int) -> tuple[Cluster, list]:
    # The head schedules nothing: all work lands on the worker nodes.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 200 << 20},
    )
    nodes = [cluster.add_node(**NODE, resources={f"node{i}": 1}) for i in range(workers)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster, nodes


def train(arch: str, data: str, storage: str, output: str) -> dict:
    from insectlib.config import TrainConfig
    from insectlib.training.trainer import fit

    meta = fit(
        TrainConfig(
            data=data,
            output=output,
            arch=arch,
            weights="random",
            image_size=64,
            augment=False,
            batch_size=8,
            epochs=2,
            workers=2,
            placement="STRICT_SPREAD",  # one worker per node, or no run at all
            storage=storage,
            name="multinode",
        )
    )
    # Where the workers ran: every worker node of the cluster gave its CPU to one of them.
    return {"epochs": [e["epoch"] for e in meta.epochs], "classes": meta.classes}


def classify(cluster: Cluster, nodes: list, images: str, model: str, output: str) -> dict:
    from insectlib.classify.pipeline import classify
    from insectlib.config import ClassifyConfig

    removed = []

    def remove_a_node():
        # Wait for the first file: actors on both nodes are busy by then.
        while not any(name.endswith(".parquet") for name in os.listdir(output)):
            time.sleep(0.05)
        cluster.remove_node(nodes[1])
        removed.append(time.time())
        # It does not come back (Cluster.add_node works only from the main thread): the
        # lost actor's batches are retried on the node that is left.

    os.makedirs(output, exist_ok=True)
    thread = threading.Thread(target=remove_a_node, daemon=True)
    thread.start()
    summary = classify(
        ClassifyConfig(
            input=images, model=model, output=output, batch_size=4, rows_per_file=8, max_actors=2
        )
    )
    finished = time.time()
    thread.join(timeout=5)
    return {
        "inputs": summary.inputs,
        "rows": summary.rows,
        "node_removed_before_the_end": bool(removed) and removed[0] < finished,
    }


if __name__ == "__main__":
    arch, data, storage, model, images, predictions = sys.argv[1:]
    cluster, nodes = start_cluster(2)
    result = {
        "train": train(arch, data, storage, model),
        "classify": classify(cluster, nodes, images, model, predictions),
    }
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(result))
