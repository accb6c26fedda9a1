"""CLI errors: one clear line naming the culprit, a non-zero exit, no traceback."""

import argparse
import dataclasses
import json
import os
import random

import pytest

from insectlib.classify import checks
from insectlib.cli.main import COMMANDS, main
from insectlib.config import ClassifyConfig, SummaryConfig, TrainConfig
from insectlib.data import synthetic
from insectlib.errors import InsectError
from insectlib.layout import INT8_RECORD, INT8_STATS, META_FILE
from insectlib.storage import S3Options
from tests.conftest import BIN, REPO, assert_refused_before_torch, expect_cli_error, run_cli


def test_train_input_errors(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert missing in expect_cli_error(capsys, ["train", missing])
    (tmp_path / "empty").mkdir()
    assert "no labelled images in" in expect_cli_error(capsys, ["train", str(tmp_path / "empty")])
    one = tmp_path / "one"
    synthetic.make_labelled(str(one), per_class=2, size=(32, 24))
    for cls in ("cockroach", "dragonflies"):
        for f in (one / cls).iterdir():
            f.unlink()
    err = expect_cli_error(capsys, ["train", str(one)])
    assert "at least 2 class folders, found 1 (beetles)" in err
    # The network's settings after the paths: they are the checks that import torch.
    data = synthetic.make_labelled(str(tmp_path / "data"), per_class=2, size=(32, 24))
    assert "unknown --arch 'vgg99'" in expect_cli_error(capsys, ["train", data, "--arch", "vgg99"])
    # A size the arch cannot take failed in every worker, in a traceback, after Ray started.
    for arch, size, why in (
        ("vgg16", "31", "Output size is too small"),
        ("vit_b_16", "64", "Wrong image height! Expected 224 but got 64!"),
    ):
        err = expect_cli_error(capsys, ["train", data, "--arch", arch, "--image-size", size])
        assert err.startswith(f"insect: error: --arch {arch} cannot take --image-size {size}: ")
        assert why in err
    assert "--weights file not found" in expect_cli_error(
        capsys, ["train", data, "--weights", str(tmp_path / "w.pth")]
    )
    # A safetensors file of another arch: from its header, before Ray starts.
    from insectlib.model import network

    network.save_model(
        str(tmp_path / "m1"),
        network.build_model("resnet18", 3, "random"),
        network.ModelMeta(classes=["a", "b", "c"], arch="resnet18", image_size=32),
    )
    weights = str(tmp_path / "m1" / network.WEIGHTS_FILE)
    err = expect_cli_error(capsys, ["train", data, "--arch", "resnet34", "--weights", weights])
    assert "does not fit resnet34: 96 tensors missing from it" in err


def test_classify_input_errors(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "in").mkdir()
    argv = [
        "classify",
        str(tmp_path / "in"),
        "--model",
        str(model),
        "--output",
        str(tmp_path / "out"),
    ]
    # The model is checked before the (empty) input.
    err = expect_cli_error(capsys, argv)
    assert "not a model directory" in err and str(model / META_FILE) in err
    # Its meta.json is read after the paths are checked (reading it imports torchvision).
    synthetic.make_image("beetles", random.Random(0), (32, 24)).save(tmp_path / "in" / "a.jpg")
    (model / META_FILE).write_text("{not json")
    err = expect_cli_error(capsys, argv)
    assert "is not a valid insect meta.json" in err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "/no/such/dir"],
        ["classify", "/no/such/dir", "--model", "/no/model", "--output", "/tmp/x"],
    ],
)
def test_cli_process_exits_non_zero_without_traceback(args):
    result = run_cli("insect", *args, timeout=120)
    assert result.returncode == 2
    assert "insect: error:" in result.stderr and "/no/" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_flag_the_command_lacks_points_to_the_commands_help(capsys):
    """argparse's refusal pointed to `insect --help`, which lists no command's flags."""
    from insectlib.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["classify", "in", "--model", "m", "--output", "o", "--storage", "s"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "insect: error: unrecognized arguments: --storage s (see insect classify --help)\n"
    )


