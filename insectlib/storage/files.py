"""Reading and writing files, local or s3://, behind one fsspec interface.

Every read and write in insect goes through this package, so the rest of the code never
asks whether a location is local or in a bucket.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import fsspec
import pyarrow.fs

from insectlib.config import S3Options
from insectlib.errors import ImageError, InsectError, StorageUnavailable
from insectlib.layout import LOCK_FILE, LOG_DIR, WRITING_PREFIX
from insectlib.storage import buckets, retry

# Local errors that say something about the file itself (and become its error row); any
# other (EIO, ESTALE, EMFILE, ...) is the machine's and stops the run.
FILE_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO, errno.EISDIR,
     errno.ENOTDIR, errno.ENAMETOOLONG}
)  # fmt: skip
# A run's own bookkeeping in an output: neither output nor foreign, never removed (nor
# are the leftovers of killed writes: `is_bookkeeping`).
BOOKKEEPING = frozenset({LOG_DIR, LOCK_FILE})
T = TypeVar("T")
U = TypeVar("U")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path to use with it."""
    if is_s3(uri):
        import s3fs

        options = s3 or S3Options()
        fs = s3fs.S3FileSystem(
            anon=options.anonymous,
            endpoint_url=buckets.endpoint(options),
            config_kwargs=retry.S3_CLIENT,  # bounded timeouts; `retry` is the only policy
            use_listings_cache=False,  # listings can be millions of keys: keep none
        )
        fs.retries = retry.S3FS_RETRIES
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


def read_head(uri: str, size: int, s3: S3Options | None = None) -> bytes:
    """The first `size` bytes of `uri` (fewer for a shorter file), read as an input is (one
    ranged GET, retried; a regular file only); what is wrong with it raises InsectError."""
    with user_errors(uri):
        return _read_first(uri, size, s3)


def read_input(uri: str, max_bytes: int, s3: S3Options | None = None) -> bytes:
    """The bytes of one input file (an image to classify or train on).

    Only regular files are read, and at most `max_bytes` of them: a FIFO would block a
    reader forever, a link to /dev/zero would fill its memory. What is wrong with the file
    itself (missing, not a regular file, too large, permission denied locally) raises
    ImageError, which becomes the file's error row. On S3 every other failure (throttling,
    timeouts, server errors, denied or expired credentials) is retried with back-off and
    then raises StorageUnavailable: it says nothing about the image and must stop the run
    rather than become its row."""
    data = _read_first(uri, max_bytes + 1, s3)  # the cap plus one byte: too large is seen
    _check_input_size(len(data), max_bytes)
    return data


def _read_first(uri: str, size: int, s3: S3Options | None) -> bytes:
    """At most the first `size` bytes of the file `uri` (see `read_input`)."""
    if not is_s3(uri):
        return _read_local_first(uri, size)
    fs, path = filesystem(uri, s3)

    def get() -> bytes:
        # One ranged GET: no HEAD request, and never more than `size` bytes.
        try:
            return fs.cat_file(path, start=0, end=size)
        except OSError as e:
            text = str(e).lower()
            if "range is not satisfiable" in text or "invalidrange" in text:
                return b""  # S3 answers a ranged GET of an empty object with 416
            raise

    try:
        return retry.retrying(get, uri)
    except FileNotFoundError:
        raise ImageError("not found (removed after it was listed?)") from None


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


