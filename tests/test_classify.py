import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import torch

from insectlib.classify.pipeline import classify
from insectlib.config import ClassifyConfig
from insectlib.data.images import decode, eval_transform, normalize
from insectlib.model.network import load_model
from insectlib.model.predictor import PREDICTION_SCHEMA, RowFormat


def _plain_forward(model_dir: str, paths: list[str]):
    """(logits, head inputs) of a plain PyTorch forward pass over `paths`."""
    model, meta = load_model(model_dir)
    transform = eval_transform(meta.image_size)
    batch = torch.stack([transform(decode(open(p, "rb").read())) for p in paths])
    seen = []
    hook = model.get_submodule(meta.head).register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    with torch.no_grad():
        logits = model(normalize(batch))
    hook.remove()
    return logits, seen[0]


def test_classify_matches_plain_pytorch(calibrated, unlabelled, tmp_path):
    """Every column against a plain forward pass: probabilities are the softmax of the
    logits divided by the model's temperature (raw with --no-temperature), the embedding
    is the head's input, top-k and --min-score follow from the probabilities."""
    model_dir, meta = calibrated
    paths = sorted(unlabelled)
    logits, features = _plain_forward(model_dir, paths)
    expected = torch.softmax(logits / meta.temperature, dim=1).numpy()
    min_score = float(np.median(expected.max(1)))  # half the rows are not decided
    out = str(tmp_path / "predictions")
    summary = classify(
        ClassifyConfig(
            input=os.path.dirname(paths[0]),
            model=model_dir,
            output=out,
            precision="fp32",
            top_k=2,
            embeddings=True,
            min_score=min_score,
        )
    )
    assert summary.inputs == summary.rows == len(unlabelled) and summary.errors == 0

    row_format = RowFormat(meta.temperature, 2, min_score, features.shape[1])
    table = pq.read_table(out)
    parts = sorted(glob.glob(os.path.join(out, "*.parquet")))
    schema = row_format.schema()
    for part in parts:  # Parquet names a list's values "element", Arrow "item"
        found = pq.read_schema(part)
        assert found.equals(schema, check_metadata=False) and found.metadata == schema.metadata
    assert parts
    rows = {r["path"]: r for r in table.to_pylist()}
    assert set(rows) == set(unlabelled)
    got = np.array([rows[p]["probabilities"] for p in paths], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    embeddings = np.array([rows[p]["embedding"] for p in paths], dtype=np.float32)
    np.testing.assert_allclose(embeddings, features.numpy(), rtol=2e-3, atol=1e-3)
    decided = 0
    for p, probs in zip(paths, expected, strict=True):
        row, best = rows[p], probs.argmax()
        assert abs(row["score"] - probs.max()) < 1e-4
        assert row["error"] is None and row["model"] == meta.model_id
        assert row["top_labels"] == [meta.classes[i] for i in np.argsort(-probs)[:2]]
        np.testing.assert_allclose(row["top_scores"], np.sort(probs)[::-1][:2], atol=1e-4)
        if row["decided"]:
            decided += 1
            assert row["label"] == meta.classes[best] and row["label_index"] == best
            assert row["score"] >= min_score
        else:  # not decided: no label, the probabilities kept
            assert row["label"] is None and row["label_index"] is None
            assert row["score"] < min_score
    assert 0 < decided < len(paths)
    report = json.loads((tmp_path / "predictions" / "_summary.json").read_text())
    assert report["rows"] == len(paths) and report["undecided"] == len(paths) - decided
    assert sum(report["classes"].values()) == decided and sum(report["scores"]["counts"]) == 24

    # --no-temperature: the raw softmax, the same predictions; the plain schema.
    raw = str(tmp_path / "raw")
    classify(
        ClassifyConfig(
            input=os.path.dirname(paths[0]),
            model=model_dir,
            output=raw,
            precision="fp32",
            use_temperature=False,
        )
    )
    table = pq.read_table(raw)
    assert table.schema.equals(PREDICTION_SCHEMA, check_metadata=False)
    rows = {r["path"]: r for r in table.to_pylist()}
    got = np.array([rows[p]["probabilities"] for p in paths], dtype=np.float32)
    np.testing.assert_allclose(got, torch.softmax(logits, dim=1).numpy(), atol=1e-4)
    for p, probs in zip(paths, expected, strict=True):
        assert rows[p]["label"] == meta.classes[probs.argmax()]
