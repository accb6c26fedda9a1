"""Hostile files: whatever bytes, names and file types an input holds, every file gets
exactly one row (or is skipped and counted in training), nothing runs, memory stays bounded,
and no reader blocks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from insectlib import storage
from insectlib.classify.dataset import image_batch
from insectlib.cli.main import main
from insectlib.config import DecodeLimits
from insectlib.data.images import (
    eval_transform,
    load_image,
    resize_size,
    train_transform,
)
from insectlib.errors import ImageError, StorageUnavailable
from insectlib.storage import files
from insectlib.training.worker import ImageFiles
from tests.fuzz import hostile_files

FUZZ_COUNT = 2100  # 350 mutants of each of the six formats
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(colour=(40, 120, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


def _write(folder, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    _write(folder, hostile_files(FUZZ_COUNT, seed=0))
    return folder


def test_fuzzed_files_never_escape_the_training_dataset(fuzz_dir):
    items = [(str(p), 0) for p in sorted(fuzz_dir.iterdir())]
    assert len(items) == FUZZ_COUNT
    for transform, min_side in ((eval_transform(64), resize_size(64)), (train_transform(64), None)):
        dataset = ImageFiles(items, transform, min_side, DecodeLimits(), s3=None)
        results = [dataset[i] for i in range(len(dataset))]  # any exception fails the test
        good = [r for r in results if r is not None]
        # The mutations leave some files decodable and break most: both paths are exercised.
        assert 0.2 * FUZZ_COUNT < len(good) < 0.8 * FUZZ_COUNT
        assert all(r[0].shape == (3, 64, 64) for r in good)


def test_decoding_on_threads_keeps_every_file_in_its_place(fuzz_dir):
    """A batch of fuzzed files decoded on 4 threads, as a model actor with 4 CPUs does,
    gives the rows one thread gives, in order: the same pixels, the same errors."""
    paths = sorted(str(p) for p in fuzz_dir.iterdir())
    batch = {"path": np.array(paths, dtype=object)}
    one = image_batch(batch, 64, DecodeLimits(), None)
    four = image_batch(batch, 64, DecodeLimits(), None, threads=4)
    assert list(four["error"]) == list(one["error"])
    assert np.array_equal(four["image"], one["image"])
    assert 0 < sum(e == "" for e in one["error"]) < len(paths)  # both kinds of file


def test_a_storage_failure_on_a_decoding_thread_stops_the_batch(fuzz_dir, monkeypatch):
    """Storage that keeps failing stops the run also when threads decode: the error
    reaches the caller, not a row."""
    paths = sorted(str(p) for p in fuzz_dir.iterdir())[:12]
    real = files.read_input

    def read_input(uri, *args, **kwargs):
        if uri == paths[7]:
            raise StorageUnavailable("the storage keeps failing")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(files, "read_input", read_input)
    batch = {"path": np.array(paths, dtype=object)}
    with pytest.raises(StorageUnavailable, match="keeps failing"):
        image_batch(batch, 64, DecodeLimits(), None, threads=4)


def test_decoder_failures_name_the_exception_type(tmp_path):
    # A PNG whose IHDR length field says 12: Pillow raises ValueError inside Image.open.
    data = bytearray(_png((4, 4)))
    data[8:12] = (12).to_bytes(4, "big")
    (tmp_path / "ihdr.png").write_bytes(bytes(data[:69]))
    with pytest.raises(ImageError, match="unreadable image|truncated|not an image"):
        load_image(str(tmp_path / "ihdr.png"), eval_transform(64), 73, DecodeLimits())


def test_only_the_accepted_formats_are_opened(tmp_path, monkeypatch):
    # Sanity: Pillow by itself does take these bytes for PostScript.
    assert Image.open(io.BytesIO(EPS)).format == "EPS"
    started = []
    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, lambda *a, **k: started.append(a))
    for name, data in (("x.jpg", EPS), ("y.png", PDF), ("z.tif", EPS)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match="not an image"):
            load_image(str(tmp_path / name), eval_transform(64), 73, DecodeLimits())
    assert started == []


MEMORY_PROBE = r"""
import sys
from insectlib.errors import ImageError
from insectlib.config import DecodeLimits
from insectlib.data.images import eval_transform, load_image, resize_size

def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

