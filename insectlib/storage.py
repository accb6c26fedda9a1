"""Local paths and s3:// URIs behind one fsspec interface.

Every read and write in insect goes through here, so the rest of the code never asks
whether a location is local or in a bucket.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import fsspec.asyn
import pyarrow.fs

from insectlib.errors import InsectError


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Credentials always come from the standard AWS chain, never from here.

    endpoint_url: an S3-compatible store (MinIO, Ceph, moto); defaults to $AWS_ENDPOINT_URL.
    anonymous: unsigned requests, for public buckets.
    """

    endpoint_url: str | None = None
    anonymous: bool = False


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path to use with it."""
    if is_s3(uri):
        import s3fs

        s3 = s3 or S3Options()
        endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        fs = s3fs.S3FileSystem(
            anon=s3.anonymous,
            endpoint_url=endpoint,
            # Bounded retries and timeouts: an unreachable endpoint fails in seconds.
            config_kwargs={
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 3, "mode": "standard"},
            },
            use_listings_cache=False,  # listings can be millions of keys: keep none
        )
        return fs, uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise InsectError(f"unsupported location {uri!r}: use a local path or an s3:// URI")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing form of a path on `fs` (s3:// for buckets)."""
    return f"s3://{path}" if _is_s3fs(fs) else path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def pyarrow_filesystem(uri: str, s3: S3Options | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """The same filesystem wrapped for the Ray APIs that want a pyarrow one."""
    fs, path = filesystem(uri, s3)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    fs, path = filesystem(uri, s3)
    parent = path.rsplit("/", 1)[0]
    if not is_s3(uri):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        return fs.exists(path)


def check_bucket(uri: str, s3: S3Options | None = None) -> None:
    """For an s3:// location, fail early and clearly when its bucket is missing or denied."""
    if is_s3(uri):
        fs, path = filesystem(uri, s3)
        bucket = path.split("/", 1)[0]
        with user_errors(uri):
            _head_bucket(fs, bucket, uri)


def _head_bucket(fs, bucket: str, uri: str) -> None:
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise InsectError(f"bucket {bucket!r} does not exist ({uri})") from None


def iter_files(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """Every file below `uri` (a file, a directory or prefix, or a glob), as full URIs.

    Directories are walked recursively and hidden files are skipped. Raises InsectError
    when `uri` does not exist or cannot be listed.
    """
    fs, path = filesystem(uri, s3)
    if _is_s3fs(fs):
        with user_errors(uri):
            yield from _iter_s3(fs, path, uri)
        return
    if not fs.exists(path):
        if any(c in path for c in "*?["):
            for name in sorted(fs.glob(path)):
                if fs.isfile(name):
                    yield name
            return
        raise InsectError(f"not found: {uri}")
    if fs.isfile(path):
        yield path
        return
    for name in _walk_local(path):
        if not os.path.basename(name).startswith("."):
            yield name


@contextlib.contextmanager
def user_errors(uri: str):
    """Turn storage failures into an InsectError that names `uri` and the likely cause."""
    try:
        yield
    except InsectError:
        raise
    except PermissionError as e:
        raise InsectError(f"access denied to {uri}: check the AWS credentials ({e})") from None
    except FileNotFoundError:
        raise InsectError(f"not found: {uri}") from None
    except Exception as e:  # botocore's connection and endpoint errors are not OSErrors
        raise InsectError(f"cannot read {uri}: {type(e).__name__}: {e}") from None


def _iter_s3(fs, path: str, uri: str) -> Iterator[str]:
    bucket, _, key = path.partition("/")
    if any(c in key for c in "*?["):
        for name in sorted(fs.glob(path)):
            yield f"s3://{name}"
        return
    # One paginated flat listing (1,000 keys a request), consumed a page at a time so that
    # only names, never per-object metadata, stay in memory.
    pages = fs._iterdir(bucket, delimiter="", prefix=f"{key}/" if key else "")
    found = False
    while names := _next_page(fs, pages, bucket, uri):
        found = True
        for name in names:
            if not name.rsplit("/", 1)[-1].startswith(".") and not name.endswith("/"):
                yield f"s3://{name}"
    if found:
        return
    if key and fs.isfile(path):
        yield f"s3://{path}"
    _head_bucket(fs, bucket, uri)  # names a missing bucket; else the prefix is empty
    raise InsectError(f"no objects under {uri}")


def _next_page(fs, pages, bucket: str, uri: str) -> list[str]:
    try:
        return fsspec.asyn.sync(fs.loop, _next_names, pages, 1000)
    except FileNotFoundError:
        _head_bucket(fs, bucket, uri)  # a missing bucket gets its own message
        raise


async def _next_names(pages, n: int) -> list[str]:
    names = []
    try:
        while len(names) < n:
            names.append((await pages.__anext__())["name"])
    except StopAsyncIteration:
        pass
    return names


def _walk_local(root: str) -> Iterator[str]:
    # A generator, sorted per directory: deterministic order without holding the tree.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _is_s3fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol
