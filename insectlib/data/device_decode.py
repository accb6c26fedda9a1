"""JPEG decoding in batches on a torch device: nvJPEG on a GPU (through
`torchvision.io.decode_jpeg`), resize and centre crop there too, so that a GPU model gets
its pixels without a host copy. The same code runs with device "cpu" (torchvision's
libjpeg-turbo), which is how CI tests it.

It takes only what it decodes exactly as the CPU path (`images`) would read it: baseline
8-bit YCbCr JPEGs with a clean structure (`device_jpeg`). Every other file, and a JPEG the
device decoder refuses after all, goes through `images.preprocess`, so that every file gets
the CPU path's result, error texts included. Work is split in two halves, so that a Ray
pipeline can run them in different processes:

- `prepare`: the host half, per file (read, sniff, check the header; decode on the CPU
  whatever the device will not take), cheap for the JPEGs the device takes;
- `finish`: the device half, per batch (decode, orient, resize, crop on the device).

`load_batch` runs both, for one process (tests, benchmarks).
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from insectlib import storage
from insectlib.config import DecodeLimits
from insectlib.data.images import (
    MAX_ASPECT,
    PILLOW_FORMATS,
    eval_transform,
    preprocess,
    resize_size,
    train_transform,
)
from insectlib.errors import ImageError

# One image decoded on the device holds at most this many pixels at full size (the CPU path
# decodes JPEGs at reduced DCT scale, so larger photos go there): 3 bytes each, 150 MB.
DEVICE_MAX_PIXELS = 50_000_000
# Full-size pixels one decode call holds at most (3 bytes each on the device).
CALL_PIXELS = 400_000_000
# Pixels one resize call takes at most: it works in float32, 12 bytes a pixel.
RESIZE_PIXELS = 64_000_000
# Luma sampling factors the device decoders take (chroma at 1x1: 4:4:4, 4:2:2, 4:4:0, 4:2:0).
LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}
BASELINE_SOF = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
DQT, DHT, DRI, SOS, EOI = 0xDB, 0xC4, 0xDD, 0xDA, 0xD9
ORIENTATION = 0x0112  # the EXIF tag
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults
# Pillow's exif_transpose as tensor operations on (C, H, W), by EXIF orientation.
ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG for the device decoder: its bytes (or a uint8 tensor of them), full size and
    EXIF orientation."""

    data: bytes | torch.Tensor
    width: int
    height: int
    orientation: int = 1

    def as_bytes(self) -> bytes:
        return self.data if isinstance(self.data, bytes) else self.data.numpy().tobytes()

    def tensor(self) -> torch.Tensor:
        """The bytes as a 1-D uint8 tensor on the host (no copy of bytes: never written)."""
        if isinstance(self.data, torch.Tensor):
            return self.data
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            return torch.frombuffer(self.data, dtype=torch.uint8)

    @property
    def pixels(self) -> int:
        return self.width * self.height


# What `prepare` makes of one file: a JPEG for the device, pixels decoded on the host, or the
# error text of its row.
Prepared = DeviceJpeg | torch.Tensor | str


def prepare(
    data: bytes | ImageError, image_size: int, limits: DecodeLimits, augment: bool = False
) -> Prepared:
    """One read file as the device half needs it (see the module's docstring); `augment`:
    the training transform for a file decoded here."""
    if isinstance(data, ImageError):
        return str(data)
    jpeg = device_jpeg(data, limits)
    if jpeg is not None:
        return jpeg
    return host_decode(data, image_size, limits, augment)


def host_decode(
    data: bytes, image_size: int, limits: DecodeLimits, augment: bool = False
) -> torch.Tensor | str:
    """The CPU path's uint8 CHW tensor for `data` (`images.eval_transform`, or with
    `augment` `images.train_transform`), or its error text."""
    if augment:
        transform, min_side = train_transform(image_size), None
    else:
        transform, min_side = eval_transform(image_size), resize_size(image_size)
    try:
        return preprocess(data, transform, min_side, limits)
    except ImageError as e:
        return str(e)


def device_jpeg(data: bytes, limits: DecodeLimits) -> DeviceJpeg | None:
    """`data` as a JPEG for the device decoders, or None: anything that is not a baseline
    8-bit YCbCr JPEG of a clean structure (`baseline_size`) that Pillow opens as the CPU
    path does, within the pixel limits at full size."""
    size = baseline_size(data)
    if size is None or size[0] * size[1] > min(limits.max_pixels, DEVICE_MAX_PIXELS):
        return None
    orientation = pillow_orientation(data, size)
    if orientation is None:
        return None
    return DeviceJpeg(data, size[0], size[1], orientation)


