"""Decoding and preprocessing: the one definition training and classification share.

Images travel between stages as uint8 CHW tensors (4x smaller than float32); the model
side turns a batch into normalised floats with `normalize`, on whatever device it runs.

Input files are untrusted: `load_image` reads one with the limits of `DecodeLimits`, lets
only the Pillow plugins of the accepted formats open it, and turns every failure of the
file itself into an `ImageError` whose text becomes the file's error row.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from insectlib import storage
from insectlib.config import MAX_PIXELS, DecodeLimits
from insectlib.errors import ImageError

if TYPE_CHECKING:
    import torch
# torch and torchvision are imported where a transform is built: decoding alone (the review
# page's thumbnail tasks) starts without them, seconds sooner.

# The accepted extensions and the Pillow plugin behind each. Only these plugins may open a
# file, whatever its name says: Pillow would otherwise open PostScript, PDF, ICNS and a
# few dozen other formats from any bytes, and its EPS plugin runs Ghostscript on them.
FORMATS_BY_EXTENSION = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",  # also opens multi-picture JPEGs (MPO), as many cameras write
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
IMAGE_EXTENSIONS = frozenset(FORMATS_BY_EXTENSION)
PILLOW_FORMATS = tuple(sorted(set(FORMATS_BY_EXTENSION.values())))

# The longest side kept before resizing, as a multiple of the shorter one. The centre crop
# only ever uses a square around the middle, so a wider image is cut to 4:1 first: the GPU
# path resizes the whole image (a 1000x1 PNG to 256000x256, 260 MB), and the CPU path cuts
# the same so that both crop alike.
MAX_ASPECT = 4

# The pixel check in `decode` (`check_dimensions`, from the header) replaces Pillow's bomb
# check and warning, whose text would differ from the documented `image too large` one;
# Pillow's other warnings are about corrupt files, which the file's error row reports.
Image.MAX_IMAGE_PIXELS = None
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

# Images in flight per decoding thread of `load_images`: they are taken in order, so with one
# each a thread whose image is done waits for the oldest (measured: docs/performance.md,
# "Decoding for the model").
DECODES_AHEAD = 2

# ImageNet statistics: the normalisation the pretrained torchvision weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def resize_size(image_size: int) -> int:
    """The shorter side images are resized to before the centre crop (256 for 224)."""
    return round(image_size * 256 / 224)


def load_image(
    uri: str,
    transform: Callable[[Image.Image], torch.Tensor],
    min_side: int | None,
    limits: DecodeLimits,
    s3: storage.S3Options | None = None,
) -> torch.Tensor:
    """Read, decode and transform one input file (`load_images` does the same for a batch,
    with overlapping reads on S3).

    Raises ImageError for anything wrong with the file itself (its row's text names the
    problem) and StorageUnavailable when the storage keeps failing; nothing else."""
    data = storage.read_input(uri, limits.max_file_bytes, s3)
    return preprocess(data, transform, min_side, limits)


def load_images(
    uris: list[str],
    transform: Callable[[Image.Image], torch.Tensor],
    min_side: int | None,
    limits: DecodeLimits,
    s3: storage.S3Options | None = None,
    threads: int = 1,
) -> Iterator[torch.Tensor | ImageError]:
    """`load_image` of each of `uris`, in order, with the ImageError of a file that cannot
    be used in its place. On S3 the reads overlap (`storage.read_inputs`); with `threads`
    above 1 so do the decodes (Pillow lets go of the GIL while it decodes and resizes),
    DECODES_AHEAD images in flight a thread. At most READ_AHEAD + DECODES_AHEAD x `threads`
    files' bytes are held at once, and `threads` images being decoded."""

    def load(data: bytes | ImageError) -> torch.Tensor | ImageError:
        try:
            if isinstance(data, ImageError):
                raise data
            return preprocess(data, transform, min_side, limits)
        except ImageError as e:
            return e

    read = storage.read_inputs(uris, limits.max_file_bytes, s3)
    threads = threads if threads > 1 else 0
    yield from storage.prefetch(load, read, threads, DECODES_AHEAD * threads)


def preprocess(
    data: bytes,
    transform: Callable[[Image.Image], torch.Tensor],
    min_side: int | None,
    limits: DecodeLimits,
) -> torch.Tensor:
    """Decode and transform one file's bytes; any failure is an ImageError that names the
    exception type when it is not one `decode` knows."""
    try:
        return transform(decode(data, min_side, limits.max_pixels))
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # hostile bytes reach Pillow's and torchvision's corner cases
        raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None


