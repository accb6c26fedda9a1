"""Local paths and s3:// URIs behind one fsspec interface.

Every read and write in insect goes through here, so the rest of the code never asks
whether a location is local or in a bucket.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
import fsspec.asyn
import pyarrow.fs

from insectlib.errors import ImageError, InsectError, StorageUnavailable

# Reading one input from S3: attempts and the first back-off (doubled each time, with
# jitter), on top of botocore's own retries. ~7 s in all before a run gives up.
READ_ATTEMPTS = 4
READ_BACKOFF_S = 1.0
# Local errors that say something about the file itself (and become its error row); any
# other (EIO, ESTALE, EMFILE, ...) is the machine's and stops the run.
FILE_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO, errno.EISDIR,
     errno.ENOTDIR, errno.ENAMETOOLONG}
)  # fmt: skip
T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Credentials always come from the standard AWS chain, never from here.

    endpoint_url: an S3-compatible store (MinIO, Ceph, moto); defaults to $AWS_ENDPOINT_URL.
    anonymous: unsigned requests, for public buckets.
    """

    endpoint_url: str | None = field(default=None, metadata={"flag": "--s3-endpoint"})
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


def read_input(uri: str, max_bytes: int, s3: S3Options | None = None) -> bytes:
    """The bytes of one input file (an image to classify or train on).

    Only regular files are read, and at most `max_bytes` of them: a FIFO would block a
    reader forever, a link to /dev/zero would fill its memory. What is wrong with the file
    itself (missing, not a regular file, too large, permission denied locally) raises
    ImageError, which becomes the file's error row. On S3 every other failure (throttling,
    timeouts, server errors, denied or expired credentials) is retried with back-off and
    then raises StorageUnavailable: it says nothing about the image and must stop the run
    rather than become its row."""
    if not is_s3(uri):
        return _read_local_input(uri, max_bytes)
    fs, path = filesystem(uri, s3)

    def get() -> bytes:
        # One ranged GET: no HEAD request, and never more than the cap plus one byte.
        try:
            return fs.cat_file(path, start=0, end=max_bytes + 1)
        except OSError as e:
            text = str(e).lower()
            if "range is not satisfiable" in text or "invalidrange" in text:
                return b""  # S3 answers a ranged GET of an empty object with 416
            raise

    try:
        data = retrying(get, uri)
    except FileNotFoundError:
        raise ImageError("not found (removed after it was listed?)") from None
    _check_input_size(len(data), max_bytes)
    return data


READ_AHEAD = 16  # S3 reads in flight per reading process (object-store latency)


def read_inputs(
    uris: list[str], max_bytes: int, s3: S3Options | None = None
) -> Iterator[bytes | ImageError]:
    """`read_input` of each of `uris`, in order, with the ImageError of a file that cannot
    be read in place of its bytes. On S3, READ_AHEAD reads are in flight at once, so that
    latency overlaps; at most READ_AHEAD files' bytes wait to be consumed."""

    def read(uri: str) -> bytes | ImageError:
        try:
            return read_input(uri, max_bytes, s3)
        except ImageError as e:
            return e

    window = READ_AHEAD if uris and is_s3(uris[0]) else 0
    yield from prefetch(read, uris, window)


def prefetch(fn: Callable[[U], T], items: Iterable[U], window: int) -> Iterator[T]:
    """`fn(item)` for each item, in order, computed `window` at a time in threads (in this
    thread when `window` is 0); at most `window` results wait to be consumed."""
    if not window:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(window) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def retrying(fn: Callable[[], T], uri: str) -> T:
    """`fn()`, retried with exponential back-off on any failure but FileNotFoundError (and
    ImageError); after READ_ATTEMPTS it raises StorageUnavailable naming `uri`."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return fn()
        except (FileNotFoundError, ImageError, ValueError):
            raise  # the file's own state, or bad content: asking again cannot help
        except Exception as e:
            if attempt == READ_ATTEMPTS - 1:
                raise StorageUnavailable(
                    f"cannot read {uri} after {READ_ATTEMPTS} attempts: {type(e).__name__}: "
                    f"{e}. The rows written so far are kept: fix the cause and rerun with "
                    "--resume"
                ) from None
            time.sleep(READ_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _read_local_input(path: str, max_bytes: int) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The type is checked on the
        # open descriptor, so a file swapped after listing cannot slip through.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError("unreadable file: not found (or a dangling link)") from None
    except OSError as e:
        if e.errno not in FILE_ERRNOS:  # EIO, ESTALE, EMFILE, ...: the machine, not the file
            raise StorageUnavailable(
                f"cannot read {printable(path)}: {e.strerror or e}. The rows written so far "
                "are kept: fix the cause and rerun with --resume"
            ) from None
        raise ImageError(f"unreadable file: {e.strerror or e}") from None
    with open(fd, "rb", closefd=True) as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"not a regular file ({_file_kind(mode)})")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"unreadable file: {e.strerror or e}") from None
    _check_input_size(len(data), max_bytes)
    return data


def _check_input_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageError(f"file too large: more than --max-file-bytes {max_bytes:,}")


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def printable(path: str) -> str:
    """`path` as valid UTF-8 text. Local names that are not UTF-8 arrive from the OS with
    their undecodable bytes as surrogates; those bytes are written as backslash escapes
    (`\\xff`), which Arrow, Parquet and terminals accept. Other names are unchanged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def sha256(uri: str, s3: S3Options | None = None) -> str:
    """The SHA-256 of a file's content, read in 8 MB pieces."""
    fs, path = filesystem(uri, s3)
    digest = hashlib.sha256()
    with user_errors(uri), fs.open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


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


