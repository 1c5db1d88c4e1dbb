"""Joint training on several shard sets: the ``data_uri`` mix syntax, its digest, the mixed pair stream,
per-corpus metrics, and (slow) one run through the train-msa flow with a tiny CLIP-architecture model."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from msa.data import ImageTransform, PairBatches, PairSource, iterate_samples, pair_loader
from msa.encoders import build_tokenizer
from msa.metrics import named_recalls
from msa.runtime.datasets import Corpus, DataMix, absolute_uri, verify_dataset
from shards.manifest import read_manifest
from shards.writer import write_shards


def test_a_plain_uri_is_one_unnamed_shard_set():
    for uri in ("/data/rsitmd", "s3://bucket/rs=icd/shards", "file:///x/y"):
        mix = DataMix.parse(uri)
        assert mix.corpora == (Corpus("", uri),) and not mix.joint and str(mix) == uri


def test_a_mix_names_uris_and_weights():
    mix = DataMix.parse("rsicd=s3://b/rsicd@0.5, rsitmd=/data/rsitmd,ucm=/data/u@x@2")
    assert mix.joint
    assert mix.corpora == (Corpus("rsicd", "s3://b/rsicd", 0.5), Corpus("rsitmd", "/data/rsitmd", 1.0),
                           Corpus("ucm", "/data/u@x", 2.0))
    assert DataMix.parse(str(mix)) == mix


@pytest.mark.parametrize("text, problem", [
    ("rsicd=/a,rsicd=/b", "unique"),
    ("RSICD=/a,b=/c", "NAME=URI"),
    ("a=/x,/y", "NAME=URI"),
    ("a=/x@0,b=/y", "must be > 0"),
    ("a=,b=/y", "has no URI"),
])
def test_bad_mixes_are_refused_naming_the_part(text, problem):
    with pytest.raises(ValueError, match=problem):
        DataMix.parse(text)


def test_a_mix_digest_hashes_member_digests_names_and_weights():
    one = DataMix.parse("/x")
    assert one.digest(["d" * 64]) == "d" * 64  # a single shard set keeps its manifest's digest
    mix = DataMix.parse("a=/x,b=/y")
    base = mix.digest(["1" * 64, "2" * 64])
    assert len(base) == 64 and base == mix.digest(["1" * 64, "2" * 64])
    assert base != mix.digest(["1" * 64, "3" * 64])
    assert base != DataMix.parse("a=/x,b=/y@2").digest(["1" * 64, "2" * 64])
    assert base != DataMix.parse("a=/x,c=/y").digest(["1" * 64, "2" * 64])
    assert base == DataMix.parse("a=/elsewhere,b=s3://k/y").digest(["1" * 64, "2" * 64])  # where does not count


def test_absolute_uri_keeps_names_and_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("a=rel/x@2,b=s3://k/y") == f"a={tmp_path}/rel/x@2,b=s3://k/y@1"
    assert absolute_uri("rel/x") == f"{tmp_path}/rel/x"


def test_named_recalls_prefix_per_corpus_and_average():
    single = named_recalls("val", {"": {"mR": 30.0, "i2t_R1": 10.0}})
    assert single == {"val_mR": 30.0, "val_i2t_R1": 10.0}
    joint = named_recalls("test", {"a": {"mR": 30.0, "chance_mR": 2.0}, "b": {"mR": 50.0, "chance_mR": 4.0}})
    assert joint == {"test_a_mR": 30.0, "test_a_chance_mR": 2.0, "test_b_mR": 50.0, "test_b_chance_mR": 4.0,
                     "test_mR": 40.0, "test_chance_mR": 3.0}
    assert named_recalls("", {"a": {"mR": 1.0}, "b": {"mR": 3.0}})["mR"] == 2.0


@pytest.fixture(scope="module")
def two_shard_sets(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    """The tiny corpus sharded under two corpus names: the same pictures, disjoint sample keys."""
    annotations, images = tiny_corpus
    root = tmp_path_factory.mktemp("joint")
    out = {}
    for name in ("alpha", "beta"):
        out[name] = str(root / name)
        write_shards(annotations, images, out[name], corpus=name, shard_size=16, progress=False)
    return out


def _image_ids(uri: str) -> set[int]:
    keys = [s.key for s in iterate_samples(read_manifest(uri).shard_urls("train"))]
    return {int.from_bytes(hashlib.sha1(k.encode()).digest()[:7], "big") for k in keys}


def test_the_mixed_stream_draws_pairs_by_share(two_shard_sets):
    ids = {name: _image_ids(uri) for name, uri in two_shard_sets.items()}
    assert not ids["alpha"] & ids["beta"]
    sources = [PairSource(tuple(read_manifest(two_shard_sets["alpha"]).shard_urls("train")), share=1.0),
               PairSource(tuple(read_manifest(two_shard_sets["beta"]).shard_urls("train")), share=3.0)]
    dataset = PairBatches(sources=sources, transform=ImageTransform(32), max_tokens=16, batch_size=16,
                          tokenizer=build_tokenizer("packaged:all-minilm-l6-v2"), steps_per_epoch=40, seed=2)
    # two loader workers: each reads its share of both corpora's shards and mixes them itself
    seen = Counter()
    for batch in pair_loader(dataset, 2):
        for image_id in batch["image_ids"].tolist():
            seen["alpha" if image_id in ids["alpha"] else "beta" if image_id in ids["beta"] else "?"] += 1
    assert seen["?"] == 0 and sum(seen.values()) == 640
    assert 0.68 < seen["beta"] / 640 < 0.82  # share 3 of 4: 0.75 (binomial sd 0.017)
    with pytest.raises(ValueError, match="not both"):
        PairBatches(["x"], sources=sources, transform=ImageTransform(32), tokenizer=None, max_tokens=8,
                    batch_size=4, steps_per_epoch=1)


def test_verify_dataset_of_a_mix_verifies_every_member(two_shard_sets, tmp_path):
    mix = f"alpha={two_shard_sets['alpha']},beta={two_shard_sets['beta']}@2"
    digests = [read_manifest(uri).digest for uri in two_shard_sets.values()]
    assert verify_dataset(mix) == DataMix.parse(mix).digest(digests)
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'}.*no manifest"):
        verify_dataset(f"alpha={two_shard_sets['alpha']},gamma={tmp_path / 'missing'}")


TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory) -> dict[str, str]:
    """Two synthetic corpora (different seeds: different pictures and captions), sharded."""
    from shards.synth import generate_corpus

    root = tmp_path_factory.mktemp("two-corpora")
    out = {}
    for seed, name in enumerate(("north", "south")):
        annotations = generate_corpus(root / name, splits={"train": 150, "val": 40, "test": 100}, image_size=32,
                                      seed=10 + seed)
        out[name] = str(root / f"{name}-shards")
        write_shards(annotations, root / name / "images", out[name], corpus=name, shard_size=50, progress=False)
    return out


@pytest.mark.slow
def test_joint_training_of_a_tiny_clip_msa_through_the_train_flow(two_corpora, mlflow_server, prefect_stack,
                                                                   ray_cluster):
    """A CLIP-architecture MSA (tiny widths, random init) trains on a mix of two corpora through train-msa:
    validation and test recall per corpus, their mean as the run's figures, each corpus well above chance,
    and the registered version cites the mix's digest."""
    from mlflow.tracking import MlflowClient

    from flows.train_msa import train_msa
    from msa.metrics import RECALL_KEYS

    mix = f"north={two_corpora['north']},south={two_corpora['south']}@1"
    overrides = {"clip.model_cfg": TINY_CLIP, "clip.random_init": True, "clip.scales": 2, "image.size": 32,
                 "text.max_tokens": 32, "mscmat.num_heads": 4, "loss.triplet_negatives": "all",
                 "optim.lr": 5e-4, "optim.weight_decay": 0.01, "train.batch_size": 32, "train.loader_workers": 0}
    result = train_msa(data_uri=mix, preset="clip-vit-b32", overrides=overrides, epochs=3, workers=1,
                       mlflow_uri=mlflow_server, run_name="joint-tiny-clip")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    metrics = run.data.metrics
    for name in ("north", "south"):
        for key in RECALL_KEYS:
            assert f"val_{name}_{key}" in metrics and f"test_{name}_{key}" in metrics
        assert metrics[f"test_{name}_mR"] >= 3 * metrics[f"test_{name}_chance_mR"], (name, metrics)
    for key in RECALL_KEYS:
        mean = (metrics[f"test_north_{key}"] + metrics[f"test_south_{key}"]) / 2
        assert metrics[f"test_{key}"] == pytest.approx(mean)
    history = client.get_metric_history(run.info.run_id, "val_mR")
    assert len(history) == 3
    digest = verify_dataset(mix)
    assert run.data.tags["dataset_digest"] == digest
    version = client.get_model_version("msa-retrieval", result["model_version"])
    assert version.tags["dataset_digest"] == digest
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/recall_curves_north.png", "figures/recall_curves_south.png"} <= artifacts
