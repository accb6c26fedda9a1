"""Training from a table of `path,label` rows (`insect train --labels TABLE`), alone or over
a labelled folder tree: the corrections file the review page downloads is such a table, and
so is any listing of a bucket that is not laid out one folder per class.

The table is read a batch at a time with pyarrow (CSV or Parquet, local or s3://); a row it
cannot use stops the run with one line naming the file and the row. Merged with ROOT, a
path in both takes the table's label; the label SKIP_LABEL leaves an image out. The split
stays stratified and seeded (`labels.split_by_class`), and every (file, label) pair ends up
in the `LabelledSet` that the run record fingerprints, so `--resume` refuses a changed table.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from insectlib import storage
from insectlib.data.inputs import check_csv_header
from insectlib.data.labels import FolderTree, LabelledSet, discover, read_tree, split_by_class
from insectlib.errors import InsectError

SKIP_LABEL = "skip"  # the page's "not an insect / skip": the image is left out of training
COLUMNS = ("path", "label")


@dataclass
class LabelTable:
    """A table as read: {path: label, or None for SKIP_LABEL}, its row count, and the path
    of each file it names ({`same_file` key: path as the table spells it})."""

    uri: str
    labels: dict[str, str | None]
    rows: int
    files: dict[str, str]


def check_table(uri: str, s3: storage.S3Options | None = None) -> None:
    """Refuse at once a table of no known format, or that is not there: its rows are read
    later, with the tree's listing."""
    _table_kind(uri)
    fs, path = storage.filesystem(uri, s3)
    with storage.user_errors(uri):
        fs.info(path)


def read_label_table(uri: str, s3: storage.S3Options | None = None) -> LabelTable:
    """Read a `path,label` table. Rows count from 1 after a CSV's header. Relative paths are
    taken from the table's own folder. A file given twice, spelled alike or not (see
    `same_file`), must have one label, and is kept as first spelled."""
    labels: dict[str, str | None] = {}
    first_row: dict[str, int] = {}
    files: dict[str, str] = {}
    rows = 0
    resolved: dict[str, str] = {}
    for row, path, label in _table_rows(uri, s3):
        rows = row
        where = f"--labels {uri} row {row}"
        path = _table_path(path, uri, where)
        label = _table_label(label, where)
        first = files.setdefault(storage.printable(same_file(path, resolved)), path)
        if first in labels and labels[first] != label:
            raise InsectError(
                f"{where}: {storage.printable(path)} was given another label on row "
                f"{first_row[first]} ({_shown(labels[first])} there, {_shown(label)} here)"
            )
        labels[first], first_row[first] = label, first_row.get(first, row)
    if not labels:
        raise InsectError(f"--labels {uri} holds no rows")
    return LabelTable(uri, labels, rows, files)


def _table_rows(uri: str, s3):
    """(row number, path, label) of every row, a batch at a time."""
    kind = _table_kind(uri)
    if kind == "csv":
        with storage.user_errors(uri):
            check_csv_header(uri, s3, COLUMNS, "--labels")
    fs, path = storage.filesystem(uri, s3)
    with storage.user_errors(uri), fs.open(path, "rb") as raw:
        f = gzip.open(raw) if uri.endswith(".gz") else raw
        try:
            row = 0
            for batch in _batches(f, kind):
                paths, labels = (batch.column(name).to_pylist() for name in COLUMNS)
                for path, label in zip(paths, labels, strict=True):
                    row += 1
                    yield row, path, label
        except (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowTypeError, KeyError) as e:
            text = " ".join(str(e).split())[:300]
            raise InsectError(
                f"--labels {uri}: cannot read its path and label columns ({text})"
            ) from None


