"""Seeded generator of hostile image files: mutated JPEG, PNG, GIF, TIFF, BMP and WebP.

Mutations aim where decoders parse: byte flips concentrated in the first bytes (the
headers), truncations, rewritten length fields (PNG chunk lengths, and 4-byte fields near
the start of the other formats) and headers spliced onto another format's body. The same
seed always gives the same files, so a failure reproduces.
"""

from __future__ import annotations

import io
import random
import struct

from PIL import Image

FORMATS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "WEBP": ".webp",
}


def seeds() -> dict[str, bytes]:
    """One small valid image per format, with some structure for the decoders to chew."""
    image = Image.new("RGB", (24, 16))
    image.putdata(
        [((x * 10) % 256, (y * 15) % 256, (x * y) % 256) for y in range(16) for x in range(24)]
    )
    out = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


def _flip(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        # Three in four flips land in the first 64 bytes, where the headers are.
        end = min(len(data), 64) if rng.random() < 0.75 else len(data)
        data[rng.randrange(end)] ^= 1 << rng.randrange(8)


def _length_field(data: bytearray, rng: random.Random, fmt: str) -> None:
    value = rng.choice([0, 1, 12, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)])
    if fmt == "PNG":
        # Chunk lengths: IHDR's at offset 8, then walk the chunks.
        offsets, pos = [], 8
        while pos + 8 <= len(data):
            offsets.append(pos)
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            pos += 12 + length
        pos = rng.choice(offsets)
    else:
        pos = rng.randrange(0, max(1, min(len(data), 60) - 4))
    data[pos : pos + 4] = struct.pack(">I" if rng.random() < 0.5 else "<I", value)


def mutate(data: bytes, fmt: str, rng: random.Random, others: list[bytes]) -> bytes:
    kind = rng.randrange(4)
    out = bytearray(data)
    if kind == 0:
        _flip(out, rng)
    elif kind == 1:
        out = out[: rng.randrange(1, len(out))]
    elif kind == 2:
        _length_field(out, rng, fmt)
    else:  # this format's header on another's body
        other = rng.choice(others)
        cut = rng.randrange(8, 64)
        out = out[:cut] + bytearray(other[cut:])
    if out and rng.random() < 0.3:
        _flip(out, rng)
    return bytes(out)


def hostile_files(count: int, seed: int = 0) -> dict[str, bytes]:
    """`count` mutated files, named `NNNN-<format>.<ext>` by the format they came from."""
    rng = random.Random(seed)
    valid = seeds()
    names = list(valid)
    files = {}
    for i in range(count):
        fmt = names[i % len(names)]
        others = [valid[f] for f in names if f != fmt]
        files[f"{i:05d}-{fmt.lower()}{FORMATS[fmt]}"] = mutate(valid[fmt], fmt, rng, others)
    return files