def decode(data: bytes, min_side: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image with its EXIF orientation applied.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps its shorter side at least `min_side` pixels: a 1024x768 photo for a 224 px model
    decodes at 512x384, several times faster, and the resize that follows sees nearly the
    same pixels. Images of more than `max_pixels` (after that reduction) are refused before
    their pixels are decoded."""
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        image.seek(0)  # first frame of animations
        full = image.size
        if min_side and image.format in ("JPEG", "MPO"):
            image.draft(None, (min_side, min_side))
        check_dimensions(image.size, max_pixels, full)
        ImageOps.exif_transpose(image, in_place=True)  # a copy otherwise, turned or not
        return to_rgb(image)
    except ImageError:
        raise
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image (accepted formats: {', '.join(PILLOW_FORMATS)})") from None
    except OSError as e:
        text = str(e)
        if "truncated" in text.lower():
            raise ImageError(f"truncated image: {text}") from None
        raise ImageError(f"unreadable image: {text}") from None
    except Exception as e:  # ValueError, SyntaxError, struct.error, ... from broken headers
        raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None


def check_dimensions(
    size: tuple[int, int], max_pixels: int, full: tuple[int, int] | None = None
) -> None:
    """Refuse sizes no decoder should allocate for: `size` as it would be decoded, of an
    image of `full` size (a JPEG's reduced by draft decoding; default `size`)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"bad dimensions: {width}x{height}")
    if width * height > max_pixels:
        shown = f"{width}x{height}"
        if full and full != size:
            shown = f"{full[0]}x{full[1]} decoded at {shown}"
        raise ImageError(
            f"image too large: {shown} = {width * height:,} pixels, more than "
            f"--max-pixels {max_pixels:,}"
        )


def limit_aspect(image: Image.Image) -> Image.Image:
    """The centre of `image` cut to at most MAX_ASPECT:1, so that resizing its shorter side
    cannot build a huge intermediate image (see MAX_ASPECT). Images within the ratio are
    returned unchanged."""
    width, height = image.size
    if width > MAX_ASPECT * height:
        keep = MAX_ASPECT * height
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    if height > MAX_ASPECT * width:
        keep = MAX_ASPECT * width
        top = (height - keep) // 2
        return image.crop((0, top, width, top + keep))
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grey scaled down (not clipped), transparency over white. Grey
    whose values have no known range (32-bit, signed or floating point: scientific TIFFs)
    is an error, rather than a picture made black or white and classified."""
    odd = _grey_without_range(image)
    if odd:
        raise ImageError(f"unsupported image: {odd} grey, whose range of values is unknown")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.uint32) >> 8  # 16-bit range to 8-bit
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies an RGB one


def _grey_without_range(image: Image.Image) -> str | None:
    """Which grey `image` is whose values have no known 8-bit range, or None. A TIFF says
    how it stores them (BitsPerSample, SampleFormat: 2 signed, 3 floating point); the other
    formats Pillow opens in mode I hold unsigned 16-bit values."""
    if image.mode == "F":
        return "floating-point"
    if image.mode != "I":
        return None
    tags = getattr(image, "tag_v2", {})
    bits, kinds = tags.get(258, 16), tags.get(339, 1)
    if 2 in (kinds if isinstance(kinds, tuple) else (kinds,)):
        return "signed"
    return "32-bit" if max(bits if isinstance(bits, tuple) else (bits,)) > 16 else None


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Validation and classification: resize, centre crop, uint8 CHW tensor. Pair it with
    `decode(data, min_side=resize_size(image_size))`."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            limit_aspect,
            functools.partial(resized_centre, image_size=image_size),
            v2.PILToTensor(),
        ]
    )


def resized_centre(image: Image.Image, image_size: int) -> Image.Image:
    """torchvision's `Resize(resize_size(image_size))` then `CenterCrop(image_size)` as one
    Pillow resize of the crop's box: the pixels the crop drops are never resampled. The same
    sizes and offsets; values within 2 levels, as Pillow may resample the box's axes in the
    other order and round between them differently."""
    width, height = image.size
    short = resize_size(image_size)
    # torchvision's sizes and offsets (its _compute_resized_output_size and center_crop)
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    left = int(round((new_width - image_size) / 2.0))
    top = int(round((new_height - image_size) / 2.0))
    x_scale, y_scale = width / new_width, height / new_height
    box = (
        left * x_scale,
        top * y_scale,
        (left + image_size) * x_scale,
        (top + image_size) * y_scale,
    )
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)


def train_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation: random resized crop and horizontal flip, uint8 CHW tensor."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def normalize(batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 NCHW batch -> float batch (float32 unless `dtype`) normalised with the
    ImageNet statistics."""
    import torch

    dtype = dtype or torch.float32
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    return (batch.to(dtype) / 255 - mean) / std
