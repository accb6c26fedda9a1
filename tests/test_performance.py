"""The speed-ups keep the results: bf16 against fp32, JPEG draft decoding against full
resolution, and training on cached trunk features against the full forward pass."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from insectlib.config import TrainConfig
from insectlib.data import synthetic
from insectlib.data.images import decode, eval_transform, resize_size
from insectlib.data.labels import discover
from insectlib.training.worker import TrainingWorker


def photo(size=(1024, 768), seed=0) -> bytes:
    """A camera-sized JPEG with smooth areas, edges and texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    noise = rng.integers(0, 40, (h, w, 3))
    image = Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        draw.ellipse(
            [x0, y0, x0 + w // 5, y0 + h // 5], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    image = image.filter(ImageFilter.GaussianBlur(1))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("image_size", [224, 64])
def test_draft_decoding_stays_close_to_full_resolution(image_size):
    data = photo()
    transform = eval_transform(image_size)
    full = transform(decode(data)).float()
    draft_image = decode(data, resize_size(image_size))
    # 768 / 256 = 3: the largest DCT scale that keeps the short side >= 256 is 1/2.
    assert draft_image.size == ((512, 384) if image_size == 224 else (128, 96))
    fast = transform(draft_image).float()
    assert fast.shape == full.shape
    diff = (fast - full).abs()
    assert diff.mean() < 2.0 and torch.quantile(diff.flatten(), 0.99) < 12, diff.mean()


@pytest.mark.parametrize(
    "size,image_size",
    [
        ((512, 384), 224),
        ((384, 512), 224),
        ((270, 480), 224),
        ((300, 300), 224),
        ((1021, 383), 224),
        ((17, 11), 224),
        ((100, 75), 64),
        ((257, 1000), 64),
        ((384, 512), 384),
        ((375, 500), 384),
        ((480, 640), 299),
        ((52, 208), 512),
    ],
)
def test_the_centre_is_resized_alone_to_torchvisions_pixels(size, image_size):
    """`eval_transform` resizes only the crop's box: on noise, where a box off by a pixel or
    a scale off by one part in a thousand moves the values by tens of levels, it must give
    torchvision's Resize-then-CenterCrop values within 2 levels (Pillow may resample the
    box's axes in the other order, rounding differently in between)."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = v2.Compose(
        [
            v2.Resize(resize_size(image_size), antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )
    expected, got = reference(image).int(), eval_transform(image_size)(image).int()
    assert got.shape == expected.shape == (3, image_size, image_size)
    diff = (got - expected).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())


def test_draft_decoding_never_goes_below_the_resize_size():
    data = photo(size=(300, 200))
    assert decode(data, resize_size(224)).size == (300, 200)  # 1/2 would give 100 px


def test_cached_features_give_the_full_forward_results(tmp_path):
    """With a zero learning rate nothing changes between epochs, so the summed losses over
    the same images must match whether the trunk ran on them or its outputs were cached.
    (The worker without Ray: the `trained` fixture runs the cache through Ray Train.)"""
    root = synthetic.make_labelled(str(tmp_path / "d"), per_class=12, size=(64, 48))
    data = discover(root)
    metrics = {}
    for cache in (True, False):
        cfg = TrainConfig(
            data=root,
            arch="resnet18",
            weights="random",
            image_size=32,
            augment=False,
            cache_features=cache,
            lr=0.0,
            epochs=2,
            batch_size=8,
            precision="fp32",
        )
        worker = TrainingWorker(cfg, data.classes, data.train, data.val)
        metrics[cache] = [worker.run_epoch(epoch) for epoch in range(cfg.epochs)]
    assert all(e["cached_features"] for e in metrics[True])
    assert not any(e["cached_features"] for e in metrics[False])
    for cached, full in zip(metrics[True], metrics[False], strict=True):
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "train_images"):
            assert cached[key] == pytest.approx(full[key], rel=1e-4), key
