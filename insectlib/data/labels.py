"""Labelled folder trees: class names, label indices and the train/validation split."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from insectlib import storage
from insectlib.data.images import is_image_name
from insectlib.errors import InsectError
from insectlib.runtime import console

# Sub-folders that mark an existing held-out split (ROOT/train + ROOT/val, the reference layout).
TRAIN_DIR = "train"
# Training validates on the first of these beside train/; evaluation holds out the first
# of EVALUATION_DIRS, so that with val/ and test/ both, test/ is what training never saw.
HELD_OUT_DIRS = ("val", "validation", "test")
EVALUATION_DIRS = ("test", "val", "validation")


@dataclass
class LabelledSet:
    """Image URIs with label indices; `classes[i]` is the name of label i."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    split: str  # how the split was made, for logs and meta.json
    held_out: str | None = None  # the held-out folder (val, validation, test) when there is one
    table: dict | None = None  # with `train --labels`: what the table did (`label_table`)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, by class name."""
        return {
            name: {self.classes[i]: n for i, n in sorted(Counter(y for _, y in items).items())}
            for name, items in (("train", self.train), ("val", self.val))
        }


def discover(
    root: str,
    val_fraction: float = 0.2,
    seed: int = 0,
    s3: storage.S3Options | None = None,
    held_out_dirs: tuple[str, ...] = HELD_OUT_DIRS,
) -> LabelledSet:
    """Read a labelled tree `ROOT/<class>/<images>` (or `ROOT/train` + one of
    `held_out_dirs`, the first found).

    Classes are the sorted sub-folder names. Without a held-out folder, each class is split
    with a fixed seed so that `val_fraction` of it is held out (stratified).
    """
    tree = read_tree(root, s3, held_out_dirs)
    if tree.held_out:
        index = {c: i for i, c in enumerate(tree.classes)}
        train = [(u, index[c]) for c in tree.classes for u in tree.train[c]]
        val = [(u, index[c]) for c in sorted(tree.val) for u in tree.val[c]]
        split = f"folders {TRAIN_DIR}/ and {tree.held_out}/"
        return LabelledSet(tree.classes, train, val, split, held_out=tree.held_out)
    train, val = split_by_class(tree.classes, tree.train, val_fraction, seed)
    return LabelledSet(
        tree.classes, train, val, f"stratified {val_fraction:g} held out, seed {seed}"
    )


@dataclass
class FolderTree:
    """A labelled tree as listed, before any split: image URIs by class folder."""

    classes: list[str]  # sorted
    train: dict[str, list[str]]  # every image, or those under ROOT/train with a held-out folder
    held_out: str | None = None  # val, validation or test, when ROOT/train has one beside it
    val: dict[str, list[str]] = field(default_factory=dict)  # the held-out folder's


def check_root(root: str, s3: storage.S3Options | None = None) -> None:
    """Refuse at once a labelled tree that is not there or is a file, as `read_tree` would
    after listing it whole (minutes, on a large bucket)."""
    if not storage.is_dir(root, s3):
        next(iter(storage.iter_files(root, s3)), None)  # "not found", as the listing says it
        _check_classes([], root)  # a file: no class folders


def read_tree(
    root: str,
    s3: storage.S3Options | None = None,
    held_out_dirs: tuple[str, ...] = HELD_OUT_DIRS,
) -> FolderTree:
    """List `ROOT/<class>/<images>` (or `ROOT/train` + the first of `held_out_dirs`),
    classes checked."""
    by_top = _images_by_folder(root, s3)
    held_out = next((d for d in held_out_dirs if d in by_top), None)
    if TRAIN_DIR in by_top and held_out:
        train_by_class = _by_class(by_top[TRAIN_DIR])
        val_by_class = _by_class(by_top[held_out])
        classes = _check_classes(sorted(train_by_class), storage.join(root, TRAIN_DIR))
        unknown = sorted(set(val_by_class) - set(classes))
        if unknown:
            raise InsectError(
                f"{storage.join(root, held_out)} has classes that are not in "
                f"{storage.join(root, TRAIN_DIR)}: {', '.join(unknown)}"
                + unicode_twins(unknown, classes)
            )
        warn_left_out(root, by_top, tuple(dict.fromkeys((TRAIN_DIR, *held_out_dirs))))
        missing = [c for c in classes if c not in val_by_class]
        if missing:
            console.warn(
                f"warning: {storage.join(root, held_out)} has no images of "
                f"{', '.join(missing)}: the held-out figures leave them out"
            )
        return FolderTree(classes, train_by_class, held_out, val_by_class)
    by_class = _by_class([(rel, uri) for items in by_top.values() for rel, uri in items], depth=0)
    classes = _check_classes(sorted(by_class), root)
    warn_left_out(root, by_top, ())
    return FolderTree(classes, by_class)


