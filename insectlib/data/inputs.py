"""Classification inputs, as a Ray Data source that streams.

Nothing is listed up front. The driver only splits the input into parts: the sub-prefixes
of a folder or bucket prefix, found with delimiter listings one or two levels down (a few
requests), the data files of a manifest, or chunks of given paths. Each part is listed or
read by its own Ray read task, which yields blocks of paths as it goes: the first images are
classified while the listing goes on, parts are listed concurrently, and the driver holds
parts, never paths. (Ray Data's own file reads list every path in the driver before the
first read, ray-project/ray#40686; its streaming V2 listing is internal and Parquet-only in
Ray 2.60.)
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv
import pyarrow.orc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from insectlib import storage
from insectlib.data.images import is_image_name
from insectlib.errors import InsectError

# Listing parts: a level with more entries than this is listed as one stream, not split
# (finding every sub-prefix of a flat level means reading all of its keys); the search for
# sub-prefixes goes no deeper than two levels and stops at this many parts.
LEVEL_LIMIT = 10_000
MAX_PARTS = 1_024
PATHS_PER_PART = 10_000  # given paths (evaluate) per read task
MANIFEST_COLUMN = "path"  # CSV and Parquet manifests: the column holding the paths
TEXT_SUFFIXES = (".txt", ".lst", ".list")
# Parts that are lists a person may have written a path into twice; listings never repeat
# one, and S3 Inventory reports list each key once.
LISTS = ("text", "csv", "parquet", "paths")
PATH_SCHEMA = pa.schema(
    [("path", pa.string()), ("raw_path", pa.binary()), ("listing_error", pa.string())]
)


@dataclass(frozen=True)
class Part:
    """A piece of the input one read task enumerates.

    kind: "tree" (every file below `uri`), "level" (the files directly in `uri`), "any"
    (`storage.iter_files`: a single file or a glob), "text" (a manifest with one path a
    line), "csv" / "parquet" (a manifest with a `path` column), "inventory-csv" /
    "inventory-parquet" / "inventory-orc" (a data file of an S3 Inventory report, whose
    rows name `bucket`), "paths" (the paths themselves)."""

    kind: str
    uri: str = ""
    paths: tuple[str, ...] = ()
    bucket: str = ""  # inventory: the bucket the report lists
    columns: tuple[str, ...] = ()  # inventory CSV: the report's fileSchema

    @property
    def listing(self) -> bool:
        """Listings (and S3 Inventory reports, a listing of a whole bucket) keep only image
        names; manifests and given paths keep every line."""
        return self.kind in ("tree", "level", "any") or self.kind.startswith("inventory-")


def plan_listing(uri: str, s3: storage.S3Options) -> list[Part]:
    """Parts of a folder, prefix, file or glob: sub-prefixes two levels down, each listed
    by its own task, so that every file is in exactly one part."""
    if any(c in uri for c in "*?[") or not storage.is_dir(uri, s3):
        return [Part("any", uri)]
    parts: list[Part] = []
    frontier = [uri]
    for _ in range(2):
        deeper: list[str] = []
        for i, folder in enumerate(frontier):
            left = len(frontier) - i - 1  # folders of this level still to place
            level = storage.list_level(folder, s3, LEVEL_LIMIT)
            if level is None or len(parts) + len(deeper) + left + 1 + len(level.subdirs) > (
                MAX_PARTS
            ):
                parts.append(Part("tree", folder))  # too large to split: one stream
                continue
            if level.has_files:
                parts.append(Part("level", folder))
            deeper += level.subdirs
        frontier = deeper
    return parts + [Part("tree", folder) for folder in frontier]


def plan_paths(paths: list[str]) -> list[Part]:
    """Parts of an explicit list of paths."""
    return [
        Part("paths", paths=tuple(paths[i : i + PATHS_PER_PART]))
        for i in range(0, len(paths), PATHS_PER_PART)
    ]


def plan_manifest(uri: str, s3: storage.S3Options) -> list[Part]:
    """Parts of a manifest: a text file of paths (one a line), a CSV or Parquet file with a
    `path` column, or an S3 Inventory report's manifest.json (one part per data file).
    The format is checked here, so that a wrong file fails before any work."""
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".json"):
        return _plan_inventory(uri, s3)
    if name.endswith((".csv", ".csv.gz")):
        kind = "csv"
    elif name.endswith(".parquet"):
        kind = "parquet"
    elif name.endswith(TEXT_SUFFIXES):
        kind = "text"
    else:
        raise InsectError(
            f"--manifest {uri}: unknown format; use a text file ({', '.join(TEXT_SUFFIXES)}, "
            "one path a line), a CSV or Parquet file with a 'path' column, or an S3 "
            "Inventory manifest.json"
        )
    part = Part(kind, uri)
    with storage.user_errors(uri):
        next(iter(part_paths(part, s3)), None)  # format, columns and first lines checked
    return [part]


def _plan_inventory(uri: str, s3: storage.S3Options) -> list[Part]:
    with storage.user_errors(uri):
        try:
            manifest = json.loads(storage.read_bytes(uri, s3))
            fmt = manifest["fileFormat"].lower()
            files = [f["key"] for f in manifest["files"]]
            bucket = manifest["sourceBucket"]
        except (ValueError, KeyError, TypeError) as e:
            raise InsectError(
                f"--manifest {uri} is not an S3 Inventory manifest.json "
                f"(needs fileFormat, sourceBucket and files[].key): {e}"
            ) from None
    if fmt not in ("csv", "parquet", "orc"):
        raise InsectError(f"--manifest {uri}: unknown inventory fileFormat {fmt!r}")
    columns = ()
    if fmt == "csv":
        columns = tuple(c.strip().lower() for c in manifest.get("fileSchema", "").split(","))
        if "key" not in columns:
            raise InsectError(f"--manifest {uri}: fileSchema {manifest.get('fileSchema')!r} "
                              "has no Key column")  # fmt: skip
    # Data file keys are keys of the bucket holding the manifest (the report's destination).
    root = "s3://" + uri[len("s3://") :].split("/", 1)[0] if storage.is_s3(uri) else ""
    where = root or os.path.dirname(uri)
    return [
        Part(f"inventory-{fmt}", f"{where}/{key}" if root else os.path.join(where, key),
             bucket=bucket, columns=columns)
        for key in files
    ]  # fmt: skip


def part_paths(part: Part, s3: storage.S3Options | None) -> Iterator[str]:
    """The paths of one part, streamed."""
    if part.kind == "tree":
        yield from storage.iter_tree(part.uri, s3)
    elif part.kind == "level":
        yield from storage.iter_level_files(part.uri, s3)
    elif part.kind == "any":
        yield from storage.iter_files(part.uri, s3)
    elif part.kind == "paths":
        yield from part.paths
    elif part.kind == "text":
        yield from _text_paths(part.uri, s3)
    elif part.kind in ("csv", "parquet"):
        yield from _column_paths(part.uri, part.kind, s3)
    elif part.kind.startswith("inventory-"):
        yield from _inventory_paths(part, s3)
    else:
        raise ValueError(part.kind)


def _open(uri: str, s3, block_size: int | None = None):
    fs, path = storage.filesystem(uri, s3)
    f = fs.open(path, "rb", block_size=block_size)
    return gzip.open(f) if uri.endswith(".gz") else f


def _manifest_path(text: str, where: str) -> str:
    storage.refuse_nul(text, where)
    if not (storage.is_s3(text) or text.startswith("/")):
        raise InsectError(
            f"{where}: {text[:80]!r} is not an absolute path or s3:// URI; a manifest lists "
            "one absolute path or s3:// URI per line"
        )
    return storage.from_printable(text)  # as an output's `path` writes it


def _text_paths(uri: str, s3) -> Iterator[str]:
    with _open(uri, s3) as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if number == 1:  # a byte-order mark (Notepad's UTF-8) is not part of a path
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise InsectError(f"--manifest {uri}, line {number}: not UTF-8 text") from None
            yield _manifest_path(text, f"--manifest {uri}, line {number}")


def _column_paths(uri: str, kind: str, s3) -> Iterator[str]:
    with _open(uri, s3) as f:
        try:
            if kind == "parquet":
                table = pq.ParquetFile(f)
                if MANIFEST_COLUMN not in table.schema_arrow.names:  # pyarrow: IndexError
                    raise InsectError(
                        f"--manifest {uri} has no {MANIFEST_COLUMN!r} column (its columns: "
                        f"{', '.join(table.schema_arrow.names)})"
                    )
                batches = table.iter_batches(columns=[MANIFEST_COLUMN])
            else:
                check_csv_header(uri, s3, (MANIFEST_COLUMN,), "--manifest")
                batches = pyarrow.csv.open_csv(
                    f, convert_options=pyarrow.csv.ConvertOptions(
                        include_columns=[MANIFEST_COLUMN],
                        column_types={MANIFEST_COLUMN: pa.string()},
                    )
                )  # fmt: skip
            row, last, value = 0, None, None
            for batch in batches:
                _check_path_type(uri, batch.column(0).type)
                for value in batch.column(0).to_pylist():
                    row += 1
                    if not value:  # a row is an input: one without a path cannot get its row
                        raise InsectError(f"--manifest {uri}, row {row}: no path in it")
                    if last is not None:
                        yield last
                    last = _manifest_path(value, f"--manifest {uri}, row {row}")
            if last is not None:
                if kind == "csv":
                    _check_unclosed_quote(uri, row, value)
                yield last
        except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError, ValueError) as e:
            raise InsectError(
                f"--manifest {uri}: cannot read its {MANIFEST_COLUMN!r} column: {e}"
            ) from None


def _check_unclosed_quote(uri: str, row: int, value: str) -> None:
    """Refuse a CSV manifest's last value that holds a line break: a quote opened in that
    row and never closed reads the rest of the file as one path. (Only a quote left open to
    the end is caught; a name with a line break in the last row is refused too, which a
    Parquet manifest lists.)"""
    if "\n" in value or "\r" in value:
        raise InsectError(
            f"--manifest {uri}, row {row}: its path holds a line break, as when a quote "
            "opened there is never closed and the rest of the file reads as one path (a "
            "name with a line break can be listed in a Parquet manifest)"
        )


HEADER_BYTES = 1 << 16  # the most of a CSV's first line read as its header


def check_csv_header(uri: str, s3, columns: tuple[str, ...], flag: str) -> None:
    """Refuse a CSV file (gzipped where its name ends .gz) whose header lacks one of
    `columns`, naming the ones it has, or names one twice (the second would be dropped)."""
    with _open(uri, s3, block_size=HEADER_BYTES) as f:  # not an S3 read-ahead of 50 MiB
        # s3fs has no readline(n); a line ends at LF, CRLF or CR (as pyarrow reads them)
        line = (f.read(HEADER_BYTES).splitlines() or [b""])[0]
    try:
        header = next(csv.reader([line.decode("utf-8-sig")]), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise InsectError(f"{flag} {uri}: its first line is no CSV header ({e})") from None
    for column in columns:
        if column not in header:
            shown = ", ".join(header[:10]) or "none"
            raise InsectError(f"{flag} {uri} has no {column!r} column (its columns: {shown})")
        if header.count(column) > 1:
            raise InsectError(f"{flag} {uri} has {header.count(column)} columns named {column!r}")


def _check_path_type(uri: str, column_type: pa.DataType) -> None:
    text = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16+
    if not (pa.types.is_string(text) or pa.types.is_large_string(text) or string_view(text)):
        raise InsectError(
            f"--manifest {uri}: its {MANIFEST_COLUMN!r} column holds {column_type} values, "
            "not paths"
        )


def _inventory_paths(part: Part, s3) -> Iterator[str]:
    """`s3://bucket/key` of every current object of one inventory data file. CSV reports
    URL-encode keys (S3's form encoding: a space is '+'); ORC and Parquet reports do not."""
    with _open(part.uri, s3) as f:
        if part.kind == "inventory-csv":
            rows = csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
            index = {name: i for i, name in enumerate(part.columns)}
            for row in rows:
                record = {name: row[i] for name, i in index.items() if i < len(row)}
                if _current(record):
                    yield f"s3://{record.get('bucket') or part.bucket}/" + (
                        urllib.parse.unquote_plus(record["key"])
                    )
            return
        if part.kind == "inventory-orc":
            reader = pyarrow.orc.ORCFile(f)
            batches = (reader.read_stripe(i) for i in range(reader.nstripes))
        else:
            batches = pq.ParquetFile(f).iter_batches()
        for batch in batches:  # a batch at a time: reports run to millions of rows
            table = pa.Table.from_batches([batch])
            table = table.rename_columns([n.lower() for n in table.column_names])
            for record in table.to_pylist():
                if _current(record):
                    yield f"s3://{record.get('bucket') or part.bucket}/{record['key']}"


def _current(record: dict) -> bool:
    """Reports with versions list old versions and delete markers too: only current objects."""
    latest = str(record.get("is_latest", record.get("islatest", "true"))).lower()
    marker = str(record.get("is_delete_marker", record.get("isdeletemarker", "false"))).lower()
    return latest != "false" and marker != "true"


class InputSource(Datasource):
    """A Ray Data source of one read task per part, each yielding tables of `rows` paths
    (`path`, and `raw_path` for names that are not UTF-8; see `path_table`). Each task
    reports to `progress` (a `runtime.progress.RunProgress`) the paths it lists as it goes
    and, once, at its end, how many its part held."""

    def __init__(self, parts: list[Part], rows: int, s3: storage.S3Options, progress=None):
        self.parts, self.rows, self.s3, self.progress = parts, rows, s3, progress

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [
            ReadTask(self._read_fn(i, part), metadata, schema=PATH_SCHEMA)
            for i, part in enumerate(self.parts)
        ]

    def _read_fn(self, index: int, part: Part):
        rows, s3, progress = self.rows, self.s3, self.progress

        def read_listing_part():  # a named function: Ray Data names operators after it
            return read_part(index, part, rows, s3, progress)

        return read_listing_part


@dataclass(frozen=True)
class Count:
    """The driver's quick look at an input: how many inputs it holds, no more than the
    limit it was counted to, the bytes a path of them takes in a block, on average, and
    whether the count saw every input (it stopped below its limit)."""

    inputs: int
    path_bytes: float
    whole: bool = False


def count_inputs(
    parts: list[Part], s3, limit: int, further: Callable[[Count], int] | None = None
) -> Count:
    """The parts' inputs, counted no further than `limit`: the driver's quick look before
    a run (is there anything at all; is the job big enough to compile for). `further`:
    at the limit, the count so far -> the limit to count on to (once)."""
    count = size = 0
    for path in _inputs_of(parts, s3):
        count += 1
        size += path_bytes(path)
        if count >= limit and further:
            limit, further = max(limit, further(Count(count, size / count))), None
        if count >= limit:
            break
    return Count(count, size / count if count else 0.0, whole=count < limit)


def first_inputs(parts: list[Part], s3, limit: int) -> list[str]:
    """The parts' first `limit` inputs, as listed."""
    return list(itertools.islice(_inputs_of(parts, s3), limit))


def _inputs_of(parts: list[Part], s3) -> Iterator[str]:
    """The parts' inputs, part after part, as listed."""
    for part in parts:
        yield from (path for path in part_paths(part, s3) if is_input(part, path))


def path_bytes(path: str) -> int:
    """The bytes `path` takes in `path_table`'s columns (shown, and raw where they differ)."""
    shown = storage.printable(path)
    raw = 0 if shown == path else len(os.fsencode(path))
    return len(shown.encode()) + raw + len(getattr(path, "reason", ""))


def read_part(index: int, part: Part, rows: int, s3, progress) -> Iterator[pa.Table]:
    """The read task of one part: its paths as tables of `rows`; a path a list names twice
    (a manifest made by hand) is one input (see `_first_time`)."""
    block: list[str] = []
    total = 0
    seen: set[bytes] | None = set() if part.kind in LISTS else None
    for path in _guarded(part_paths(part, s3), part.uri or "the given paths"):
        if not is_input(part, path) or not _first_time(path, seen):
            continue
        block.append(path)
        total += 1
        if len(block) == rows:
            yield path_table(block)
            if progress is not None:
                progress.add.remote("listed", len(block))
            block = []
    if block:
        yield path_table(block)
        if progress is not None:
            progress.add.remote("listed", len(block))
    if progress is not None:
        ray.get(progress.set_part_total.remote(index, total))


def _first_time(path: str, seen: set[bytes] | None) -> bool:
    """Whether `path` is new to `seen` (None: a listing, where no path repeats), which keeps
    a 16-byte digest per path (no two paths share one in practice: 2**-128), about 70
    bytes of the listing task's memory per entry, not the path."""
    if seen is None:
        return True
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def is_input(part: Part, path: str) -> bool:
    """Whether `path`, found in `part`, gets a row: every entry of a manifest or given list;
    of a listing, the image names and the folders that could not be listed."""
    return not part.listing or is_image_name(path) or isinstance(path, storage.UnlistedFolder)


def _guarded(paths: Iterator[str], uri: str) -> Iterator[str]:
    """`paths`, with a storage or format failure turned into one InsectError naming `uri`
    (it stops the run: the part cannot be enumerated)."""
    with storage.user_errors(uri):
        try:
            yield from paths
        except KeyError as e:
            raise InsectError(f"{uri}: a row without {e}") from None


def path_table(paths: list[str]) -> pa.Table:
    """`path`, the file as the output names it; `raw_path`, the OS's bytes for a local name
    that is not valid UTF-8 (null otherwise): such a name is shown with backslash escapes
    (`storage.printable`) but read as it is; `listing_error`, why a folder could not be
    listed (its row's error), null for files."""
    shown = [storage.printable(p) for p in paths]
    raw = [None if s == p else os.fsencode(p) for s, p in zip(shown, paths, strict=True)]
    errors = [p.reason if isinstance(p, storage.UnlistedFolder) else None for p in paths]
    columns = zip(PATH_SCHEMA.names, (shown, raw, errors), strict=True)
    return pa.table({name: pa.array(v, PATH_SCHEMA.field(name).type) for name, v in columns})
