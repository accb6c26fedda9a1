"""Training from a table of path,label rows (`insect train --labels`): reading CSV and
Parquet tables, local and on S3, merging them over a labelled tree, and the run record
that makes `--resume` refuse a changed table. No Ray here: the training run on the
corrections the review page downloads is in test_review.py."""

from __future__ import annotations

import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from insectlib.config import TrainConfig
from insectlib.data import synthetic
from insectlib.data.label_table import SKIP_LABEL, read_label_table, training_set
from insectlib.errors import InsectError
from insectlib.training.run_storage import check_run_record, write_run_record
from tests.conftest import expect_cli_error


def write_csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_csv_table_keeps_quoted_names_resolves_relative_paths_and_skips(tmp_path):
    table = write_csv(
        tmp_path / "t.csv",
        'path,label\n/data/a.jpg,beetles\nsub/b.jpg,wasps\n"/data/c,""quoted"".jpg",beetles\n'
        "/data/d.jpg,skip\n/data/a.jpg,beetles\n",
    )
    found = read_label_table(table)
    assert found.rows == 5 and found.uri == table
    assert found.labels == {
        "/data/a.jpg": "beetles",  # given twice, with one label: fine
        str(tmp_path / "sub" / "b.jpg"): "wasps",  # relative: from the table's folder
        '/data/c,"quoted".jpg': "beetles",
        "/data/d.jpg": None,  # skip
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,label\n/a.jpg,beetles\n/b.jpg,\n", r"t\.csv row 2: no label \(write skip"),
        ("path,label\n/a.jpg,beetles\n,wasps\n", r"t\.csv row 2: no path"),
        ("path,label\n/a.jpg, beetles\n", r"row 1: the label ' beetles' has spaces around it"),
        ("path,label\n/a.jpg,wasps\n/b.jpg,x\n/a.jpg,bees\n", r"row 3: /a\.jpg was given another "
         r"label on row 1 \('wasps' there, 'bees' here\)"),
        ("path,class\n/a.jpg,beetles\n",
         r"t\.csv has no 'label' column \(its columns: path, class\)$"),
        ("label,path,label\n/a.jpg,beetles,x\n", r"t\.csv has 2 columns named 'label'$"),
        ("path,label\nhttp://x/a.jpg,beetles\n", r"row 1: 'http://x/a\.jpg' is not a local path"),
        ("path,label\n", r"t\.csv holds no rows"),
    ],
)  # fmt: skip
def test_table_errors_name_the_file_and_the_row(tmp_path, text, problem):
    with pytest.raises(InsectError, match=problem):
        read_label_table(write_csv(tmp_path / "t.csv", text))


def test_a_parquet_table_without_its_columns_names_them(tmp_path):
    """A Parquet table of other columns was refused with pyarrow's schema-cast text, naming
    no column; a CSV's names the one missing."""
    for columns, missing in ((["file", "class"], "path"), (["path", "Label"], "label")):
        local = tmp_path / f"{missing}.parquet"
        pq.write_table(pa.table({c: ["x"] for c in columns}), local)
        said = rf"path and label columns \(no column '{missing}' in the Parquet file; it has"
        with pytest.raises(InsectError, match=said):
            read_label_table(str(local))


def test_unknown_formats_and_missing_tables_are_refused(tmp_path):
    with pytest.raises(InsectError, match=r"t\.txt: unknown format; use a CSV"):
        read_label_table(write_csv(tmp_path / "t.txt", "path,label\n"))
    with pytest.raises(InsectError, match=r"not found: .*missing\.csv"):
        read_label_table(str(tmp_path / "missing.csv"))


def test_tables_and_manifests_are_read_from_s3(s3_server, tmp_path):
    """Parquet and CSV (also gzipped); a CSV manifest too (its header check read a line
    with readline(n), which s3fs's files do not take)."""
    import gzip

    from insectlib.data.inputs import Part, part_paths

    client = s3_server.client()
    client.create_bucket(Bucket="insect-tables")
    local = tmp_path / "t.parquet"
    pq.write_table(pa.table({"label": ["beetles", "skip"], "path": ["x/a.jpg", "s3://b/c.jpg"]}),
                   local)  # fmt: skip
    client.upload_file(str(local), "insect-tables", "runs/t.parquet")
    text = "path,label\nx/a.jpg,beetles\ns3://b/c.jpg,skip\n"
    client.put_object(Bucket="insect-tables", Key="runs/t.csv", Body=text.encode())
    client.put_object(
        Bucket="insect-tables", Key="runs/t.csv.gz", Body=gzip.compress(text.encode())
    )
    for name in ("t.parquet", "t.csv", "t.csv.gz"):
        found = read_label_table(f"s3://insect-tables/runs/{name}")
        assert found.labels == {"s3://insect-tables/runs/x/a.jpg": "beetles", "s3://b/c.jpg": None}
    client.put_object(Bucket="insect-tables", Key="m.csv", Body=b"path\ns3://b/c.jpg\n")
    assert list(part_paths(Part("csv", "s3://insect-tables/m.csv"), None)) == ["s3://b/c.jpg"]