def _table_kind(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    raise InsectError(
        f"--labels {uri}: unknown format; use a CSV (.csv, .csv.gz) or Parquet file with "
        "'path' and 'label' columns"
    )


def _batches(f, kind: str):
    if kind == "parquet":
        table = pq.ParquetFile(f)
        names = table.schema_arrow.names
        for name in COLUMNS:  # iter_batches leaves a missing column out without a word
            if name not in names:
                raise pa.ArrowInvalid(f"no column {name!r} in the Parquet file; it has {names}")
        for batch in table.iter_batches(columns=list(COLUMNS)):
            yield batch.cast(pa.schema([(name, pa.string()) for name in COLUMNS]))
        return
    yield from pyarrow.csv.open_csv(
        f,
        parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
        convert_options=pyarrow.csv.ConvertOptions(
            include_columns=list(COLUMNS),
            column_types=dict.fromkeys(COLUMNS, pa.string()),
            strings_can_be_null=False,  # an empty label is refused by name, not as null
        ),
    )


def _table_path(path: str | None, table: str, where: str) -> str:
    """An input path as the folder listing names it: s3:// URIs as they are, local paths
    absolute (relative ones from the table's folder)."""
    if not path:
        raise InsectError(f"{where}: no path")
    storage.refuse_nul(path, where)
    if "://" in path and not storage.is_s3(path):
        raise InsectError(f"{where}: {path[:80]!r} is not a local path or s3:// URI")
    if storage.is_s3(path):
        return path
    if storage.is_s3(table) and not path.startswith("/"):
        return storage.join(table.rsplit("/", 1)[0], path)
    base = "/" if storage.is_s3(table) else os.path.dirname(table)
    path = storage.from_printable(path)  # as an output's `path` writes it
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def same_file(path: str, folders: dict[str, str]) -> str:
    """What `path` names, to match spellings of one file: a local path with its folder's
    links, `..` and doubled slashes resolved, and the file's own link (a table written from
    an evaluation of a linked folder names ROOT's files so); s3:// URIs as they are.
    `folders`: the folders resolved so far (one lstat a file, one realpath a folder)."""
    if storage.is_s3(path):
        return path
    folder, name = os.path.split(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    real = os.path.join(folders[folder], name)
    return os.path.realpath(real) if os.path.islink(real) else real


def _table_label(label: str | None, where: str) -> str | None:
    if not label:
        raise InsectError(f"{where}: no label (write {SKIP_LABEL} to leave the image out)")
    if label != label.strip():
        raise InsectError(f"{where}: the label {label!r} has spaces around it")
    return None if label == SKIP_LABEL else label


def _shown(label: str | None) -> str:
    return SKIP_LABEL if label is None else repr(label)


def training_set(
    root: str | None,
    table_uri: str | None,
    val_fraction: float = 0.2,
    seed: int = 0,
    new_classes: bool = False,
    s3: storage.S3Options | None = None,
) -> LabelledSet:
    """The images to train on: the tree `root` (`labels.discover`), the table `table_uri`,
    or the tree with the table over it (see `merge`)."""
    if not table_uri:
        return discover(root, val_fraction, seed, s3)
    table = read_label_table(table_uri, s3)
    tree = read_tree(root, s3) if root else None
    return merge(tree, table, val_fraction, seed, new_classes, root)


def merge(
    tree: FolderTree | None,
    table: LabelTable,
    val_fraction: float,
    seed: int,
    new_classes: bool = False,
    root: str | None = None,
) -> LabelledSet:
    """The tree's images with the table over them: a path in both takes the table's label
    (or leaves, for SKIP_LABEL), the table's other paths are added. With a held-out folder
    the tree's images keep their side and the added ones are split; otherwise all are split
    together. Classes are the sorted names with a training image; those only the table
    names need `new_classes` when there is a tree."""
    tree = tree or FolderTree([], {})
    if SKIP_LABEL in tree.classes:
        raise InsectError(
            f"{root} has a class folder named {SKIP_LABEL!r}, which a --labels table uses to "
            "leave an image out: rename the folder"
        )
    train, val, added, stats = _overlay(tree, table)
    # An image of ROOT given a new class counts as much as an added one.
    unknown = sorted((set(added.values()) | set(train) | set(val)) - set(tree.classes))
    if tree.classes and unknown and not new_classes:
        raise InsectError(
            f"--labels {table.uri} names classes {root} has no folder for: "
            f"{', '.join(unknown[:10])}; pass --new-classes to add them"
        )
    stats["new_classes"] = unknown if tree.classes else []
    if tree.held_out:
        new_train, new_val = _split_names(_by_label(added), val_fraction, seed)
        train, val = _extend(train, new_train), _extend(val, new_val)
        how = f"folders train/ and {tree.held_out}/, the table's other images stratified"
    else:
        train, val = _split_names(_extend(train, _by_label(added)), val_fraction, seed)
        how = "stratified"
    classes = _classes_of(train, val, table.uri)
    index = {c: i for i, c in enumerate(classes)}
    train_items, val_items = (
        [(u, index[c]) for c in sorted(side) for u in sorted(side[c])] for side in (train, val)
    )
    how += f" {val_fraction:g} held out, seed {seed}; labels from {table.uri}"
    return LabelledSet(classes, train_items, val_items, how, held_out=tree.held_out, table=stats)


def _overlay(tree: FolderTree, table: LabelTable) -> tuple[dict, dict, dict, dict]:
    """The tree's (train, val) images by class with the table's labels applied, the table's
    paths the tree does not hold ({path: label}), and what the table did."""
    sides: list[dict[str, list[str]]] = [{}, {}]
    stats = {"table": table.uri, "rows": table.rows, "in_root": 0, "relabelled": 0}
    stats.update(skipped=sum(label is None for label in table.labels.values()), added=0)
    seen, folders = set(), {}
    for side, by_class in zip(sides, (tree.train, tree.val), strict=True):
        for name, uris in by_class.items():
            for uri in uris:
                key = table.files.get(storage.printable(same_file(uri, folders)))
                label = table.labels.get(key, name)
                if key in table.labels:
                    seen.add(key)
                    stats["in_root"] += 1
                    stats["relabelled"] += label is not None and label != name
                if label is not None:
                    side.setdefault(label, []).append(uri)
    added = {p: c for p, c in table.labels.items() if p not in seen and c is not None}
    stats["added"] = len(added)
    return sides[0], sides[1], added, stats


def _by_label(items: dict[str, str]) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = {}
    for path, label in items.items():
        by_label.setdefault(label, []).append(path)
    return by_label


def _extend(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
    return {c: a.get(c, []) + b.get(c, []) for c in {*a, *b}}


def _split_names(
    by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """`labels.split_by_class` of images by class name, by class name."""
    names = sorted(by_class)
    train, val = split_by_class(names, by_class, val_fraction, seed)
    return _named(train, names), _named(val, names)


def _named(items: list[tuple[str, int]], names: list[str]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for uri, i in items:
        by_name.setdefault(names[i], []).append(uri)
    return by_name


def _classes_of(train: dict, val: dict, table: str) -> list[str]:
    """The sorted classes with a training image; refuses fewer than 2, or validation
    images of a class with none."""
    classes = sorted(c for c, uris in train.items() if uris)
    if len(classes) < 2:
        raise InsectError(
            f"training needs at least 2 classes with images, found {len(classes)} "
            f"({', '.join(classes) or 'none'}) with --labels {table}"
        )
    orphans = sorted(c for c, uris in val.items() if uris and c not in classes)
    if orphans:
        raise InsectError(
            f"with --labels {table}, no training image is left in classes "
            f"{', '.join(orphans[:10])}, which have validation images"
        )
    return classes


def describe(stats: dict) -> str:
    """One line on what a table did to the training set, for the console."""
    line = f"--labels {stats['table']}: {stats['rows']} rows"
    if stats["in_root"]:
        line += (
            f"; {stats['in_root']} images of ROOT took the table's label "
            f"({stats['relabelled']} changed)"
        )
    line += f"; {stats['added']} images added; {stats['skipped']} marked {SKIP_LABEL}"
    if stats["new_classes"]:
        line += f"; new classes: {', '.join(stats['new_classes'])}"
    return line