def prefetch(
    fn: Callable[[U], T], items: Iterable[U], threads: int, ahead: int | None = None
) -> Iterator[T]:
    """`fn(item)` for each item, in order, computed in `threads` threads (in this thread when
    `threads` is 0), `ahead` items at a time (`threads` unless more): at most `ahead` results
    wait to be consumed. With more items in flight than threads, a thread whose item is done
    starts the next while the oldest, awaited first, is still being computed. Closed early, or
    on an error, the items not started are dropped."""
    if not threads:
        yield from map(fn, items)
        return
    ahead = max(threads, ahead or 0)
    pool = ThreadPoolExecutor(threads)
    try:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _read_local_first(path: str, size: int) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The type is checked on the
        # open descriptor, so a file swapped after listing cannot slip through.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError("unreadable file: not found (or a dangling link)") from None
    except OSError as e:
        if e.errno not in FILE_ERRNOS:  # EIO, ESTALE, EMFILE, ...: the machine, not the file
            raise StorageUnavailable(f"cannot read {printable(path)}: {e.strerror or e}") from None
        raise ImageError(f"unreadable file: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # before open(), which refuses a directory's descriptor
        os.close(fd)
        raise ImageError(f"not a regular file ({_file_kind(info.st_mode)})")
    with open(fd, "rb", closefd=True) as f:
        try:  # a read of n bytes allocates n up front: no more than the file holds, plus one
            return f.read(min(size, info.st_size + 1))
        except OSError as e:
            raise ImageError(f"unreadable file: {e.strerror or e}") from None


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


def not_a_folder(path: str) -> str | None:
    """Why the local `path` cannot be written into as a folder: it is a file, a link to
    nothing or in a loop, or it lies under one of those (makedirs cannot make it); None
    where it is a folder or nothing yet."""
    if os.path.isdir(path):
        return None
    if os.path.lexists(path):
        return _not_a_folder_because(path)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if os.path.isdir(parent):
        return None
    return f"lies under {parent}, which " + _not_a_folder_because(parent)


def _not_a_folder_because(path: str) -> str:
    """What the existing `path`, not a folder, is (a link to nothing or in a loop, a file)."""
    if not os.path.islink(path):
        return "is a file"
    try:
        os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a link in a loop"
        return f"is a link to {os.path.realpath(path)}, which does not exist"
    return "is a link to a file"


def refuse_nul(text: str, where: str) -> None:
    """Refuse a path read from a file (a manifest's line, a labels table's cell) that holds
    a NUL character, naming `where` it was read."""
    if "\0" in text:
        raise InsectError(f"{where}: {text[:80]!r} holds a NUL character, which no path can")


def printable(path: str) -> str:
    """`path` as valid UTF-8 text, one text per name. Local names that are not UTF-8 arrive
    from the OS with their undecodable bytes as surrogates; those bytes are written as
    backslash escapes (`\\xff`), which Arrow, Parquet and terminals accept, and so is a
    backslash in a local name (`\\\\`): no name reads like another's escapes, and
    `from_printable` undoes them. Other names, and S3 keys (UTF-8 always), are unchanged."""
    if is_s3(path) or (is_utf8(path) and "\\" not in path):
        return path
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """Whether a name from the OS is valid UTF-8 (no undecodable bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# What `printable` writes: a backslash twice, or a byte UTF-8 cannot decode (0x80 and up).
ESCAPE = re.compile(rb"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def from_printable(text: str) -> str:
    """The local name that `printable` wrote as `text`, as the OS names it (a path copied
    from an output's `path` column into a manifest or a table); S3 URIs as they are. A
    backslash that starts no escape is kept: a name typed as it is."""
    if is_s3(text) or "\\" not in text:
        return text
    raw = ESCAPE.sub(
        lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]), os.fsencode(text)
    )
    return os.fsdecode(raw)


def sha256(uri: str, s3: S3Options | None = None) -> str:
    """The SHA-256 of a file's content, read in 8 MB pieces."""
    fs, path = filesystem(uri, s3)
    digest = hashlib.sha256()
    with user_errors(uri), fs.open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None, durable: bool = True) -> None:
    """Write `data` to `uri`, replacing it. A local file is written beside (a new file of
    its own, `WRITING_PREFIX`) and renamed, so it is there whole or not at all: a full disk
    left an empty `_SUCCESS` (an S3 object is whole by nature). `durable`: the file is
    flushed to the disk before the rename and the rename after it, so that a power loss too
    leaves it whole or absent, and a file written later (`_SUCCESS`) never outlives it. It
    keeps the mode of the file it replaces; a failure of the file beside names `uri`."""
    fs, path = filesystem(uri, s3)
    if is_s3(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    folder = os.path.dirname(path)
    beside = os.path.join(folder, f"{WRITING_PREFIX}{os.getpid()}.{secrets.token_hex(8)}")
    created = False
    try:
        os.makedirs(folder, exist_ok=True)
        # O_EXCL: a new file of its own; mode 0o666 less the umask, as open() would make it
        fd = os.open(beside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with open(fd, "wb") as f:
            f.write(data)
            if durable:  # a rename can reach the disk before the data it names
                f.flush()
                os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):  # the mode of the file it replaces
            os.chmod(beside, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(beside, path)
        created = False
        if durable:
            sync_folder(folder)
    except BaseException as e:  # a Ctrl-C too: nothing left beside
        if created:
            with contextlib.suppress(OSError):
                os.unlink(beside)
        if isinstance(e, OSError) and e.filename in (None, beside):
            raise OSError(e.errno, e.strerror, path) from None
        raise


def sync_folder(folder: str) -> None:
    """Flush a folder's entries to the disk. A file system that cannot sync a folder
    (EINVAL: some network and FUSE mounts) keeps its own order."""
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        return fs.exists(path)


def bucket_and_key(uri: str) -> tuple[str, str]:
    """The bucket and the key (no slash at its end) of an s3:// URI."""
    bucket, _, key = uri[len("s3://") :].rstrip("/").partition("/")
    return bucket, key


def check_bucket(uri: str, s3: S3Options | None = None) -> None:
    """For an s3:// location, fail early and clearly when its bucket is missing or denied."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")  # a final "/" kept: see below
        if not bucket:
            raise InsectError(f"{uri} names no bucket: s3://BUCKET or s3://BUCKET/PREFIX")
        with user_errors(uri):  # under its own prefix: a listing allowed only there passes
            buckets.has_objects(s3, bucket, key)


def not_found(uri: str, s3: S3Options | None = None) -> InsectError:
    """The error for a location that is not there, naming its bucket where that is what is
    missing (or denied)."""
    check_bucket(uri, s3)
    return InsectError(f"{uri} does not exist")


@contextlib.contextmanager
def user_errors(uri: str, action: str = "read"):
    """Turn storage failures into an InsectError that names `uri`, what was done to it
    (`action`) and the likely cause."""
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
        raise InsectError(f"cannot {action} {uri}: {type(e).__name__}: {e}") from None


def write_file(directory: str, name: str, data: str | bytes, s3: S3Options | None = None) -> None:
    """Write file `name` of `directory` (local or s3://), replacing it."""
    write_bytes(join(directory, name), data.encode() if isinstance(data, str) else data, s3)


def _is_s3fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol


def list_entries(output: str, s3: S3Options | None) -> list[dict]:
    """The entries directly in `output` (fsspec `ls` details), [] when it does not exist;
    a run's own bookkeeping (its log folder, the lock) left out: those are neither output
    nor foreign, and never removed."""
    fs, path = filesystem(output, s3)
    with user_errors(output):
        if not fs.exists(path):
            return []
        entries = [e for e in fs.ls(path, detail=True) if e["name"].rstrip("/") != path]
    return [e for e in entries if not is_bookkeeping(entry_name(e))]


def is_bookkeeping(name: str) -> bool:
    """Whether a name in an output is a run's own bookkeeping (see BOOKKEEPING), or a file a
    killed writer left half-written beside its final name (see `write_bytes`)."""
    return name in BOOKKEEPING or name.startswith(WRITING_PREFIX)


def entry_name(entry: dict) -> str:
    """The file or folder name of a `list_entries` entry (no path)."""
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]
