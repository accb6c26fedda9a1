"""What insect writes into an output location, and the only code that removes anything.

A classification output holds Parquet parts written by `PartsDatasink` and, once every input
has its row, `_SUCCESS` and the run's summary (`RUN_FILES`). `--overwrite` removes exactly
those (recognised by name, and the parts by their Parquet schema) and nothing else;
`--resume` trusts only those. Any other file is named in a refusal, never deleted, and no
output may contain the input or the model.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from insectlib import storage
from insectlib.classify import duplicates
from insectlib.errors import InsectError
from insectlib.layout import OUTPUT_NAMES, ROW_FORMAT_KEY, RUN_FILES, SUCCESS_FILE
from insectlib.runtime import console, progress
from insectlib.storage import entry_name, list_entries, retry

# part-<write id>-<task>.parquet (`PartsDatasink`); "-<i>" before ".parquet": parts that
# Ray Data's Parquet writer wrote, up to insect 2026-12.
PART_NAME = re.compile(r"part-[0-9a-f]{32}-\d{6}(-\d+)?\.parquet")
# Parts written before insect named them: Ray Data's default names.
LEGACY_PART_NAME = re.compile(r"[A-Za-z0-9]{16,32}_[0-9a-f]{32}_\d{6}-\d+\.parquet")
# Columns every insect part has, whatever optional columns a run adds.
PART_COLUMNS = frozenset({"path", "label", "error", "model"})
SHOWN = 5  # foreign files named in a refusal


class PartsDatasink(Datasink[int]):
    """Each write task's rows as one Parquet part, with `schema` (the run's row format in
    its metadata), fenced by the run's `RunProgress` (`progress.fenced`): no part begins
    after the run's end, and the end waits for those under way. Ray Data's own Parquet
    writer, cancelled by a failed run, left one going, and it landed after the failure
    had been reported, under the rows a --resume was writing again."""

    def __init__(self, output: str, s3, schema: pa.Schema, rows_per_file: int, run):
        self.output, self.s3, self.schema, self.rows_per_file = output, s3, schema, rows_per_file
        self.run = run
        self.write_id = uuid.uuid4().hex

    @property
    def min_rows_per_write(self) -> int:
        # Ray Data joins blocks into writes of at least this many rows: one file each.
        return self.rows_per_file

    def write(self, blocks, ctx) -> int:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [self._conform(t) for t in tables if t.num_rows]
        if not tables:
            return 0
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(tables), buffer)
        data = buffer.getvalue()
        name = f"part-{self.write_id}-{ctx.task_idx:06}.parquet"
        uri = storage.join(self.output, name)

        def put() -> None:
            storage.write_file(self.output, name, data, self.s3)

        def write_part() -> bool:
            retry.retrying(put, uri, "write")
            return True

        with storage.user_errors(uri, "write"):
            if not progress.fenced(self.run, name, write_part):
                return 0  # the run had ended
        return sum(t.num_rows for t in tables)

    def _conform(self, table: pa.Table) -> pa.Table:
        """`table` with the schema's columns, order and types; other columns are a bug."""
        if set(table.column_names) != set(self.schema.names):
            raise ValueError(
                f"rows with columns {table.column_names}, not the row format's {self.schema.names}"
            )
        return table.select(self.schema.names).cast(self.schema)


# Why an output holding anything but the command's own files is refused with --overwrite.
OVERWRITE_REFUSED = (
    "--overwrite removes only what this command writes: move them or choose another --output"
)


def is_part_name(name: str) -> bool:
    """Whether a file name (no folder) is one insect gives its Parquet parts."""
    return bool(PART_NAME.fullmatch(name) or LEGACY_PART_NAME.fullmatch(name))


def part_entries(entries: Iterable[dict]) -> list[dict]:
    """The Parquet parts among `entries`, by name."""
    return [e for e in entries if e["type"] == "file" and is_part_name(entry_name(e))]


