import os

import numpy as np
import pyarrow.parquet as pq
import torch

from insectlib.classify import classify
from insectlib.config import ClassifyConfig
from insectlib.images import decode, eval_transform, normalize
from insectlib.model import load_model
from insectlib.predict import PREDICTION_SCHEMA


def test_classify_matches_plain_pytorch(trained, unlabelled, tmp_path):
    cfg, meta = trained
    out = str(tmp_path / "predictions")
    summary = classify(
        ClassifyConfig(
            input=os.path.dirname(next(iter(unlabelled))),
            model=cfg.output,
            output=out,
            precision="fp32",
        )
    )
    assert summary.inputs == summary.rows == len(unlabelled) and summary.errors == 0

    table = pq.read_table(out)
    assert table.schema.equals(PREDICTION_SCHEMA, check_metadata=False)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert set(rows) == set(unlabelled)

    model, _ = load_model(cfg.output)
    transform = eval_transform(meta.image_size)
    paths = sorted(rows)
    batch = torch.stack([transform(decode(open(p, "rb").read())) for p in paths])
    with torch.no_grad():
        expected = torch.softmax(model(normalize(batch)), dim=1).numpy()
    got = np.array([rows[p]["probabilities"] for p in paths], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    for p, probs in zip(paths, expected, strict=True):
        assert rows[p]["label_index"] == probs.argmax()
        assert rows[p]["label"] == meta.classes[probs.argmax()]
        assert abs(rows[p]["score"] - probs.max()) < 1e-4
        assert rows[p]["error"] is None and rows[p]["model"] == meta.model_id
