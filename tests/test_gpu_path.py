"""The GPU path's logic, run on the CPU: JPEG decoding on a torch device
(`data.device_decode`, with device "cpu": torchvision's libjpeg-turbo in place of nvJPEG)
against the CPU path (`images.load_images`) on every kind of file, the hostile corpus
included; the model's top-1 agreement between the two; a classify run with --decode
device against the default. Tests that need CUDA are marked and skip without it (the GPU
check, bench/gpu_check.sh, runs the same comparisons on a GPU)."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from insectlib.cli.main import main, parser
from insectlib.config import ClassifyConfig, DecodeLimits, EvaluateConfig, TrainConfig
from insectlib.data import device_decode, synthetic
from insectlib.data.images import eval_transform, load_images, resize_size
from insectlib.data.labels import discover
from insectlib.errors import ImageError
from insectlib.model.predictor import Predictor
from insectlib.training.worker import TrainingWorker, make_loaders
from tests.fuzz import hostile_files

# Pillow decodes a JPEG at reduced DCT scale (1/2 for 1024x768 at 224 px) and resizes in
# fixed point; the device decodes at full size and resizes in float. Measured here: mean
# differences of 0.0-0.4 levels, 99% of pixels within 0-10 levels (sharp edges of a
# 1001x751 photo, whose reduced size rounds up, move by a fraction of a pixel).
MEAN_LEVELS = 1.0
P99_LEVELS = 12
LIMITS = DecodeLimits(max_pixels=10_000_000)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
XMP_ROTATED = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


def _sof_patched(data: bytes, **values) -> bytes:
    """`data` with its SOF0's precision, height or width rewritten."""
    at = data.index(b"\xff\xc0") + 4
    out = bytearray(data)
    if "precision" in values:
        out[at] = values["precision"]
    if "size" in values:
        width, height = values["size"]
        out[at + 1 : at + 5] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def _stray_marker(data: bytes) -> bytes:
    """`data` with a DHT marker in the middle of its scan."""
    middle = len(data) // 2
    return data[:middle] + b"\xff\xc4" + data[middle + 2 :]