def pillow_orientation(data: bytes, size: tuple[int, int]) -> int | None:
    """The EXIF orientation `images.decode` applies to `data` (1 to 8), by Pillow's own
    header parse, as the CPU path opens it; None where Pillow sees another mode, size or
    format, or where opening or reading the EXIF data raises: the CPU path decides those."""
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        if image.format not in ("JPEG", "MPO") or image.mode != "RGB" or image.size != size:
            return None
        if image.info.get("progressive") or image.info.get("progression"):
            return None
        exif = image.getexif()
        orientation = exif.get(ORIENTATION, 1)
        if orientation not in ORIENT:
            return 1  # exif_transpose leaves the image as it is
        del exif[ORIENTATION]
        exif.tobytes()  # what exif_transpose does next: it must not raise here either
        return orientation
    except Exception:  # hostile headers reach Pillow's corner cases: the CPU path's to word
        return None


def baseline_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a baseline JPEG that both libjpeg and nvJPEG decode without an
    error: segments in order and within the file, one 8-bit 3-component frame with chroma
    at 1x1, Huffman and quantization tables as libjpeg accepts them, one scan of all
    components ending in EOI. None for anything else (progressive, CMYK, grey, 12-bit,
    arithmetic-coded, truncated, RGB-coded, ...)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    state = {"quant": set(), "huffman": set(), "frame": None}
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        pos += 2 + length
        if marker == SOS:
            if not _scan_ok(segment, state) or not _ends_in_eoi(data, pos):
                return None
            frame = state["frame"]
            return frame[1], frame[0]
        if not _segment_ok(marker, segment, state):
            return None
    return None


def _segment_ok(marker: int, segment: bytes, state: dict) -> bool:
    """Whether one segment before the scan is one the decoders take alike (see
    `baseline_size`); records its tables and frame in `state`."""
    if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
        # Adobe's colour transform 0 means RGB-coded: nvJPEG would convert it as YCbCr.
        return not (marker == 0xEE and segment.startswith(b"Adobe") and segment[11:12] != b"\1")
    if marker == DQT:
        return _quant_ok(segment, state["quant"])
    if marker == DHT:
        return _huffman_ok(segment, state["huffman"])
    if marker == DRI:
        return len(segment) == 2
    if marker in BASELINE_SOF and state["frame"] is None:
        state["frame"] = _frame(segment)
        return state["frame"] is not None
    return False  # progressive, lossless, arithmetic, a second frame, DNL, ...


