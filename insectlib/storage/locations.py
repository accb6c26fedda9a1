"""Where a run may write: never into (or as) one of its inputs, never over a file, never a
bucket root. Checked before anything is written or removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from insectlib.config import S3Options
from insectlib.errors import InsectError
from insectlib.storage.files import filesystem, is_s3, not_a_folder, user_errors
from insectlib.storage.listing import is_glob


def folder_problem(uri: str, s3: S3Options | None = None) -> str | None:
    """Why `uri` cannot be an output folder (see `files.not_a_folder`), None if it can."""
    if not is_s3(uri):
        return not_a_folder(os.path.expanduser(uri))
    fs, path = filesystem(uri, s3)
    with user_errors(uri):
        if fs.isfile(path):
            return "is a file"
        parts = path.split("/")
        for end in range(2, len(parts)):  # each folder above it (a HEAD each): an object?
            above = "/".join(parts[:end])
            if fs.isfile(above):
                return f"lies under s3://{above}, which is a file"
    return None


def location_key(uri: str) -> str:
    """A comparable form of a location: the real absolute path, or the s3:// URI."""
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.realpath(os.path.expanduser(uri))


def pattern_root(uri: str) -> str:
    """Where an input a command reads lies: a glob pattern's fixed leading folders (it
    selects files inside them), any other location itself. A local path that exists is no
    pattern, whatever its name holds, as the listing takes it (a folder 'photos [2023]');
    an S3 key with glob characters always is, as the listing takes it."""
    if is_s3(uri):
        scheme, path = "s3://", uri[len("s3://") :]
        if not is_glob(path.partition("/")[2]):
            return uri
    else:
        scheme, path = "", os.path.expanduser(uri)
        if not is_glob(path) or os.path.exists(path):
            return uri
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if is_glob(part))
    return scheme + ("/".join(parts[:fixed]) or ("/" if path.startswith("/") else "."))


def within(uri: str, location: str) -> bool:
    """Whether `uri` is `location` or lies inside it (compared as `location_key`s)."""
    return _holds(location_key(location), location_key(uri))


def _holds(outer: str, inner: str) -> bool:
    """Whether the `location_key` `inner` is `outer` or lies inside it."""
    outer = outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def check_location(
    output: str,
    protected: dict[str, str],
    apart: tuple[str, ...] = (),
    s3: S3Options | None = None,
    flag: str = "--output",
) -> None:
    """Refuse an output location (given as `flag`) that is a file, a bucket root, or holds
    (or is) one of the `protected` locations ({"the input": uri, "the model": uri}), before
    anything is written or removed there; for those named in `apart`, also an output
    inside them."""
    if is_s3(output) and not output[len("s3://") :].strip("/"):
        raise InsectError(f"{flag} {output} names no bucket: give s3://BUCKET/PREFIX")
    if is_s3(output) and "/" not in output[len("s3://") :].strip("/"):
        raise InsectError(
            f"{flag} {output} is a bucket root; write to a prefix such as "
            f"{output.rstrip('/')}/predictions"
        )
    why = folder_problem(output, s3)
    if why:
        raise InsectError(f"{flag} {output} {why}; give a folder (or s3:// prefix)")
    for what, uri in protected.items():
        if within(pattern_root(uri), output):
            raise InsectError(f"{flag} {output} contains {what} ({uri}): choose another {flag}")
        if what in apart:
            check_not_inside(output, uri, what, flag)


def folder_holding(uri: str, folders: Iterable[str]) -> str | None:
    """The first of `folders` (each itself, never a pattern: the folders of listed files)
    that `uri` is or lies in; None where there is none. One key of `uri` for them all."""
    inner = location_key(uri)
    for folder in folders:
        if is_s3(folder) == is_s3(uri) and _holds(location_key(folder), inner):
            return folder
    return None


def check_not_inside(output: str, location: str, what: str, flag: str = "--output") -> None:
    """Refuse an output in (or inside) `location`, where its files would be read as inputs
    by the next run over it."""
    if within(output, pattern_root(location)):
        raise InsectError(
            f"{flag} {output} is inside {what} ({location}), where its files would be taken "
            f"for that one's own next time: choose a {flag} outside it"
        )
