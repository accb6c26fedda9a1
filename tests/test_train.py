import os

import torch

from insectlib.model import build_model, head_name, load_model


def test_train_two_workers_reports_and_checkpoints_every_epoch(trained):
    cfg, meta = trained
    assert [e["epoch"] for e in meta.epochs] == [1, 2, 3, 4]
    assert meta.epochs[-1]["train_images"] == 72 and meta.epochs[-1]["val_images"] == 18
    assert meta.epochs[-1]["val_accuracy"] > 0.5  # chance is 1/3
    assert all(e["images_per_second"] > 0 for e in meta.epochs)
    run_dir = os.path.join(cfg.storage, cfg.name)
    checkpoints = [d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))]
    epochs = [
        torch.load(os.path.join(run_dir, d, "state.pt"), weights_only=True)["epoch"]
        for d in checkpoints
    ]
    assert sorted(epochs) == [1, 2, 3, 4]


def test_model_directory_is_self_describing(trained):
    cfg, meta = trained
    assert meta.classes == ["beetles", "cockroach", "dragonflies"]
    assert meta.arch == "vgg16" and meta.image_size == 64 and meta.head == "classifier.6"
    assert meta.data["counts"]["train"] == {c: 24 for c in meta.classes}
    assert {"torch", "torchvision", "ray", "insect"} <= set(meta.versions)


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