@pytest.fixture
def tree(tmp_path) -> str:
    return synthetic.make_labelled(str(tmp_path / "root"), per_class=5, size=(32, 24))


def by_path(labelled) -> dict[str, str]:
    return {u: labelled.classes[y] for u, y in labelled.train + labelled.val}


def test_the_table_wins_over_the_tree_adds_images_and_leaves_out_skipped_ones(tree, tmp_path):
    relabelled = os.path.join(tree, "beetles", "beetles_0001.jpg")
    confirmed = os.path.join(tree, "cockroach", "cockroach_0002.jpg")
    dropped = os.path.join(tree, "dragonflies", "dragonflies_0003.jpg")
    table = write_csv(
        tmp_path / "t.csv",
        f"path,label\n{relabelled},cockroach\n{confirmed},cockroach\n{dropped},{SKIP_LABEL}\n"
        "/new/one.jpg,beetles\n/new/two.jpg,dragonflies\n/new/three.jpg,skip\n",
    )
    merged = training_set(tree, table, val_fraction=0.2, seed=3)
    labels = by_path(merged)
    assert merged.classes == ["beetles", "cockroach", "dragonflies"]
    assert labels[relabelled] == "cockroach" and labels[confirmed] == "cockroach"
    assert dropped not in labels and "/new/three.jpg" not in labels
    assert labels["/new/one.jpg"] == "beetles" and labels["/new/two.jpg"] == "dragonflies"
    assert len(labels) == 15 - 1 + 2 == len(merged.train) + len(merged.val)
    assert merged.table == {
        "table": table, "rows": 6, "in_root": 3, "relabelled": 1, "skipped": 2, "added": 2,
        "new_classes": [],
    }  # fmt: skip
    counts = merged.counts()  # stratified: 1 of each class's 5 (or 4, or 6) held out
    assert counts["val"] == {"beetles": 1, "cockroach": 1, "dragonflies": 1}
    again = training_set(tree, table, val_fraction=0.2, seed=3)
    assert (again.train, again.val) == (merged.train, merged.val)  # seeded
    assert training_set(tree, table, val_fraction=0.2, seed=4).val != merged.val
    assert f"labels from {table}" in merged.split


def test_a_table_names_roots_files_however_their_path_is_spelled(tree, tmp_path):
    """Through a linked folder (as an evaluation of the link wrote them), a link to the file,
    `..` or a leading doubled slash: the same file, relabelled or left out, never added a
    second time. An added image keeps the table's spelling (a worker may lack the link)."""
    link = tmp_path / "link"
    link.symlink_to(tree)
    (tmp_path / "curated").mkdir()
    linked_file = tmp_path / "curated" / "c2.jpg"
    linked_file.symlink_to(os.path.join(tree, "cockroach", "cockroach_0002.jpg"))
    relabelled = f"{link}/beetles/beetles_0001.jpg"
    dropped = f"/{tree}/../{os.path.basename(tree)}/dragonflies/dragonflies_0003.jpg"
    added = f"{link}/new/one.jpg"
    table = write_csv(
        tmp_path / "t.csv",
        f"path,label\n{relabelled},cockroach\n{dropped},skip\n{linked_file},beetles\n"
        f"{added},dragonflies\n{link}/../link/beetles/beetles_0001.jpg,cockroach\n",
    )
    for root in (tree, str(link)):
        merged = training_set(root, table, val_fraction=0.2, seed=3)
        labels = by_path(merged)
        assert labels.pop(added) == "dragonflies"  # as the table spells it
        labels = {os.path.realpath(u): c for u, c in labels.items()}
        assert len(labels) == 15 - 1 == len(merged.train) + len(merged.val) - 1
        assert labels[os.path.realpath(relabelled)] == "cockroach"
        assert labels[os.path.realpath(linked_file)] == "beetles"
        assert os.path.realpath(dropped) not in labels
        assert merged.table["in_root"] == 3 and merged.table["added"] == 1
    conflict = write_csv(tmp_path / "c.csv", f"path,label\n{relabelled},cockroach\n"
                         f"{tree}/beetles/beetles_0001.jpg,beetles\n")  # fmt: skip
    with pytest.raises(InsectError, match=r"row 2: .*beetles_0001\.jpg was given another label"):
        read_label_table(conflict)


