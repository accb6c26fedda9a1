"""The review page (`insect report`), in a real browser: Debian's chromium, headless, driven
by Playwright. One classification (hostile file and class names, files that fail) and one
evaluation (a wrong label in the data) are reviewed; the corrections the page downloads
train a model (`insect train --labels`)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pytest
import torch
from PIL import Image

from insectlib.classify.evaluate import evaluate
from insectlib.classify.pipeline import classify
from insectlib.classify.summary import show
from insectlib.cli.main import main
from insectlib.config import (
    ClassifyConfig,
    DecodeLimits,
    EvaluateConfig,
    ReportConfig,
    SummaryConfig,
)
from insectlib.data import synthetic
from insectlib.data.images import decode, eval_transform, normalize
from insectlib.errors import InsectError
from insectlib.layout import LOCK_FILE, SUCCESS_FILE
from insectlib.model.meta import write_meta
from insectlib.model.network import load_model
from insectlib.review import page
from insectlib.review.report import build_report
from insectlib.review.selection import Selector
from insectlib.review.thumbnails import THUMB_SIDE, thumb_name, write_thumbnails
from insectlib.storage.lock import output_lock
from tests.conftest import expect_cli_error

HOSTILE_FILE = '"><img src=x onerror=alert(1)>.jpg'
HOSTILE_SVG = "<svg onload=alert(2)>.png"
QUOTED_FILE = 'a,"quoted" name.jpg'
# A class name that would close the data's <script> element and open one of its own.
HOSTILE_CLASS = '</script><script>alert("class")</script>'
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run"]  # fmt: skip


def parquet_rows(folder) -> list[dict]:
    return pyarrow.dataset.dataset(str(folder), format="parquet").to_table().to_pylist()


# ---- the one-pass selection, without Ray ----------------------------------------------------


def test_one_pass_selection_equals_sorting_every_row():
    """Batch by batch, each gallery keeps exactly what sorting all rows would choose."""
    rng = np.random.default_rng(0)
    n, classes = 20_000, ["a", "b", "c"]
    label = rng.choice([*classes, None, "x"], size=n, p=[0.3, 0.3, 0.2, 0.15, 0.05])
    score = rng.random(n).astype(np.float32)
    failed = rng.random(n) < 0.02
    rows = [
        {"path": f"/p/{i}.jpg", "label": None if failed[i] else label[i],
         "score": None if failed[i] else float(score[i]),
         "error": f"not an image ({i})" if failed[i] else None}
        for i in range(n)
    ]  # fmt: skip
    truth = {r["path"]: "a" for r in rows[:3000] if r["label"] in ("b", "c")}
    selector = Selector(classes, size=7, max_errors=10, truth=truth)
    for start in range(0, n, 4096):
        selector.add(pa.RecordBatch.from_pylist(rows[start : start + 4096]))
    s = selector.selection
    assert s.classes == ["a", "b", "c", "x"] and s.rows == n  # "x": a label not in the list

    def chosen(key) -> list[str]:
        return [r["path"] for r in s.galleries[key].rows()]

    ok = [r for r in rows if r["error"] is None]
    for i, name in enumerate(s.classes):
        mine = sorted((r for r in ok if r["label"] == name), key=lambda r: r["score"])
        assert chosen(("class", i)) == [r["path"] for r in mine[:7]]
        assert s.totals[("class", i)] == len(mine)
    undecided = sorted((r for r in ok if r["label"] is None), key=lambda r: r["score"])
    assert chosen(("undecided",)) == [r["path"] for r in undecided[:7]]
    wrong = sorted((r for r in ok if r["path"] in truth and r["label"] == "b"),
                   key=lambda r: -r["score"])  # fmt: skip
    assert chosen(("cell", 0, 1)) == [r["path"] for r in wrong[:7]]  # most confident first
    assert s.totals[("cell", 0, 1)] == len(wrong)
    assert s.error_total == failed.sum() and len(s.errors) == 10
    assert s.error_kinds == {"not an image": failed.sum()}
    assert s.histogram.sum() == len(ok)


def test_an_evaluation_without_a_mistake_is_reviewed():
    """An evaluation whose misclassified.parquet holds no row (every image right): `insect
    report` failed with a traceback, its empty truth an array of no type."""
    rows = [{"path": f"/p/{i}.jpg", "label": "ab"[i % 2], "score": 0.9, "error": None}
            for i in range(5)]  # fmt: skip
    selector = Selector(["a", "b"], size=7, max_errors=10, truth={})
    selector.add(pa.RecordBatch.from_pylist(rows))
    s = selector.selection
    assert s.totals[("cell", 0, 0)] == 3 and s.totals[("cell", 1, 1)] == 2
    assert not [key for key in s.totals if key[0] == "cell" and key[1] != key[2]]


def test_a_success_file_insect_did_not_write_is_refused_as_summary_refuses_it(tmp_path):
    """A _SUCCESS holding a JSON list was taken for none: report warned 'no _SUCCESS' and
    exited 0, where insect summary refuses it."""
    from insectlib.classify import summary
    from insectlib.review.report import read_run

    (tmp_path / "_SUCCESS").write_text("[1, 2]")
    with pytest.raises(InsectError, match=r"_SUCCESS is not one insect wrote: a JSON list$"):
        read_run(str(tmp_path), None)
    with pytest.raises(InsectError, match="_SUCCESS is not a valid insect manifest: list"):
        summary.read_summary(str(tmp_path), None)
    (tmp_path / "_SUCCESS").write_text('{"rows": 3}')
    assert read_run(str(tmp_path), None)[0] == {"rows": 3, "complete": True}
    with pytest.raises(InsectError, match="manifest: it has no 'finished' field$"):
        summary.read_summary(str(tmp_path), None)


def test_the_page_data_cannot_close_its_script_element():
    text = page.script_json({"name": HOSTILE_CLASS, "other": "a & b <!-- c -->"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"name": HOSTILE_CLASS, "other": "a & b <!-- c -->"}
    html = page.render({"x": HOSTILE_CLASS})
    assert html.count("<script") == 2 and "alert" in html  # inside the JSON, escaped


# ---- a classification and an evaluation, reviewed ---------------------------------------------


@pytest.fixture(scope="module")
def hostile_model(trained, unlabelled, tmp_path_factory) -> dict:
    """The session's model with one class renamed to HOSTILE_CLASS: the class of the image
    it is surest of, so that some decided rows carry the name. Also a --min-score leaving
    about half of the images undecided: the middle of the widest gap between the top
    probabilities near their median (fp32, as the test classifies)."""
    cfg, meta = trained
    model, _ = load_model(cfg.output)
    transform = eval_transform(meta.image_size)
    x = torch.stack([transform(decode(Path(p).read_bytes())) for p in sorted(unlabelled)[:12]])
    with torch.no_grad():
        top, best = torch.softmax(model(normalize(x)), dim=1).max(1)
    renamed = meta.classes[int(best[top.argmax()])]
    ordered = np.sort(top.numpy())
    widest = max(range(3, 9), key=lambda i: ordered[i + 1] - ordered[i])
    folder = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(cfg.output, folder)
    classes = [HOSTILE_CLASS if c == renamed else c for c in meta.classes]
    write_meta(str(folder), dataclasses.replace(meta, classes=classes))  # a new model id
    return {
        "model": str(folder),
        "min_score": float(ordered[widest] + ordered[widest + 1]) / 2,
        "kept": [c for c in meta.classes if c != renamed],  # classes with their own names
    }


@pytest.fixture(scope="module")
def classified(ray_local, hostile_model, unlabelled, tmp_path_factory) -> dict:
    """A classification with --top-k 2 and a --min-score that leaves about half of them
    undecided, of 12 images, three with hostile names, and of three files that fail; and
    its review page."""
    work = tmp_path_factory.mktemp("review")
    images = work / "images"
    images.mkdir()
    sources = sorted(unlabelled)[:12]
    for source in sources[3:]:
        shutil.copy(source, images)
    for source, name in zip(sources[:3], (HOSTILE_FILE, HOSTILE_SVG, QUOTED_FILE), strict=True):
        shutil.copy(source, images / name)
    (images / "truncated.jpg").write_bytes(Path(sources[0]).read_bytes()[:300])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not a picture")
    out = work / "predictions"
    min_score = hostile_model["min_score"]
    classify(ClassifyConfig(input=str(images), model=hostile_model["model"], output=str(out),
                            top_k=2, min_score=min_score, precision="fp32"))  # fmt: skip
    html = work / "page"
    result = build_report(ReportConfig(predictions=str(out), html=str(html)))
    return {"images": images, "out": out, "html": html, "result": result, "min_score": min_score,
            "kept": hostile_model["kept"]}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(ray_local, trained, tmp_path_factory) -> dict:
    """An evaluation of 12 labelled images, one of them in the wrong class folder and one
    unreadable; its review page with galleries of 3."""
    cfg, _ = trained
    work = tmp_path_factory.mktemp("review-evaluation")
    tree = Path(synthetic.make_labelled(str(work / "tree"), per_class=4, seed=7, size=(64, 48)))
    wrong = tree / "cockroach" / "really_a_beetle.jpg"
    (tree / "beetles" / "beetles_0000.jpg").rename(wrong)
    (tree / "beetles" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = work / "evaluation"
    evaluate(EvaluateConfig(data=str(tree), model=cfg.output, output=str(out)))
    html = work / "page"
    build_report(ReportConfig(predictions=str(out), html=str(html), gallery_size=3))
    return {"tree": tree, "out": out, "html": html, "wrong": str(wrong)}


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not on PATH (`make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        yield launched
        launched.close()


class Visit:
    """The page in `folder` opened from disk, with what it logs, asks and requests."""

    def __init__(self, browser, folder: Path):
        self.folder, self.errors, self.dialogs, self.requests = folder, [], [], []
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto((folder / "index.html").as_uri())
        self.page.wait_for_load_state("load")

    def galleries(self) -> dict[str, dict]:
        """{title: {"id", "hidden", "about", "paths"}} of every gallery section."""
        return {
            g["title"]: g
            for g in self.page.evaluate(
                """() => [...document.querySelectorAll("section.gallery")].map(s => ({
                    id: s.id, hidden: s.hidden, title: s.querySelector("h2").textContent,
                    about: s.querySelector(".about").textContent,
                    paths: [...s.querySelectorAll("figure .name")].map(n => n.title)}))"""
            )
        }

    def assert_clean(self) -> None:
        """No error logged, no dialog, no request outside the page's folder, every image
        one of its own thumbnails, loaded."""
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs
        inside = self.folder.as_uri() + "/"
        assert self.requests and all(url.startswith(inside) for url in self.requests), self.requests
        images = self.page.evaluate(
            "() => [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])"
        )
        assert images and all(src.startswith("thumbs/") and width > 0 for src, width in images)

    def close(self) -> None:
        self.context.close()


def least_confident(rows: list[dict], size: int) -> list[str]:
    return [r["path"] for r in sorted(rows, key=lambda r: r["score"])][:size]


@pytest.mark.slow  # a browser
def test_classification_page_shows_galleries_errors_and_hostile_names_as_text(classified, browser):
    rows = parquet_rows(classified["out"])
    decided = [r for r in rows if r["label"] is not None]
    undecided = [r for r in rows if r["decided"] is False]
    failed = [r for r in rows if r["error"] is not None]
    assert len(rows) == 15 and len(failed) == 3 and undecided and decided
    assert any(r["label"] == HOSTILE_CLASS for r in decided)
    visit = Visit(browser, classified["html"])
    try:
        visit.assert_clean()
        shown = visit.galleries()
        for label in {r["label"] for r in decided}:
            mine = [r for r in decided if r["label"] == label]
            assert shown[f"Predicted {label}"]["paths"] == least_confident(mine, 60)
        below = shown[f"Not decided: score below --min-score {classified['min_score']}"]
        assert below["paths"] == least_confident(undecided, 60)
        assert len(shown) == len({r["label"] for r in decided}) + 1
        errors = visit.page.evaluate(
            "() => [...document.querySelectorAll('table.error-rows tr')].slice(1)"
            ".map(tr => [...tr.cells].map(c => c.textContent))"
        )
        assert sorted(errors) == sorted([r["path"], r["error"]] for r in failed)
        # Hostile names are text: shown as they are, and nothing of them ran or loaded.
        for name in (HOSTILE_FILE, HOSTILE_SVG):
            assert visit.page.get_by_text(name, exact=True).count() == 1
        assert visit.page.get_by_text(f"Predicted {HOSTILE_CLASS}", exact=True).count() == 1
        assert visit.page.evaluate("() => document.scripts.length") == 2
        assert visit.page.evaluate("() => document.querySelectorAll('svg[onload], [onerror]')"
                                   ".length") == 0  # fmt: skip
        # The policy is the page's, and enforced: an inline script added now does not run.
        policy = visit.page.get_attribute("meta[http-equiv='Content-Security-Policy']", "content")
        assert policy == page.CSP
        assert visit.page.evaluate("""() => { const s = document.createElement("script");
            s.textContent = "window.injected = 1"; document.body.append(s);
            return window.injected === undefined; }""")
        top = visit.page.locator("figure").filter(has=visit.page.get_by_title(
            decided[0]["path"], exact=True)).locator(".top").text_content()  # fmt: skip
        assert top.startswith(f"{decided[0]['top_labels'][0]} {decided[0]['top_scores'][0]:.3f}")
    finally:
        visit.close()


def test_the_page_of_an_unfinished_run_says_so(classified, browser, tmp_path, capsys):
    """An output without _SUCCESS (interrupted, or still running), or whose _SUCCESS counts
    other rows than its parts hold (one cut short or removed since), gets its page of the
    rows it holds, said on the console and among the run's facts."""
    success = json.loads((classified["out"] / SUCCESS_FILE).read_text())
    rows = success["rows"]
    pages = {classified["html"]: success["finished"]}
    for name, change, why in (
        ("running", None, f"no {SUCCESS_FILE}: an interrupted or running insect classify"),
        ("changed", {**success, "rows": rows + 1},
         f"{SUCCESS_FILE} says {rows + 1} rows, the parts differ"),
    ):  # fmt: skip
        out = tmp_path / name
        shutil.copytree(classified["out"], out)
        (out / SUCCESS_FILE).unlink()
        if change:
            (out / SUCCESS_FILE).write_text(json.dumps(change))
        capsys.readouterr()
        build_report(ReportConfig(predictions=str(out), html=str(tmp_path / f"{name}-page")))
        said = f"warning: {out} is not a whole run ({why}): the page shows the rows it holds"
        assert said in capsys.readouterr().err
        pages[tmp_path / f"{name}-page"] = f"not a whole run ({why})"
    for folder, shown in pages.items():
        visit = Visit(browser, folder)
        try:
            visit.assert_clean()
            facts = visit.page.evaluate(
                "() => Object.fromEntries([...document.querySelectorAll('dl.facts dt')]"
                ".map(dt => [dt.textContent, dt.nextElementSibling.textContent]))"
            )
            assert facts["finished"] == shown
        finally:
            visit.close()


