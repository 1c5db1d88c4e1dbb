"""``msa weights fetch`` and ``materialize_weights``: hub weights staged once, read on every node, checked.

No hub is reachable here, so a reachable hub is simulated by a populated hub cache in the exact layout
huggingface_hub uses (``models--ORG--NAME/snapshots/<40-hex commit>/FILES`` and ``refs/main``), holding
randomly initialised weights saved by timm and transformers under the names the test config asks for:
resnet10t's timm hub id and a tiny BERT as ``msa-test/tiny-bert``. Fetches run their real code path with
``from_cache`` (``--from-cache``), i.e. with huggingface_hub's offline flag on for the simulated hub only,
so nothing waits on a network that does not exist; everything after the hub lookup is the online path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from flows import cli
from msa.checkpoint import save_checkpoint
from msa.config import resolve_config
from msa.encoders import build_towers
from msa.model import MSAModel
from msa.pretrained import WeightsUnavailableError, minilm_path
from msa.runtime import weights
from msa.runtime.resolver import resolve_model
from msa.runtime.weights import MANIFEST, NothingToFetchError, fetch, materialize_weights

BUCKET = "msa-shards"  # created by the s3_endpoint fixture (conftest)
IMAGE_REPO = "timm/resnet10t.c3_in1k"  # what timm.create_model("resnet10t", pretrained=True) asks the hub for
TEXT_REPO = "msa-test/tiny-bert"
# The small preset with both towers taken from the (simulated) hub.
SETS = ["image.weights=hub", f"text.model={TEXT_REPO}", "text.weights=pretrained", "text.config_overrides={}"]


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def _cache_entry(cache: Path, repo: str) -> Path:
    """An empty snapshot folder of ``repo`` that refs/main points at."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(_commit(repo))
    snapshot = folder / "snapshots" / _commit(repo)
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """The simulated hub: its cache folder and the tensors it serves (image: timm full model; text: BertModel)."""
    import timm
    from transformers import AutoTokenizer, BertConfig, BertModel

    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    image = timm.create_model("resnet10t").state_dict()
    safetensors.torch.save_file(image, str(_cache_entry(cache, IMAGE_REPO) / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, num_hidden_layers=2, hidden_size=128,
                                num_attention_heads=2, intermediate_size=256))
    snapshot = _cache_entry(cache, TEXT_REPO)
    bert.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    return {"cache": str(cache), "image": image, "text": bert.state_dict()}


@pytest.fixture
def run_cli(monkeypatch, tmp_path, capfd):
    """``msa ...`` in this process (its environment defaults set beforehand, so nothing leaks): (rc, out, err)."""
    for key, value in {**cli._CLI_ENV, "PREFECT_HOME": str(tmp_path / "prefect")}.items():
        monkeypatch.setenv(key, os.environ.get(key, value))

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(list(argv))
        captured = capfd.readouterr()
        return rc, captured.out, captured.err

    return run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_cached_weights(cfg, hub: dict) -> None:
    """Towers built from ``cfg`` hold exactly the hub's tensors."""
    text, image = build_towers(cfg)
    backbone = image.backbone.state_dict()
    assert backbone and all(torch.equal(tensor, hub["image"][key]) for key, tensor in backbone.items())
    transformer = text.transformer.state_dict()
    assert transformer.keys() == {k for k in hub["text"] if not k.startswith("pooler.")}
    assert all(torch.equal(tensor, hub["text"][key]) for key, tensor in transformer.items())


def test_fetch_to_a_directory_writes_checked_files_and_manifest_last(hub, tmp_path, run_cli) -> None:
    dest = tmp_path / "bundle"
    sets = [arg for value in SETS for arg in ("--set", value)]
    rc, out, err = run_cli("weights", "fetch", "small", "--to", str(dest), *sets, "--hub-cache", hub["cache"],
                           "--from-cache", "--json")
    assert rc == 0, err
    bundle = json.loads(out)  # --json: stdout holds the JSON alone
    assert bundle["overrides"] == {"image.weights": str(dest / "image.safetensors"), "text.model": str(dest / "text")}

    manifest_path = dest / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    written = {p.relative_to(dest).as_posix(): p for p in dest.rglob("*") if p.is_file() and p != manifest_path}
    assert set(manifest["files"]) == set(written) == set(bundle["files"])
    assert {"image.safetensors", "text/config.json", "text/model.safetensors", "text/tokenizer.json"} <= set(written)
    for name, path in written.items():
        assert manifest["files"][name] == {"sha256": _sha256(path), "size": path.stat().st_size}, name
    assert manifest_path.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in written.values())
    assert manifest["overrides"] == bundle["overrides"] and manifest["preset"] == "small"
    assert manifest["sources"]["image"]["hf_hub_id"] == IMAGE_REPO
    assert manifest["sources"]["image"]["revision"] == _commit(IMAGE_REPO)
    assert manifest["sources"]["text"]["revision"] == _commit(TEXT_REPO)
    assert {"torch", "timm", "transformers"} <= set(manifest["versions"])

    cfg = resolve_config("small", SETS + [f"{k}={v}" for k, v in bundle["overrides"].items()])
    _assert_cached_weights(cfg, hub)