def foreign_rows(names: Iterable[str]) -> list[str]:
    """The `names` in an output beside insect's parts that a reader of the whole folder
    also takes for rows (pyarrow.dataset and pandas.read_parquet read every file and folder
    not named "_..." or "..."), which insect did not write and does not count."""
    return sorted(n for n in names if not n.startswith(("_", ".")) and not is_part_name(n))


def refuse_foreign(
    output: str, entries: list[dict], why: str, own_files=RUN_FILES, own_dirs=()
) -> None:
    """Refuse, naming them, when `entries` hold anything but insect's parts, `own_files`
    and `own_dirs`."""

    def ours(entry: dict) -> bool:
        name = entry_name(entry)
        if entry["type"] == "directory":
            return name in own_dirs
        return is_part_name(name) or name in own_files

    foreign = sorted(entry_name(e) for e in entries if not ours(e))
    if foreign:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        what = "files insect did not write"
        if OUTPUT_NAMES.issuperset(foreign):  # a classification where an evaluation goes, ...
            what = "files named as another insect command names its output"
        raise InsectError(f"{output} holds {what} ({', '.join(foreign[:SHOWN])}{more}); {why}")


def _part_footer(fs, name: str) -> pq.FileMetaData | None:
    """A part's Parquet footer, or None when it has none (a writer stopped before finishing
    it). Storage failures are retried, then stop the run."""

    def read():
        with fs.open(name, "rb") as f:
            size = f.size
            if size < 12:
                return None
            f.seek(size - 4)
            if f.read(4) != b"PAR1":
                return None
            f.seek(0)
            return pq.ParquetFile(f).metadata

    uri = storage.to_uri(fs, name)
    try:
        with storage.user_errors(uri):
            return retry.retrying(read, uri)
    except pa.ArrowInvalid as e:  # a Parquet tail but no valid footer: not half-written
        raise InsectError(
            f"{uri} is damaged ({e}); insect will not remove it: remove or move it yourself"
        ) from None


def check_parts(fs, parts: list[dict]) -> dict[str, pq.FileMetaData | None]:
    """Each part's footer (None: half-written); refuses a part whose columns are not
    insect's (a foreign file that happens to have such a name). One footer read per part,
    16 at a time: the only cost of a resume that grows with the output (one part per
    --rows-per-file rows)."""
    names = [e["name"] for e in parts]
    with ThreadPoolExecutor(16) as pool:
        footers = dict(zip(names, pool.map(lambda n: _part_footer(fs, n), names), strict=True))
    for name, footer in footers.items():
        columns = footer.schema.names if footer is not None else None
        if columns is not None and not PART_COLUMNS <= set(columns):
            raise InsectError(
                f"{storage.to_uri(fs, name)} is named like insect's output but has other "
                f"columns ({', '.join(columns[:6])}); remove it yourself or write elsewhere"
            )
    return footers


def entries_to_replace(
    output: str, s3: storage.S3Options, overwrite: bool, alternative: str = "", unused=()
) -> list[dict]:
    """The entries of `output` but the names `unused`, which must be none unless
    `overwrite`: the refusal names --overwrite and any `alternative` flag (" or --resume to
    ...")."""
    entries = [e for e in list_entries(output, s3) if entry_name(e) not in unused]
    if entries and not overwrite:
        raise InsectError(
            f"output {output} is not empty; pass --overwrite to replace it{alternative}"
        )
    return entries


def overwrite_plan(output: str, s3: storage.S3Options, own_files=RUN_FILES) -> list[str]:
    """What `--overwrite` will remove from `output`: insect's parts and `own_files`, checked
    by name and schema. Refuses, removing nothing, when anything else is there. Call
    `remove` with the plan once the new run is known to be able to start."""
    entries = list_entries(output, s3)
    why = OVERWRITE_REFUSED
    refuse_foreign(output, entries, why, own_files)
    fs, _ = storage.filesystem(output, s3)
    check_parts(fs, part_entries(entries))
    return [e["name"] for e in entries]


