import os
import threading
import time
from dataclasses import replace

import pytest
import ray
import ray.train
import torch

from insectlib.config import TrainConfig
from insectlib.data import synthetic
from insectlib.data.labels import discover
from insectlib.errors import RunStopped
from insectlib.layout import STATE_FILE
from insectlib.model.network import build_model, head_name, load_model
from insectlib.training.trainer import PEER_LOST, fit_stops, lost_workers, workers_lost
from insectlib.training.worker import CLASS_IMAGES, TrainingWorker


def test_train_two_workers_reports_and_checkpoints_every_epoch(trained):
    cfg, meta = trained
    assert [e["epoch"] for e in meta.epochs] == [1, 2, 3, 4]
    assert meta.epochs[-1]["train_images"] == 72 and meta.epochs[-1]["val_images"] == 18
    assert meta.epochs[-1]["val_accuracy"] > 0.5  # chance is 1/3
    assert all(e["images_per_second"] > 0 for e in meta.epochs)
    run_dir = os.path.join(cfg.storage, cfg.name)
    checkpoints = [d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))]
    epochs = [
        torch.load(os.path.join(run_dir, d, STATE_FILE), weights_only=True)["epoch"]
        for d in checkpoints
    ]
    assert sorted(epochs) == [1, 2, 3, 4]


def test_model_directory_is_self_describing(trained):
    cfg, meta = trained
    assert meta.classes == ["beetles", "cockroach", "dragonflies"]
    assert meta.arch == "resnet18" and meta.image_size == 64 and meta.head == "fc"
    assert meta.data["counts"]["train"] == {c: 24 for c in meta.classes}
    assert {"torch", "torchvision", "torchao", "ray", "insect"} <= set(meta.versions)


def test_frozen_weights_are_bit_identical_after_training(trained):
    cfg, _ = trained
    torch.manual_seed(cfg.seed)  # the same random trunk the workers built
    before = build_model(cfg.arch, 3, "random").state_dict()
    after, _ = load_model(cfg.output)
    head = head_name(after) + "."
    for name, value in after.state_dict().items():
        if name.startswith(head):
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"


def test_training_worker_runs_without_ray(tmp_path):
    """Each part of a worker's training (features cache, epoch, state) as plain PyTorch."""
    root = synthetic.make_labelled(str(tmp_path / "d"), per_class=6, size=(48, 36))
    data = discover(root, val_fraction=0.25, seed=0)
    cfg = TrainConfig(
        data=root, arch="resnet18", weights="random", image_size=32, batch_size=4, augment=False
    )

    def worker(**kw) -> TrainingWorker:
        return TrainingWorker(replace(cfg, **kw), data.classes, data.train, data.val)

    cached, direct = worker(), worker(cache_features=False)
    assert cached.cached and not direct.cached
    # The cached trunk features give the head exactly what the full forward pass gives it.
    before_training = []
    for w in (cached, direct):
        validation = w.epoch_batches(0)[1]
        w.model.eval()
        before_training.append(w.evaluate(validation))
    assert torch.allclose(*before_training, rtol=1e-4)
    assert before_training[0][2] == len(data.val)

    metrics = cached.run_epoch(0)
    assert metrics["train_images"] == len(data.train) and metrics["val_images"] == len(data.val)
    assert metrics["cached_features"] and metrics["skipped_images"] == 0
    listed = [sum(y == c for _, y in data.train) for c in range(len(data.classes))]
    assert metrics[CLASS_IMAGES] == listed  # images seen of each class
    cached.history.append(metrics)

    restored = worker()
    restored.restore(cached.training_state())
    assert restored.start_epoch == 1 and restored.history == [metrics]
    head = restored.head + "."
    for name, value in restored.model.state_dict().items():
        if name.startswith(head):
            assert torch.equal(value, cached.model.state_dict()[name])
    predictions = []
    restored.run_epoch(1, predictions)
    assert sum(len(labels) for labels, _ in predictions) == len(data.val)
    assert restored.model_meta({"root": root}).data["skipped_images"] == 0


