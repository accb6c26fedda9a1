"""The paths users walk first: relative paths from their own folder, two runs at once, a
killed run's leftovers, every entry of an input getting its row, settings checked before
anything starts, and evaluation that is really held out. One test per way it failed."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from insectlib import layout, storage
from insectlib.classify.evaluate import evaluate
from insectlib.classify.pipeline import classify
from insectlib.cli.demo import check_workdir
from insectlib.config import ClassifyConfig, EvaluateConfig, TrainConfig
from insectlib.data import synthetic
from insectlib.data.labels import EVALUATION_DIRS, discover
from insectlib.errors import InsectError
from insectlib.metrics import confidence
from insectlib.storage import lock
from insectlib.storage.listing import LINKED_FOLDER
from insectlib.training.preflight import new_run_name, preflight
from insectlib.training.run_storage import RUN_SNAPSHOT, write_run_record
from insectlib.training.trainer import fit, unreadable_class, unreadable_split
from insectlib.training.worker import ShardSampler
from tests.conftest import BIN, REPO, SESSION_ARCH, expect_cli_error, run_cli


def _images(unlabelled) -> str:
    return os.path.dirname(next(iter(unlabelled)))


def _rows(out) -> list[dict]:
    return pq.read_table(out).to_pylist()


def _popen(*args: str, cwd, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "insect"), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _session_address() -> str:
    return ray.get_runtime_context().gcs_address


def test_two_runs_on_one_output_never_both_write(trained, unlabelled, tmp_path):
    """Two processes classify into one output at once (fresh, then both with --overwrite,
    then both with --resume): one holds the output's lock and the other is refused in one
    line naming it; every input has exactly one row and _SUCCESS tells the truth."""
    cfg, _ = trained
    out = tmp_path / "out"
    argv = [_images(unlabelled), "--model", cfg.output, "--output", str(out)]
    argv += ["--address", _session_address()]
    for extra in ([], ["--overwrite"], ["--resume"]):
        procs = [_popen("classify", *argv, *extra, cwd=tmp_path) for _ in range(2)]
        results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        refusals = [err for rc, _, err in results if rc == 2]
        assert codes == [0, 2], results
        assert re.search(r"is in use by insect classify \(host \S+, pid \d+", refusals[0])
        assert "Traceback" not in refusals[0]
        paths = [r["path"] for r in _rows(out)]
        assert sorted(paths) == sorted(set(paths)) and len(paths) == len(unlabelled)
        manifest = json.loads((out / layout.SUCCESS_FILE).read_text())
        assert manifest["rows"] == manifest["inputs"] == len(unlabelled)
        assert not (out / layout.LOCK_FILE).exists()


def test_a_killed_runs_lock_is_taken_over_with_a_message(trained, unlabelled, tmp_path, capsys):
    cfg, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    gone = {"host": "elsewhere", "pid": 999999, "command": "classify", "started": "yesterday"}
    (out / layout.LOCK_FILE).write_text(json.dumps(gone))
    classify(ClassifyConfig(input=_images(unlabelled), model=cfg.output, output=str(out)))
    said = capsys.readouterr().out
    assert "taking over the lock of" in said and "pid 999999" in said and "which is gone" in said
    assert len(_rows(out)) == len(unlabelled) and not (out / layout.LOCK_FILE).exists()


@pytest.mark.s3
def test_s3_locks_are_conditional_writes(s3_server, monkeypatch):
    """On S3 the lock is an object created with If-None-Match: a second holder is refused,
    a released lock is free again, and a lock nobody refreshed is taken over. Asked who
    holds it (`refuse_if_held`), nothing is written: a held lock refuses, a stale one and
    none do not."""
    client = s3_server.client()
    client.create_bucket(Bucket="locks")
    out = "s3://locks/run/out"
    said = []
    lock.refuse_if_held(out, None, None)  # no lock object: not held
    with lock.output_lock(out, "classify", say=said.append):
        busy = r"^s3://locks/run/out is in use by insect classify .*: wait for it to finish, "
        busy += r"or choose another folder \(a run that stopped .* after its last heartbeat: "
        with pytest.raises(InsectError, match=busy + r"in 1[6-8]\d s\)$"):  # STALE_S, 180
            with lock.output_lock(out, "evaluate", say=said.append):
                pass
        etag = client.head_object(Bucket="locks", Key=f"run/out/{layout.LOCK_FILE}")["ETag"]
        takeover = r" \(a run that stopped .* after its last heartbeat: in 1[6-8]\d s\)$"
        with pytest.raises(InsectError, match=r"in use by insect classify .*, or go" + takeover):
            lock.refuse_if_held(out, None, "go")
        assert client.head_object(Bucket="locks", Key=f"run/out/{layout.LOCK_FILE}")["ETag"] == etag
    with lock.output_lock(out, "evaluate", say=said.append):
        pass
    assert not said
    held = lock.S3Lock(out, None)
    held.acquire(lock.holder("train"))  # then dies: never refreshed, never released
    held.stop.set()
    monkeypatch.setattr(lock, "STALE_S", 0.0)
    lock.refuse_if_held(out, None, None)  # stale: not held, and left for a run to take over
    with lock.output_lock(out, "classify", say=said.append):
        pass
    assert len(said) == 1 and "insect train" in said[0] and "which is gone" in said[0]


def test_repeated_rows_are_never_success_and_resume_repairs_them(
    trained, unlabelled, tmp_path, capsys
):
    """An output holding a path twice (what two writers left before the lock): `insect
    summary` does not trust its _SUCCESS, and --resume removes the repeated part and
    finishes with exactly one row per input."""
    cfg, _ = trained
    out = tmp_path / "out"
    base = ClassifyConfig(input=_images(unlabelled), model=cfg.output, output=str(out))
    classify(base)
    part = next(p for p in out.iterdir() if p.name.startswith("part-"))
    from insectlib.cli.main import main

    # As many rows as _SUCCESS says, one path twice (a part copied over another of its size).
    table = pq.read_table(part)
    paths = table.column("path").to_pylist()
    column = table.schema.get_field_index("path")
    twice = table.set_column(column, "path", pa.array([paths[0], *paths[:-1]]))
    pq.write_table(twice.replace_schema_metadata(table.schema.metadata), part)
    assert main(["summary", str(out)]) == 0
    assert "(incomplete: paths with more than one row: 1;" in capsys.readouterr().out
    pq.write_table(table, part)
    shutil.copy(part, out / ("part-" + "f" * 32 + "-000000-0.parquet"))  # the same rows again
    assert main(["summary", str(out)]) == 0
    assert "(incomplete: _SUCCESS says 24 rows, the parts differ)" in capsys.readouterr().out
    classify(ClassifyConfig(**{**base.__dict__, "resume": True}))
    said = capsys.readouterr().out
    assert "repeats rows of another part" in said
    paths = [r["path"] for r in _rows(out)]
    assert len(paths) == len(set(paths)) == len(unlabelled)
    assert json.loads((out / layout.SUCCESS_FILE).read_text())["rows"] == len(unlabelled)
    # `insect summary OUT | head -1`: the reader leaves early; no traceback.
    reader = subprocess.Popen(
        [str(BIN / "insect"), "summary", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader.stdout.close()
    code, err = reader.wait(timeout=60), reader.stderr.read()
    assert code in (0, 1) and b"Traceback" not in err, (code, err[-3000:])
    # A part cut short (its writer stopped mid-file) is named, with _SUCCESS and without.
    part = sorted(p for p in out.iterdir() if p.name.startswith("part-"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    assert main(["summary", str(out)]) == 0
    cut = f"{part.name} without a Parquet footer (cut short, or being written)"
    assert f"the parts differ; {cut}" in capsys.readouterr().out
    (out / layout.SUCCESS_FILE).unlink()
    main(["summary", str(out)])  # 2 (no rows yet) where that part held every row
    said = capsys.readouterr()
    assert f"(incomplete: no _SUCCESS; {cut})" in said.out or f"no rows yet; {cut}" in said.err


@pytest.mark.slow
def test_the_readmes_commands_from_another_folder(trained, labelled_root, unlabelled, tmp_path):
    """The README's `insect` commands, run from a folder of the user's own with the
    relative paths they name (data/insects, models/m1, photos/, ...), against a running
    cluster ($RAY_ADDRESS, as `ray job submit` sets it): everything lands where the
    user's shell means it, and what is recorded names absolute paths. (Small settings
    are added to each command so that it runs in seconds: random weights, 32 px, a small
    arch.)"""
    home = tmp_path / "user"
    shutil.copytree(labelled_root, home / "data" / "insects")
    shutil.copytree(_images(unlabelled), home / "photos")
    readme = (REPO / "README.md").read_text()
    commands: dict[str, list[str]] = {}  # the first example of each command
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if words[:1] == ["insect"]:
                commands.setdefault(words[1], words)
    small = {
        "train": ["--weights", "random", "--image-size", "32", "--no-augment", "--epochs", "1"]
        + ["--progress-every", "0", "--workers", "1"]  # a line per step
        # The default arch (VGG-16) is asserted by test_imagenet_weights_without_network,
        # and the demo trains it: here its 528 MB of weights took a quarter of the test.
        + ["--arch", SESSION_ARCH]
    }
    env = {"RAY_ADDRESS": _session_address()}
    outputs, results = [], {}
    for command, words in commands.items():
        result = run_cli("insect", *words[1:], *small.get(command, []), env=env, cwd=home)
        assert result.returncode == 0, (words, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        outputs.append(result.stdout)
        results[command] = result
    assert ["train", "classify", "summary", "evaluate"] == list(commands)[:4]
    train, classified, n = results["train"].stdout, results["classify"], len(unlabelled)
    assert re.search(r"epoch 1/1: step 1/\d+, [\d.]+ img/s", train), train
    assert "epoch 1/1: train loss" in train and "validation accuracy" in train
    # An unnamed run's generated name, for a --resume after a kill (no line then).
    named = r"^run \S+/insect-train-[\d-]+-[0-9a-f]{6}; if it stops, --resume --name"
    assert re.search(named, train, re.M), train
    assert f"{n} images -> {n} rows (0 with errors)" in classified.stdout
    bar = rf"classified: 100%.*\b{n}/{n} \[.*(img/s|s/img)\]"  # tqdm says s/img under 1 img/s
    assert re.search(bar, classified.stderr), classified.stderr
    # Quiet: the log line, the plan, the result, and the bar (where stderr is not a
    # terminal, a line each LOG_EVERY_S, none in a run this short, and one at the end).
    said = [line for line in (classified.stdout + classified.stderr).splitlines() if line]
    bars = [line for line in said if line.startswith("classified: ")]
    assert len(said) - len(bars) <= 3 and len(bars) == 1, said
    assert said[0].startswith("log: ") and (home / "predictions" / "_logs").is_dir(), said
    assert not [line for line in said if "\x1b[" in line], said  # no colour codes
    # Ray Data's own progress (INFO lines where stderr is not a terminal) stays off it.
    assert "Execution plan" not in classified.stderr
    assert "logging_progress" not in classified.stderr
    meta = json.loads((home / "models" / "m1" / layout.META_FILE).read_text())
    assert meta["data"]["root"] == str(home / "data" / "insects")
    assert meta["arch"] == SESSION_ARCH and meta["head"] == "fc"
    success = json.loads((home / "predictions" / layout.SUCCESS_FILE).read_text())
    assert success["input"] == str(home / "photos")
    assert f"`{home / 'data' / 'insects'}`" in (home / "models" / "m1" / "report.md").read_text()
    assert (home / "evaluation" / layout.METRICS_FILE).exists()
    assert any("starting" in o and "model actor" in o for o in outputs)


def test_every_entry_of_a_manifest_or_a_tree_gets_its_row(trained, unlabelled, tmp_path):
    """A directory in a manifest, a link loop among the images: rows, never a failed run."""
    cfg, _ = trained
    images = tmp_path / "in"
    shutil.copytree(_images(unlabelled), images)
    os.symlink("la", images / "lb")
    os.symlink("lb", images / "la.jpg")
    os.symlink("la.jpg", images / "la")
    (images / "folder.jpg").mkdir()  # a folder named like an image: walked into
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(next(images.glob("photo_*.jpg")), tmp_path / "elsewhere" / "x.jpg")
    os.symlink(tmp_path / "elsewhere", images / "linked")  # a link to a folder: said, not walked
    manifest = tmp_path / "list.txt"
    first = sorted(images.glob("photo_*.jpg"))[0]
    # The same file twice (a list made by hand): one input, one row.
    manifest.write_text(f"{images / 'folder.jpg'}\n{first}\n{images / 'la.jpg'}\n{first}\n")
    by_path = {
        r["path"]: r for r in classify_rows(cfg, manifest=str(manifest), output=str(tmp_path / "m"))
    }
    assert by_path[str(images / "folder.jpg")]["error"] == "not a regular file (a directory)"
    assert "symbolic links" in by_path[str(images / "la.jpg")]["error"]
    assert by_path[str(first)]["error"] is None and len(by_path) == 3
    tree = {r["path"]: r for r in classify_rows(cfg, input=str(images), output=str(tmp_path / "t"))}
    assert len(tree) == len(unlabelled) + 2  # every image, the loop named like one, the link
    assert "symbolic links" in tree[str(images / "la.jpg")]["error"]
    assert tree[str(images / "linked")]["error"] == LINKED_FOLDER


def classify_rows(cfg: TrainConfig, **where) -> list[dict]:
    classify(ClassifyConfig(model=cfg.output, **where))
    return _rows(where["output"])


def test_an_unlistable_folder_becomes_a_row_naming_it(tmp_path, monkeypatch):
    """A sub-folder that cannot be listed (permissions, which root ignores, so faked here)
    is yielded as an entry of its own, whose row's error says why; only the input root
    failing stops a run."""
    from insectlib.classify.dataset import image_batch
    from insectlib.config import DecodeLimits
    from insectlib.data.inputs import path_table

    root = tmp_path / "in"
    (root / "open").mkdir(parents=True)
    (root / "closed").mkdir()
    synthetic.make_image("beetles", random.Random(0)).save(root / "open" / "a.jpg")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("closed"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(storage.iter_tree(str(root)))
    assert sorted(found) == [str(root / "closed"), str(root / "open" / "a.jpg")]
    table = path_table(found)
    batch = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    rows = image_batch(batch, 32, DecodeLimits(), None)
    errors = dict(zip(rows["path"], rows["error"], strict=True))
    assert errors[str(root / "closed")] == "unreadable folder: Permission denied"
    assert errors[str(root / "open" / "a.jpg")] == ""
    with pytest.raises(InsectError, match="cannot read .*closed: Permission denied"):
        list(storage.iter_files(str(root / "closed")))


def test_an_edited_meta_json_is_refused(trained, unlabelled, tmp_path, capsys):
    """Classes reordered in meta.json would relabel every prediction under the same model
    id: the id covers them, so the edit is refused in one line, also by --resume."""
    cfg, meta = trained
    copy = tmp_path / "m"
    shutil.copytree(cfg.output, copy)
    raw = json.loads((copy / layout.META_FILE).read_text())
    raw["classes"] = raw["classes"][::-1]
    (copy / layout.META_FILE).write_text(json.dumps(raw))
    out = tmp_path / "out"
    argv = ["classify", _images(unlabelled), "--model", str(copy), "--output", str(out)]
    err = expect_cli_error(capsys, argv)
    assert "was changed after training" in err and meta.model_id in err
    assert not out.exists()
    err = expect_cli_error(capsys, [*argv, "--resume"])
    assert "was changed after training" in err


def test_another_models_weights_are_refused_before_any_actor(trained, unlabelled, tmp_path, capsys):
    cfg, meta = trained
    other = tmp_path / "other"
    shutil.copytree(cfg.output, other)
    from insectlib.model.network import build_model, save_model

    save_model(str(other), build_model(meta.arch, len(meta.classes), "random"), meta.__class__(
        classes=meta.classes, arch=meta.arch, image_size=meta.image_size, head=meta.head
    ))  # fmt: skip
    swapped = tmp_path / "swapped"
    shutil.copytree(cfg.output, swapped)
    shutil.copy(other / layout.WEIGHTS_FILE, swapped / layout.WEIGHTS_FILE)
    started = time.monotonic()
    argv = ["classify", _images(unlabelled), "--model", str(swapped)]
    argv += ["--output", str(tmp_path / "o")]
    err = expect_cli_error(capsys, argv)
    assert "is not the model meta.json describes" in err
    assert time.monotonic() - started < 15  # no actor started (each takes longer)
    assert not (tmp_path / "o").exists()


def test_outputs_are_never_inside_inputs_nor_files(trained, unlabelled, tmp_path, capsys):
    cfg, _ = trained
    images = tmp_path / "in"
    shutil.copytree(_images(unlabelled), images)
    inside = ["classify", str(images), "--model", cfg.output, "--output", str(images / "out")]
    assert "is inside the input" in expect_cli_error(capsys, inside)
    image = str(sorted(images.glob("*.jpg"))[0])
    maps = ["visualize", image, "--model", cfg.output, "--layers", "1", "--output", str(images)]
    assert "is inside the image's folder" in expect_cli_error(capsys, maps)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    removed, link, loop = tmp_path / "removed", tmp_path / "gone", tmp_path / "loop"
    link.symlink_to(removed)  # a link to a folder since removed
    loop.symlink_to(loop)
    not_folders = {
        a_file: "is a file",
        a_file / "sub": f"lies under {a_file}, which is a file",
        link: f"is a link to {removed}, which does not exist",
        link / "sub": f"lies under {link}, which is a link to {removed}, which does not exist",
        loop / "sub": f"lies under {loop}, which is a link in a loop",
    }
    for argv in (
        ["classify", str(images), "--model", cfg.output, "--output"],
        ["evaluate", str(tmp_path), "--model", cfg.output, "--output"],
        ["train", str(images), "--output"],
    ):
        for output, why in not_folders.items():
            assert f"--output {output} {why}" in expect_cli_error(capsys, [*argv, str(output)])
    folder_as_image = ["visualize", str(images), "--model", cfg.output, "--layers", "1"]
    err = expect_cli_error(capsys, folder_as_image)
    assert f"IMAGE {images} is a folder; give one image file" in err
    folder_as_image[1] = str(images / "nope.jpg")  # not blamed on --output any more
    assert "nope.jpg does not exist" in expect_cli_error(capsys, folder_as_image)
    assert a_file.read_text() == "mine" and sorted(os.listdir(images)) == sorted(
        os.listdir(_images(unlabelled))
    )


def test_training_writes_only_where_it_may(labelled_root, tmp_path, capsys):
    """A folder of the user's own files (whatever their names), a --storage that is a file or
    inside the data, a folder as --weights, a model among a label table's images: each one
    line before Ray, nothing changed."""
    data, train = str(labelled_root), ["train", str(labelled_root), "--weights", "random"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    err = expect_cli_error(capsys, [*train, "--output", str(mine)])
    assert "holds files insect did not write (notes.txt)" in err
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    (predictions / layout.SUCCESS_FILE).write_text("{}")
    err = expect_cli_error(capsys, [*train, "--output", str(predictions)])
    assert "holds the predictions of insect classify, not a model (_SUCCESS)" in err
    named = tmp_path / "named"
    named.mkdir()
    for name in (layout.REPORT_FILE, layout.METRICS_FILE):
        (named / name).write_text("mine")
    err = expect_cli_error(capsys, [*train, "--output", str(named)])
    assert "already holds an unfinished model (no meta.json); pass --overwrite" in err
    assert (named / layout.REPORT_FILE).read_text() == "mine"
    out = ["--output", str(tmp_path / "m")]
    err = expect_cli_error(capsys, [*train, *out, "--storage", str(mine / "notes.txt")])
    assert "--storage" in err and "is a file" in err
    err = expect_cli_error(capsys, [*train, *out, "--storage", os.path.join(data, "runs")])
    assert "--storage" in err and "is inside the data" in err
    err = expect_cli_error(capsys, ["train", data, *out, "--weights", str(mine)])
    assert "is a folder; give a state-dict file" in err
    # The run folder (--storage/--name): a folder, apart from --output.
    runs = ["--storage", str(tmp_path)]
    err = expect_cli_error(capsys, [*train, *out, *runs, "--name", "mine/notes.txt"])
    assert f"the run folder {mine / 'notes.txt'} (--storage, --name) is a file" in err
    chain = tmp_path / "chain"  # a link to a link to nothing
    chain.symlink_to(tmp_path / "gone")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    err = expect_cli_error(capsys, [*train, *out, *runs, "--name", "chain"])
    assert f"is a link to {tmp_path / 'nowhere'}, which does not exist" in err
    err = expect_cli_error(capsys, [*train, *out, *runs, "--name", "m"])
    assert f"--output {tmp_path / 'm'} and the run folder {tmp_path / 'm'} (--storage" in err
    for text in ("hello", '{"classes": []}'):  # refused before Ray, not by torch's words
        (tmp_path / "w.pt").write_text(text)
        err = expect_cli_error(capsys, ["train", data, *out, "--weights", str(tmp_path / "w.pt")])
        assert f"--weights {tmp_path / 'w.pt'} is not a weights file" in err
    os.mkfifo(tmp_path / "fifo.pt")  # read as an input is: no wait for a writer that never comes
    err = expect_cli_error(capsys, ["train", data, *out, "--weights", str(tmp_path / "fifo.pt")])
    assert "fifo.pt: not a regular file (a FIFO)" in err
    folder = os.path.join(data, "beetles")
    table = tmp_path / "t.csv"
    rows = [f"{os.path.join(folder, n)},beetles" for n in sorted(os.listdir(folder))[:3]]
    rows += [f"{os.path.join(data, 'cockroach', n)},cockroach" for n in sorted(
        os.listdir(os.path.join(data, "cockroach")))[:3]]  # fmt: skip
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    err = expect_cli_error(capsys, ["train", "--labels", str(table), "--output", folder + "/m"])
    assert "is inside a folder of the table's images" in err
    assert sorted(os.listdir(mine)) == ["notes.txt"] and not (tmp_path / "m").exists()


def test_a_run_folder_takes_one_run_at_a_time(ray_local, labelled_root, tmp_path):
    """Two runs of one --name (or two resumes of one run) at once would mix their
    checkpoints: the second is refused while the first holds the run folder; runs without
    a --name started in one second get names of their own."""
    runs = tmp_path / "runs"
    cfg = TrainConfig(
        data=str(labelled_root), output=str(tmp_path / "m"), weights="random", epochs=1,
        storage=str(runs), name="shared",
    )  # fmt: skip
    with lock.output_lock(str(runs / "shared"), "train"):
        started = time.monotonic()
        with pytest.raises(InsectError) as refused:
            fit(cfg)
        assert time.monotonic() - started < 15  # refused before Ray Train starts
    assert f"{runs / 'shared'} is in use by insect train" in str(refused.value)
    assert str(refused.value).endswith("wait for it to finish, or choose another --name")
    assert not (tmp_path / "m").exists() and not (runs / "shared").exists()
    assert new_run_name() != new_run_name()
    # A resume of a run still going (its record written) has no other name: it waits.
    write_run_record(cfg, preflight(cfg))
    with lock.output_lock(str(runs / "shared"), "train"):
        with pytest.raises(InsectError, match=r"is in use by insect train .*finish$"):
            fit(dataclasses.replace(cfg, resume=True))
        # A new run of its name, once it has checkpoints: told to wait, not to --resume.
        (runs / "shared" / RUN_SNAPSHOT).write_text("{}")
        with pytest.raises(InsectError, match=r"is in use by insect train .*another --name$"):
            fit(cfg)
    with pytest.raises(InsectError, match="already exists; pass --resume to continue it"):
        fit(cfg)  # and to --resume once it is gone
    assert sorted(os.listdir(runs / "shared")) == sorted(
        [layout.RUN_RECORD, RUN_SNAPSHOT]
    )  # no lock left


def test_classify_evaluate_visualize_refusals_before_ray(trained, tmp_path, capsys):
    cfg, _ = trained
    started = time.monotonic()
    missing = ["classify", str(tmp_path / "nope"), "--model", cfg.output]
    err = expect_cli_error(capsys, [*missing, "--output", str(tmp_path / "o")])
    assert str(tmp_path / "nope") in err and not (tmp_path / "o").exists()
    assert time.monotonic() - started < 15  # no Ray started
    inside = ["evaluate", cfg.data, "--model", cfg.output, "--output", cfg.output + "/ev"]
    assert "is inside the model" in expect_cli_error(capsys, inside)
    a_file = tmp_path / "maps"
    a_file.write_text("mine")
    image = next(str(p) for p in Path(cfg.data).rglob("*.jpg"))
    maps = ["visualize", image, "--model", cfg.output, "--layers", "1", "--output", str(a_file)]
    assert "is a file" in expect_cli_error(capsys, maps)
    assert a_file.read_text() == "mine"


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk (the SIGXFSZ
    that would kill the process ignored)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    return limit_files


def test_a_write_the_disk_refuses_is_one_line_and_leaves_no_cut_file(trained, tmp_path):
    """With no room for its output (here: a file size limit, which fails the write as a
    full disk does), `insect visualize` ended in a traceback and left a cut PNG under its
    final name; a demo into a file or a read-only folder did the same. One line naming the
    file now, and nothing left under that name. (No Ray: its logs would meet the limit.)"""
    cfg, _ = trained
    image = next(str(p) for p in Path(cfg.data).rglob("*.jpg"))
    out = tmp_path / "maps"
    argv = ["visualize", image, "--model", cfg.output, "--layers", "1", "--output", str(out)]
    result = subprocess.run([str(BIN / "insect"), *argv], capture_output=True, text=True,
                            cwd=tmp_path, preexec_fn=_file_size_limit(2000))  # fmt: skip
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"insect: error: {out}/layer-001-\S+\.png: File too large", lines[0])
    assert os.listdir(out) == []
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    demo = run_cli("insect", "demo", "--workdir", str(a_file / "demo"), cwd=tmp_path)
    assert demo.returncode == 2 and demo.stderr.startswith("insect: error: "), demo.stderr
    assert demo.stderr == (
        f"insect: error: --workdir {a_file / 'demo'} lies under {a_file}, which is a file; "
        "give a folder\n"
    )
    # A folder of the user's (a labelled tree): the demo added its folders to it as classes.
    (tmp_path / "tree" / "beetles").mkdir(parents=True)
    demo = run_cli("insect", "demo", "--workdir", "tree", cwd=tmp_path)
    assert demo.returncode == 2 and demo.stderr == (
        "insect: error: --workdir tree holds what an earlier demo did not write (beetles): "
        "give a new or empty folder\n"
    )
    assert os.listdir(tmp_path / "tree") == ["beetles"]  # not even the log file
    earlier = tmp_path / "earlier"
    for name in ("sample", "model", "ray_results", "predictions", "_logs"):
        (earlier / name).mkdir(parents=True)
    (earlier / ".DS_Store").write_text("")  # hidden: never listed, not in the way
    for own in ("labelled/beetles/beetles_0059.jpg", "unlabelled/photo_0004.png"):
        (earlier / "sample" / own).parent.mkdir(parents=True, exist_ok=True)
        (earlier / "sample" / own).write_bytes(b"")
    check_workdir(str(earlier))  # an earlier demo's: written over
    # A file of the user's in the sample: the demo would classify (or train on) it too.
    for mine in ("unlabelled/my_photo.jpg", "labelled/ants/a.jpg"):
        (earlier / "sample" / mine).parent.mkdir(parents=True, exist_ok=True)
        (earlier / "sample" / mine).write_bytes(b"")
        with pytest.raises(InsectError, match=f"did not write \\(sample/{mine}\\)"):
            check_workdir(str(earlier))
        (earlier / "sample" / mine).unlink()


def test_a_split_without_one_readable_image_stops_training():
    config = {"train": ["a", "b"], "val": ["c"]}
    metrics = {"train_images": 0, "val_images": 1, "skipped_images": 2}
    assert "none of the 2 training images could be read" in unreadable_split(config, metrics, 0)
    metrics.update(train_images=2, val_images=0)
    assert "none of the 1 validation images" in unreadable_split(config, metrics, 0)
    assert unreadable_split(config, {**metrics, "val_images": 1}, 0) is None
    assert unreadable_split({**config, "val": []}, metrics, 0) is None


@pytest.mark.parametrize(
    "flags",
    [
        ["train", "d", "--lr", "nan"],
        ["train", "d", "--val-fraction", "inf"],
        ["classify", "d", "--model", "m", "--output", "o", "--min-score", "nan"],
        ["classify", "d", "--model", "m", "--output", "o", "--batch-size", "-1"],
        ["classify", "d", "--model", "m", "--output", "o", "--no-calibration"],
        ["classify", "d", "--model", "m", "--output", ""],
        ["train", "d", "--epochs", "1e3"],
        ["train", "d", "--seed", "99999999999999999999"],
        ["visualize", "x.jpg", "--model", "m", "--layers", ",,"],
        # Past an index-sized integer, these overflowed deep in a run, after Ray started.
        ["classify", "d", "--model", "m", "--output", "o", "--batch-size", "99999999999999999999"],
        ["train", "d", "--batch-size", "9223372036854775808"],
        ["classify", "d", "--model", "m", "--output", "o", "--max-file-bytes", str(2**63)],
    ],
)
def test_wrong_values_are_one_line_in_under_two_seconds(flags, tmp_path):
    """One line naming the flag (the last one given), exit 2, before torch or Ray."""
    started = time.monotonic()
    proc = subprocess.Popen([str(BIN / "insect"), *flags], cwd=tmp_path, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    with proc.stderr:
        stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this command's own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert time.monotonic() - started < 2.0, stderr
    # Before torch or Ray: importing torch alone takes over 1.5 CPU-seconds here.
    assert usage.ru_utime + usage.ru_stime < 0.5, (usage, stderr)
    assert proc.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("insect: error: ") and "Traceback" not in stderr
    assert [f for f in flags if f.startswith("--")][-1] in stderr


@pytest.mark.slow
def test_imagenet_weights_without_network_are_one_line_before_ray(labelled_root, tmp_path):
    """An air-gapped machine with an empty torch hub cache: the default --weights imagenet
    is refused in one line naming the cache, before Ray starts."""
    out = tmp_path / "model"
    env = {"TORCH_HOME": str(tmp_path / "hub"), "RAY_ADDRESS": ""}
    result = run_cli("insect", "train", labelled_root, "--output", str(out), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "ImageNet weights for vgg16 are not in the torch hub cache" in lines[0]
    assert str(tmp_path / "hub") in lines[0] and "--weights random" in lines[0]
    assert "log:" not in result.stdout and not out.exists()
    # insect's own line only: torch.hub's "Downloading: ..." (on stdout in torch 2.14) is not
    assert result.stdout.splitlines() == [
        f"downloading the ImageNet weights of vgg16 into {tmp_path}/hub/hub/checkpoints/"
        "vgg16-397923af.pth"
    ], result.stdout


def test_runs_the_cluster_cannot_hold_are_refused_in_one_line(trained, unlabelled, tmp_path):
    cfg, _ = trained
    data = cfg.data
    big = TrainConfig(
        **{**cfg.__dict__, "workers": 1000, "output": str(tmp_path / "m"), "name": "big"}
    )
    with pytest.raises(InsectError, match=r"1000 training workers \(1 CPU each\) do not fit"):
        fit(big)
    gpu = TrainConfig(**{**cfg.__dict__, "gpu": True, "output": str(tmp_path / "g"), "name": "g"})
    with pytest.raises(InsectError, match="--gpu: the cluster has no GPU"):
        fit(gpu)
    many = ClassifyConfig(
        input=_images(unlabelled), model=cfg.output, output=str(tmp_path / "o"),
        max_actors=50, min_actors=50, batch_size=1,
    )  # fmt: skip
    with pytest.raises(InsectError, match=r"24 model actors \(\d CPUs? each\) do not fit"):
        classify(many)
    assert data and not (tmp_path / "o").exists()


def test_training_counts_each_image_once():
    """45 images over 2 workers: DistributedSampler repeats one to give both 23 steps; the
    repeat is marked, so the images seen add up to 45."""
    dataset = list(range(45))
    shards = [list(ShardSampler(dataset, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert [len(s) for s in shards] == [23, 23]
    real = [i for s in shards for i in s if i < 45]
    assert sorted(real) == list(range(45))
    padded = [i - 45 for s in shards for i in s if i >= 45]
    assert len(padded) == 1 and 0 <= padded[0] < 45


def test_a_pillow_bomb_gets_the_documented_text():
    from PIL import Image

    from insectlib.data.images import decode

    header = Image.new("L", (1, 1))
    buffer = io.BytesIO()
    header.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)  # width and height in IHDR
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(Exception, match=r"image too large: 30000x30000 = 900,000,000 pixels"):
        decode(bytes(data))


def test_the_summary_says_the_runs_own_rate_after_a_resume(trained, unlabelled, tmp_path):
    cfg, _ = trained
    out = tmp_path / "out"
    base = ClassifyConfig(
        input=_images(unlabelled), model=cfg.output, output=str(out), rows_per_file=8
    )
    # An interrupted run's output: rows for two thirds of the inputs, no _SUCCESS. (Removing
    # a part of a whole run left none when Ray Data wrote every row into one part.)
    classify(base, paths=sorted(unlabelled)[:16])
    (out / layout.SUCCESS_FILE).unlink()
    resumed = classify(ClassifyConfig(**{**base.__dict__, "resume": True}))
    summary = json.loads((out / layout.SUMMARY_JSON).read_text())
    assert summary["images_per_second"] == pytest.approx(resumed.images_per_second)
    done = resumed.already_done
    assert done == 16 and resumed.inputs == len(unlabelled)
    assert resumed.images_per_second == pytest.approx((len(unlabelled) - done) / resumed.seconds)


def test_evaluation_says_when_it_is_not_held_out(trained, labelled_root, tmp_path, capsys):
    """Evaluating on the images training validated on (and fitted its temperature on) is
    said; with train/, val/ and test/, training validates on val/ and evaluation uses
    test/, which it never saw."""
    cfg, _ = trained
    evaluate(EvaluateConfig(data=labelled_root, model=cfg.output, output=str(tmp_path / "e")))
    assert "these figures are not held out" in capsys.readouterr().err
    tree = tmp_path / "tree"
    for split in ("train", "val", "test"):
        synthetic.make_labelled(str(tree / split), per_class=2, size=(32, 24))
    assert discover(str(tree)).held_out == "val"
    assert discover(str(tree), held_out_dirs=EVALUATION_DIRS).held_out == "test"


def test_each_way_to_name_the_images_training_used_is_said(tmp_path):
    """The root, its held-out folder or its train/ folder, named directly, by a link, or
    with a trailing slash; a folder training never read is not."""
    from insectlib.classify.evaluate import used_in_training

    root = tmp_path / "data"
    for split in ("train", "test", "other"):
        (root / split).mkdir(parents=True)
    (tmp_path / "link").symlink_to(root)
    trained = {"root": str(root), "held_out": "test"}
    assert "validated on its test/ folder" in used_in_training(str(root), "test", trained)
    for test in (root / "test", f"{tmp_path}/link/test/"):
        assert "validated on these images, its test/" in used_in_training(str(test), None, trained)
    assert "trained on these images" in used_in_training(str(root / "train"), None, trained)
    assert used_in_training(str(root / "other"), None, trained) is None
    assert used_in_training(str(root), "val", trained) is None
    flat = {"root": str(root), "held_out": None}
    assert "trained and validated on every image" in used_in_training(str(root), None, flat)
    assert used_in_training(str(root / "test"), None, flat) is None


def test_a_temperature_is_kept_only_where_it_generalises():
    rng = np.random.default_rng(0)
    few = rng.normal(0, 3, (20, 3))
    report = confidence.temperature_report(few, np.where(rng.random(20) < 0.5, few.argmax(1), 0))
    assert report["temperature"] is None and "too few" in report["note"]
    # Labels drawn from softmax(z): already calibrated, a fitted T only fits noise.
    logits = rng.normal(0, 2, (400, 4))
    labels = np.array([rng.choice(4, p=p) for p in confidence.probabilities(logits)])
    calibrated = confidence.temperature_report(logits, labels)
    checked = calibrated["cross_validated"]
    assert calibrated["temperature"] is None and checked["with_temperature"] >= checked["raw"]
    # Drawn from softmax(z / 3): the temperature helps out of sample and is kept.
    labels = np.array([rng.choice(4, p=p) for p in confidence.probabilities(logits, 3.0)])
    kept = confidence.temperature_report(logits, labels)
    assert 2.5 < kept["temperature"] < 3.5
    assert kept["cross_validated"]["with_temperature"] < kept["cross_validated"]["raw"]


def test_a_class_without_one_readable_training_image_stops_training():
    config = {"classes": ["ants", "bees", "wasps"], "train": [("a", 0), ("b", 2), ("c", 2)]}
    assert unreadable_class(config, [1, 0, 1], 0) is None  # bees: none listed, none seen
    assert "in epoch 2 of class wasps (2 listed); no model" in unreadable_class(
        config, [1, 0, 0], 1
    )
    assert "of classes ants (1 listed), wasps (2 listed);" in unreadable_class(config, [0, 0, 0], 0)
