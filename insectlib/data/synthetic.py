"""A small generated image set for the demo and the tests: no downloads, learnable on purpose.

Each class has its own background colour and insect-like shape, so even a randomly
initialised frozen trunk gives features a linear head can separate.
"""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("beetles", "cockroach", "dragonflies")
_STYLE = {
    # background, body colour, body (width, height) as a fraction of the image
    "beetles": ((70, 120, 60), (40, 25, 20), (0.45, 0.55)),
    "cockroach": ((225, 205, 170), (120, 50, 20), (0.30, 0.70)),
    "dragonflies": ((120, 170, 230), (20, 60, 140), (0.10, 0.80)),
}


def make_image(cls: str, rng: random.Random, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One synthetic photo of class `cls`."""
    w, h = size
    background, body, (bw, bh) = _STYLE[cls]
    jitter = [max(0, min(255, c + rng.randint(-15, 15))) for c in background]
    image = Image.new("RGB", size, tuple(jitter))
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # clutter shared by every class
        x, y = rng.randint(0, w), rng.randint(0, h)
        r = rng.randint(1, max(2, w // 25))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 255) for _ in "rgb"))
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    scale = rng.uniform(0.8, 1.1)
    hw, hh = bw * w * scale / 2, bh * h * scale / 2
    draw.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=body)
    if cls == "dragonflies":  # wings
        draw.ellipse(
            [cx - 0.35 * w, cy - 0.2 * h, cx + 0.35 * w, cy - 0.1 * h], fill=(200, 220, 240)
        )
    return image.filter(ImageFilter.GaussianBlur(0.6))


def labelled_names(per_class: int) -> list[tuple[str, str]]:
    """(path relative to the root, class) of each file `make_labelled` writes, in order."""
    return [(f"{cls}/{cls}_{i:04d}.jpg", cls) for cls in CLASSES for i in range(per_class)]


def unlabelled_names(count: int) -> list[tuple[str, str]]:
    """(file name, class) of each image `make_unlabelled` writes: JPEGs and some PNGs."""
    return [
        (f"photo_{i:04d}.{'png' if i % 5 == 4 else 'jpg'}", CLASSES[i % len(CLASSES)])
        for i in range(count)
    ]


def make_labelled(root: str, per_class: int = 40, seed: int = 0, size=(160, 120)) -> str:
    """Write `root/<class>/<n>.jpg` for every class; returns root."""
    rng = random.Random(seed)
    for name, cls in labelled_names(per_class):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_image(cls, rng, size).save(path, quality=90)
    return root


def make_unlabelled(root: str, count: int = 30, seed: int = 1, size=(160, 120)) -> dict[str, str]:
    """Write `count` images into one folder (`unlabelled_names`); returns {path: true class}."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    truth = {}
    for name, cls in unlabelled_names(count):
        path = os.path.join(root, name)
        make_image(cls, rng, size).save(path)
        truth[path] = cls
    return truth