def kinds_of_files() -> dict[str, tuple[bytes, bool]]:
    """{name: (bytes, whether the device decodes it)}: every kind of file the CPU path
    handles, camera-sized where size matters."""
    photo = synthetic.make_image("dragonflies", random.Random(3), (1024, 768))
    small = photo.resize((640, 480))
    baseline = _jpeg(photo, quality=90)
    exif = Image.Exif()
    files = {
        "baseline.jpg": (baseline, True),
        "444.jpg": (_jpeg(photo, quality=95, subsampling=0), True),
        "422.jpg": (_jpeg(photo, quality=85, subsampling=1), True),
        "odd-size.jpg": (_jpeg(photo.resize((1001, 751))), True),
        "wide.jpg": (_jpeg(photo.resize((1200, 100))), True),
        "restart-markers.jpg": (_jpeg(small, restart_marker_blocks=4), True),
        "trailing-bytes.jpg": (baseline + b"camera maker's trailer", True),
        "xmp-rotated.jpg": (_jpeg(small, xmp=XMP_ROTATED), True),
        "progressive.jpg": (_jpeg(photo, progressive=True), False),
        "grey.jpg": (_jpeg(photo.convert("L")), False),
        "cmyk.jpg": (_jpeg(photo.convert("CMYK")), False),
        "12-bit.jpg": (_sof_patched(baseline, precision=12), False),
        "huge-header.jpg": (_sof_patched(baseline, size=(40000, 30000)), False),
        "over-the-limit-at-full-size.jpg": (_jpeg(photo.resize((4000, 3000))), False),
        "truncated.jpg": (baseline[: len(baseline) // 2], False),
        "stray-marker.jpg": (_stray_marker(baseline), False),
        "empty.jpg": (b"", False),
        "text.jpg": (b"not an image at all", False),
    }
    for orientation in range(1, 9):
        exif[0x0112] = orientation
        data = _jpeg(small, exif=exif.tobytes())
        files[f"exif-orientation-{orientation}.jpg"] = (data, True)
    buf = io.BytesIO()
    small.save(buf, "PNG")
    files["photo.png"] = (buf.getvalue(), False)
    return files


def _write(folder, files: dict[str, bytes]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files]


def _both_paths(paths: list[str], size: int, device: str = "cpu"):
    """(the CPU path's tensor or ImageError per file, device images, device errors)."""
    cpu = list(load_images(paths, eval_transform(size), resize_size(size), LIMITS))
    images, errors = device_decode.load_batch(paths, size, LIMITS, device)
    return cpu, images.cpu(), errors


def test_every_kind_of_file_gets_the_cpu_paths_result(tmp_path):
    """The device takes exactly the baseline JPEGs; every file gets the CPU path's error
    text, every other file its exact pixels, and a device-decoded JPEG pixels within the
    tolerance above (an orientation applied the wrong way differs by ~35 levels)."""
    files = kinds_of_files()
    paths = _write(tmp_path, {name: data for name, (data, _) in files.items()})
    routed = {n for n, (data, _) in files.items() if device_decode.device_jpeg(data, LIMITS)}
    assert routed == {n for n, (_, device) in files.items() if device}
    cpu, images, errors = _both_paths(paths, 224)
    for name, expected, image, error in zip(files, cpu, images, errors, strict=True):
        if isinstance(expected, ImageError):
            assert error == str(expected), name
            continue
        assert error is None, name
        diff = (image.int() - expected.int()).abs().float()
        if name not in routed:
            assert diff.max() == 0, name
        else:
            assert diff.mean() <= MEAN_LEVELS and diff.quantile(0.99) <= P99_LEVELS, name
    failed = {n for n, e in zip(files, errors, strict=True) if e}
    # A marker inside the scan: libjpeg refuses the file after decoding it (nvJPEG may not).
    broken = {"12-bit.jpg", "huge-header.jpg", "truncated.jpg", "stray-marker.jpg"}
    assert failed == broken | {"empty.jpg", "text.jpg"}


def test_the_hostile_corpus_gets_the_same_errors(tmp_path):
    """2,100 mutated files of six formats: the same error text (or none) for each file,
    with the device decoding the mutants it takes."""
    files = hostile_files(2100, seed=0)
    paths = _write(tmp_path, files)
    cpu, _, errors = _both_paths(paths, 64)
    expected = [str(c) if isinstance(c, ImageError) else None for c in cpu]
    assert errors == expected
    routed = sum(device_decode.device_jpeg(d, LIMITS) is not None for d in files.values())
    assert routed >= 50  # the device half is exercised, not only the fallback


def test_a_refusal_of_the_device_decoder_takes_the_cpu_path(tmp_path, monkeypatch):
    """A JPEG the device decoder refuses fails its batched call: each is retried alone,
    and the refused one gets the CPU path's pixels; calls hold at most CALL_PIXELS, and
    resizes at most RESIZE_PIXELS."""
    photo = synthetic.make_image("beetles", random.Random(1), (320, 240))
    names = [f"{i}.jpg" for i in range(5)]
    paths = _write(tmp_path, {n: _jpeg(photo.rotate(i * 30)) for i, n in enumerate(names)})
    refused = open(paths[2], "rb").read()
    real, calls = device_decode.decode_jpeg, []

    def flaky(data, **kw):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(t.numpy()) == refused for t in batch):
            raise RuntimeError("nvjpeg refused it")
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", flaky)
    monkeypatch.setattr(device_decode, "CALL_PIXELS", 3 * 320 * 240)
    monkeypatch.setattr(device_decode, "RESIZE_PIXELS", 2 * 320 * 240)  # resized 2 at a time
    cpu, images, errors = _both_paths(paths, 64)
    assert errors == [None] * 5
    assert calls == [3, 1, 1, 1, 2]  # 3 + 2 per call; the first failed and was retried
    assert torch.equal(images[2], cpu[2])  # the CPU path's exact pixels
    for image, expected in zip(images, cpu, strict=True):  # each in its own place
        assert (image.int() - expected.int()).abs().float().mean() <= MEAN_LEVELS


def test_columns_carry_every_kind_of_row():
    """What the host half sends the actors (`to_columns`) decodes as the batch did."""
    photo = synthetic.make_image("cockroach", random.Random(2), (160, 120))
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    reads = [_jpeg(photo), buf.getvalue(), ImageError("not found"), b"junk"]
    prepared = [device_decode.prepare(r, 64, LIMITS) for r in reads]
    direct = device_decode.finish(prepared, 64, "cpu", LIMITS)
    columns = device_decode.to_columns(prepared)
    assert list(columns["orientation"]) == [1, 0, 0, 0]
    carried = device_decode.finish(device_decode.from_columns(columns, 64), 64, "cpu", LIMITS)
    assert torch.equal(direct[0], carried[0]) and direct[1] == carried[1]
    assert carried[1][:3] == [None, None, "not found"] and "not an image" in carried[1][3]


def test_decode_setting():
    """--decode auto decodes on the device with --gpu only; evaluate passes it on."""
    assert not ClassifyConfig(model="m", output="o", input="i").decodes_on_device
    assert ClassifyConfig(model="m", output="o", input="i", gpu=True).decodes_on_device
    cfg = ClassifyConfig(model="m", output="o", input="i", gpu=True, decode="cpu")
    assert not cfg.decodes_on_device
    args = parser().parse_args(["evaluate", "d", "--model", "m", "--decode", "device"])
    assert args.decode == "device" and EvaluateConfig(data="d", model="m").decode == "auto"


def test_the_model_agrees_on_both_decodings(trained, tmp_path):
    """The session model on CPU-decoded and device-decoded batches of generated photos of
    three sizes (640x480 decodes at 1/8 scale on the CPU path at the model's 64 px, so its
    pixels differ most): probabilities within 0.005 on average (0.001 measured; a transposed
    or 20% darker decoding: 0.02 and 0.07), and the top-1 label kept wherever the CPU path's
    top two are 0.05 apart (the weak session model has near ties, which may flip)."""
    cfg, meta = trained
    rng = random.Random(7)
    files = {}
    for i in range(300):
        size = ((640, 480), (1024, 768), (300, 200))[i % 3]
        files[f"{i}.jpg"] = _jpeg(synthetic.make_image(synthetic.CLASSES[i % 3], rng, size))
    paths = _write(tmp_path, files)
    cpu, images, errors = _both_paths(paths, meta.image_size)
    assert errors == [None] * len(paths)
    predictor = Predictor(cfg.output, precision="fp32")
    on_cpu = predictor.probabilities(torch.stack(cpu))
    on_device = predictor.probabilities(images)
    apart = float(np.abs(on_cpu - on_device).mean())
    assert apart <= 0.005, apart
    top_two = np.sort(on_cpu, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] >= 0.05
    assert clear.sum() >= len(paths) // 2  # the check below holds for most images
    kept = on_cpu.argmax(1) == on_device.argmax(1)
    assert kept[clear].all(), np.array(paths)[clear & ~kept].tolist()


def test_classify_with_device_decoding_gives_the_same_rows(trained, tmp_path, capsys):
    """`insect classify --decode device` (the GPU run's pipeline: the actors decode the
    JPEGs, here on the CPU) writes the default run's rows: same paths, errors, labels,
    and probabilities within 0.02."""
    cfg, meta = trained
    kinds = kinds_of_files()
    files = {n: d for n, (d, _) in kinds.items()}
    files.update(hostile_files(60, seed=3))
    folder = tmp_path / "in"
    _write(folder, files)
    tables = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        argv = ["classify", str(folder), "--model", cfg.output, "--output", str(out)]
        argv += ["--compile", "off", "--precision", "fp32", "--decode", decode]
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
        tables[decode] = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    cpu, device = tables["cpu"], tables["device"]
    assert sorted(cpu) == sorted(device) and len(cpu) == len(files)
    for path, row in cpu.items():
        other = device[path]
        assert (row["error"], row["label"]) == (other["error"], other["label"]), path
        if row["error"] is None:
            assert np.allclose(row["probabilities"], other["probabilities"], atol=0.02), path
    assert sum(r["error"] is None for r in cpu.values()) >= len(kinds) - 6  # six are broken


def _labelled_with_odd_files(root) -> str:
    """A labelled tree of 8 photos a class, plus in each class one file the device decodes
    (a rotated JPEG), one the CPU path decodes (progressive, PNG) and one nobody can."""
    synthetic.make_labelled(str(root), per_class=8, size=(160, 120))
    photo = synthetic.make_image("beetles", random.Random(5), (200, 150))
    exif = Image.Exif()
    exif[0x0112] = 6
    odd = {
        "rotated.jpg": _jpeg(photo, exif=exif.tobytes()),
        "progressive.jpg": _jpeg(photo, progressive=True),
        "truncated.jpg": _jpeg(photo)[:500],
        "text.jpg": b"not an image",
    }
    for i, cls in enumerate(synthetic.CLASSES):
        for name, data in list(odd.items())[i : i + 2]:
            (root / cls / name).write_bytes(data)
    return str(root)


def _feed(worker: TrainingWorker, loader, epoch: int) -> list:
    """(batch shape, labels, skipped) of each batch `worker` takes from `loader`."""
    worker.sampler.set_epoch(epoch)
    return [(tuple(x.shape), y.tolist(), n) for x, y, n in worker.device_batches(loader)]


@pytest.mark.parametrize("augment", [False, True])
def test_the_training_feed_on_the_device_keeps_its_guarantees(tmp_path, augment):
    """--decode device in training: on each of two workers' shards, the same steps, labels
    (so the same images, each once an epoch) and skipped files as the CPU feed, batch by
    batch; and an epoch counts every image once, trained, validated or skipped."""
    data = discover(_labelled_with_odd_files(tmp_path), val_fraction=0.25, seed=0)
    feeds, workers = {}, {}
    for decode in ("cpu", "device"):
        cfg = TrainConfig(
            data=str(tmp_path), weights="random", image_size=32, batch_size=4,
            augment=augment, decode=decode, workers=2,
        )  # fmt: skip
        workers[decode] = worker = TrainingWorker(cfg, data.classes, data.train, data.val)
        for rank in (0, 1):
            _, train, val = make_loaders(cfg, data.train, data.val, rank, 2)
            feeds[decode, rank] = _feed(worker, train, 1) + _feed(worker, val, 1)
    for rank in (0, 1):
        assert feeds["cpu", rank] == feeds["device", rank]
    skipped = sum(n for rank in (0, 1) for _, _, n in feeds["device", rank])
    assert skipped == 3  # two truncated files and the text, wherever they fell
    metrics = workers["device"].run_epoch(0)
    total = metrics["train_images"] + metrics["val_images"] + metrics["skipped_images"]
    assert total == len(data.train) + len(data.val) and metrics["skipped_images"] == 3


@needs_cuda
def test_cuda_decoding_matches_the_cpu_path(tmp_path):
    """nvJPEG: the same errors as the CPU path on every kind of file and on the hostile
    corpus, pixels within the tolerance above."""
    files = {n: d for n, (d, _) in kinds_of_files().items()}
    files.update(hostile_files(600, seed=5))
    paths = _write(tmp_path, files)
    cpu, images, errors = _both_paths(paths, 224, device="cuda")
    assert errors == [str(c) if isinstance(c, ImageError) else None for c in cpu]
    for name, expected, image in zip(files, cpu, images, strict=True):
        if not isinstance(expected, ImageError) and not name[0].isdigit():
            diff = (image.int() - expected.int()).abs().float()
            assert diff.mean() <= MEAN_LEVELS and diff.quantile(0.99) <= P99_LEVELS, name


@needs_cuda
def test_a_predictor_on_cuda_decodes_its_batches_there(trained, tmp_path):
    """The actor's half on a GPU: the batch's pixels never leave it, rows as on the CPU."""
    cfg, meta = trained
    files = {n: d for n, (d, _) in kinds_of_files().items()}
    paths = _write(tmp_path, files)
    prepared = [device_decode.prepare(open(p, "rb").read(), meta.image_size, LIMITS) for p in paths]
    columns = {"path": np.array(paths, dtype=object), **device_decode.to_columns(prepared)}
    gpu = Predictor(cfg.output, device="cuda", precision="fp32")
    images, _ = gpu.images(columns)
    assert images.device.type == "cuda"
    rows = gpu(columns).to_pylist()
    cpu_rows = Predictor(cfg.output, precision="fp32")(columns).to_pylist()
    for a, b in zip(rows, cpu_rows, strict=True):
        assert (a["error"], a["label"]) == (b["error"], b["label"]), a["path"]
    assert os.path.basename(rows[0]["path"]) == "baseline.jpg"
