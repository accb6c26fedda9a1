"""CLI errors: one clear line naming the culprit, a non-zero exit, no traceback."""

import pytest

from insectlib import sample
from insectlib.model import META_FILE
from tests.conftest import expect_cli_error, run_cli


def test_train_input_errors(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert missing in expect_cli_error(capsys, ["train", missing])
    (tmp_path / "empty").mkdir()
    assert "no labelled images in" in expect_cli_error(capsys, ["train", str(tmp_path / "empty")])
    one = tmp_path / "one"
    sample.make_labelled(str(one), per_class=2, size=(32, 24))
    for cls in ("cockroach", "dragonflies"):
        for f in (one / cls).iterdir():
            f.unlink()
    assert "at least 2 classes, found 1 (beetles)" in expect_cli_error(capsys, ["train", str(one)])
    assert "unknown --arch 'vgg99'" in expect_cli_error(
        capsys, ["train", str(one), "--arch", "vgg99"]
    )
    assert "--weights file not found" in expect_cli_error(
        capsys, ["train", str(one), "--weights", str(tmp_path / "w.pth")]
    )


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