def _frame(segment: bytes) -> tuple | None:
    """(height, width, component ids, their quant tables) of an SOF the decoders share."""
    if len(segment) != 15 or segment[0] != 8 or segment[5] != 3:
        return None
    height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
    ids = tuple(segment[6 + 3 * i] for i in range(3))
    sampling = [(segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(3)]
    quant = tuple(segment[8 + 3 * i] for i in range(3))
    if not height or not width or len(set(ids)) != 3 or ids == (82, 71, 66):  # "RGB" ids
        return None
    if sampling[0] not in LUMA_SAMPLING or sampling[1] != (1, 1) or sampling[2] != (1, 1):
        return None
    return height, width, ids, quant


def _quant_ok(segment: bytes, defined: set) -> bool:
    """8-bit quantization tables, each whole."""
    pos = 0
    while pos < len(segment):
        precision, table = segment[pos] >> 4, segment[pos] & 15
        if precision != 0 or table > 3 or pos + 65 > len(segment):
            return False
        defined.add(table)
        pos += 65
    return True


def _huffman_ok(segment: bytes, defined: set) -> bool:
    """Huffman tables as libjpeg's jpeg_make_d_derived_tbl accepts them: at most 256
    symbols, canonical codes that fit their lengths, DC symbols up to 15; and not empty."""
    pos = 0
    while pos < len(segment):
        kind, table = segment[pos] >> 4, segment[pos] & 15
        counts = segment[pos + 1 : pos + 17]
        total = sum(counts)
        symbols = segment[pos + 17 : pos + 17 + total]
        if kind > 1 or table > 3 or len(counts) != 16 or not 0 < total <= 256:
            return False
        if len(symbols) != total or (kind == 0 and max(symbols) > 15):
            return False
        code = 0
        for length, count in enumerate(counts, 1):
            code += count
            if code >= 1 << length:  # no code may be all ones
                return False
            code <<= 1
        defined.add((kind, table))
        pos += 17 + total
    return True


def _scan_ok(segment: bytes, state: dict) -> bool:
    """One sequential scan of the frame's three components, with tables defined."""
    frame = state["frame"]
    if frame is None or len(segment) != 10 or segment[0] != 3:
        return False
    _, _, ids, quant = frame
    if not set(quant) <= state["quant"] or segment[7:10] != b"\x00\x3f\x00":
        return False
    for i in range(3):
        component, tables = segment[1 + 2 * i], segment[2 + 2 * i]
        if component != ids[i] or not {(0, tables >> 4), (1, tables & 15)} <= state["huffman"]:
            return False
    return True


def _ends_in_eoi(data: bytes, start: int) -> bool:
    """Whether the first marker after the scan's data begins is EOI: the file is not
    truncated, and no stray marker (which libjpeg may refuse after the scan) comes first."""
    scan = np.frombuffer(data, np.uint8, offset=start)
    ff = np.flatnonzero(scan[:-1] == 0xFF)
    after = scan[ff + 1]
    markers = ff[(after != 0) & ((after < 0xD0) | (after > 0xD7))]  # not stuffing, not RSTn
    return len(markers) > 0 and scan[markers[0] + 1] == EOI


def finish(
    prepared: list[Prepared],
    image_size: int,
    device: torch.device | str,
    limits: DecodeLimits,
    augment: bool = False,
) -> tuple[torch.Tensor, list[str | None]]:
    """(uint8 (N, 3, S, S) images on `device`, errors) for `prepared` files: the JPEGs
    decoded there in batched calls, the host-decoded ones copied there; a row with an
    error holds zeros. A JPEG the device decoder refuses gets the CPU path's result.
    `augment`: random resized crops and flips (`random_crops`) rather than the centre."""
    device, prepared = torch.device(device), list(prepared)
    out = torch.zeros((len(prepared), 3, image_size, image_size), dtype=torch.uint8, device=device)
    errors: list[str | None] = [p if isinstance(p, str) else None for p in prepared]
    jpegs = [i for i, p in enumerate(prepared) if isinstance(p, DeviceJpeg)]
    decoded = decode_jpegs([prepared[i] for i in jpegs], device)
    done = {}
    for i, image in zip(jpegs, decoded, strict=True):
        if image is None:  # refused on the device: the CPU path's answer
            prepared[i] = host_decode(prepared[i].as_bytes(), image_size, limits, augment)
            errors[i] = prepared[i] if isinstance(prepared[i], str) else None
        else:
            done[i] = image
    if done:
        resize = random_crops if augment else to_model_size
        out[list(done)] = resize(list(done.values()), image_size)
    for i, p in enumerate(prepared):
        if isinstance(p, torch.Tensor):
            out[i] = p.to(device, non_blocking=True)
    return out, errors


def decode_jpegs(jpegs: list[DeviceJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as a uint8 (3, H, W) tensor on `device`, oriented as its EXIF says; None
    for one the decoder refuses. Batched calls of at most CALL_PIXELS pixels; a call that
    fails is retried one image at a time, to find the one that failed it."""
    found: list[torch.Tensor | None] = []
    for call in _calls(jpegs):
        inputs = [j.tensor() for j in call]
        try:
            images = decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = [_decode_one(x, device) for x in inputs]
        for jpeg, image in zip(call, images, strict=True):
            ok = image is not None and tuple(image.shape) == (3, jpeg.height, jpeg.width)
            found.append(ORIENT.get(jpeg.orientation, lambda x: x)(image) if ok else None)
    return found


def _calls(jpegs: list[DeviceJpeg]) -> list[list[DeviceJpeg]]:
    """`jpegs` in order, cut into decode calls of at most CALL_PIXELS pixels each."""
    calls, pixels = [[]], 0
    for jpeg in jpegs:
        if calls[-1] and pixels + jpeg.pixels > CALL_PIXELS:
            calls.append([])
            pixels = 0
        calls[-1].append(jpeg)
        pixels += jpeg.pixels
    return [c for c in calls if c]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def to_model_size(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """`images.eval_transform` on uint8 (3, H, W) tensors, on their device: the centre cut to
    MAX_ASPECT:1, the shorter side resized to `resize_size` (antialiased bilinear, as
    Pillow resizes), the centre crop; images of one size in one call (of at most
    RESIZE_PIXELS)."""
    images = [limit_aspect(x) for x in images]
    by_size = defaultdict(list)
    for i, image in enumerate(images):
        by_size[tuple(image.shape)].append(i)
    out = images[0].new_empty((len(images), 3, image_size, image_size))
    for (_, height, width), same in by_size.items():
        per_call = max(1, RESIZE_PIXELS // (height * width))
        for start in range(0, len(same), per_call):
            indices = same[start : start + per_call]
            batch = torch.stack([images[i] for i in indices])
            batch = F.resize(batch, [resize_size(image_size)], antialias=True)
            out[indices] = F.center_crop(batch, [image_size, image_size])
    return out


def random_crops(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """`images.train_transform` on uint8 (3, H, W) tensors, on their device: a random
    resized crop (torchvision's scale and ratio ranges) and a random horizontal flip each,
    from torch's random generator."""
    out = images[0].new_empty((len(images), 3, image_size, image_size))
    for i, image in enumerate(images):
        top, left, height, width = RandomResizedCrop.get_params(image, CROP_SCALE, CROP_RATIO)
        crop = F.resized_crop(image, top, left, height, width, [image_size] * 2, antialias=True)
        out[i] = crop.flip(-1) if torch.rand(1).item() < 0.5 else crop
    return out


def limit_aspect(image: torch.Tensor) -> torch.Tensor:
    """`images.limit_aspect` for a (C, H, W) tensor."""
    height, width = image.shape[-2:]
    if width > MAX_ASPECT * height:
        left = (width - MAX_ASPECT * height) // 2
        return image[..., :, left : left + MAX_ASPECT * height]
    if height > MAX_ASPECT * width:
        top = (height - MAX_ASPECT * width) // 2
        return image[..., top : top + MAX_ASPECT * width, :]
    return image


def load_batch(
    uris: list[str],
    image_size: int,
    limits: DecodeLimits,
    device: torch.device | str,
    s3: storage.S3Options | None = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """`images.load_images` of `uris` as one batch on `device`: (uint8 (N, 3, S, S)
    images, the error text of each file or None), both halves in this process."""
    reads = storage.read_inputs(uris, limits.max_file_bytes, s3)
    prepared = [prepare(r, image_size, limits) for r in reads]
    return finish(prepared, image_size, device, limits)


def to_columns(prepared: list[Prepared]) -> dict[str, np.ndarray]:
    """`prepared` files as Ray Data columns, for the process that runs `finish`: `data`
    (the JPEG's bytes, or the host-decoded CHW pixels' bytes), `orientation` (0: pixels),
    `width`, `height` and `error` ("" where there is none)."""
    n = len(prepared)
    data, error = np.empty(n, dtype=object), np.empty(n, dtype=object)
    sizes = np.zeros((3, n), dtype=np.int64)  # orientation, width, height
    for i, p in enumerate(prepared):
        data[i], error[i] = b"", ""
        if isinstance(p, DeviceJpeg):
            data[i], sizes[:, i] = p.data, (p.orientation, p.width, p.height)
        elif isinstance(p, torch.Tensor):
            data[i] = p.numpy().tobytes()
        else:
            error[i] = p
    return {
        "data": data,
        "orientation": sizes[0].astype(np.int8),
        "width": sizes[1],
        "height": sizes[2],
        "error": error.astype(str),
    }


def from_columns(batch: dict[str, np.ndarray], image_size: int) -> list[Prepared]:
    """The `prepared` files of a batch of `to_columns` rows."""
    found: list[Prepared] = []
    for data, orientation, width, height, error in zip(
        batch["data"], batch["orientation"], batch["width"], batch["height"], batch["error"],
        strict=True,
    ):  # fmt: skip
        if error:
            found.append(str(error))
        elif orientation:
            found.append(DeviceJpeg(bytes(data), int(width), int(height), int(orientation)))
        else:
            pixels = np.frombuffer(data, np.uint8).reshape(3, image_size, image_size)
            found.append(torch.from_numpy(pixels.copy()))
    return found