def warn_left_out(root: str, by_top: dict, folders: tuple[str, ...]) -> None:
    """Warn of the images the tree's layout leaves out: those in ROOT itself (key ""), in
    `folders` themselves rather than a class folder of theirs, and in other top folders."""
    beside = [uri for _, uri in by_top.get("", [])]
    if folders:  # train/ and held-out folders: their class folders are one level down
        beside += [uri for top in folders for parts, uri in by_top.get(top, []) if len(parts) == 2]
    if beside:
        console.warn(
            f"warning: {console.counted(len(beside), 'image')} outside class folders left out "
            f"({storage.printable(beside[0])}{', ...' if len(beside) > 1 else ''})"
        )
    other = sorted(top for top in by_top if top and folders and top not in folders)
    if other:
        shown = ", ".join(storage.printable(storage.join(root, top)) + "/" for top in other)
        console.warn(
            f"warning: {shown} left out: beside {TRAIN_DIR}/ and a held-out folder, only those "
            "are read"
        )


def split_by_class(
    classes: list[str], by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val) items: `val_fraction` of each class held out (at least one image of a
    class that has two), chosen with `seed` whatever order the URIs came in."""
    if not 0 < val_fraction < 1:
        raise InsectError(
            f"--val-fraction must be greater than 0 and less than 1 where ROOT has no train/ "
            f"and held-out folders, got {val_fraction}"
        )
    rng = random.Random(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        uris = sorted(by_class.get(name, []))
        rng.shuffle(uris)
        n_val = min(max(1, round(len(uris) * val_fraction)), len(uris) - 1) if len(uris) > 1 else 0
        val += [(u, label) for u in uris[:n_val]]
        train += [(u, label) for u in uris[n_val:]]
    return train, val


def _images_by_folder(root: str, s3) -> dict[str, list[tuple[list[str], str]]]:
    """Image files grouped by their top-level folder under root, with relative path parts."""
    fs, path = storage.filesystem(root, s3)
    prefix = storage.to_uri(fs, path) + "/"
    by_top: dict[str, list[tuple[list[str], str]]] = {}
    for uri in storage.iter_files(root, s3):
        if isinstance(uri, storage.UnlistedFolder):
            console.warn(f"warning: {storage.printable(uri)} left out: {uri.reason}")
            continue
        parts = uri[len(prefix) :].split("/") if uri.startswith(prefix) else []
        if parts and is_image_name(parts[-1]):  # in ROOT itself too (""): said left out
            by_top.setdefault(parts[0] if len(parts) > 1 else "", []).append((parts, uri))
    return by_top


def _by_class(items: list[tuple[list[str], str]], depth: int = 1) -> dict[str, list[str]]:
    # depth: index of the path part that names the class (1 below train/ or val/).
    by_class: dict[str, list[str]] = {}
    for parts, uri in items:
        if len(parts) > depth + 1:
            by_class.setdefault(parts[depth], []).append(uri)
    return by_class


def unicode_twins(unknown: list[str], known: list[str]) -> str:
    """A note on the `unknown` class names that read as one of `known` but are written with
    other Unicode code points (a folder named on macOS, decomposed, against one named
    elsewhere, composed), or "": the message would otherwise name two names that look alike."""
    forms = {unicodedata.normalize("NFC", name): name for name in known}
    twins = [name for name in unknown if unicodedata.normalize("NFC", name) in forms]
    if not twins:
        return ""
    return (
        f" ({', '.join(twins)}: the same letters as a known class, written with other "
        "Unicode code points, as macOS writes accented names; rename the folder)"
    )


def _check_classes(classes: list[str], root: str) -> list[str]:
    if not classes:
        raise InsectError(
            f"no labelled images in {root}: expected image files in class folders, "
            f"{root}/<class>/<image>"
        )
    if len(classes) < 2:
        raise InsectError(
            f"labelled images need at least 2 class folders, found 1 ({classes[0]}) in {root}"
        )
    odd = [storage.printable(c) for c in classes if not storage.is_utf8(c)]
    if odd:
        raise InsectError(
            f"class folder names must be valid UTF-8 (they become the model's labels): "
            f"rename {', '.join(odd)} in {root}"
        )
    return classes