transform = eval_transform(224)
load_image(sys.argv[1], transform, resize_size(224), DecodeLimits())  # warm up
before = peak_kb()
for path in sys.argv[2:]:
    shape = tuple(load_image(path, transform, resize_size(224), DecodeLimits()).shape)
    assert shape == (3, 224, 224), shape
print((peak_kb() - before) // 1024)
"""


def test_extreme_aspect_ratios_decode_in_bounded_memory(tmp_path):
    """A 1000x1 PNG would be resized to 256000x256 (~200 MB), a 60000x2 one to 7.7M x 256
    (~6 GB): the peak of the decoding process may grow by at most 32 MB."""
    names = {"warm.png": (300, 200), "wide.png": (1000, 1), "tall.png": (2, 60000)}
    for name, size in names.items():
        (tmp_path / name).write_bytes(_png(size))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 32, result.stdout


def _load_with_deadline(path: str, limits: DecodeLimits | None = None) -> str:
    """The ImageError text for `path`, failing the test if reading blocks for 20 s."""
    outcome: list = []

    def read():
        try:
            load_image(path, eval_transform(64), 73, limits or DecodeLimits())
            outcome.append("decoded")
        except ImageError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(20)
    assert outcome, f"reading {path} blocked"
    return outcome[0]


def test_only_regular_files_are_read_and_size_is_capped(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    assert _load_with_deadline(str(tmp_path / "fifo.jpg")) == "not a regular file (a FIFO)"
    assert "not a regular file (a character device)" in _load_with_deadline(
        str(tmp_path / "zero.jpg")
    )
    (tmp_path / "big.jpg").write_bytes(_jpeg())
    size = len(_jpeg())
    assert "file too large" in _load_with_deadline(
        str(tmp_path / "big.jpg"), DecodeLimits(size - 1)
    )
    assert _load_with_deadline(str(tmp_path / "big.jpg"), DecodeLimits(size)) == "decoded"


def test_pixel_limit(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((300, 200)))
    assert "image too large: 300x200" in _load_with_deadline(
        str(tmp_path / "a.png"), DecodeLimits(max_pixels=300 * 200 - 1)
    )
    # JPEGs count at the scale draft decoding reads them at (1/4 here: 400x300 -> 100x75)
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "b.jpg").write_bytes(buf.getvalue())
    assert _load_with_deadline(str(tmp_path / "b.jpg"), DecodeLimits(max_pixels=100 * 75)) == (
        "decoded"
    )
    # ... and the refusal names the file's own size beside the size it would be decoded at.
    assert "image too large: 400x300 decoded at 100x75 = 7,500 pixels" in _load_with_deadline(
        str(tmp_path / "b.jpg"), DecodeLimits(max_pixels=100 * 75 - 1)
    )


def test_one_classify_run_over_a_hostile_tree(trained, fuzz_dir, tmp_path, capsys):
    """Every hostile file above in one `insect classify` run: exit 0 with
    --max-error-fraction 1.0, exactly one row per file, each with the right fate."""
    cfg, meta = trained
    folder = tmp_path / "in"
    _write(folder, {p.name: p.read_bytes() for p in fuzz_dir.iterdir()})
    special = {
        "eps.jpg": EPS,
        "pdf.png": PDF,
        "wide.png": _png((1000, 1)),
        "tall.png": _png((2, 60000)),
        "big.jpg": b"\xff\xd8" + b"\0" * 5000,
    }
    _write(folder, special)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.jpg")  # not valid UTF-8
    with open(latin1, "wb") as f:
        f.write(_jpeg())
    out = tmp_path / "out"
    argv = ["classify", str(folder), "--model", cfg.output, "--output", str(out)]
    argv += ["--max-error-fraction", "1.0", "--compile", "off", "--max-file-bytes", "4096"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]

    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    expected = FUZZ_COUNT + len(special) + 3
    assert len(rows) == pq.read_table(out).num_rows == expected
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["inputs"] == manifest["rows"] == expected
    by_name = {p.rsplit("/", 1)[-1]: r for p, r in rows.items()}
    assert "not an image" in by_name["eps.jpg"]["error"]
    assert "not an image" in by_name["pdf.png"]["error"]
    assert by_name["fifo.jpg"]["error"] == "not a regular file (a FIFO)"
    assert "character device" in by_name["zero.jpg"]["error"]
    assert "file too large" in by_name["big.jpg"]["error"]
    for name in ("wide.png", "tall.png"):
        assert by_name[name]["error"] is None and by_name[name]["label"] in meta.classes
    # The name that is not UTF-8 is shown with a backslash escape and still classified.
    escaped = by_name["caf\\xe9.jpg"]
    assert escaped["path"] == f"{folder}/caf\\xe9.jpg"
    assert escaped["error"] is None and escaped["label"] in meta.classes
    errors = [r["error"] for r in rows.values() if r["error"]]
    assert sum(r["error"] is None for r in rows.values()) > 0.2 * FUZZ_COUNT
    assert all(isinstance(e, str) and e for e in errors)


def test_names_that_read_alike_get_rows_of_their_own_whose_paths_lead_back(
    trained, tmp_path, capsys
):
    """A name that is not UTF-8 is written with `\\xNN` escapes, and so a backslash in any
    local name is written as two: a file whose name holds the escape's text (`caf\\xe9.jpg`,
    a text file here) gets a row of its own, where both shared one path and no run could
    finish. Each row's path, in a manifest, a labels table or the review page, reads its
    own file."""
    from insectlib.config import DecodeLimits
    from insectlib.data.label_table import training_set
    from insectlib.review.thumbnails import write_thumbnails

    cfg, meta = trained
    root = tmp_path / "root"
    folder = root / "a"
    _write(folder, {"caf\\xe9.jpg": b"not a picture", "a\\b.jpg": _jpeg((250, 10, 10))})
    _write(root / "b", {"plain.jpg": _jpeg()})
    with open(os.fsdecode(bytes(folder) + b"/caf\xe9.jpg"), "wb") as f:  # not UTF-8
        f.write(_jpeg())
    out = tmp_path / "out"
    argv = ["classify", str(folder), "--model", cfg.output, "--output", str(out)]
    assert main([*argv, "--compile", "off", "--precision", "fp32"]) == 0, capsys.readouterr().err
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    latin1, literal, slash = (f"{folder}/{n}" for n in ("caf\\xe9", "caf\\\\xe9", "a\\\\b"))
    assert set(rows) == {f"{latin1}.jpg", f"{literal}.jpg", f"{slash}.jpg"}
    assert rows[f"{literal}.jpg"]["error"].startswith("not an image")
    assert rows[f"{latin1}.jpg"]["error"] is None and rows[f"{slash}.jpg"]["error"] is None
    assert (out / "_SUCCESS").exists()
    # The paths as a manifest: each reads its own file, none is 'not found'.
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in rows))
    again = tmp_path / "again"
    argv = ["classify", "--manifest", str(listed), "--model", cfg.output, "--output", str(again)]
    assert main([*argv, "--compile", "off", "--precision", "fp32"]) == 0, capsys.readouterr().err
    for row in pq.read_table(again).to_pylist():
        first = rows[row["path"]]
        assert (row["probabilities"], row["error"]) == (first["probabilities"], first["error"])
    assert rows[f"{latin1}.jpg"]["probabilities"] != rows[f"{slash}.jpg"]["probabilities"]
    # A labels table naming the Latin-1 file moves it alone, not the text file.
    table = tmp_path / "labels.csv"
    table.write_text(f'path,label\n"{latin1}.jpg",b\n')
    chosen = training_set(str(root), str(table), val_fraction=0.5)
    assert chosen.table["in_root"] == chosen.table["relabelled"] == 1
    by_class = {c: {u for u, y in chosen.train + chosen.val if chosen.classes[y] == c}
                for c in chosen.classes}  # fmt: skip
    assert os.fsdecode(bytes(folder) + b"/caf\xe9.jpg") in by_class["b"]
    assert f"{folder}/caf\\xe9.jpg" in by_class["a"]  # the text file keeps its folder's class
    # The review page's thumbnails of those paths.
    thumbs = write_thumbnails(str(tmp_path / "page"), list(rows), DecodeLimits(), None)
    assert "thumb" in thumbs[f"{latin1}.jpg"] and "thumb" in thumbs[f"{slash}.jpg"]
    assert "problem" in thumbs[f"{literal}.jpg"]
    # And the page's check that it lies outside the folders of its images.
    from insectlib.review.report import folder_of_images

    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9 \\ photos")  # not UTF-8, a backslash
    os.makedirs(odd)
    shown = storage.printable(f"{odd}/a.jpg")
    assert folder_of_images(f"{odd}/page", [shown]) == odd
