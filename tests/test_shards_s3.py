"""Shards on S3 against a real HTTP S3 endpoint (moto's threaded server on 127.0.0.1)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from shards import cli  # noqa: E402
from shards.manifest import read_manifest, verify_shards  # noqa: E402
from shards.readers import InputError  # noqa: E402
from shards.storage import StorageError, register_webdataset_s3  # noqa: E402
from shards.writer import write_shards  # noqa: E402

BUCKET = "msa-shards"  # created by the s3_endpoint fixture (conftest)


def _corpus(root):
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        (images / f"{i}.jpg").write_bytes(buf.getvalue())
        records.append({"filename": f"{i}.jpg", "imgid": i, "split": "train" if i < 6 else "test",
                        "sentences": [{"raw": f"scene {i} view {j}"} for j in range(5)]})
    ann = root / "dataset_synth.json"
    ann.write_text(json.dumps({"images": records, "dataset": "synth"}))
    return ann, images


def test_first_write_in_worker_processes_on_s3(tmp_path, s3_endpoint):
    """Worker processes check and write in one pass straight to S3: the local set's digest; with a bad
    image (on_error="fail") the shards other drafts wrote are deleted again: no object is left."""
    ann, images = _corpus(tmp_path)
    opts = {"endpoint_url": s3_endpoint}
    local = write_shards(ann, images, str(tmp_path / "local"), shard_size=4, progress=False)
    uri = f"s3://{BUCKET}/corpora/pooled"
    m = write_shards(ann, images, uri, shard_size=4, workers=2, storage_options=opts, progress=False)
    assert m.digest == local.digest and len(m.shards()) >= 3 and verify_shards(uri, opts).ok

    (images / "7.jpg").write_bytes((images / "7.jpg").read_bytes()[:-10])  # test split: its draft comes last
    with pytest.raises(InputError, match="7.jpg: truncated JPEG"):
        write_shards(ann, images, f"s3://{BUCKET}/corpora/failed", shard_size=4, workers=2, storage_options=opts,
                     progress=False)
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="corpora/failed/")
    assert listed["KeyCount"] == 0


def test_write_verify_and_read_back_through_webdataset(tmp_path, s3_endpoint, capsys):
    import webdataset as wds

    ann, images = _corpus(tmp_path)
    opts = {"endpoint_url": s3_endpoint}
    uri = f"s3://{BUCKET}/corpora/synth"
    m = write_shards(ann, images, uri, shard_size=4, storage_options=opts, progress=False)
    assert m.uri == uri and not m.reused
    assert m.shard_urls("train") == [f"{uri}/{s.name}" for s in m.splits["train"].shards]
    assert len(m.splits["train"].shards) >= 2 and m.shard_urls("test") == [f"{uri}/test/test-000000.tar"]
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=BUCKET, Prefix="corpora/synth/")["Contents"]}
    assert keys == {"corpora/synth/manifest.json", "corpora/synth/sizes.json"} | {
        f"corpora/synth/{s.name}" for s in m.shards()}

    # same digest as a local run: the store does not change the bytes
    local = write_shards(ann, images, str(tmp_path / "local"), shard_size=4, progress=False)
    assert local.digest == m.digest

    rep = verify_shards(uri, opts)
    assert rep.ok and rep.checked == len(m.shards()), rep.problems
    assert read_manifest(uri, opts).digest == m.digest
    again = write_shards(ann, images, uri, shard_size=4, storage_options=opts, progress=False)
    assert again.reused

    register_webdataset_s3(opts)
    got = {s["__key__"]: json.loads(s["json"])["captions"]
           for s in wds.WebDataset(m.shard_urls("train") + m.shard_urls("test"), shardshuffle=False)}
    assert sorted(got) == sorted(f"synth_{i}" for i in range(8))
    assert got["synth_3"][0] == "scene 3 view 0"

    # the CLI with --endpoint-url; the test shard is kept, the training shards merge into one (stale ones go)
    assert cli.main(["shard", str(ann), "--images", str(images), "--out", uri, "--shard-size", "10",
                     "--endpoint-url", s3_endpoint, "--no-progress"]) == 0
    assert cli.main(["shard", "verify", uri, "--endpoint-url", s3_endpoint]) == 0
    out = capsys.readouterr()
    assert "testing-secret-0123" not in out.out + out.err
    rep = verify_shards(uri, opts)
    assert rep.ok and rep.checked == 2 and not rep.extra
    assert read_manifest(uri, opts).reused_shards == ["test/test-000000.tar"]

    # corruption is detected remotely too
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=BUCKET, Key="corpora/synth/train/train-000000.tar", Body=b"\0" * 10240)
    rep = verify_shards(uri, opts)
    assert not rep.ok and rep.corrupt == ["train/train-000000.tar"]


def test_endpoint_from_environment_and_storage_errors(tmp_path, s3_endpoint, monkeypatch):
    ann, images = _corpus(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    m = write_shards(ann, images, f"s3://{BUCKET}/env", shard_size=100, progress=False)
    assert verify_shards(f"s3://{BUCKET}/env").ok and m.digest
    with pytest.raises(StorageError):
        write_shards(ann, images, "s3://no-such-bucket/x", progress=False)
    assert cli.main(["shard", str(ann), "--images", str(images), "--out", "s3://no-such-bucket/x",
                     "--no-progress"]) == 3


def test_download_restarts_after_a_connection_reset_mid_file(tmp_path, s3_endpoint, monkeypatch):
    """Store.download: a connection reset after part of the object was copied restarts the copy from the first
    byte (the file is rewritten, not appended to), as the warning says, and returns the whole file's digest."""
    import hashlib

    from shards import storage
    from shards.storage import Store

    data = np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 5, dtype=np.uint8).tobytes()
    store = Store(f"s3://{BUCKET}/blobs", {"endpoint_url": s3_endpoint})
    store.write_bytes("blob.bin", data)
    real_open, opened = store.fs.open, []

    def open_and_reset_once(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        opened.append(path)
        if len(opened) > 1:
            return f
        read = f.read

        def read_then_reset(n=-1):
            if f.tell() >= (1 << 20):
                raise ConnectionResetError(104, "Connection reset by peer")
            return read(n)

        f.read = read_then_reset
        return f

    monkeypatch.setattr(store.fs, "open", open_and_reset_once)
    warnings: list[str] = []
    monkeypatch.setattr(storage.log, "warning", lambda msg, *args: warnings.append(msg % args))
    dest = tmp_path / "blob.bin"
    assert store.download("blob.bin", dest) == (hashlib.sha256(data).hexdigest(), len(data))
    assert dest.read_bytes() == data and len(opened) == 2
    assert len(warnings) == 1 and "blob.bin" in warnings[0] and "retrying in" in warnings[0], warnings
    assert store.download("absent.bin", tmp_path / "absent.bin") is None and not (tmp_path / "absent.bin").exists()
