"""Listing folders and prefixes, streamed: local trees with `os.walk`/`os.scandir`, buckets
with paginated ListObjectsV2 requests (`buckets.pages`). Hidden names (a leading ".") are
skipped everywhere, and nothing below a listed location stops a listing: a sub-folder that
cannot be read is yielded as an `UnlistedFolder`, which becomes its own error row. Only the
listed location itself, unreadable or missing, raises.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from insectlib.config import S3Options
from insectlib.errors import InsectError, StorageUnavailable
from insectlib.storage import buckets
from insectlib.storage.files import (
    FILE_ERRNOS,
    bucket_and_key,
    check_bucket,
    filesystem,
    is_s3,
    printable,
    user_errors,
)

GLOB_CHARS = "*?["


# A link to a folder is not walked (a loop, or a tree listed twice, where it points inside):
# it is accounted for as a folder left out, a row or a warning saying so.
LINKED_FOLDER = "folder link not followed: give its target instead"


class UnlistedFolder(str):
    """A folder below the listed location that could not be listed: its path, with
    `reason` (what its row's error says). A str, so it travels with the listed paths."""

    reason: str

    def __new__(cls, path: str, reason: str) -> UnlistedFolder:
        folder = super().__new__(cls, path)
        folder.reason = reason
        return folder

    def __reduce__(self):  # pickled between Ray processes with its reason
        return (UnlistedFolder, (str(self), self.reason))


def is_glob(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARS)


def iter_files(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """Every file below `uri` (a file, a directory or prefix, or a glob), as full URIs.

    Directories are walked recursively and hidden files are skipped. Raises InsectError
    when `uri` does not exist or cannot be listed."""
    if is_s3(uri):
        yield from _iter_s3(uri, s3)
        return
    fs, path = filesystem(uri, s3)
    if is_glob(path) and not os.path.exists(path):
        yield from (name for name in _glob_visible(path, fs.glob(path)) if os.path.isfile(name))
    elif os.path.isdir(path):
        yield from _walk_local(path)
    elif os.path.lexists(path):
        yield path  # a file (or a link to one, or a dangling link: its row says so)
    else:
        raise InsectError(f"not found: {uri}")


def is_dir(uri: str, s3: S3Options | None = None) -> bool:
    """Whether `uri` is a folder, or a bucket or prefix with objects below it. A bucket that
    does not exist is refused, naming it."""
    if not is_s3(uri):
        return os.path.isdir(filesystem(uri, s3)[1])
    bucket, key = bucket_and_key(uri)
    if not key:  # a bucket: one request, which refuses one that does not exist
        check_bucket(uri, s3)
        return True
    with user_errors(uri):
        return buckets.has_objects(s3, bucket, f"{key}/")


@dataclass
class Level:
    """The entries directly in a folder or prefix: whether it holds files, and its
    sub-folders as URIs (hidden ones left out, as everywhere)."""

    has_files: bool
    subdirs: list[str]


def list_level(uri: str, s3: S3Options | None, limit: int) -> Level | None:
    """One level of `uri` (a folder or prefix), or None when it holds more than `limit`
    entries (then only a single stream over the whole tree is cheap: finding every
    sub-prefix of a flat level means reading every key of it) or cannot be listed here
    (a stream over it then yields it as an `UnlistedFolder`)."""
    has_files, subdirs, seen = False, [], 0
    with user_errors(uri):
        try:
            for name, is_folder in _level_entries(uri, s3):
                seen += 1
                if seen > limit or name.endswith("/"):
                    # Too many to split; or an empty key segment (prefix "a//"), which no
                    # sub-prefix URI can name: list it all in one stream.
                    return None
                if is_folder:
                    subdirs.append(name)
                else:
                    has_files = True
        except OSError as e:
            if e.errno not in FILE_ERRNOS:
                raise
            return None
    return Level(has_files, sorted(subdirs))


def iter_level_files(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """The files directly in folder or prefix `uri` (not below it), as full URIs."""
    with user_errors(uri):
        names = (name for name, is_folder in _level_entries(uri, s3) if not is_folder)
        yield from (names if is_s3(uri) else sorted(names))


def iter_tree(uri: str, s3: S3Options | None = None) -> Iterator[str]:
    """Every file below folder or prefix `uri`, recursively, as full URIs; nothing when it
    has gone (a prefix emptied since it was found); an `UnlistedFolder` for `uri` itself
    when it cannot be listed."""
    if is_s3(uri):
        bucket, key = bucket_and_key(uri)
        prefix = f"{key}/" if key else ""
        start = len(bucket) + 1 + len(prefix)
        with user_errors(uri):
            for page in buckets.pages(s3, bucket, prefix):
                yield from (f"s3://{n}" for n, _ in page if _visible_below(n, start))
        return
    path = filesystem(uri, s3)[1]
    if os.path.isdir(path):
        yield from _walk_local(path, root_may_fail=False)
    elif os.path.lexists(path):
        yield UnlistedFolder(path, _folder_problem(path))


def _visible(name: str) -> bool:
    return not name.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def _visible_below(name: str, start: int) -> bool:
    """A key of a flat listing is an input when it is no folder marker and no part of it
    below the listed prefix (from `start`) is hidden: as a local walk skips hidden folders."""
    return not name.endswith("/") and not any(
        part.startswith(".") for part in name[start:].split("/")
    )


def _glob_visible(pattern: str, names: Iterable[str]) -> list[str]:
    """The sorted `names` a glob matched, less those with a hidden part below its fixed
    folder, as the shell's * and ** skip names that start with a dot (and as a folder's
    walk does); a pattern that names such a part itself keeps them."""
    first = min((i for i, c in enumerate(pattern) if c in GLOB_CHARS), default=len(pattern))
    start = pattern.rfind("/", 0, first) + 1
    if "/." in "/" + pattern[start:]:
        return sorted(names)
    return sorted(n for n in names if not any(p.startswith(".") for p in n[start:].split("/")))


def _level_entries(uri: str, s3: S3Options | None) -> Iterator[tuple[str, bool]]:
    """(URI, is a folder) of the entries directly in `uri`, hidden names skipped; local
    ones follow `_walk_local`: a link to a folder is an `UnlistedFolder` (LINKED_FOLDER),
    and an entry whose type cannot be read (a link loop) counts as a file, whose row will
    say why."""
    if is_s3(uri):
        bucket, key = bucket_and_key(uri)
        for page in buckets.pages(s3, bucket, f"{key}/" if key else "", delimiter="/"):
            for name, is_folder in page:
                if _visible(name) and (is_folder or not name.endswith("/")):
                    yield f"s3://{name}", is_folder
        return
    with os.scandir(filesystem(uri, s3)[1]) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                is_dir = _is_dir(entry)
                if is_dir and entry.is_symlink():
                    yield UnlistedFolder(entry.path, LINKED_FOLDER), False
                else:
                    yield entry.path, is_dir


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # ELOOP, EACCES on the target: a file as far as listing goes
        return False


def _iter_s3(uri: str, s3: S3Options | None) -> Iterator[str]:
    bucket, key = bucket_and_key(uri)
    with user_errors(uri):
        if is_glob(key):
            fs, path = filesystem(uri, s3)
            yield from (f"s3://{name}" for name in _glob_visible(path, fs.glob(path)))
            return
        found = False
        for name in iter_tree(uri, s3):
            found = True
            yield name
        if found:
            return
        fs, path = filesystem(uri, s3)
        if key and fs.isfile(path):
            yield f"s3://{path}"
            return
        buckets.has_objects(s3, bucket, "")  # names a missing bucket; else the prefix is empty
    raise InsectError(f"no objects under {uri}")


def _walk_local(root: str, root_may_fail: bool = True) -> Iterator[str]:
    """Every visible file below `root`, sorted per folder (deterministic, and no folder is
    held whole); a sub-folder that cannot be listed comes as an `UnlistedFolder`. `root`
    itself failing raises (InsectError) unless not `root_may_fail`, where it too is
    yielded as an `UnlistedFolder`."""
    failed: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=failed.append):
        yield from _unlisted(failed, root, root_may_fail)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(name)  # os.walk would not go in either: said, not dropped
            yield UnlistedFolder(os.path.join(dirpath, name), LINKED_FOLDER)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)
    yield from _unlisted(failed, root, root_may_fail)


def _unlisted(failed: list[OSError], root: str, root_may_fail: bool) -> Iterator[str]:
    """The folders whose listing failed so far, as `UnlistedFolder`s (and `failed`
    emptied); the machine's own errors (EIO, ...) stop the run instead."""
    while failed:
        error = failed.pop(0)
        where = error.filename or root
        if error.errno not in FILE_ERRNOS:
            raise StorageUnavailable(f"cannot list {printable(where)}: {error.strerror or error}")
        if where == root and root_may_fail:
            raise InsectError(f"cannot read {printable(root)}: {error.strerror or error}")
        yield UnlistedFolder(where, f"unreadable folder: {error.strerror or error}")


def _folder_problem(path: str) -> str:
    try:
        os.scandir(path).close()
    except OSError as e:
        return f"unreadable folder: {e.strerror or e}"
    return f"unreadable folder: {os.strerror(errno.ENOTDIR)}"