def test_files_beside_the_parts_that_a_folder_reader_counts_are_named(
    classified, browser, tmp_path, capsys
):
    """A file or folder copied into an output beside insect's parts is read with them by
    pandas or pyarrow: insect summary and the page count only the parts, and name it."""
    out = tmp_path / "out"
    shutil.copytree(classified["out"], out)
    rows = json.loads((out / SUCCESS_FILE).read_text())["rows"]
    shutil.copy(next(out.glob("part-*.parquet")), out / "extra.parquet")
    (out / "old").mkdir()
    shutil.copy(next(out.glob("part-*.parquet")), out / "old")
    assert len(parquet_rows(out)) > rows  # what a reader of the folder gets
    note = f"{out} also holds extra.parquet, old, which insect did not write: not"
    text = show(SummaryConfig(predictions=str(out)))
    assert text.startswith(f"{out}: {rows} rows for ")
    assert f"warning: {note} counted here" in text
    capsys.readouterr()
    build_report(ReportConfig(predictions=str(out), html=str(tmp_path / "page")))
    assert f"warning: {note} shown here" in capsys.readouterr().err
    visit = Visit(browser, tmp_path / "page")
    try:
        visit.assert_clean()
        facts = visit.page.evaluate(
            "() => Object.fromEntries([...document.querySelectorAll('dl.facts dt')]"
            ".map(dt => [dt.textContent, dt.nextElementSibling.textContent]))"
        )
        assert facts["warning"].startswith(f"{note} shown here")
        assert facts["rows"] == str(rows)
    finally:
        visit.close()
    shutil.rmtree(out / "old")
    (out / "extra.parquet").unlink()
    assert "warning" not in show(SummaryConfig(predictions=str(out)))


