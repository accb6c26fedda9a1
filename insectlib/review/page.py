"""The review page: one HTML file that holds no markup from the data, its data as JSON, and
its own script and style beside it.

Everything shown comes from the data (file, folder and class names included), so nothing
of it is ever HTML: the document is JSON in a `<script type="application/json">` element,
escaped so that no `<`, `>` or `&` appears in it (a `</script>` in a name stays inside), and
`review.js` builds the page with `textContent`, never `innerHTML`. The Content-Security-
Policy lets the page run only its own script file, show only its own images and style, and
connect nowhere: an injected handler or inline script would not run, and no request leaves
the page's folder. Opened from disk (`file://`), it needs no server.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib import resources

from insectlib.data.label_table import SKIP_LABEL
from insectlib.layout import REVIEW_SCRIPT, REVIEW_STYLE
from insectlib.review.selection import Selection

# No inline script or style, no connections, no plugins, no <base>, no form submission.
CSP = (
    "default-src 'none'; script-src 'self'; img-src 'self'; style-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)
DATA_ID = "review-data"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>insect review</title>
<link rel="stylesheet" href="{style}">
<script type="application/json" id="{data_id}">{data}</script>
<script src="{script}" defer></script>
</head>
<body>
<noscript>This page is drawn by its own script, {script}, beside it: allow JavaScript
for this file (it loads nothing from the network).</noscript>
<main id="review"></main>
</body>
</html>
"""


def asset(name: str) -> bytes:
    """A static file of the page (`review.js`, `review.css`), shipped with the package."""
    return resources.files("insectlib.review").joinpath("assets", name).read_bytes()


def script_json(document: dict) -> str:
    """`document` as JSON that is safe inside a <script> element: ASCII only, and `<`, `>`
    and `&` written as \\u escapes, so no text in it can close the element or start one."""
    text = json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(document: dict) -> str:
    """The HTML of the page for `document` (see `page_document`)."""
    return PAGE.format(
        csp=CSP,
        style=REVIEW_STYLE,
        script=REVIEW_SCRIPT,
        data_id=DATA_ID,
        data=script_json(document),
    )


def page_document(
    kind: str,
    output: str,
    run: dict,
    selection: Selection,
    thumbs: dict[str, dict],
    evaluation: dict | None = None,
) -> dict:
    """Everything the page shows, as the JSON `review.js` reads: each image once (by
    index), the galleries as lists of indices, the error rows, the run and, for an
    evaluation, its metrics and the gallery of each cell of the confusion matrix."""
    images, index = [], {}
    galleries = []
    for key in sorted(selection.galleries, key=_gallery_order):
        entries = []
        for row in selection.galleries[key].rows():
            if row["path"] not in index:
                index[row["path"]] = len(images)
                images.append(_image(row, thumbs.get(row["path"], {})))
            entries.append(index[row["path"]])
        galleries.append(_gallery(key, len(galleries), entries, selection, run))
    document = {
        "kind": kind,
        "output": output,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run,
        "histogram": _histogram(selection),
        "classes": selection.classes,
        "skip_label": SKIP_LABEL,
        "gallery_size": selection.size,
        "images": images,
        "galleries": galleries,
        "errors": {
            "total": selection.error_total,
            "kinds": dict(sorted(selection.error_kinds.items(), key=lambda kv: -kv[1])),
            "rows": selection.errors,
        },
        "evaluation": None,
    }
    if evaluation is not None:  # each cell of the confusion matrix opens its gallery
        cells = {f"{g['cell'][0]},{g['cell'][1]}": g["id"] for g in galleries if "cell" in g}
        document["evaluation"] = {**evaluation, "cells": cells}
    return _finite(document)


def _gallery_order(key: tuple) -> tuple:
    order = {"class": 0, "undecided": 1, "cell": 2}
    return (order[key[0]], *key[1:])


def _image(row: dict, thumb: dict) -> dict:
    return {**row, "name": os.path.basename(row["path"].rstrip("/")) or row["path"], **thumb}


def _gallery(key: tuple, number: int, entries: list[int], s: Selection, run: dict) -> dict:
    gallery = {"id": f"g{number}", "kind": key[0], "total": s.totals.get(key, 0)}
    gallery["images"] = entries
    if key[0] == "class":
        gallery.update(label=s.classes[key[1]], order="least confident first")
    elif key[0] == "undecided":
        gallery.update(min_score=(run.get("row_format") or {}).get("min_score"))
        gallery["order"] = "least confident first"
    else:
        truth, predicted = s.classes[key[1]], s.classes[key[2]]
        gallery.update(truth=truth, label=predicted, cell=[key[1], key[2]])
        gallery["order"] = "least confident first" if truth == predicted else "most confident first"
    return gallery


def _histogram(s: Selection) -> dict:
    edges = [round(i / len(s.histogram), 6) for i in range(len(s.histogram) + 1)]
    return {"edges": edges, "counts": s.histogram.tolist()}


def _finite(value):
    """The document with NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