def remove(output: str, names: list[str], s3: storage.S3Options) -> None:
    """Remove the files of an `overwrite_plan` (one file at a time: never a folder)."""
    fs, _ = storage.filesystem(output, s3)
    with storage.user_errors(output):
        for name in names:
            fs.rm_file(name)


def part_footers(output: str, s3: storage.S3Options) -> dict[str, pq.FileMetaData | None]:
    """Each of insect's parts in `output` by name, with its footer (see `check_parts`)."""
    fs, _ = storage.filesystem(output, s3)
    return check_parts(fs, part_entries(list_entries(output, s3)))


def duplicated_paths(
    output: str, s3: storage.S3Options, footers: dict | None = None
) -> dict[str, list[str]]:
    """{path: parts} of the paths with more than one row among insect's complete parts
    (`footers`: `part_footers`, where read already)."""
    footers = part_footers(output, s3) if footers is None else footers
    complete = sorted(name for name, f in footers.items() if f is not None)
    return duplicates.duplicates(storage.filesystem(output, s3)[0], complete)


@dataclass
class Done:
    """The complete parts of an interrupted run and how many rows they hold."""

    files: list[str]
    rows: int
    # A finished run's record (_SUCCESS, the summary) while no row is added: a resume with
    # nothing to do keeps it where it still holds (`pipeline.finish`); one that classifies
    # removes it first (`drop_record`).
    record: list[dict] = field(default_factory=list)


def _models(fs, name: str, footer: pq.FileMetaData) -> set[str]:
    """The model ids in a part, from its column statistics (no data read) when it has them."""
    index = footer.schema.names.index("model")
    found: set = set()
    for g in range(footer.num_row_groups):
        stats = footer.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max:
            with fs.open(name, "rb") as f:
                return set(pc.unique(pq.read_table(f, columns=["model"])["model"]).to_pylist())
        found |= {stats.min, stats.max}
    return {m.decode() if isinstance(m, bytes) else m for m in found}


def row_format_of(footer: pq.FileMetaData, legacy: dict) -> dict:
    """The row format (`predict.RowFormat` as a dict) a part was written with; `legacy`
    for a part written before insect stored it (raw softmax, no optional columns)."""
    raw = (footer.metadata or {}).get(ROW_FORMAT_KEY.encode())
    if raw is None:
        return legacy
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    return found if isinstance(found, dict) else {"row format": raw.decode(errors="replace")}


def check_same_input(output: str, source: str, s3: storage.S3Options) -> None:
    """Refuse to resume a finished run over another input: the new input's rows would join
    the old one's, and no run on either could finish (rows would never equal inputs)."""
    uri = storage.join(output, SUCCESS_FILE)
    if not storage.exists(uri, s3):
        return
    with storage.user_errors(uri):
        try:
            recorded = json.loads(storage.read_bytes(uri, s3)).get("input")
        except (ValueError, AttributeError):
            return  # not a manifest of ours: a resume rewrites it (`pipeline.finish`)
    # Before 2026-12-02 insect recorded the input as typed (maybe relative): not compared.
    named = isinstance(recorded, str) and (recorded.startswith("/") or "://" in recorded)
    if named and recorded.rstrip("/") != source.rstrip("/"):
        raise InsectError(
            f"{output} holds a finished run over {recorded}, not {source}: --resume continues "
            "a run over its own input; choose another --output, or --overwrite to start over"
        )


def resume_entries(output: str, s3: storage.S3Options) -> list[dict]:
    """The entries of an output to resume, refusing (naming them) files insect did not write."""
    entries = list_entries(output, s3)
    why = "--resume continues only insect's own output: move them or choose another --output"
    refuse_foreign(output, entries, why)
    return entries