def test_thumbnails_are_small_reencoded_jpegs_named_by_a_hash(classified):
    html, images = classified["html"], classified["images"]
    rows = parquet_rows(classified["out"])
    readable = {r["path"] for r in rows if r["error"] is None}
    thumbs = {p.name for p in (html / "thumbs").iterdir()}
    assert thumbs == {thumb_name(p) for p in readable}  # none for a file that failed
    originals = {p.read_bytes() for p in images.iterdir()}
    for name in thumbs:
        data = (html / "thumbs" / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and max(image.size) <= THUMB_SIDE
        assert data not in originals
    assert classified["result"]["thumbnails"] == len(readable)
    assert sorted(os.listdir(html)) == ["index.html", "review.css", "review.js", "thumbs"]


def test_thumbnails_read_from_s3_through_the_bounded_decoder(ray_local, s3_server, unlabelled,
                                                              tmp_path):  # fmt: skip
    client = s3_server.client()
    client.create_bucket(Bucket="insect-review")
    source = sorted(unlabelled)[0]
    client.upload_file(source, "insect-review", "in/a.jpg")
    client.put_object(Bucket="insect-review", Key="in/b.jpg", Body=b"not a picture")
    paths = ["s3://insect-review/in/a.jpg", "s3://insect-review/in/b.jpg"]
    found = write_thumbnails(str(tmp_path), paths, DecodeLimits(max_pixels=10_000), None)
    assert found[paths[0]] == {"thumb": f"thumbs/{thumb_name(paths[0])}"}
    assert found[paths[1]]["problem"].startswith("not an image")
    with Image.open(tmp_path / found[paths[0]]["thumb"]) as image:
        assert image.format == "JPEG"
    small = write_thumbnails(str(tmp_path), paths[:1], DecodeLimits(max_pixels=100), None)
    assert small[paths[0]]["problem"].startswith("image too large")  # the limits hold


@pytest.fixture(scope="module")
def corrections(classified, browser, tmp_path_factory) -> dict:
    """Corrections made by hand in the page, downloaded: {"csv": path, "chosen": {path:
    label}}."""
    images, (one, other) = classified["images"], classified["kept"]
    chosen = {
        str(images / HOSTILE_FILE): one,
        str(images / QUOTED_FILE): other,
        str(images / HOSTILE_SVG): one,
        str(sorted(images.glob("photo_*"))[0]): "skip",
    }
    visit = Visit(browser, classified["html"])
    try:
        for path, label in chosen.items():
            figure = visit.page.locator("figure").filter(has=visit.page.get_by_title(
                path, exact=True))  # fmt: skip
            figure.locator("select").select_option(value=label)
        assert visit.page.text_content("#correction-count") == "4 corrections"
        with visit.page.expect_download() as download:
            visit.page.click("#download-corrections")
        target = tmp_path_factory.mktemp("corrections") / download.value.suggested_filename
        download.value.save_as(target)
        visit.assert_clean()
    finally:
        visit.close()
    return {"csv": target, "chosen": chosen, "images": images}


@pytest.mark.slow  # a browser
def test_corrections_download_as_the_csv_expected(corrections):
    expected = io.StringIO()
    writer = csv.writer(expected, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(sorted(corrections["chosen"].items()))
    assert corrections["csv"].name == "corrections.csv"
    assert corrections["csv"].read_text() == expected.getvalue()  # quoted where needed


@pytest.mark.slow  # a browser, then training
def test_training_on_the_downloaded_corrections_counts_them(corrections, labelled_root,
                                                            tmp_path):  # fmt: skip
    out = tmp_path / "model"
    code = main(["train", labelled_root, "--labels", str(corrections["csv"]), "--output",
                 str(out), "--weights", "random", "--image-size", "64", "--epochs", "1",
                 "--workers", "1", "--batch-size", "8", "--no-augment",
                 "--storage", str(tmp_path / "runs")])  # fmt: skip
    assert code == 0
    data = json.loads((out / "meta.json").read_text())["data"]
    assert data["labels"] == {
        "table": str(corrections["csv"]), "rows": 4, "in_root": 0, "relabelled": 0,
        "skipped": 1, "added": 3, "new_classes": [],
    }  # fmt: skip
    counts = data["counts"]
    assert sum(n for side in counts.values() for n in side.values()) == 90 + 3
    one = corrections["chosen"][str(corrections["images"] / HOSTILE_FILE)]
    assert counts["train"][one] + counts["val"][one] == 30 + 2


@pytest.mark.slow  # a browser
def test_evaluation_page_opens_the_images_of_each_cell(evaluated, browser):
    metrics = json.loads((evaluated["out"] / "metrics.json").read_text())
    matrix = json.loads((evaluated["out"] / "confusion_matrix.json").read_text())
    rows = [r for r in parquet_rows(evaluated["out"] / "predictions") if r["error"] is None]
    classes = matrix["classes"]
    visit = Visit(browser, evaluated["html"])
    try:
        visit.assert_clean()
        shown = visit.page.evaluate(
            "() => [...document.querySelectorAll('table.confusion tr')].slice(1)"
            ".map(tr => [...tr.cells].slice(1).map(c => c.textContent))"
        )
        assert shown == [[str(n) for n in line] for line in matrix["matrix"]]
        per_class = visit.page.evaluate(
            "() => [...document.querySelectorAll('table.per-class tr')].slice(1)"
            ".map(tr => [...tr.cells].map(c => c.textContent))"
        )
        assert per_class == [
            [name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
             str(m["support"])]
            for name, m in metrics["per_class"].items()
        ]  # fmt: skip
        opened = 0
        for i, truth in enumerate(classes):
            for j, predicted in enumerate(classes):
                cell = [r for r in rows if Path(r["path"]).parent.name == truth
                        and r["label"] == predicted]  # fmt: skip
                if not cell:
                    continue
                title = f"True {truth}, predicted {predicted}"
                visit.page.get_by_title(f"{truth} predicted as {predicted}", exact=True).click()
                galleries = visit.galleries()
                assert not galleries[title]["hidden"]
                assert sum(not g["hidden"] for t, g in galleries.items() if "True" in t) == 1
                order = 1 if i == j else -1  # off the diagonal, the most confident first
                expected = [r["path"] for r in sorted(cell, key=lambda r: order * r["score"])]
                assert galleries[title]["paths"] == expected[:3]
                opened += 1
        assert opened == sum(n > 0 for line in matrix["matrix"] for n in line) >= 4
        wrong_cell = visit.galleries()["True cockroach, predicted beetles"]
        assert evaluated["wrong"] in wrong_cell["paths"]
    finally:
        visit.close()


def test_report_refuses_unsafe_folders_and_overwrites_only_its_own(classified, tmp_path,
                                                                   capsys):  # fmt: skip
    out, html = str(classified["out"]), str(classified["html"])
    err = expect_cli_error(capsys, ["report", out, "--html", os.path.join(out, "page")])
    assert "--html" in err and "is inside the classification" in err
    err = expect_cli_error(capsys, ["report", out, "--html", str(classified["images"])])
    assert "contains its input" in err
    # A run whose input the page cannot go by (a manifest's; here none: no _SUCCESS): a
    # page in a folder of the images it shows is said.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / SUCCESS_FILE).unlink()
    inside = classified["images"] / "page"
    try:
        assert main(["report", str(copy), "--html", str(inside)]) == 0
        warning = f"warning: --html {inside} lies in {inside.parent}, a folder of the page's"
        assert warning in capsys.readouterr().err
    finally:
        shutil.rmtree(inside)  # the module's next tests list those images
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    err = expect_cli_error(capsys, ["report", out, "--html", str(a_file / "page")])
    assert f"--html {a_file / 'page'} lies under {a_file}, which is a file" in err
    err = expect_cli_error(capsys, ["report", out, "--html", html])
    assert "not empty; pass --overwrite" in err
    stale = Path(html) / "thumbs" / ("0" * 32 + ".jpg")  # named as report names its own
    stale.write_bytes(b"an old thumbnail")
    assert main(["report", out, "--html", html, "--overwrite"]) == 0
    assert not stale.exists() and len(list((Path(html) / "thumbs").iterdir())) == 12
    (Path(html) / "thumbs" / "mine.jpg").write_bytes(b"x")
    err = expect_cli_error(capsys, ["report", out, "--html", html, "--overwrite"])
    assert "holds files insect did not write (mine.jpg)" in err
    assert (Path(html) / "thumbs" / "mine.jpg").exists() and (Path(html) / "index.html").exists()
    assert "holds no insect classification" in expect_cli_error(
        capsys, ["report", str(tmp_path), "--html", str(tmp_path / "page")])  # fmt: skip
    assert f"{tmp_path / 'typo'} does not exist" in expect_cli_error(
        capsys, ["report", str(tmp_path / "typo"), "--html", str(tmp_path / "page")])  # fmt: skip
    (Path(html) / "thumbs" / "mine.jpg").unlink()
    # Two reports into one folder: the second is refused while the first holds it.
    with output_lock(html, "report"):
        err = expect_cli_error(capsys, ["report", out, "--html", html, "--overwrite"])
    assert f"{html} is in use by insect report (host" in err
    assert main(["report", out, "--html", html, "--overwrite"]) == 0
    assert not (Path(html) / LOCK_FILE).exists()


def test_thumbnail_names_are_hashes_of_paths():
    name = thumb_name(HOSTILE_FILE)
    assert name == hashlib.sha256(HOSTILE_FILE.encode()).hexdigest()[:32] + ".jpg"