def is_dir(uri: str, s3: S3Options | None = None) -> bool:
    """Whether `uri` is a folder, or a bucket or prefix with objects below it."""
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        if not _is_s3fs(fs):
            return os.path.isdir(path)
        bucket, _, key = path.partition("/")
        if not key:
            return True
        entries = fs._iterdir(bucket, delimiter="/", prefix=f"{key}/", max_items=1)
        return bool(_next_page(fs, entries, bucket, uri))


@dataclass
class Level:
    """The entries directly in a folder or prefix: whether it holds files, and its
    sub-folders as URIs (hidden ones left out, as everywhere)."""

    has_files: bool
    subdirs: list[str]


def list_level(uri: str, s3: S3Options | None, limit: int) -> Level | None:
    """One level of `uri` (a folder or prefix), or None when it holds more than `limit`
    entries: then only a single stream over the whole tree is cheap (finding every
    sub-prefix of a flat level means reading every key of it)."""
    fs, path = filesystem(uri, s3)
    has_files, subdirs, seen = False, [], 0
    with user_errors(uri):
        for name, is_dir in _level_entries(fs, path, uri):
            seen += 1
            if seen > limit or name.endswith("/"):
                # Too many to split; or an empty key segment (prefix "a//"), which no
                # sub-prefix URI can name: list it all in one stream.
                return None
            if is_dir:
                subdirs.append(to_uri(fs, name))
            else:
                has_files = True
    return Level(has_files, sorted(subdirs))


def iter_level_files(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """The files directly in folder or prefix `uri` (not below it), as full URIs."""
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        names = (name for name, is_dir in _level_entries(fs, path, uri) if not is_dir)
        yield from (to_uri(fs, name) for name in (sorted(names) if not _is_s3fs(fs) else names))


def iter_tree(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """Every file below folder or prefix `uri`, recursively, as full URIs; nothing when it
    has gone (a prefix emptied since it was found)."""
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        if _is_s3fs(fs):
            bucket, _, key = path.partition("/")
            prefix = f"{key}/" if key else ""
            pages = fs._iterdir(bucket, delimiter="", prefix=prefix)
            start = len(bucket) + 1 + len(prefix)
            while entries := _next_page(fs, pages, bucket, uri):
                yield from (f"s3://{n}" for n, _ in entries if _visible_below(n, start))
        elif os.path.isdir(path):
            yield from (n for n in _walk_local(path) if _visible(n))


def _visible(name: str) -> bool:
    return not name.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def _visible_below(name: str, start: int) -> bool:
    """A key of a flat listing is an input when it is no folder marker and no part of it
    below the listed prefix (from `start`) is hidden: as a local walk skips hidden folders."""
    return not name.endswith("/") and not any(
        part.startswith(".") for part in name[start:].split("/")
    )


def _level_entries(fs, path: str, uri: str) -> Iterator[tuple[str, bool]]:
    """(name, is a folder) directly in `path`, hidden names skipped; local ones follow
    os.walk: a link to a folder is neither walked nor a file."""
    if _is_s3fs(fs):
        bucket, _, key = path.partition("/")
        pages = fs._iterdir(bucket, delimiter="/", prefix=f"{key}/" if key else "")
        while entries := _next_page(fs, pages, bucket, uri):
            for name, is_dir in entries:
                if _visible(name) and (is_dir or not name.endswith("/")):
                    yield name, is_dir
        return
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not entry.is_symlink():
                    yield entry.path, True
            else:
                yield entry.path, False


@contextlib.contextmanager
def user_errors(uri: str):
    """Turn storage failures into an InsectError that names `uri` and the likely cause."""
    try:
        yield
    except InsectError:
        raise
    except ImageError as e:  # the file itself: what its error row would say
        raise InsectError(f"{printable(uri)}: {e}") from None
    except PermissionError as e:
        hint = "check the AWS credentials" if is_s3(uri) else "check its permissions"
        raise InsectError(f"access denied to {uri}: {hint} ({e})") from None
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
    prefix = f"{key}/" if key else ""
    pages = fs._iterdir(bucket, delimiter="", prefix=prefix)
    found = False
    while entries := _next_page(fs, pages, bucket, uri):
        found = True
        for name, _ in entries:
            if _visible_below(name, len(bucket) + 1 + len(prefix)):
                yield f"s3://{name}"
    if found:
        return
    if key and fs.isfile(path):
        yield f"s3://{path}"
    _head_bucket(fs, bucket, uri)  # names a missing bucket; else the prefix is empty
    raise InsectError(f"no objects under {uri}")


def _next_page(fs, pages, bucket: str, uri: str) -> list[tuple[str, bool]]:
    """The next (up to) 1,000 (name, is a prefix) of an s3fs listing: consumed a page at a
    time, so only names, never per-object metadata, stay in memory."""
    try:
        return fsspec.asyn.sync(fs.loop, _next_entries, pages, 1000)
    except FileNotFoundError:
        _head_bucket(fs, bucket, uri)  # a missing bucket gets its own message
        raise


async def _next_entries(pages, n: int) -> list[tuple[str, bool]]:
    entries = []
    try:
        while len(entries) < n:
            info = await pages.__anext__()
            entries.append((info["name"], info["type"] == "directory"))
    except StopAsyncIteration:
        pass
    return entries


def _walk_local(root: str) -> Iterator[str]:
    # A generator, sorted per directory: deterministic order without holding the tree.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _raise(error: OSError) -> None:
    raise error  # a folder that cannot be listed must not silently lose its files


def _is_s3fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol
