"""Operator mistakes: nothing insect did not write is ever removed, a broken run never
leaves an output or a model directory that looks complete, and every mistake gets one clear
line instead of a traceback."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch

from insectlib import layout, storage
from insectlib.classify import outputs, pipeline
from insectlib.classify.pipeline import classify, plan_run, print_summary
from insectlib.config import ClassifyConfig, TrainConfig
from insectlib.errors import InsectError, StorageUnavailable
from insectlib.layout import CONFUSION_PNG, META_FILE, MODEL_FILES, RELIABILITY_PNG, WEIGHTS_FILE
from insectlib.model.meta import read_meta
from insectlib.model.network import load_model
from insectlib.model.predictor import PREDICTION_SCHEMA, RowFormat
from insectlib.storage import files, retry
from insectlib.training.model_dir import write_model_dir
from insectlib.training.preflight import preflight
from tests.conftest import expect_cli_error, run_cli


def _images(unlabelled, tmp_path, name="data"):
    """A copy of the unlabelled images in DIR/sub, and DIR/notes.txt beside them."""
    root = tmp_path / name
    shutil.copytree(os.path.dirname(next(iter(unlabelled))), root / "sub")
    (root / "notes.txt").write_text("keep me")
    return root


def _classify(model, images, output, **kw):
    return classify(ClassifyConfig(input=str(images), model=model, output=str(output), **kw))


def _tree(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_overwrite_refuses_an_output_holding_the_input_or_the_model(
    trained, unlabelled, tmp_path, capsys
):
    cfg, _ = trained
    root = _images(unlabelled, tmp_path)
    before = _tree(root)
    argv = ["classify", str(root / "sub"), "--model", cfg.output, "--output", str(root)]
    err = expect_cli_error(capsys, [*argv, "--overwrite"])
    assert "contains the input" in err
    model_copy = tmp_path / "models" / "m"
    shutil.copytree(cfg.output, model_copy)
    err = expect_cli_error(
        capsys,
        ["classify", str(root / "sub"), "--model", str(model_copy), "--output",
         str(tmp_path / "models"), "--overwrite"],
    )  # fmt: skip
    assert "contains the model" in err
    assert _tree(root) == before and (model_copy / META_FILE).exists()
    # evaluate --output DATA --overwrite: the data it is about to read
    err = expect_cli_error(
        capsys,
        ["evaluate", str(root), "--model", cfg.output, "--output", str(root), "--overwrite"],
    )
    assert "contains the input" in err
    assert _tree(root) == before


def test_overwrite_removes_only_insects_files_and_only_once_the_run_can_start(
    trained, unlabelled, tmp_path, capsys
):
    cfg, meta = trained
    images = os.path.dirname(next(iter(unlabelled)))
    out = tmp_path / "out"
    _classify(cfg.output, images, out)
    first = _tree(out)
    assert layout.SUCCESS_FILE in first and all(
        outputs.is_part_name(n) for n in first if n not in layout.RUN_FILES
    )
    argv = ["classify", images, "--model", cfg.output, "--output", str(out), "--overwrite"]
    # A broken model directory or an input without images: refused, old output untouched.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / META_FILE).write_bytes((tmp_path / cfg.output / META_FILE).read_bytes())
    err = expect_cli_error(capsys, ["classify", images, "--model", str(broken), "--output",
                                    str(out), "--overwrite"])  # fmt: skip
    assert f"has no {WEIGHTS_FILE}" in err
    (tmp_path / "empty").mkdir()
    err = expect_cli_error(capsys, ["classify", str(tmp_path / "empty"), *argv[2:]])
    assert "no image files found" in err
    assert _tree(out) == first
    # A file insect did not write: refused, naming it, nothing removed.
    (out / "notes.txt").write_text("mine")
    err = expect_cli_error(capsys, argv)
    assert "holds files insect did not write (notes.txt)" in err
    assert _tree(out) == {**first, "notes.txt": b"mine"}
    # A Parquet file named like insect's but with other columns: refused as well.
    (out / "notes.txt").unlink()
    # Another command's output (an evaluation over a classification): insect's all the same.
    ev = ["evaluate", cfg.data, "--model", cfg.output, "--output", str(out), "--overwrite"]
    err = expect_cli_error(capsys, ev)
    assert "holds files named as another insect command names its output (_SUCCESS, _sum" in err
    fake = "part-" + "a" * 32 + "-000000-0.parquet"
    pq.write_table(pa.table({"x": [1]}), out / fake)
    assert "other columns" in expect_cli_error(capsys, argv)
    (out / fake).unlink()
    # Its own output: replaced.
    from insectlib.cli.main import main

    assert main(argv) == 0
    second = _tree(out)
    assert set(second) != set(first) and layout.SUCCESS_FILE in second
    assert pq.read_table(out).num_rows == len(unlabelled)


def test_output_files_hold_rows_per_file_up_to_one_batch_more(trained, unlabelled, tmp_path):
    """Batches of 3 do not fill files of 8 exactly: a file takes the block that crosses 8
    rows whole (a block of this small input holds one or two batches, depending on the
    paths' length: 9 to 13 rows), never a file of full rows plus one of the remainder.
    Only the last may hold fewer."""
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    out = tmp_path / "out"
    _classify(cfg.output, images, out, rows_per_file=8, batch_size=3)
    sizes = sorted(pq.read_metadata(f).num_rows for f in out.glob("*.parquet"))
    assert sum(sizes) == len(unlabelled)
    assert all(8 <= n <= 8 - 1 + 2 * 3 for n in sizes[1:]), sizes
    assert sizes[0] >= 1


def test_resume_trusts_only_insects_own_files(
    calibrated, unlabelled, tmp_path, capsys, monkeypatch
):
    model_dir, _ = calibrated
    images = os.path.dirname(next(iter(unlabelled)))
    out = tmp_path / "out"
    _classify(model_dir, images, out, rows_per_file=8, batch_size=4, top_k=2)
    argv = ["classify", images, "--model", model_dir, "--output", str(out), "--resume"]
    # Rows made another way (other columns, other probabilities): refused before Ray starts
    # (which would leave a log in the output), nothing removed.
    with monkeypatch.context() as m:
        m.setattr(pipeline, "init_ray", lambda address: pytest.fail("Ray started"))
        before = _tree(out)
        err = expect_cli_error(capsys, argv)
        assert "holds rows made another way (top_k 2 then, null now)" in err
        err = expect_cli_error(capsys, [*argv, "--top-k", "2", "--no-temperature"])
        assert "(temperature 1.7 then, null now)" in err
        assert _tree(out) == before
    argv += ["--top-k", "2"]
    for name, write in (
        ("notes.txt", lambda p: p.write_text("mine")),
        ("other.parquet", lambda p: pq.write_table(pa.table({"a": [1]}), p)),
    ):
        write(out / name)
        before = _tree(out)
        err = expect_cli_error(capsys, argv)
        assert f"holds files insect did not write ({name})" in err
        assert _tree(out) == before  # checked before anything was removed
        (out / name).unlink()
    # A half-written part (no footer) is the dead run's: removed and its rows redone.
    part = sorted(p for p in out.iterdir() if outputs.is_part_name(p.name))[0]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    from insectlib.cli.main import main

    assert main(argv) == 0
    table = pq.read_table(out)
    assert sorted(table.column("path").to_pylist()) == sorted(unlabelled)
    assert {layout.SUMMARY_JSON, layout.SUMMARY_PNG, layout.SUCCESS_FILE} <= set(_tree(out))


def test_parts_from_before_row_formats_resume_only_as_raw_softmax(trained, tmp_path):
    """A part written before insect recorded how its rows were made holds raw softmax
    probabilities and no optional column: only such a run may continue it."""
    _, meta = trained
    out = tmp_path / "out"
    out.mkdir()
    rows = {
        "path": ["/x/a.jpg"], "label": ["a"], "label_index": [0], "score": [0.9],
        "probabilities": [[0.9, 0.1]], "error": [None], "model": [meta.model_id],
    }  # fmt: skip
    part = out / ("part-" + "b" * 32 + "-000000-0.parquet")
    pq.write_table(pa.table(rows, schema=PREDICTION_SCHEMA), part)
    legacy, s3 = asdict(RowFormat()), storage.S3Options()
    assert outputs.resume_state(str(out), meta.model_id, s3, legacy, legacy).rows == 1
    calibrated = asdict(RowFormat(temperature=1.7))
    with pytest.raises(InsectError, match="temperature null then, 1.7 now"):
        outputs.resume_state(str(out), meta.model_id, s3, calibrated, legacy)


def test_resume_read_errors_are_retried_then_fail_without_deleting(
    trained, unlabelled, tmp_path, monkeypatch
):
    cfg, meta = trained
    images = os.path.dirname(next(iter(unlabelled)))
    out = tmp_path / "out"
    _classify(cfg.output, images, out, rows_per_file=8, batch_size=4)
    before = _tree(out)
    monkeypatch.setattr(retry, "READ_BACKOFF_S", 0.01)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise OSError("connection reset by peer")

    monkeypatch.setattr(outputs.pq, "ParquetFile", failing)
    with pytest.raises(StorageUnavailable, match="after 4 attempts"):
        legacy = asdict(RowFormat())
        outputs.resume_state(str(out), meta.model_id, storage.S3Options(), legacy, legacy)
    assert len(calls) >= retry.READ_ATTEMPTS and _tree(out) == before


def test_a_finished_run_is_resumed_only_over_its_own_input(trained, unlabelled, tmp_path, capsys):
    """--resume over another input used to remove _SUCCESS and add the other input's rows:
    an output no run could finish again. It is refused with nothing touched; the same input,
    spelled with a trailing slash, resumes, and with every input done starts no model actor
    (it did, and said 0.0 images/s)."""
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(iter(unlabelled)), other / "one.jpg")
    out = tmp_path / "out"
    _classify(cfg.output, images, out)
    before = _tree(out)
    refused = f"holds a finished run over {images}, not {other}"
    with pytest.raises(InsectError, match=refused):  # in the checks, before Ray
        plan_run(ClassifyConfig(input=str(other), model=cfg.output, output=str(out), resume=True))
    with pytest.raises(InsectError, match=refused):
        _classify(cfg.output, other, out, resume=True)
    assert _tree(out) == before
    capsys.readouterr()
    record = {name: before[name] for name in (layout.SUCCESS_FILE, layout.SUMMARY_JSON)}
    resumed = _classify(cfg.output, images + "/", out, resume=True)
    assert resumed.rows == resumed.already_done == len(unlabelled) and resumed.shape is None
    said = capsys.readouterr().out
    assert "every input has its row already; nothing to classify" in said
    assert "its _SUCCESS and summary are kept" in said
    print_summary(resumed)
    assert "(every one done before)" in capsys.readouterr().out
    # The finished run's record stays its own: not this resume's time, speed and spelling.
    assert {name: (out / name).read_bytes() for name in record} == record
    # ...while it holds: a broken summary (a kill between the two writes) is written anew.
    (out / layout.SUMMARY_JSON).write_text("{")
    _classify(cfg.output, images, out, resume=True)
    assert "are kept" not in capsys.readouterr().out
    assert json.loads((out / layout.SUMMARY_JSON).read_text())["rows"] == len(unlabelled)
    # An input removed since: --resume cannot mend that (it keeps rows), and says so; the
    # record goes, as the output is no longer a finished run of its input.
    fewer = ClassifyConfig(input=images, model=cfg.output, output=str(out), resume=True)
    with pytest.raises(InsectError, match="rows of 1 input no longer in .* --overwrite classif"):
        classify(fewer, paths=sorted(unlabelled)[:-1])
    assert not (out / layout.SUCCESS_FILE).exists() and not (out / layout.SUMMARY_JSON).exists()


def test_a_finished_run_resumed_over_new_inputs_records_it_anew(trained, unlabelled, tmp_path):
    """Images added to a finished run's input: --resume classifies those alone, and the
    record (_SUCCESS, summary) is written anew for the whole output."""
    cfg, _ = trained
    paths = sorted(unlabelled)
    images = tmp_path / "images"
    images.mkdir()
    for path in paths[:4]:
        shutil.copy(path, images)
    out = tmp_path / "out"
    _classify(cfg.output, images, out)
    first = json.loads((out / layout.SUCCESS_FILE).read_text())
    shutil.copy(paths[4], images)
    resumed = _classify(cfg.output, images, out, resume=True)
    assert (resumed.rows, resumed.already_done) == (5, 4) and resumed.shape is not None
    success = json.loads((out / layout.SUCCESS_FILE).read_text())
    assert success["inputs"] == success["rows"] == 5 and success["resumed"]
    assert success["started"] > first["finished"]
    summary = json.loads((out / layout.SUMMARY_JSON).read_text())
    assert (summary["rows"], summary["already_done"]) == (5, 4)
    names = sorted(os.path.basename(p) for p in pq.read_table(out).column("path").to_pylist())
    assert names == sorted(os.path.basename(p) for p in paths[:5])


def test_the_input_a_success_names_is_compared_only_where_it_is_absolute(tmp_path):
    """Before 2026-12-02 _SUCCESS named the input as typed: `imgs` may be any folder."""
    s3 = storage.S3Options()
    for recorded, source, refused in [
        ("imgs", "/work/imgs", False),
        ("/work/imgs/", "/work/imgs", False),
        ("s3://b/p", "s3://b/p/", False),
        ("/work/imgs", "/work/other", True),
        ("s3://b/p", "s3://b/q", True),
    ]:
        (tmp_path / layout.SUCCESS_FILE).write_text(json.dumps({"input": recorded}))
        if refused:
            with pytest.raises(InsectError, match=f"finished run over {recorded}, not {source}"):
                outputs.check_same_input(str(tmp_path), source, s3)
        else:
            outputs.check_same_input(str(tmp_path), source, s3)


def test_rows_must_equal_inputs(trained, unlabelled, tmp_path):
    """A resumed output with rows for an input that is gone: no _SUCCESS, a clear error."""
    cfg, _ = trained
    folder = tmp_path / "in"
    shutil.copytree(os.path.dirname(next(iter(unlabelled))), folder)
    out = tmp_path / "out"
    _classify(cfg.output, folder, out)
    (out / layout.SUCCESS_FILE).unlink()
    sorted(folder.iterdir())[0].unlink()
    with pytest.raises(InsectError, match=r"has 24 rows for 23 inputs, so no _SUCCESS"):
        _classify(cfg.output, folder, out, resume=True)
    assert not (out / layout.SUCCESS_FILE).exists()


def test_model_id_is_checked_against_the_weights(trained, tmp_path):
    """A copied or half-rewritten weights file is refused where the model is loaded."""
    cfg, meta = trained
    copy = tmp_path / "m"
    shutil.copytree(cfg.output, copy)
    state = safetensors.torch.load((copy / WEIGHTS_FILE).read_bytes())
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    (copy / WEIGHTS_FILE).write_bytes(safetensors.torch.save(state))
    with pytest.raises(InsectError, match=f"meta.json says {meta.model_id}"):
        load_model(str(copy))
    # The same refusal from the model actors of a classification run, as one error.
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InsectError, match=f"meta.json says {meta.model_id}"):
        _classify(str(copy), images, tmp_path / "out")


def test_model_dir_never_looks_complete_while_rewritten(trained, tmp_path, monkeypatch):
    cfg, meta = trained
    copy = tmp_path / "m"
    shutil.copytree(cfg.output, copy)
    model, meta = load_model(str(copy))
    written = []
    real_write = files.write_bytes

    def record(uri, data, s3=None):
        written.append(uri.rsplit("/", 1)[-1])
        real_write(uri, data, s3)

    monkeypatch.setattr(files, "write_bytes", record)
    target = TrainConfig(data="d", output=str(copy))
    write_model_dir(target, model, meta, None)
    # In the order the layout states (no validation here: no confusion matrix).
    assert written == [name for name in MODEL_FILES if name not in (CONFUSION_PNG, RELIABILITY_PNG)]
    assert read_meta(str(copy)).model_id == meta.model_id

    def crash(uri, data, s3=None):  # the run dies while writing the new weights
        if uri.endswith(WEIGHTS_FILE):
            raise OSError("disk full")
        real_write(uri, data, s3)

    monkeypatch.setattr(files, "write_bytes", crash)
    with pytest.raises(OSError):
        write_model_dir(target, model, meta, None)
    assert not (copy / META_FILE).exists()  # not a model: no old meta beside other weights


def test_train_resume_refuses_another_configuration(trained, labelled_root, tmp_path):
    cfg, _ = trained
    same = TrainConfig(**{**cfg.__dict__, "resume": True, "overwrite": True})
    preflight(same)  # the recorded configuration: accepted
    other = TrainConfig(**{**same.__dict__, "seed": 1, "image_size": 32, "freeze": "none"})
    with pytest.raises(InsectError) as e:
        preflight(other)
    text = str(e.value)
    assert "different configuration" in text
    assert "seed: 0 then, 1 now" in text and "image_size: 64 then, 32 now" in text
    assert "freeze" in text
    data = tmp_path / "data"
    shutil.copytree(labelled_root, data)
    (data / "beetles" / "extra.jpg").write_bytes(next((data / "beetles").iterdir()).read_bytes())
    with pytest.raises(InsectError, match="data_sha256"):
        preflight(TrainConfig(**{**same.__dict__, "data": str(data)}))


def test_clear_errors_instead_of_tracebacks(trained, unlabelled, tmp_path, capsys):
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    base = ["classify", images, "--model", cfg.output, "--output", str(tmp_path / "o")]
    assert "--cpus-per-actor must be at least 0.0001, got 0" in expect_cli_error(
        capsys, [*base, "--cpus-per-actor", "0"]
    )
    assert "--max-file-bytes must be between 1 and" in expect_cli_error(
        capsys, [*base, "--max-file-bytes", "0"]
    )
    bad = tmp_path / "bad-meta"
    shutil.copytree(cfg.output, bad)
    meta = json.loads((bad / META_FILE).read_text())
    (bad / META_FILE).write_text(json.dumps({**meta, "mean": None}))
    err = expect_cli_error(capsys, ["classify", images, "--model", str(bad), "--output",
                                    str(tmp_path / "o2")])  # fmt: skip
    assert "not a valid insect meta.json" in err and "'mean'" in err
    err = expect_cli_error(capsys, ["visualize", next(iter(unlabelled)), "--model", cfg.output,
                                    "--layers", "1", "--max-maps", "0"])  # fmt: skip
    assert "--max-maps must be at least 1" in err
    err = expect_cli_error(capsys, ["train", images, "--image-size", "5000"])
    assert "--image-size must be between 16 and 4096" in err
    err = expect_cli_error(capsys, ["train", images, "--output", f"{images}/model"])
    assert "is inside the data" in err
    s3_root = ["classify", images, "--model", cfg.output, "--output", "s3://bucket/"]
    assert "is a bucket root" in expect_cli_error(capsys, s3_root)


@pytest.mark.parametrize("given", ["--address", "$RAY_ADDRESS"])
def test_bad_address_fails_fast_with_one_line(given, trained, unlabelled, tmp_path):
    """A cluster address that does not answer, as the flag or as `ray job submit` would set
    it: one line naming where it came from, in seconds (Ray itself retries for minutes)."""
    cfg, _ = trained
    images = os.path.dirname(next(iter(unlabelled)))
    argv = ["classify", images, "--model", cfg.output, "--output", str(tmp_path / "o")]
    flag = ["--address", "127.0.0.1:1"] if given == "--address" else []
    env = {"RAY_ADDRESS": "127.0.0.1:1" if given == "$RAY_ADDRESS" else ""}
    started = time.monotonic()
    result = run_cli("insect", *argv, *flag, env=env, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60, result.stderr
    assert "insect: error: cannot connect to Ray at 127.0.0.1:1" in result.stderr
    assert f"check {given} (" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_class_of_unreadable_training_images_writes_no_model(ray_local, tmp_path):
    """The model could not learn the class: no model, rather than one that never names it."""
    from insectlib.data import synthetic
    from insectlib.training.trainer import fit

    root = tmp_path / "data"
    synthetic.make_labelled(str(root), per_class=4, size=(32, 24))
    for image in (root / "dragonflies").iterdir():
        image.write_bytes(b"not a picture")
    cfg = TrainConfig(
        data=str(root), output=str(tmp_path / "m"), arch="resnet18", weights="random",
        epochs=1, image_size=32, batch_size=4, storage=str(tmp_path / "runs"),
    )  # fmt: skip
    with pytest.raises(
        InsectError, match=r"in epoch 1 of class dragonflies \(3 listed\); no model"
    ):
        fit(cfg)
    assert not (tmp_path / "m" / META_FILE).exists()


def test_all_validation_images_unreadable(ray_local, tmp_path):
    from insectlib.data import synthetic
    from insectlib.training.trainer import fit

    root = tmp_path / "data"
    synthetic.make_labelled(str(root / "train"), per_class=4, size=(32, 24))
    for cls in ("beetles", "cockroach", "dragonflies"):
        (root / "val" / cls).mkdir(parents=True)
        (root / "val" / cls / "bad.jpg").write_bytes(b"not a picture")
    with pytest.raises(InsectError, match="none of the 3 validation images could be read"):
        fit(
            TrainConfig(
                data=str(root), output=str(tmp_path / "m"), arch="resnet18", weights="random",
                epochs=2, image_size=32, batch_size=4, storage=str(tmp_path / "runs"),
            )
        )  # fmt: skip
    assert not (tmp_path / "m" / META_FILE).exists()


def test_training_records_its_configuration_beside_the_run(trained):
    cfg, meta = trained
    uri = storage.join(cfg.storage, cfg.name, "insect-run.json")
    record = json.loads(storage.read_bytes(uri))
    assert record["seed"] == cfg.seed and record["image_size"] == cfg.image_size
    assert record["classes"] == meta.classes and len(record["data_sha256"]) == 64