def resume_state(
    output: str, model_id: str, s3: storage.S3Options, row_format: dict, legacy: dict
) -> Done:
    """The parts an interrupted run of `model_id` finished in `output`, whose rows were
    made with `row_format` (`legacy`: the format of parts that do not say).

    Everything is checked before anything is removed: a file insect did not write, rows
    of another model or made another way refuse the resume. Only then are removed the
    half-written parts (no Parquet footer) and the parts holding a second row for a path
    (left by any earlier fault: their inputs are classified again), and with either
    `_SUCCESS` and the summary; without, those stay in `Done.record`. A part that cannot be
    read is retried, then stops the run without removing anything."""
    entries, footers = check_resume(output, model_id, s3, row_format, legacy)
    fs, _ = storage.filesystem(output, s3)
    complete = {name: f for name, f in footers.items() if f is not None}
    doubled = duplicates.parts_to_remove(duplicates.duplicates(fs, sorted(complete)))
    incomplete = sorted(set(footers) - set(complete))
    done = Done([], 0, [e for e in entries if entry_name(e) in RUN_FILES])
    if incomplete or doubled:
        drop_record(output, done, s3)
    with storage.user_errors(output):
        for name in incomplete:
            console.say(f"removing incomplete output file {storage.to_uri(fs, name)}")
            fs.rm_file(name)
        for name in doubled:
            console.say(
                f"removing {storage.to_uri(fs, name)}: it repeats rows of another part "
                "(its inputs are classified again)"
            )
            fs.rm_file(name)
            del complete[name]
    done.files, done.rows = sorted(complete), sum(f.num_rows for f in complete.values())
    return done


Parts = tuple[list[dict], dict[str, pq.FileMetaData | None]]  # entries, footers (None: cut)


def read_parts(output: str, s3: storage.S3Options) -> Parts:
    """The entries of an output to resume and its parts' footers, refusing a file insect
    did not write or a part with other columns."""
    entries = resume_entries(output, s3)
    fs, _ = storage.filesystem(output, s3)
    return entries, check_parts(fs, part_entries(entries))


def models_in(output: str, s3: storage.S3Options, footers: dict) -> set[str]:
    """The model ids of the finished parts (`read_parts`' footers) of `output`."""
    fs, _ = storage.filesystem(output, s3)
    found = set()
    for name, footer in footers.items():
        if footer is not None:
            found |= _models(fs, name, footer)
    return found


def check_resume(
    output: str,
    model_id: str,
    s3: storage.S3Options,
    row_format: dict,
    legacy: dict,
    parts: Parts | None = None,
) -> Parts:
    """The entries of `output` and its parts' footers (`read_parts`, or the `parts` read
    already), refusing a part of another model than `model_id`, or made another way than
    `row_format`. Reads only: before Ray starts, and again under the lock."""
    entries, footers = parts or read_parts(output, s3)
    fs, _ = storage.filesystem(output, s3)
    for name, footer in footers.items():
        if footer is not None:
            _check_resumable(output, fs, name, footer, model_id, row_format, legacy)
    return entries, footers


def drop_record(output: str, done: Done, s3: storage.S3Options) -> None:
    """Remove the run's record (`Done.record`) before its parts change; _SUCCESS last: a
    summary without it is stale (see `summary.read_summary`)."""
    fs, _ = storage.filesystem(output, s3)
    with storage.user_errors(output):
        for entry in sorted(done.record, key=lambda e: entry_name(e) == SUCCESS_FILE):
            fs.rm_file(entry["name"])
    done.record = []


def _check_resumable(
    output: str, fs, name: str, footer, model_id: str, row_format: dict, legacy: dict
) -> None:
    """Refuse to resume over a part of another model, or made another way."""
    others = _models(fs, name, footer) - {model_id}
    if others:
        raise InsectError(
            f"{output} holds predictions of model {others.pop()}, not of "
            f"{model_id}; resume with the same --model and --precision, or write elsewhere"
        )
    found = row_format_of(footer, legacy)
    differ = sorted(k for k in {*found, *row_format} if found.get(k) != row_format.get(k))
    if differ:
        shown = ", ".join(
            f"{k} {json.dumps(found.get(k))} then, {json.dumps(row_format.get(k))} now"
            for k in differ
        )
        raise InsectError(
            f"{output} holds rows made another way ({shown}); resume with the flags it "
            "began with (--top-k, --embeddings, --min-score, --no-temperature) and the "
            "same model, or write elsewhere"
        )