def test_a_removed_working_folder_is_one_line(tmp_path):
    """A shell left in a folder that was then removed: every command failed with a traceback
    from os.getcwd(), absolute paths or not."""
    gone = tmp_path / "gone"
    gone.mkdir()
    insect = BIN / "insect"
    script = f'cd "{gone}" && rmdir "{gone}" && exec "{insect}" summary "{tmp_path}/out"'
    result = run_cli("/bin/bash", "-c", script, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (
        "insect: error: the current folder no longer exists (removed after the shell went "
        "into it): cd to one that does\n"
    )


def test_classify_empty_input(trained, tmp_path, capsys):
    cfg, _ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    err = expect_cli_error(
        capsys,
        [
            "classify",
            str(tmp_path / "in"),
            "--model",
            cfg.output,
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert f"no image files found in {tmp_path / 'in'}" in err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from insectlib.cli.main import parser

    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_is_a_config_field_with_its_default_and_choices(command):
    cls = COMMANDS[command][0]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "s3"}
    if "s3" in cls.__dataclass_fields__:
        fields |= {f.name: f for f in dataclasses.fields(S3Options)}
    seen = set()
    for action in _subparsers()[command]._actions:
        if action.dest == "help":
            continue
        f = fields[action.dest]  # every flag is a field...
        seen.add(action.dest)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            assert action.const is not f.default, action.dest  # the flag changes it
            assert action.default is argparse.SUPPRESS  # an absent flag leaves the field's
        else:
            default = None if f.default is dataclasses.MISSING else f.default
            assert action.default == default, action.dest
            assert action.choices == f.metadata.get("choices"), action.dest
    assert seen == set(fields)  # ...and every field a flag


def test_parsed_defaults_equal_the_config_defaults():
    from insectlib.cli.main import config_from, parser

    def parsed(argv):
        args = parser().parse_args(argv)
        return config_from(COMMANDS[args.command][0], args)

    assert parsed(["train", "d"]) == TrainConfig(data="d")
    assert parsed(["classify", "i", "--model", "m", "--output", "o"]) == ClassifyConfig(
        input="i", model="m", output="o"
    )
    flags = ["train", "d", "--no-augment", "--gpu", "--s3-endpoint", "http://x", "--epochs", "7"]
    assert parsed(flags) == TrainConfig(
        data="d", augment=False, gpu=True, epochs=7, s3=S3Options(endpoint_url="http://x")
    )


def test_settings_outside_their_rules_are_refused_by_the_config():
    # Library callers get the same checks as the command line.
    with pytest.raises(InsectError, match="unknown --optimizer 'lbfgs': choose one of adam, sgd"):
        TrainConfig(data="d", optimizer="lbfgs").validate()
    with pytest.raises(InsectError, match="--image-size must be between 16 and 4096, got 8"):
        TrainConfig(data="d", image_size=8).validate()
    # Past float32's range torch failed mid-run with a traceback; --name left --storage.
    for field, flag in [
        ("lr", "--lr"),
        ("weight_decay", "--weight-decay"),
        ("momentum", "--momentum"),
    ]:
        with pytest.raises(InsectError, match=f"{flag} must be between 0 and"):
            TrainConfig(data="d", **{field: 1e99}).validate()
    for name in ["../data/runs", "a/../..", "/abs", "a//b", ".", "..", "", "a\nb", "a\tb"]:
        with pytest.raises(InsectError, match="--name must be a folder under --storage"):
            TrainConfig(data="d", name=name).validate()
    TrainConfig(data="d", name="team-a/run-1", lr=0.5).validate()
    # A positional argument is named as --help shows it, not as a flag it is not.
    with pytest.raises(InsectError, match="^PREDICTIONS is empty"):
        SummaryConfig(predictions="").validate()
    with pytest.raises(InsectError, match="^--output is empty"):  # wrote into a folder " "
        ClassifyConfig(input="i", model="m", output=" ").validate()
    with pytest.raises(InsectError, match="--max-error-fraction must be between 0 and 1"):
        ClassifyConfig(input="i", model="m", output="o", max_error_fraction=2.0).validate()
    # Less than Ray's smallest share reached Ray and failed there with a traceback.
    for value in (0, 0.00001):
        with pytest.raises(
            InsectError, match=f"--cpus-per-actor must be at least 0.0001, got {value}"
        ):
            ClassifyConfig(input="i", model="m", output="o", cpus_per_actor=value).validate()
    # On CPU a fraction gave one thread per actor and as many actors as fit in the cluster.
    for value in (0.0001, 0.5, 2.0000001):
        with pytest.raises(InsectError, match=f"^--cpus-per-actor {value}: on CPU .* whole"):
            ClassifyConfig(input="i", model="m", output="o", cpus_per_actor=value).validate()
    ClassifyConfig(input="i", model="m", output="o", cpus_per_actor=2).validate()
    ClassifyConfig(input="i", model="m", output="o", cpus_per_actor=0.5, gpu=True).validate()
    with pytest.raises(InsectError, match="--cpus-per-worker must be at least 0.0001, got 1e-05"):
        TrainConfig(data="d", cpus_per_worker=0.00001).validate()


def test_gpu_workers_get_the_cores_their_gpus_leave(monkeypatch):
    from insectlib.runtime import connect

    gpu = TrainConfig(data="d", gpu=True)
    assert (gpu.sized(16.0).cpus_per_worker, gpu.sized(16.0).loader_workers) == (16.0, 15)
    assert (gpu.sized(None).cpus_per_worker, gpu.sized(None).loader_workers) == (1.0, 0)
    given = TrainConfig(data="d", gpu=True, cpus_per_worker=4, loader_workers=2).sized(16.0)
    assert (given.cpus_per_worker, given.loader_workers) == (4, 2)  # the user's, kept
    cpu = TrainConfig(data="d").sized(16.0)  # on CPU the model is the bottleneck
    assert (cpu.cpus_per_worker, cpu.loader_workers) == (1.0, 0)
    nodes = [
        {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 64.0}},  # CPU-only: not a training node
        {"Alive": False, "Resources": {"CPU": 1.0, "GPU": 1.0}},
    ]
    monkeypatch.setattr(connect.ray, "nodes", lambda: nodes)
    assert connect.cpus_per_gpu() == 8.0  # the tightest GPU node decides


@pytest.mark.parametrize(
    "module",
    [
        "insectlib.config",  # the settings, and so the flags
        "insectlib.data.inputs",  # Ray Data's listing tasks
        "insectlib.classify.outputs",  # its write tasks
    ],
)
def test_modules_load_without_torch(module):
    """The settings load without a model library, and so do the modules Ray's listing and
    write tasks unpickle: a worker process importing torch spends a second or more of CPU
    on it, and memory."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_the_docs_name_no_renamed_flag():
    """A renamed flag is refused with its new name; the README and docs/ name only the new."""
    from insectlib.cli.main import RENAMED
    from tests.conftest import REPO

    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        assert not [old for old in RENAMED if old in text], page.name


def test_wrong_paths_are_refused_before_torch_is_imported(tmp_path):
    """A wrong folder is the likeliest mistake: train's, classify's and evaluate's paths are
    refused in one line each before torch (seconds of import) is, in a fresh interpreter."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / META_FILE).write_text("{}")  # a model directory, as far as paths go
    synthetic.make_labelled(str(tmp_path / "data"), per_class=1, size=(32, 32))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("a file")
    missing, data, model = tmp_path / "missing", tmp_path / "data", tmp_path / "model"
    int8 = ["classify", str(data), "--model", str(model), "--output", "o", "--precision", "int8"]
    int8.append("--int8-images")
    cases = {
        "not found": ["train", str(missing)],
        "file.txt": ["train", str(tmp_path / "file.txt")],
        "holds files insect did not write": ["train", str(data), "--output", f"{tmp_path}/full"],
        "--weights file not found": ["train", str(data), "--weights", f"{missing}.pth"],
        "--storage": ["train", str(data), "--storage", f"{data}/runs"],
        f"not found: {missing}.csv": ["train", str(data), "--labels", f"{missing}.csv"],
        "not a model directory": ["classify", str(data), "--model", str(data), "--output", "o"],
        str(missing): ["classify", str(missing), "--model", str(model), "--output", "o"],
        "inside": ["classify", str(data), "--model", str(model), "--output", f"{data}/out"],
        "--overwrite": ["classify", str(data), "--model", str(model), "--output", "full"],
        "holds files insect did not write (notes.txt); --resume": [
            "classify",
            str(data),
            "--model",
            str(model),
            "--output",
            "full",
            "--resume",
        ],  # fmt: skip
        "--cpus-per-actor 0.0001: on CPU": [*int8[:6], "--cpus-per-actor", "0.0001"],
        f"--int8-images: not found: {missing}": [*int8, str(missing)],
        f"--int8-images: no image files found in {tmp_path}/full": [*int8, f"{tmp_path}/full"],
        f"--int8-images: not found: {missing}-too": ["evaluate", *int8[1:], f"{missing}-too"],
        f"{missing}/": ["evaluate", str(data), "--model", str(missing), "--output", "o"],
        f"not found: {missing}": ["evaluate", str(missing), "--model", str(model), "--output", "o"],
    }
    assert_refused_before_torch(list(cases.items()), tmp_path)
    assert os.listdir(tmp_path / "full") == ["notes.txt"]  # no log folder left in it


def test_int8_images_a_kept_record_names_are_not_looked_for(tmp_path):
    """Statistics kept in the model directory are used again without reading the images
    they were measured on: a run naming that folder once it is gone is not refused for it
    (another missing folder is, and one that exists passes)."""
    model, images = tmp_path / "model", tmp_path / "gone"
    model.mkdir()
    (model / INT8_RECORD).write_text(json.dumps({"images_from": str(images)}))
    cfg = ClassifyConfig(input="in", model=str(model), output="o", precision="int8")
    with pytest.raises(InsectError, match=f"^--int8-images: not found: {images}$"):
        checks.check_int8_images(dataclasses.replace(cfg, int8_images=str(images)))  # half kept
    (model / INT8_STATS).write_bytes(b"statistics")
    checks.check_int8_images(dataclasses.replace(cfg, int8_images=str(images)))
    with pytest.raises(InsectError, match=f"^--int8-images: not found: {tmp_path}/other$"):
        checks.check_int8_images(dataclasses.replace(cfg, int8_images=str(tmp_path / "other")))
    synthetic.make_unlabelled(str(images), count=1, size=(8, 8))
    (model / INT8_RECORD).write_text("not json")
    checks.check_int8_images(dataclasses.replace(cfg, int8_images=str(images)))


@pytest.mark.parametrize("command", ["train", "classify"])
def test_a_ray_job_refuses_to_write_to_a_relative_path(command, tmp_path):
    """A job runs in Ray's copy of its --working-dir, which Ray deletes: a relative --output
    (or --storage) would be written there and lost, while the job said it succeeded. Its
    inputs may be relative (uploaded with the code); an absolute output is taken."""
    (tmp_path / "photos").mkdir()
    args = ["photos", "--output", "out"] if command == "train" else ["photos", "--model", "m"]
    if command == "classify":
        args += ["--output", "preds"]
    job = ["python", str(REPO / "jobs" / f"{command}.py")]
    result = run_cli(*job, *args, cwd=tmp_path, timeout=120)
    relative = "out" if command == "train" else "preds"
    assert result.returncode == 2 and result.stderr == (
        f"insect: error: --output {relative} is relative, and a Ray job runs in a folder of "
        f"Ray's ({tmp_path}; with --working-dir, its copy, deleted with it): give an absolute "
        "path or s3://\n"
    )
    absolute = [a if a not in ("out", "preds") else str(tmp_path / a) for a in args]
    result = run_cli(*job, *absolute, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "is relative" not in result.stderr  # refused later
    if command == "train":
        storage = run_cli(*job, *absolute, "--storage", "runs", cwd=tmp_path, timeout=120)
        assert "--storage runs is relative" in storage.stderr


def test_a_manifests_output_in_the_folder_of_its_images_is_warned_of(tmp_path, capsys):
    """The next classification of that folder would read the output's files as images; said,
    not refused: a manifest's folder (a home folder, a bucket) is no input of the run."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        synthetic.make_image("beetles", random.Random(i), (32, 24)).save(photos / f"{i}.jpg")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{photos / f'{i}.jpg'}\n" for i in range(2)))
    model = tmp_path / "model"
    model.mkdir()
    (model / META_FILE).write_text("{}")
    argv = ["classify", "--manifest", str(manifest), "--model", str(model), "--output"]
    for output, warned in ((photos / "out", True), (tmp_path / "out", False)):
        assert main([*argv, str(output)]) == 2  # past the check: the model is read next
        err = capsys.readouterr().err
        assert "meta.json" in err
        warning = f"warning: --output {output} lies in {photos}, a folder of the manifest's"
        assert (warning in err) == warned, err
