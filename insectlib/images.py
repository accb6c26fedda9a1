"""Decoding and preprocessing: the one definition training and classification share.

Images travel between stages as uint8 CHW tensors (4x smaller than float32); the model
side turns a batch into normalised floats with `normalize`, on whatever device it runs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# ImageNet statistics: the normalisation the pretrained torchvision weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """A file that cannot be turned into an image; the message is the `error` column's text."""


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def resize_size(image_size: int) -> int:
    """The shorter side images are resized to before the centre crop (256 for 224)."""
    return round(image_size * 256 / 224)


def decode(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image with its EXIF orientation applied.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps its shorter side at least `min_side` pixels: a 1024x768 photo for a 224 px model
    decodes at 512x384, several times faster, and the resize that follows sees nearly the
    same pixels."""
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)  # first frame of animations
        if min_side and image.format == "JPEG":
            image.draft(None, (min_side, min_side))
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image") from None
    except OSError as e:
        text = str(e)
        if "truncated" in text.lower():
            raise ImageError(f"truncated image: {text}") from None
        raise ImageError(f"unreadable image: {text}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grey scaled down (not clipped), transparency over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.uint32) >> 8  # 16-bit range to 8-bit
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Validation and classification: resize, centre crop, uint8 CHW tensor. Pair it with
    `decode(data, min_side=resize_size(image_size))`."""
    return v2.Compose(
        [
            # Resizing the PIL image before tensor conversion uses Pillow's SIMD resampler.
            v2.Resize(resize_size(image_size), antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )


def train_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation: random resized crop and horizontal flip, uint8 CHW tensor."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW batch -> float batch normalised with the ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    return (batch.to(dtype) / 255 - mean) / std
