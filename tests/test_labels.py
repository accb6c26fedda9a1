import os

import pytest

from insectlib.data import synthetic
from insectlib.data.labels import discover
from insectlib.errors import InsectError


def test_classes_sorted_and_stratified_split_is_deterministic(tmp_path):
    root = synthetic.make_labelled(str(tmp_path), per_class=10, size=(32, 24))
    a = discover(root, val_fraction=0.2, seed=3)
    b = discover(root, val_fraction=0.2, seed=3)
    assert a.classes == sorted(synthetic.CLASSES)
    assert a.train == b.train and a.val == b.val
    assert a.counts() == {
        "train": {c: 8 for c in a.classes},
        "val": {c: 2 for c in a.classes},
    }
    # every file lands in exactly one split, under its own folder's label
    everything = a.train + a.val
    assert len({u for u, _ in everything}) == 30
    for uri, label in everything:
        assert os.path.basename(os.path.dirname(uri)) == a.classes[label]
    assert discover(root, val_fraction=0.2, seed=4).val != a.val


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_existing_train_and_held_out_folders_are_used(tmp_path, held_out):
    synthetic.make_labelled(str(tmp_path / "train"), per_class=4, size=(32, 24))
    synthetic.make_labelled(str(tmp_path / held_out), per_class=2, size=(32, 24))
    s = discover(str(tmp_path))
    assert held_out in s.split
    assert len(s.train) == 12 and len(s.val) == 6
    assert all(f"/train/{s.classes[y]}/" in u for u, y in s.train)
    assert all(f"/{held_out}/{s.classes[y]}/" in u for u, y in s.val)


def test_images_the_layout_leaves_out_are_said_to_be(tmp_path, capsys):
    """Images beside the class folders, a folder beside train/ and test/, a class the
    held-out folder lacks: the split was made without them, in silence."""
    flat = tmp_path / "flat"
    synthetic.make_labelled(str(flat), per_class=2, size=(32, 24))
    (flat / "stray.jpg").write_bytes(b"")
    s = discover(str(flat))
    assert len(s.train) + len(s.val) == 6
    assert capsys.readouterr().err == (
        f"warning: 1 image outside class folders left out ({flat}/stray.jpg)\n"
    )
    split = tmp_path / "split"
    synthetic.make_labelled(str(split / "train"), per_class=2, size=(32, 24))
    synthetic.make_labelled(str(split / "test"), per_class=1, size=(32, 24))
    for f in (split / "test" / "beetles").iterdir():
        f.unlink()
    (split / "train" / "a.jpg").write_bytes(b"")
    (split / "extra" / "ants").mkdir(parents=True)
    (split / "extra" / "ants" / "b.jpg").write_bytes(b"")
    s = discover(str(split))
    assert (len(s.train), len(s.val)) == (6, 2)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: 1 image outside class folders left out ({split}/train/a.jpg)",
        f"warning: {split}/extra/ left out: beside train/ and a held-out folder, only those "
        "are read",
        f"warning: {split}/test has no images of beetles: the held-out figures leave them out",
    ]
    (flat / "stray.jpg").unlink()
    discover(str(flat))  # nothing left out: nothing said
    assert capsys.readouterr().err == ""


def test_non_images_and_hidden_files_are_ignored(tmp_path):
    root = synthetic.make_labelled(str(tmp_path), per_class=3, size=(32, 24))
    (tmp_path / "beetles" / "notes.txt").write_text("x")
    (tmp_path / "beetles" / ".DS_Store").write_text("x")
    (tmp_path / "beetles" / "UPPER.JPG").write_bytes(
        (tmp_path / "beetles" / "beetles_0000.jpg").read_bytes()
    )
    s = discover(root)
    uris = [u for u, _ in s.train + s.val]
    assert len(uris) == 10 and any(u.endswith("UPPER.JPG") for u in uris)


def test_errors_name_the_culprit(tmp_path):
    with pytest.raises(InsectError, match="not found: .*missing"):
        discover(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InsectError, match="no labelled images in .*empty"):
        discover(str(tmp_path / "empty"))
    synthetic.make_labelled(str(tmp_path / "one"), per_class=2, size=(32, 24))
    for cls in synthetic.CLASSES[1:]:
        for f in (tmp_path / "one" / cls).iterdir():
            f.unlink()
    with pytest.raises(InsectError, match=r"at least 2 class folders, found 1 \(beetles\)"):
        discover(str(tmp_path / "one"))
    # --val-fraction's bounds, where it is used: with train/ and a held-out folder it is not.
    flat = synthetic.make_labelled(str(tmp_path / "flat"), per_class=2, size=(32, 24))
    with pytest.raises(InsectError, match="greater than 0 and less than 1 where ROOT has no"):
        discover(flat, val_fraction=0.0)
    synthetic.make_labelled(str(tmp_path / "layout" / "train"), per_class=2, size=(32, 24))
    synthetic.make_labelled(str(tmp_path / "layout" / "val"), per_class=1, size=(32, 24))
    assert len(discover(str(tmp_path / "layout"), val_fraction=0.0).val) == 3
    # One name composed (NFC), its twin decomposed (NFD, as macOS names folders): they look
    # alike in the message, which says why they differ.
    split = tmp_path / "split"
    for side, name in (("train", "K\u00e4fer"), ("train", "ants"), ("test", "Ka\u0308fer")):
        (split / side / name).mkdir(parents=True)
        (split / side / name / "a.jpg").write_bytes(b"")
    with pytest.raises(InsectError, match="not in .*train: Ka\u0308fer \\(Ka\u0308fer: the same"):
        discover(str(split))


def test_a_class_folder_that_is_a_link_is_named_as_left_out(tmp_path, capsys):
    """Class folders linked in from elsewhere were left out without a word, and training
    then said only that there were no labelled images."""
    elsewhere = synthetic.make_labelled(str(tmp_path / "elsewhere"), per_class=2, size=(32, 24))
    root = tmp_path / "linked"
    root.mkdir()
    for cls in synthetic.CLASSES:
        os.symlink(os.path.join(elsewhere, cls), root / cls)
    with pytest.raises(InsectError, match="no labelled images in"):
        discover(str(root))
    warned = capsys.readouterr().err.splitlines()
    assert warned == [
        f"warning: {root / cls} left out: folder link not followed: give its target instead"
        for cls in synthetic.CLASSES
    ]
