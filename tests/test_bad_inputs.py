"""Files from the wild: odd images are converted and classified, broken ones become rows
with an error; none fails the job or takes its batch down."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from insectlib.classify.pipeline import classify
from insectlib.config import ClassifyConfig
from insectlib.data.images import decode
from insectlib.errors import ImageError
from tests.conftest import expect_cli_error, small_train_config


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(mode="RGB", size=(64, 48)) -> Image.Image:
    return Image.new(mode, size, 90 if mode in ("L", "P", "CMYK") else (40, 120, 60))


def odd_but_valid() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    frames = [_photo(), Image.new("RGB", (64, 48), (255, 0, 0))]
    return {
        "alpha.png": _encode(Image.new("RGBA", (64, 48), (40, 120, 60, 0)), "PNG"),
        "palette.png": _encode(_photo("P"), "PNG"),
        "grey16.png": _encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "PNG"),
        "grey16.tif": _encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "TIFF"),
        "cmyk.jpg": _encode(_photo("CMYK"), "JPEG"),
        "rotated.jpg": _encode(_photo(), "JPEG", exif=exif),
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "photo.webp": _encode(_photo(), "WEBP"),
        "large.jpg": _encode(_photo(size=(6000, 4000)), "JPEG"),
    }


def _grey_tiff(values: np.ndarray, sample_format: int) -> bytes:
    """A one-strip little-endian grey TIFF of `values` with its SampleFormat (1 unsigned,
    2 signed): Pillow writes every mode I image as signed 32-bit."""
    height, width = values.shape
    data = values.astype(values.dtype.newbyteorder("<")).tobytes()
    tags = [
        (256, width), (257, height), (258, values.dtype.itemsize * 8), (259, 1), (262, 1),
        (273, 8), (277, 1), (278, height), (279, len(data)), (339, sample_format),
    ]  # fmt: skip
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + ifd


def broken() -> dict[str, tuple[bytes, str]]:
    """name: (bytes, the error text it must get)"""
    good = _encode(_photo(), "JPEG")
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good[: len(good) // 3], "truncated image"),
        "text.jpg": (b"this is not a picture", "not an image"),
        "bomb.png": (_encode(Image.new("1", (20000, 20000)), "PNG"), "image too large"),
        # No known range of values: made black or white, they were classified.
        "grey32.tif": (_grey_tiff(np.full((48, 64), 90, np.uint32), 1), "32-bit grey"),
        "signed16.tif": (_grey_tiff(np.full((48, 64), -300, np.int16), 2), "signed grey"),
        "float.tif": (
            _encode(Image.fromarray(np.full((48, 64), 0.4, np.float32)), "TIFF"),
            "unsupported image: floating-point grey",
        ),
    }


def test_decode_converts_odd_images_to_rgb():
    images = {name: decode(data) for name, data in odd_but_valid().items()}
    assert all(im.mode == "RGB" for im in images.values())
    assert images["rotated.jpg"].size == (48, 64)  # EXIF rotation applied
    assert images["grey16.png"].getpixel((0, 0)) == (156, 156, 156)  # scaled, not clipped
    assert images["grey16.tif"].getpixel((0, 0)) == (156, 156, 156)
    assert images["alpha.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent: white
    assert images["animated.gif"].getpixel((0, 0)) != (255, 0, 0)  # first frame


@pytest.mark.parametrize(("name", "case"), broken().items())
def test_decode_errors_say_what_is_wrong(name, case):
    data, text = case
    with pytest.raises(ImageError, match=text):
        decode(data)


def test_classify_accounts_for_every_file(trained, tmp_path, capsys):
    cfg, meta = trained
    folder = tmp_path / "wild"
    folder.mkdir()
    for name, data in odd_but_valid().items():
        (folder / name).write_bytes(data)
    for name, (data, _) in broken().items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    # batch size 4: broken files share batches with good ones
    s = classify(ClassifyConfig(input=str(folder), model=cfg.output, output=str(out), batch_size=4))
    n = len(odd_but_valid()) + len(broken())
    assert s.inputs == s.rows == n and s.errors == len(broken())
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == n
    for name in odd_but_valid():
        assert rows[name]["error"] is None and rows[name]["label"] in meta.classes, name
    for name, (_, text) in broken().items():
        row = rows[name]
        assert text in row["error"] and row["label"] is None and row["probabilities"] is None
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert (manifest["inputs"], manifest["rows"], manifest["errors"]) == (n, n, len(broken()))
    assert manifest["model"] == meta.model_id and manifest["started"] < manifest["finished"]
    # The run's summary: errors by kind, rows per class; `insect summary` prints it, and
    # computes the same from the parts for an output without one (an older insect's).
    report = json.loads((out / "_summary.json").read_text())
    assert report["error_kinds"] == {
        "empty file": 1, "truncated image": 1, "not an image": 1, "image too large": 1,
        "unsupported image": 3,
    }  # fmt: skip
    assert (report["rows"], report["errors"], report["inputs"]) == (n, len(broken()), n)
    predicted = [r["label"] for r in rows.values() if r["label"]]
    assert report["classes"] == {c: predicted.count(c) for c in meta.classes}
    assert sum(report["scores"]["counts"]) == len(predicted) and report["images_per_second"] > 0
    capsys.readouterr()
    from insectlib.cli.main import main

    assert main(["summary", str(out)]) == 0
    written = capsys.readouterr().out
    (out / "_summary.json").unlink()
    (out / "_summary.png").unlink()
    assert main(["summary", str(out)]) == 0
    computed = capsys.readouterr().out
    said = f"{out}: {n} rows for {n} inputs, {len(broken())} errors; model {meta.model_id}"
    assert said in computed
    for c in meta.classes:
        assert f"\n{c} " in written
    for c in set(predicted):
        line = f"{c:<20} {predicted.count(c):>9} {predicted.count(c) / n:>7.1%}"
        assert line in written and line in computed
    assert "  not an image: 1" in computed and "truncated image: 1" in computed
    # The same score histogram and errors.
    assert written[written.index("\nscore") :] == computed[computed.index("\nscore") :]
    err = expect_cli_error(capsys, ["summary", str(tmp_path / "nothing-here")])
    assert f"{tmp_path / 'nothing-here'} does not exist" in err
    (tmp_path / "empty").mkdir()
    err = expect_cli_error(capsys, ["summary", str(tmp_path / "empty")])
    assert "holds no insect classification output" in err
    (tmp_path / "empty" / "predictions").mkdir()  # an evaluation's layout: said where to look
    (tmp_path / "empty" / "confusion_matrix.json").write_text("{}")
    err = expect_cli_error(capsys, ["summary", str(tmp_path / "empty")])
    assert f"is an evaluation; its classification is {tmp_path / 'empty' / 'predictions'}" in err
    # Hostile or damaged files: one line each.
    (out / "_summary.json").write_text('{"rows": "12", "errors": 0}')
    err = expect_cli_error(capsys, ["summary", str(out)])
    assert "_summary.json is not a valid insect summary (check: rows, classes" in err
    (out / "_summary.json").unlink()
    pq.write_table(pa.table({"x": [1]}), out / ("part-" + "c" * 32 + "-000000-0.parquet"))
    err = expect_cli_error(capsys, ["summary", str(out)])
    assert "is named like insect's output but has other columns (x)" in err

    # Over a 0.25 limit the job fails, but only after writing every row
    err = expect_cli_error(
        capsys,
        [
            "classify",
            str(folder),
            "--model",
            cfg.output,
            "--output",
            str(tmp_path / "out2"),
            "--max-error-fraction",
            "0.25",
        ],
    )
    failed = len(broken())
    assert f"{failed} of {n} images ({failed / n:.1%}) could not be classified" in err
    assert pq.read_table(tmp_path / "out2").num_rows == n


def test_training_skips_and_counts_unreadable_images(ray_local, tmp_path):
    from insectlib.data import synthetic
    from insectlib.training.trainer import fit

    root = synthetic.make_labelled(str(tmp_path / "data"), per_class=6, size=(48, 36))
    (tmp_path / "data" / "beetles" / "text.jpg").write_bytes(b"not a picture")
    (tmp_path / "data" / "cockroach" / "empty.jpg").write_bytes(b"")
    (tmp_path / "data" / "cockroach" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    first = sorted((tmp_path / "data" / "dragonflies").glob("*.*"))[0]
    inside = tmp_path / "data" / "dragonflies" / "dir.jpg"  # a folder: its images count
    inside.mkdir()
    (inside / "inside.jpg").write_bytes(first.read_bytes())
    meta = fit(
        small_train_config(
            root, tmp_path, arch="resnet18", epochs=2, image_size=32, batch_size=4, augment=True
        )
    )
    for epoch in meta.epochs:
        assert epoch["skipped_images"] == 3
        # DistributedSampler pads the training split to a multiple of the 2 workers
        assert 19 <= epoch["train_images"] + epoch["val_images"] <= 20
    assert meta.data["skipped_images"] == 3