def test_s3_bundle_is_copied_once_per_node_and_checked(hub, tmp_path, s3_endpoint, monkeypatch) -> None:
    options = {"endpoint_url": s3_endpoint}
    uri = f"s3://{BUCKET}/weights/small"
    bundle = fetch("small", uri, options, SETS, hub_cache=hub["cache"], from_cache=True)
    assert bundle.overrides == {"image.weights": f"{uri}/image.safetensors", "text.model": f"{uri}/text"}
    cfg = resolve_config("small", SETS + bundle.override_args())  # s3:// URIs are valid config values
    assert cfg.image.weights == f"{uri}/image.safetensors"

    cache = tmp_path / "node-cache"
    local = materialize_weights(cfg, options, cache_dir=cache)
    image, text = Path(local.image.weights), Path(local.text.model)
    assert image.is_relative_to(cache) and text.is_relative_to(cache) and local.text.tokenizer is None
    assert _sha256(image) == bundle.files["image.safetensors"]["sha256"]
    assert {p.name for p in text.iterdir()} == {n.split("/", 1)[1] for n in bundle.files if n.startswith("text/")}
    _assert_cached_weights(local, hub)

    # Training builds from the node's copies but checkpoints record the shared URIs (fit's checkpoint_config); the
    # resolver rebuilds such a checkpoint on any node, copying the text model there (MSA_HOME/weights: here tmp).
    monkeypatch.setattr(weights, "LOCAL_STATE", tmp_path / "msa-home")
    model = MSAModel(local)
    save_checkpoint(tmp_path / "checkpoint", model=model, optimizer=None, epoch=0, cfg=cfg, dataset_digest="d",
                    metrics={}, history=[])
    loaded = resolve_model(tmp_path / "checkpoint", "cpu", storage_options=options)
    assert loaded.cfg == cfg and loaded.cfg.text.model == f"{uri}/text"
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in loaded.model.state_dict().items())
    assert loaded.encode_texts(["a river through farmland"])[0].shape == (1, 128)
    assert list((tmp_path / "msa-home" / "weights").glob("*/text/config.json"))

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket=BUCKET, Key="weights/small/image.safetensors", Body=b"corrupt" * 100)
    # The node's copy is reused, not downloaded again: the corrupt object is never read.
    again = materialize_weights(cfg, options, cache_dir=cache)
    assert again == local and _sha256(image) == bundle.files["image.safetensors"]["sha256"]
    # A fresh node downloads, checks, and refuses the corrupt file by name; nothing half-written is left.
    fresh = tmp_path / "fresh-node"
    with pytest.raises(WeightsUnavailableError, match=rf"{uri}/image\.safetensors: sha256 .* {MANIFEST}"):
        materialize_weights(cfg, options, cache_dir=fresh)
    assert not [p for p in fresh.iterdir() if p.is_dir()]

    orphan = resolve_config("small", [f"image.weights=s3://{BUCKET}/elsewhere/image.safetensors"])
    with pytest.raises(WeightsUnavailableError, match=rf"no {MANIFEST} at s3://{BUCKET}/elsewhere/{MANIFEST}"):
        materialize_weights(orphan, options, cache_dir=fresh)


def test_s3_weights_download_is_retried_through_an_outage(hub, tmp_path, s3_endpoint, monkeypatch) -> None:
    """The endpoint goes down for 6 s as a fresh node starts downloading the bundle's files: the node still ends
    with checked copies (botocore's retries, then Store.download's: which of them bridges the gap depends on
    timing; the restart itself is tested in tests/test_shards_s3.py)."""
    from urllib.parse import urlsplit

    from s3proxy import FlakyProxy

    from shards.storage import Store

    uri = f"s3://{BUCKET}/weights/small"
    bundle = fetch("small", uri, {"endpoint_url": s3_endpoint}, SETS, hub_cache=hub["cache"], from_cache=True)
    cfg = resolve_config("small", SETS + bundle.override_args())
    target = urlsplit(s3_endpoint)
    with FlakyProxy(target.hostname, target.port) as proxy:
        download, outages = Store.download, []

        def down_at_first_download(self, name, dest):
            if not outages:
                outages.append(proxy.outage(6.0))
            return download(self, name, dest)

        monkeypatch.setattr(Store, "download", down_at_first_download)
        local = materialize_weights(cfg, {"endpoint_url": proxy.endpoint_url}, cache_dir=tmp_path / "node")
        assert proxy.refused > 0
    assert _sha256(Path(local.image.weights)) == bundle.files["image.safetensors"]["sha256"]
    _assert_cached_weights(local, hub)


def test_nothing_to_fetch_and_clip_files(hub, tmp_path, run_cli) -> None:
    dest = tmp_path / "bundle"
    with pytest.raises(NothingToFetchError, match="preset 'small': nothing to fetch"):
        fetch("small", str(dest))
    rc, out, err = run_cli("weights", "fetch", "pretrained-lite", "--to", str(dest))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "nothing to fetch" in err
    rc, _, err = run_cli("weights", "fetch", "clip-vit-b32", "--to", str(dest))
    assert rc == 2 and "--clip-checkpoint" in err and "RemoteCLIP" in err
    assert not dest.exists()

    # A hub that lacks the weights: exit 3, one line naming the backbone.
    rc, _, err = run_cli("weights", "fetch", "paper", "--to", str(dest), "--hub-cache", str(tmp_path / "empty"),
                         "--from-cache")
    assert rc == 3 and "image backbone 'resnet50.tv_in1k'" in err and len(err.strip().splitlines()) == 1
    assert not (dest / MANIFEST).exists()

    checkpoint = tmp_path / "RS5M_ViT-B-32.pt"
    checkpoint.write_bytes(os.urandom(4096))
    bundle = fetch("clip-vit-b32", str(dest), clip_checkpoint=str(checkpoint))
    assert bundle.overrides == {"clip.checkpoint": str(dest / "clip.pt")}
    assert (dest / "clip.pt").read_bytes() == checkpoint.read_bytes()
    assert json.loads((dest / MANIFEST).read_text())["files"] == {
        "clip.pt": {"sha256": _sha256(checkpoint), "size": 4096}}