def test_training_reads_a_batch_from_s3_concurrently(monkeypatch, tmp_path):
    """A batch's S3 reads overlap (latency, not bandwidth, bounds a GET), as classify's do."""
    from insectlib import storage
    from insectlib.config import DecodeLimits
    from insectlib.data.images import eval_transform
    from insectlib.storage import files
    from insectlib.training.worker import ImageFiles

    photo = synthetic.make_labelled(str(tmp_path / "d"), per_class=1, size=(48, 36))
    data = next((tmp_path / "d" / "beetles").iterdir()).read_bytes()
    in_flight, most, lock = [0], [0], threading.Lock()

    def slow_get(uri, max_bytes, s3=None):
        assert uri.startswith("s3://") and photo
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.2)  # an object store's first-byte latency
        with lock:
            in_flight[0] -= 1
        return data

    monkeypatch.setattr(files, "read_input", slow_get)
    items = [(f"s3://bucket/{i}.jpg", 0) for i in range(32)]
    files = ImageFiles(items, eval_transform(32), 37, DecodeLimits(), storage.S3Options())
    started = time.perf_counter()
    samples = files.__getitems__(list(range(32)))
    assert all(s is not None for s in samples)
    assert most[0] == storage.READ_AHEAD
    assert time.perf_counter() - started < 32 * 0.2 / 4  # one at a time would take 6.4 s


CFG = TrainConfig(data="d", name="r", storage="s")


class _HealthCheckFailed(Exception):
    """As Ray Train reports a worker's failed health check: the cause in an attribute."""

    def __init__(self, failure: Exception):
        super().__init__("A worker health check failed.")
        self.health_check_failure = failure


def test_only_lost_workers_make_the_one_line_ending_a_training_run():
    """A worker whose actor died is lost; the others then fail on their lost peer (gloo).
    A failure of the training code itself, alone or beside a lost peer, is not: its
    traceback is what to read."""
    died = _HealthCheckFailed(ray.exceptions.ActorDiedError())
    peer = RuntimeError(f"[pair.cc:561] Connection closed by peer. {PEER_LOST} GLHF!")
    unsendable = _HealthCheckFailed(TypeError("cannot pickle '_thread.lock' object"))

    def lost(**failures: Exception) -> list[int]:
        ranks = {int(rank[1:]): f for rank, f in failures.items()}
        return sorted(lost_workers(ray.train.WorkerGroupError("failed", ranks)))

    assert lost(r0=died, r1=peer) == [0] and lost(r0=peer, r1=died) == [1]
    assert lost(r0=peer, r1=peer) == [0, 1]  # the dead one not polled yet
    assert lost(r0=peer, r1=ValueError("a bug")) == []
    assert lost(r0=unsendable) == [] and lost(r0=ValueError("a bug")) == []
    assert lost_workers(ray.train.ControllerError(RuntimeError("x"))) == {}
    said = workers_lost(ray.train.WorkerGroupError("failed", {0: peer, 1: peer}), CFG)
    assert said.startswith("training stopped: a worker was lost (worker 0, 1 lost its peer: ")
    assert said.endswith("--max-failures 2 allows"), said
    # Said as the run stops, with its way on; a Ctrl-C (Ray Train's abort ends fit() with
    # SystemExit) with it too.
    way_on = "--resume --name r --storage s continues from its last recorded epoch"
    with pytest.raises(RunStopped) as stopped, fit_stops(CFG):
        raise ray.train.WorkerGroupError("failed", {0: peer, 1: peer})
    assert str(stopped.value) == f"{said}; once the cluster is up, {way_on}"
    with pytest.raises(KeyboardInterrupt, match=f"^{way_on}$"), fit_stops(CFG):
        raise SystemExit(0)