def test_classes_only_the_table_names_need_new_classes(tree, tmp_path):
    table = write_csv(tmp_path / "t.csv", "path,label\n/new/w.jpg,wasps\n/new/w2.jpg,wasps\n")
    with pytest.raises(InsectError, match="names classes .* has no folder for: wasps; pass "
                                          "--new-classes"):  # fmt: skip
        training_set(tree, table)
    merged = training_set(tree, table, new_classes=True)
    assert merged.classes == ["beetles", "cockroach", "dragonflies", "wasps"]
    assert merged.table["new_classes"] == ["wasps"]
    assert merged.counts()["train"]["wasps"] + merged.counts()["val"]["wasps"] == 2
    # A class given to images ROOT holds (each dragonfly renamed) is as new as an added one.
    renamed = "".join(f"{os.path.join(tree, 'dragonflies', f'dragonflies_{i:04d}.jpg')},moths\n"
                      for i in range(5))  # fmt: skip
    table = write_csv(tmp_path / "renamed.csv", "path,label\n" + renamed)
    with pytest.raises(InsectError, match="has no folder for: moths; pass --new-classes"):
        training_set(tree, table)
    merged = training_set(tree, table, new_classes=True)
    assert merged.classes == ["beetles", "cockroach", "moths"]
    assert merged.table["new_classes"] == ["moths"] and merged.table["relabelled"] == 5
    assert merged.table["added"] == 0


def test_a_table_alone_is_a_training_set(tmp_path):
    rows = [f"/img/{c}_{i}.jpg,{c}" for c in ("moths", "ants") for i in range(5)]
    table = write_csv(tmp_path / "t.csv", "path,label\n" + "\n".join(rows) + "\n")
    alone = training_set(None, table, val_fraction=0.2, seed=0)
    assert alone.classes == ["ants", "moths"]
    assert alone.counts() == {"train": {"ants": 4, "moths": 4}, "val": {"ants": 1, "moths": 1}}
    one = write_csv(tmp_path / "one.csv", "path,label\n/img/a.jpg,ants\n/img/b.jpg,skip\n")
    with pytest.raises(InsectError, match=r"at least 2 classes with images, found 1 \(ants\)"):
        training_set(None, one)


def test_a_held_out_folder_keeps_its_images_and_the_added_ones_are_split(tmp_path):
    root = tmp_path / "root"
    synthetic.make_labelled(str(root / "train"), per_class=4, size=(32, 24))
    synthetic.make_labelled(str(root / "val"), per_class=2, size=(32, 24))
    moved = str(root / "val" / "beetles" / "beetles_0000.jpg")
    added = [f"/new/{i}.jpg,dragonflies" for i in range(5)]
    table = write_csv(tmp_path / "t.csv", f"path,label\n{moved},cockroach\n" + "\n".join(added))
    merged = training_set(str(root), table, val_fraction=0.2, seed=0)
    val = {u: merged.classes[y] for u, y in merged.val}
    assert val[moved] == "cockroach" and merged.held_out == "val"
    assert all("/train/" not in u for u in val)  # the tree's training images stay there
    new_val = [u for u in val if u.startswith("/new/")]
    assert len(new_val) == 1 and len(merged.train) + len(merged.val) == 12 + 6 + 5


def test_a_class_folder_named_skip_is_refused_with_a_table(tree, tmp_path):
    os.rename(os.path.join(tree, "beetles"), os.path.join(tree, SKIP_LABEL))
    table = write_csv(tmp_path / "t.csv", "path,label\n/new/a.jpg,cockroach\n")
    with pytest.raises(InsectError, match="class folder named 'skip'.*rename the folder"):
        training_set(tree, table)


def test_resume_refuses_a_changed_table(tree, tmp_path):
    path = os.path.join(tree, "beetles", "beetles_0001.jpg")
    table = write_csv(tmp_path / "t.csv", f"path,label\n{path},cockroach\n")
    cfg = TrainConfig(data=tree, labels=table, storage=str(tmp_path / "runs"), name="r",
                      weights="random")  # fmt: skip
    first = training_set(tree, table)
    write_run_record(cfg, first)
    check_run_record(dataclasses.replace(cfg, resume=True), training_set(tree, table))
    write_csv(tmp_path / "t.csv", f"path,label\n{path},dragonflies\n")
    with pytest.raises(InsectError, match=r"cannot resume run .* configuration \(data_sha256"):
        check_run_record(dataclasses.replace(cfg, resume=True), training_set(tree, table))


def test_train_needs_a_root_or_a_table(tmp_path, capsys):
    err = expect_cli_error(capsys, ["train"])
    assert "give the labelled ROOT, a --labels table, or both" in err
    err = expect_cli_error(capsys, ["train", str(tmp_path), "--new-classes"])
    assert "--new-classes is for classes a --labels table adds" in err
    missing = str(tmp_path / "nowhere.csv")
    assert f"not found: {missing}" in expect_cli_error(capsys, ["train", "--labels", missing])
    table = write_csv(tmp_path / "t.csv", "path,label\n/a.jpg,\n")
    assert "row 1: no label" in expect_cli_error(capsys, ["train", "--labels", table])
