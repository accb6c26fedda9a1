"""The review page's thumbnails: Ray tasks read the chosen inputs (local or s3://) through
the bounded decoder classification uses (`data.images.load_images`: size and pixel limits,
only the accepted formats' decoders) and re-encode each as a small JPEG. The original bytes
never reach the page. The tasks return the JPEGs to the driver, which writes them into the
page's folder: on a cluster, a local folder is the driver's disk, not a worker's.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ray
from PIL import Image

from insectlib import storage
from insectlib.config import DecodeLimits
from insectlib.data.images import load_images
from insectlib.errors import ImageError
from insectlib.layout import THUMBS_DIR
from insectlib.runtime.connect import insect_error_in

THUMB_SIDE = 160  # pixels, the longer side; JPEGs are decoded at a reduced scale near it
THUMB_QUALITY = 80
MAX_PER_TASK = 64  # paths per task: small enough that every CPU gets some


def thumb_name(path: str) -> str:
    """The thumbnail's file name: a hash of the input's path, never the name itself."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{digest[:32]}.jpg"


def to_jpeg(image: Image.Image) -> bytes:
    """A decoded RGB image as a small JPEG, its longer side at most THUMB_SIDE."""
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()


def make_thumbnails(
    paths: list[str], limits: DecodeLimits, s3: storage.S3Options | None
) -> list[tuple[str, bytes | str]]:
    """(path, JPEG bytes, or why there is none) for each of `paths`, in order."""
    # The rows' paths as written (`storage.printable`): read by the names they stand for.
    found = load_images([storage.from_printable(p) for p in paths], to_jpeg, THUMB_SIDE, limits, s3)
    return [
        (path, str(result) if isinstance(result, ImageError) else result)
        for path, result in zip(paths, found, strict=True)
    ]


def per_task(paths: int, cpus: float) -> int:
    """Paths per task: about two tasks per CPU, at most MAX_PER_TASK."""
    return max(1, min(MAX_PER_TASK, math.ceil(paths / max(1.0, 2 * cpus))))


def thumbnail_results(
    paths: list[str], limits: DecodeLimits, s3: storage.S3Options | None
) -> Iterator[tuple[str, bytes | str]]:
    """`make_thumbnails` of `paths` in parallel Ray tasks, as each task finishes."""
    size = per_task(len(paths), ray.cluster_resources().get("CPU", 1.0))
    # Retried: a task only reads and decodes, so a worker lost on the way costs nothing.
    task = ray.remote(num_cpus=1, max_retries=2)(make_thumbnails)
    pending = [task.remote(paths[i : i + size], limits, s3) for i in range(0, len(paths), size)]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield from ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            raise insect_error_in(e) or e from None


def write_thumbnails(
    html: str, paths: list[str], limits: DecodeLimits, s3: storage.S3Options | None
) -> dict[str, dict]:
    """Make and write the thumbnails of `paths` into `html`/THUMBS_DIR; returns {path:
    {"thumb": its file, relative to the page} or {"problem": why there is none}}."""
    found: dict[str, dict] = {}
    with ThreadPoolExecutor(16 if storage.is_s3(html) else 1) as pool:
        writes = []
        for path, result in thumbnail_results(paths, limits, s3):
            if isinstance(result, str):
                found[path] = {"problem": result}
                continue
            name = f"{THUMBS_DIR}/{thumb_name(path)}"
            # Not flushed one by one: a thumbnail is remade by the next report.
            uri = storage.join(html, name)
            writes.append(pool.submit(storage.write_bytes, uri, result, s3, durable=False))
            found[path] = {"thumb": name}
        for write in writes:
            write.result()
    return found
