"""S3 end to end against moto's real S3 server on loopback (no mocks in this process)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import boto3
import duckdb
import pandas as pd
import pyarrow.compute
import pyarrow.dataset
import pytest
import ray
import s3fs
import safetensors.torch
import torch
import torchvision

from insectlib import storage
from insectlib.classify.pipeline import classify
from insectlib.config import ClassifyConfig
from insectlib.errors import ImageError, StorageUnavailable
from insectlib.layout import META_FILE
from insectlib.model.meta import read_meta
from insectlib.model.network import build_model
from insectlib.storage import buckets, retry
from insectlib.training.trainer import fit
from tests.conftest import (
    assert_refused_before_torch,
    expect_cli_error,
    run_cli,
    small_train_config,
    upload_tree,
    wait_for,
)
from tests.s3server import free_port

BUCKET = "insect-e2e"
# Names that break naive URL or shell handling; each must round-trip exactly.
ODD_NAMES = [
    "with space/photo one.jpg",
    "unicode/ünïcödé 昆虫.jpeg",
    "plus+and%25percent.JPG",
    "nested/deeper/still/UPPER.PNG",
    'quotes/it\'s "$(echo hi)".jpg',
]


@pytest.fixture(scope="module")
def s3_data(s3_server, labelled_root, unlabelled):
    """A bucket with the labelled tree and the unlabelled images (plus odd names)."""
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    upload_tree(client, labelled_root, BUCKET, "labelled")
    sources = sorted(unlabelled)
    keys = upload_tree(client, os.path.dirname(sources[0]), BUCKET, "images")
    for name, source in zip(ODD_NAMES, sources, strict=False):
        client.upload_file(source, BUCKET, f"images/{name}")
        keys.append(f"images/{name}")
    client.put_object(Bucket=BUCKET, Key="images/readme.txt", Body=b"not an image")
    client.put_object(Bucket=BUCKET, Key="text-only/readme.txt", Body=b"not an image")
    return {"images": sorted(f"s3://{BUCKET}/{k}" for k in keys)}


@pytest.fixture(scope="module")
def s3_model(ray_local, s3_data):
    """Trained from S3 data, with Ray Train checkpoints and the model directory in S3."""
    cfg = small_train_config(
        f"s3://{BUCKET}/labelled",
        f"s3://{BUCKET}",  # run storage: s3://BUCKET/runs
        output=f"s3://{BUCKET}/models/m1",
        name="s3run",
        arch="resnet18",
        epochs=2,
        image_size=32,
        batch_size=32,
        augment=True,  # S3 reads every epoch
    )
    return cfg, fit(cfg)


def test_train_reads_and_writes_s3(s3_model, s3_server):
    cfg, meta = s3_model
    assert meta.data["counts"]["train"] == {c: 24 for c in meta.classes}
    assert read_meta(cfg.output).model_id == meta.model_id
    keys = [
        o["Key"] for o in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="")["Contents"]
    ]
    assert "models/m1/model.safetensors" in keys and "models/m1/meta.json" in keys
    assert sum(k.startswith("runs/s3run/") and k.endswith("/state.pt") for k in keys) == 2


def test_classify_s3_to_s3_readable_by_pyarrow_pandas_duckdb(s3_model, s3_data, s3_server):
    cfg, meta = s3_model
    out = f"s3://{BUCKET}/predictions"
    summary = classify(ClassifyConfig(input=f"s3://{BUCKET}/images/", model=cfg.output, output=out))
    n = len(s3_data["images"])
    assert summary.inputs == summary.rows == n and summary.errors == 0

    fs, path = storage.pyarrow_filesystem(out)
    table = pyarrow.dataset.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == s3_data["images"]
    assert set(table.column("model").to_pylist()) == {meta.model_id}

    frame = pd.read_parquet(out, storage_options={"endpoint_url": s3_server.endpoint})
    assert len(frame) == n and frame["label"].notna().all()

    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(endpoint_url=s3_server.endpoint))
    rows, distinct = con.sql(
        f"SELECT count(*), count(DISTINCT path) FROM read_parquet('{out}/*.parquet')"
    ).fetchall()[0]
    assert rows == distinct == n


def test_mixed_local_and_s3(s3_model, s3_data, unlabelled, tmp_path):
    cfg, _ = s3_model
    images = os.path.dirname(next(iter(unlabelled)))
    out = f"s3://{BUCKET}/predictions-from-local"
    s = classify(ClassifyConfig(input=images, model=cfg.output, output=out))
    assert s.rows == len(unlabelled)

    fs, path = storage.filesystem(cfg.output)
    fs.get(path, str(tmp_path / "model"), recursive=True)  # S3 model copied to local disk
    s = classify(
        ClassifyConfig(
            input=f"s3://{BUCKET}/images",
            model=str(tmp_path / "model"),
            output=str(tmp_path / "out"),
        )
    )
    assert s.rows == len(s3_data["images"])
    paths = pyarrow.dataset.dataset(str(tmp_path / "out")).to_table().column("path")
    assert sorted(paths.to_pylist()) == s3_data["images"]


def test_weights_from_s3(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="insect-weights")
    base = torchvision.models.resnet18(weights=None)
    fs, _ = storage.filesystem("s3://insect-weights")
    with fs.open("insect-weights/r18.pth", "wb") as f:
        torch.save(base.state_dict(), f)
    with fs.open("insect-weights/r18.safetensors", "wb") as f:
        f.write(safetensors.torch.save(base.state_dict()))
    for name in ("r18.pth", "r18.safetensors"):
        m = build_model("resnet18", 3, f"s3://insect-weights/{name}")
        assert torch.equal(m.conv1.weight, base.conv1.weight) and m.fc.out_features == 3


def test_listing_many_objects_uses_paginated_requests(s3_server, monkeypatch):
    """A listing is one ListObjectsV2 request a page and nothing per key. Pages of 100 keys
    here, not S3's 1,000 (300 objects uploaded rather than 3,000), in two folders of 150:
    three pages, where a listing folder by folder would take four."""
    monkeypatch.setattr(buckets, "PAGE_KEYS", 100)
    client = s3_server.client()
    client.create_bucket(Bucket="insect-many")
    keys = [f"many/{i // 150}/{i:05d}.jpg" for i in range(300)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="insect-many", Key=k, Body=b"x"), keys))
    log = s3_server._log.name
    before = os.path.getsize(log)
    listed = list(storage.iter_files("s3://insect-many/many"))
    assert sorted(listed) == [f"s3://insect-many/{k}" for k in keys]
    with open(log, errors="replace") as f:
        f.seek(before)
        requests = [line for line in f if "insect-many" in line]
    queries = [parse_qs(urlsplit(r.split()[-4]).query) for r in requests if "list-type=2" in r]
    # Three pages, the second and third asked for with a continuation token, and nothing
    # else per key.
    assert len(queries) == 3 and len(requests) <= 4, requests[:20]
    assert all(q["max-keys"] == ["100"] for q in queries), queries
    assert ["continuation-token" in q for q in queries] == [False, True, True], queries


def test_s3_errors_name_the_uri(s3_data, trained, capsys, monkeypatch, tmp_path):
    model, out = trained[0].output, str(tmp_path / "out")
    monkeypatch.setattr(retry, "READ_BACKOFF_S", 0.01)  # the dead endpoint's 4 attempts
    err = expect_cli_error(capsys, ["train", "s3://insect-no-such-bucket/labelled"])
    assert "bucket 'insect-no-such-bucket' does not exist" in err
    assert "no objects under s3://insect-e2e/empty" in expect_cli_error(
        capsys, ["train", f"s3://{BUCKET}/empty"]
    )
    assert f"no image files found in s3://{BUCKET}/text-only" in expect_cli_error(
        capsys, ["classify", f"s3://{BUCKET}/text-only", "--model", model, "--output", out]
    )
    err = expect_cli_error(
        capsys,
        [
            "classify",
            f"s3://{BUCKET}/images",
            "--model",
            f"s3://{BUCKET}/models/none",
            "--output",
            out,
        ],
    )
    assert f"not a model directory: s3://{BUCKET}/models/none/meta.json" in err
    dead = f"http://127.0.0.1:{free_port()}"
    err = expect_cli_error(capsys, ["train", f"s3://{BUCKET}/labelled", "--s3-endpoint", dead])
    assert f"cannot read s3://{BUCKET}/labelled" in err and "Could not connect" in err
    assert "--resume" not in err  # classify's advice: this training wrote nothing


def test_a_missing_bucket_is_refused_before_torch(s3_server, tmp_path):
    """A bucket that does not exist, named alone (no prefix) as the labelled data or the
    input, or holding the model or the output to summarize or review, is refused in one line
    naming it before torch is imported
    (training's check took a bucket for a folder without asking, and found out only after
    torch and Ray had started; a model there was 'not a model directory')."""
    missing = "s3://insect-no-such-bucket"
    said = "bucket 'insect-no-such-bucket' does not exist"
    model = tmp_path / "model"
    model.mkdir()
    (model / META_FILE).write_text("{}")  # a model directory, as far as paths go
    assert_refused_before_torch(
        [
            (f"{said} ({missing}/)", ["train", missing]),
            (f"{said} ({missing}/)", ["train", f"{missing}/"]),
            (said, ["evaluate", missing, "--model", str(model), "--output", "o"]),
            (said, ["classify", missing, "--model", str(model), "--output", "o"]),
            (said, ["classify", str(tmp_path), "--model", f"{missing}/m", "--output", "o"]),
            ("s3:// names no bucket", ["train", "s3://"]),
            (said, ["summary", f"{missing}/out"]),
            (said, ["report", f"{missing}/out", "--html", str(tmp_path / "page")]),
        ],
        tmp_path,
    )


def test_an_s3_glob_skips_hidden_keys_as_a_folder_listing_does(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="insect-glob")
    for key in ["g/a.jpg", "g/.cache/b.jpg", "g/s/.c.jpg", "g/s/d.jpg"]:
        client.put_object(Bucket="insect-glob", Key=key, Body=b"x")
    found = list(storage.iter_files("s3://insect-glob/g/**/*.jpg"))
    assert "s3://insect-glob/g/s/d.jpg" in found and not [f for f in found if "/." in f], found
    assert list(storage.iter_files("s3://insect-glob/g/.cache/*.jpg")) == [
        "s3://insect-glob/g/.cache/b.jpg"
    ]


def test_wrong_credentials_are_denied(s3_data, s3_server):
    result = run_cli(
        "insect",
        "train",
        f"s3://{BUCKET}/labelled",
        env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"access denied to s3://{BUCKET}/labelled" in result.stderr
    assert "Traceback" not in result.stderr


def test_s3_reads_retry_transient_failures_and_keep_file_problems_as_rows(
    s3_server, s3_data, monkeypatch
):
    client = s3_server.client()
    client.put_object(Bucket=BUCKET, Key="odd/empty.jpg", Body=b"")
    monkeypatch.setattr(retry, "READ_BACKOFF_S", 0.01)
    uri = s3_data["images"][0]
    fs, _ = storage.filesystem(uri)  # fsspec caches it: read_input gets this instance
    real = fs.cat_file
    failures = []

    def flaky(path, *args, **kwargs):
        if len(failures) < 2:
            failures.append(path)
            raise OSError("503 SlowDown")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky)
    assert storage.read_input(uri, 10**7)[:2] == b"\xff\xd8" and len(failures) == 2
    assert storage.read_input(f"s3://{BUCKET}/odd/empty.jpg", 10**7) == b""
    with pytest.raises(ImageError, match="not found"):
        storage.read_input(f"s3://{BUCKET}/odd/gone.jpg", 10**7)
    with pytest.raises(ImageError, match="file too large"):
        storage.read_input(uri, 100)

    def down(path, *args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(fs, "cat_file", down)
    with pytest.raises(StorageUnavailable, match=f"cannot read {uri} after 4 attempts"):
        storage.read_input(uri, 10**7)


def _set_policy(s3_server, statements: list[dict]) -> None:
    iam = boto3.client(
        "iam",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_server.secret,
    )
    document = {"Version": "2012-10-17", "Statement": statements}
    iam.put_user_policy(UserName="insect", PolicyName="s3", PolicyDocument=json.dumps(document))


def test_a_table_whose_images_cannot_be_read_is_refused_before_ray_starts(s3_server, tmp_path):
    """Not by the workers' first reads, a minute into the run; a missing image is skipped
    and counted later, as in a folder."""
    from insectlib.config import TrainConfig
    from insectlib.data import synthetic
    from insectlib.training.preflight import named, preflight

    tree = synthetic.make_labelled(str(tmp_path / "root"), per_class=3, size=(32, 24))
    client = s3_server.client()
    client.create_bucket(Bucket="insect-table-images")
    client.put_object(Bucket="insect-table-images", Key="moved/a.jpg", Body=b"bytes")
    images = "s3://insect-table-images"
    table = tmp_path / "t.csv"
    table.write_text(f"path,label\n{images}/moved/a.jpg,beetles\n{images}/gone.jpg,beetles\n")
    m, runs = str(tmp_path / "m"), str(tmp_path / "runs")
    cfg = TrainConfig(data=tree, labels=str(table), output=m, storage=runs, weights="random")
    cfg = named(cfg)
    assert preflight(cfg).table["added"] == 2
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    deny = {
        "Effect": "Deny",
        "Action": "s3:GetObject",
        "Resource": "arn:aws:s3:::insect-table-images/*",
    }
    _set_policy(s3_server, [allow, deny])
    try:
        with pytest.raises(StorageUnavailable, match=f"cannot read {images}/"):
            preflight(cfg)
    finally:
        _set_policy(s3_server, [allow])


def test_an_output_naming_an_object_or_under_one_is_refused(s3_server):
    """As a local output under a file is: the object and the prefix would share a name."""
    client = s3_server.client()
    client.create_bucket(Bucket="insect-objects")
    client.put_object(Bucket="insect-objects", Key="a/lone.jpg", Body=b"x")
    assert storage.folder_problem("s3://insect-objects/a/lone.jpg") == "is a file"
    assert storage.folder_problem("s3://insect-objects/a/lone.jpg/sub/out") == (
        "lies under s3://insect-objects/a/lone.jpg, which is a file"
    )
    assert storage.folder_problem("s3://insect-objects/a/other/out") is None


def test_denied_reads_stop_the_run_and_resume_finishes_it(
    s3_model, s3_data, s3_server, monkeypatch, capsys
):
    """Reads refused mid-bucket (credentials revoked, a policy change) are not recorded as
    the images' fate: the run fails with one line and no _SUCCESS, the rows written are
    kept, and --resume finishes once reading works again."""
    cfg, _ = s3_model
    out = f"s3://{BUCKET}/predictions-denied"
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    deny = {
        "Effect": "Deny",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/images/with space/*",
    }
    argv = ["classify", f"s3://{BUCKET}/images", "--model", cfg.output, "--output", out]
    argv += ["--batch-size", "4", "--rows-per-file", "4"]
    _set_policy(s3_server, [allow, deny])
    try:
        err = expect_cli_error(capsys, argv)
    finally:
        _set_policy(s3_server, [allow])
    assert f"cannot read s3://{BUCKET}/images/with space/photo one.jpg after 4 attempts" in err
    assert "--resume" in err
    fs, path = storage.filesystem(out)
    assert not fs.exists(f"{path}/_SUCCESS")
    # The failed run's model actors are gone: none waits on, holding its CPUs, for a
    # consumer that is gone (the --resume below, in this process, would wait forever).
    every_cpu = ray.cluster_resources()["CPU"]

    def every_cpu_free():
        wait_for(lambda: ray.available_resources().get("CPU") == every_cpu, 30, "the CPUs freed")

    every_cpu_free()
    from insectlib.cli.main import main

    assert main([*argv, "--resume"]) == 0
    every_cpu_free()
    err = capsys.readouterr().err  # the stopped actors' ends are not the user's business
    assert "Unhandled" not in err and "ActorDied" not in err and "Traceback" not in err, err
    table = pyarrow.dataset.dataset(path, filesystem=storage.pyarrow_filesystem(out)[0]).to_table()
    assert sorted(table.column("path").to_pylist()) == s3_data["images"]
    assert table.filter(pyarrow.compute.field("error").is_valid()).num_rows == 0


def test_s3_overwrite_removes_only_insects_objects(s3_model, s3_data, s3_server, capsys):
    cfg, _ = s3_model
    client = s3_server.client()
    out = f"s3://{BUCKET}/predictions-guarded"
    argv = ["classify", f"s3://{BUCKET}/images", "--model", cfg.output, "--output", out]
    from insectlib.cli.main import main

    assert main(argv) == 0
    client.put_object(Bucket=BUCKET, Key="predictions-guarded/README.md", Body=b"mine")
    err = expect_cli_error(capsys, [*argv, "--overwrite"])
    assert "holds files insect did not write (README.md)" in err
    client.delete_object(Bucket=BUCKET, Key="predictions-guarded/README.md")
    assert main([*argv, "--overwrite"]) == 0
    assert "is a bucket root" in expect_cli_error(
        capsys, [*argv[:-1], f"s3://{BUCKET}/", "--overwrite"]
    )
    err = expect_cli_error(
        capsys, [*argv[:-1], f"s3://{BUCKET}/models", "--overwrite"]
    )  # the model m1 lives under it
    assert "contains the model" in err
    assert read_meta(cfg.output).model_id  # still there


def test_denied_part_writes_stop_the_run_in_one_line_and_resume_finishes_it(
    s3_model, s3_data, s3_server, capsys
):
    """A part that cannot be written (a policy refusing it) is retried, then stops the run
    with one line naming the part, no _SUCCESS; --resume finishes once writing works."""
    cfg, _ = s3_model
    out = f"s3://{BUCKET}/predictions-unwritable"
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    deny = {
        "Effect": "Deny",
        "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/predictions-unwritable/part-*",
    }
    argv = ["classify", f"s3://{BUCKET}/images", "--model", cfg.output, "--output", out]
    _set_policy(s3_server, [allow, deny])
    try:
        err = expect_cli_error(capsys, argv)
    finally:
        _set_policy(s3_server, [allow])
    assert f"cannot write s3://{BUCKET}/predictions-unwritable/part-" in err
    assert "after 4 attempts" in err and "--resume" in err
    fs, path = storage.filesystem(out)
    assert not fs.exists(f"{path}/_SUCCESS")
    from insectlib.cli.main import main

    assert main([*argv, "--resume"]) == 0
    table = pyarrow.dataset.dataset(path, filesystem=storage.pyarrow_filesystem(out)[0]).to_table()
    assert sorted(table.column("path").to_pylist()) == s3_data["images"]
