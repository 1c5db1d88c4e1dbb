"""msa.retrieval: index building, cosine search, MSCMAT re-ranking, recall protocol, errors; the
``msa index`` / ``msa search`` commands of flows.cli_retrieval."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
                     "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

from msa import retrieval as R  # noqa: E402
from msa.config import resolve_config  # noqa: E402
from msa.data import iterate_samples  # noqa: E402
from msa.encoders import tokenize  # noqa: E402
from msa.metrics import recall_at_k  # noqa: E402
from msa.model import MSAModel  # noqa: E402
from msa.checkpoint import save_checkpoint  # noqa: E402

N_IMAGES = 16
SIZE = 32
# Index vectors are stored float16: stored vs directly computed values agree to float16 rounding, and
# scores computed from them to about 1e-4.
FP16 = dict(atol=1e-4, rtol=2**-10)
SCORE_ABS = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(directory: Path, seed: int, overrides=()) -> Path:
    cfg = resolve_config("small", [f"image.size={SIZE}", *overrides])
    torch.manual_seed(seed)
    save_checkpoint(directory, model=MSAModel(cfg), optimizer=None, epoch=0, cfg=cfg,
                    dataset_digest="0" * 64, metrics={}, history=[])
    return directory


def test_remote_checkpoint_is_checked_against_its_manifest(tmp_path, s3_endpoint):
    """An s3:// checkpoint directory is fetched with its manifest: a byte flipped in a tensor (same size) is
    refused naming the remote directory, as it is for a local one, instead of loading silently."""
    import s3fs

    from msa.checkpoint import CorruptCheckpointError

    local = _checkpoint(tmp_path / "ckpt", seed=0)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for f in local.iterdir():
        fs.put_file(str(f), f"msa-shards/runs/ckpt/{f.name}")
    opts, uri = {"endpoint_url": s3_endpoint}, "s3://msa-shards/runs/ckpt"
    assert R.resolve_model(uri, device="cpu", storage_options=opts).checkpoint_epoch == 0
    data = bytearray((local / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 1
    fs.pipe_file("msa-shards/runs/ckpt/checkpoint.pt", bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"^{uri}: checkpoint.pt does not match its recorded sha256"):
        R.resolve_model(uri, device="cpu", storage_options=opts)
    fs.put_file(str(local / "checkpoint.pt"), "msa-shards/runs/ckpt/checkpoint.pt")
    fs.rm_file("msa-shards/runs/ckpt/history.json")  # a file the manifest lists, gone: named, not skipped
    with pytest.raises(CorruptCheckpointError, match=rf"^{uri}: history.json is missing"):
        R.resolve_model(uri, device="cpu", storage_options=opts)
    with pytest.raises(FileNotFoundError, match=r"^s3://msa-shards/runs/nothing: no MSA checkpoint here"):
        R.resolve_model("s3://msa-shards/runs/nothing", device="cpu", storage_options=opts)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16-image synthetic test split, a random small model, and its index (built once)."""
    from shards.synth import generate_corpus
    from shards.writer import write_shards

    root = tmp_path_factory.mktemp("retrieval")
    ann = generate_corpus(root / "corpus", splits={"train": 2, "test": N_IMAGES}, image_size=SIZE)
    manifest = write_shards(ann, root / "corpus" / "images", str(root / "shards"), progress=False)
    checkpoint = _checkpoint(root / "checkpoint", seed=0)
    index_dir = R.build_index(str(checkpoint), str(root / "shards"), root / "index", batch_size=8)
    model = R.resolve_model(checkpoint, device="cpu")
    samples = list(iterate_samples(manifest.shard_urls("test")))
    with torch.no_grad():
        pixels = torch.stack([model.transform(s.image) for s in samples])
        image_emb, scales = model.model.encode_image(pixels)
    image_file = root / "corpus" / "images" / f"{samples[3].key.split('_', 1)[1]}.jpg"
    assert image_file.is_file()
    return {
        "root": root,
        "shards": str(root / "shards"),
        "manifest": manifest,
        "checkpoint": checkpoint,
        "index_dir": index_dir,
        "index": R.Index.load(index_dir),
        "model": model,
        "samples": samples,
        "image_emb": image_emb,
        "scales": scales,
        "image_file": image_file,
    }


def _f32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _text(model: R.ResolvedModel, captions: list[str]):
    ids, mask = tokenize(model.tokenizer, captions, model.cfg.text.max_tokens)
    with torch.no_grad():
        cls, tokens = model.model.encode_text(ids, mask)
    return cls, tokens


def _direct_mscmat(model: R.ResolvedModel, scales, tokens, cls) -> torch.Tensor:
    with torch.no_grad():
        return model.model.mscmat(scales, tokens, cls).mean(0)


# ------------------------------------------------------------------------------------ build / load


def test_build_index_writes_every_file_and_meta(world):
    directory, manifest, index = world["index_dir"], world["manifest"], world["index"]
    expected = {R.META_FILE, R.IMAGE_EMB_FILE, R.TEXT_EMB_FILE, R.CAPTION_IMAGE_FILE, R.IMAGE_KEYS_FILE,
                R.CAPTIONS_FILE, *(R.scale_file(k) for k in range(4))}
    assert {p.name for p in directory.iterdir()} == expected
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".index.")]  # no temp dirs left
    meta = json.loads((directory / R.META_FILE).read_text())
    assert meta["model"]["source"] == str(world["checkpoint"])
    assert meta["model"]["resolved"] == str(world["checkpoint"].resolve())
    assert meta["model"]["registry"] is None
    assert meta["data"] == {"uri": world["shards"], "split": "test", "dataset_digest": manifest.digest,
                            "corpus": "synth"}
    n_captions = manifest.splits["test"].captions
    assert meta["counts"] == {"images": N_IMAGES, "captions": n_captions}
    assert meta["dims"] == {"embed": 128, "scales": list(world["model"].scale_dims)}
    assert meta["created"].endswith("+00:00")

    assert index.image_emb.shape == (N_IMAGES, 128) and index.image_emb.dtype == np.float16
    assert index.text_emb.shape == (n_captions, 128)
    assert index.image_keys == [s.key for s in world["samples"]]
    assert index.captions == [c for s in world["samples"] for c in s.captions]
    assert index.caption_image.tolist() == [i for i, s in enumerate(world["samples"]) for _ in s.captions]
    torch.testing.assert_close(_f32(index.image_emb), world["image_emb"], **FP16)
    for stored, direct in zip(index.image_scales, world["scales"]):
        torch.testing.assert_close(_f32(stored), direct, **FP16)
    cls, _ = _text(world["model"], index.captions)
    torch.testing.assert_close(_f32(index.text_emb), cls, **FP16)


def test_index_matches_the_evaluation_embedding(world):
    from msa.evaluate import embed_split

    model = world["model"]
    split = embed_split(model.model, world["manifest"].shard_urls("test"), transform=model.transform,
                        tokenizer=model.tokenizer, max_tokens=model.cfg.text.max_tokens, batch_size=8)
    index = world["index"]
    torch.testing.assert_close(_f32(index.image_emb), split.image_emb, **FP16)
    torch.testing.assert_close(_f32(index.text_emb), split.text_emb, **FP16)
    assert index.caption_image.tolist() == split.caption_image.tolist()


def test_rebuild_replaces_atomically_and_refuses_foreign_directories(world, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    shutil.copytree(world["index_dir"], out)
    before = (out / R.META_FILE).read_text()
    real_open, calls = np.lib.format.open_memmap, []

    def failing_open(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", failing_open)
    with pytest.raises(OSError, match="disk full"):
        R.build_index(world["model"], world["shards"], out)
    monkeypatch.undo()
    assert (out / R.META_FILE).read_text() == before  # the old index is untouched
    assert R.Index.load(out).num_images == N_IMAGES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # temp dir cleaned up

    R.build_index(world["model"], world["shards"], out)  # replacing an index is fine
    assert json.loads((out / R.META_FILE).read_text())["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not an msa index"):
        R.build_index(world["model"], world["shards"], foreign)
    assert (foreign / "holiday.jpg").exists()
    with pytest.raises(ValueError, match="no 'val' split"):
        R.build_index(world["model"], world["shards"], tmp_path / "v", split="val")


# ------------------------------------------------------------------------------------------ search


def test_search_text_sorted_k_and_direct_cosines(world):
    index, model = world["index"], world["model"]
    query = "a river crosses green farmland"
    hits = R.search_text(index, model, query, k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    cls, _ = _text(model, [query])
    direct = (world["image_emb"] / world["image_emb"].norm(dim=1, keepdim=True)) @ cls[0]
    for hit in hits:
        assert hit.image_key == index.image_keys[hit.image_index]
        assert hit.score == pytest.approx(float(direct[hit.image_index]), abs=SCORE_ABS)
        assert hit.cosine == hit.score and hit.mscmat is None and hit.caption is None
    assert [h.image_index for h in hits] == direct.topk(5).indices.tolist()
    assert len(R.search_text(index, model, query, k=100)) == N_IMAGES


def test_corpus_caption_query_top_hit_is_direct_argmax(world):
    index, model = world["index"], world["model"]
    direct_images = world["image_emb"] / world["image_emb"].norm(dim=1, keepdim=True)
    for j in (0, 17, len(index.captions) - 1):
        caption = index.captions[j]
        cls, _ = _text(model, [caption])
        top = R.search_text(index, model, caption, k=1)[0]
        assert top.image_index == int((direct_images @ cls[0]).argmax())


def test_search_image_returns_captions_with_their_image(world):
    index, model = world["index"], world["model"]
    hits = R.search_image(index, model, world["image_file"], k=7)
    assert len(hits) == 7 and [h.rank for h in hits] == list(range(1, 8))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    query_emb = world["image_emb"][3] / world["image_emb"][3].norm()
    cls, _ = _text(model, index.captions)
    direct = cls @ query_emb
    # Ranked as the stored (float16) caption embeddings rank; float16 rounding may swap near-ties of direct.
    assert [h.caption_index for h in hits] == (_f32(index.text_emb) @ query_emb).topk(7).indices.tolist()
    for hit in hits:
        assert hit.caption == index.captions[hit.caption_index]
        assert hit.image_key == index.image_keys[int(index.caption_image[hit.caption_index])]
        assert hit.score == pytest.approx(float(direct[hit.caption_index]), abs=SCORE_ABS)
    with pytest.raises(FileNotFoundError, match="no-such.jpg"):
        R.search_image(index, model, world["root"] / "no-such.jpg")


@pytest.mark.parametrize("mode", ["mscmat", "blend"])
def test_text_rerank_permutes_only_the_top_r_with_mscmat_scores(world, mode):
    index, model = world["index"], world["model"]
    query, top = index.captions[12], 8
    cosine = R.search_text(index, model, query, k=top)
    hits = R.search_text(index, model, query, k=top, rerank=top, rerank_mode=mode, rerank_weight=2.0)
    assert {h.image_key for h in hits} == {h.image_key for h in cosine}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    cls, tokens = _text(model, [query])
    idx = [h.image_index for h in hits]
    direct = _direct_mscmat(model, [s[idx] for s in world["scales"]], tokens, cls)[:, 0]
    for hit, ms in zip(hits, direct.tolist()):
        assert hit.mscmat == pytest.approx(ms, abs=SCORE_ABS)
        assert hit.cosine == pytest.approx(next(c.cosine for c in cosine if c.image_index == hit.image_index))
        expected = ms if mode == "mscmat" else hit.cosine + 2.0 * ms
        assert hit.score == pytest.approx(expected, abs=SCORE_ABS)
    # k < R: the first k of the re-ranked top R.
    head = R.search_text(index, model, query, k=3, rerank=top, rerank_mode=mode, rerank_weight=2.0)
    assert [h.image_key for h in head] == [h.image_key for h in hits[:3]]


class _RowReader:
    """A stored scale-vector array that records the rows read from it."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, []

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __getitem__(self, rows):
        self.reads.append(rows.tolist() if isinstance(rows, np.ndarray) else rows)
        return self.array[rows]


def test_text_rerank_reads_only_the_top_r_scale_rows(world):
    import dataclasses

    index, model = world["index"], world["model"]
    query, top = index.captions[12], 5
    recording = dataclasses.replace(index, image_scales=[_RowReader(s) for s in index.image_scales])
    hits = R.search_text(recording, model, query, k=3, rerank=top)
    candidates = [h.image_index for h in R.search_text(index, model, query, k=top)]
    assert [reader.reads for reader in recording.image_scales] == [[candidates]] * len(index.image_scales)
    assert [h.image_key for h in hits] == [h.image_key for h in R.search_text(index, model, query, k=3, rerank=top)]
    R.search_text(recording, model, query, k=3)
    assert all(len(reader.reads) == 1 for reader in recording.image_scales)  # no re-rank, no scale rows read


def test_image_rerank_permutes_only_the_top_r_with_mscmat_scores(world):
    index, model = world["index"], world["model"]
    top = 10
    cosine = R.search_image(index, model, world["image_file"], k=top)
    hits = R.search_image(index, model, world["image_file"], k=top, rerank=top, rerank_mode="mscmat")
    assert {h.caption_index for h in hits} == {h.caption_index for h in cosine}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    cls, tokens = _text(model, [h.caption for h in hits])
    direct = _direct_mscmat(model, [s[3:4] for s in world["scales"]], tokens, cls)[0]
    assert [h.mscmat for h in hits] == pytest.approx(direct.tolist(), abs=SCORE_ABS)
    assert [h.score for h in hits] == [h.mscmat for h in hits]


def test_mscmat_matrix_matches_the_model(world):
    index, model = world["index"], world["model"]
    matrix = R.mscmat_matrix(index, model, caption_batch=7)
    cls, tokens = _text(model, index.captions)
    torch.testing.assert_close(matrix, _direct_mscmat(model, world["scales"], tokens, cls), atol=SCORE_ABS, rtol=0)


def test_search_arguments_are_validated(world):
    index, model = world["index"], world["model"]
    with pytest.raises(ValueError, match="empty"):
        R.search_text(index, model, "  ")
    with pytest.raises(ValueError, match="k must be"):
        R.search_text(index, model, "fields", k=0)
    with pytest.raises(ValueError, match="rerank_mode"):
        R.search_text(index, model, "fields", rerank=5, rerank_mode="magic")


# ------------------------------------------------------------------------------------ recall protocol


def test_identity_rerank_reproduces_recall_at_k_exactly(world):
    g = torch.Generator().manual_seed(0)
    caption_image = torch.arange(30).repeat_interleave(5)
    sims = torch.randn(30, 150, generator=g)
    sims[:, 7] = sims[:, 12]  # duplicate captions: exact ties must not split across the top-R boundary
    sims[:, 40] = sims[:, 3]
    t = world["index"].tensors("cpu")
    index_sims = t["image_emb"] @ t["text_emb"].T
    for matrix, ci in ((sims, caption_image), (index_sims, t["caption_image"])):
        base = recall_at_k(matrix, ci)
        for top in (1, 5, 10, 20, matrix.shape[0], matrix.shape[1]):
            assert R.reranked_recall(matrix, matrix, ci, top) == base
            assert R.reranked_recall(matrix, 3.0 * matrix - 1.0, ci, top) == base  # any monotone map
    # Re-ranking everything with another score is ranking by that score.
    other = torch.randn(30, 150, generator=g)
    full = R.reranked_recall(sims, other, caption_image, 10_000)
    assert full == recall_at_k(other, caption_image)


def test_rerank_similarities_only_reorders_each_querys_top():
    g = torch.Generator().manual_seed(1)
    sims, other = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g)
    out = R.rerank_similarities(sims, other, 4, dim=1)
    for row in range(6):
        top = set(sims[row].topk(4).indices.tolist())
        new_order = out[row].argsort(descending=True).tolist()
        assert set(new_order[:4]) == top
        assert new_order[:4] == sorted(top, key=lambda j: -float(other[row, j]))
        assert new_order[4:] == [j for j in sims[row].argsort(descending=True).tolist() if j not in top]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ("delete", R.TEXT_EMB_FILE),
        ("garbage", R.IMAGE_EMB_FILE),
        ("delete", R.scale_file(2)),
        ("garbage", R.META_FILE),
        ("delete", R.META_FILE),
        ("garbage", R.CAPTIONS_FILE),
        ("shape", R.CAPTION_IMAGE_FILE),
        ("shorten", R.IMAGE_KEYS_FILE),
    ],
)
def test_missing_or_corrupt_index_file_is_named(world, tmp_path, damage, file):
    broken = tmp_path / "broken"
    shutil.copytree(world["index_dir"], broken)
    path = broken / file
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" if file.endswith(".npy") else b"{not json")
    elif damage == "shape":
        np.save(path, np.zeros(3, dtype=np.int64))
    else:
        path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    with pytest.raises(R.IndexFormatError) as err:
        R.Index.load(broken)
    assert str(path) in str(err.value)


def test_missing_index_directory(tmp_path):
    with pytest.raises(R.IndexFormatError, match="no such index directory"):
        R.Index.load(tmp_path / "nothing")


def test_dimension_and_model_mismatch_are_reported(world, tmp_path):
    index = world["index"]
    wide = R.resolve_model(_checkpoint(tmp_path / "wide", seed=0, overrides=["text.config_overrides={num_hidden_layers: 2, "
                                                                         "hidden_size: 64, num_attention_heads: 2, "
                                                                         "intermediate_size: 128}"]), device="cpu")
    with pytest.raises(R.ModelIndexMismatch, match="dimension mismatch.*D=64.*D=128"):
        R.search_text(index, wide, "fields")
    other = R.resolve_model(_checkpoint(tmp_path / "other", seed=1), device="cpu")
    with pytest.raises(R.ModelIndexMismatch, match="not the model index"):
        R.search_image(index, other, world["image_file"])
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        R.resolve_model(tmp_path / "absent")


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """``msa`` with just the retrieval commands, dispatched as flows.cli.main does."""
    from flows import cli_retrieval

    parser = argparse.ArgumentParser(prog="msa")
    cli_retrieval.register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def test_cli_search_prints_a_ranked_table(world, capsys):
    index = world["index"]
    query = index.captions[20]
    assert main(["search", str(world["index_dir"]), "--text", query, "--k", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["rank", "score", "cosine", "mscmat"])
    rows = [line.split() for line in lines[header + 2 : header + 6]]
    expected = R.search_text(index, world["model"], query, k=4)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert [r[4] for r in rows] == [h.image_key for h in expected]
    assert [float(r[1]) for r in rows] == pytest.approx([h.score for h in expected], abs=1e-4)

    assert main(["search", str(world["index_dir"]), "--image", str(world["image_file"]), "--k", "3",
                 "--rerank", "6", "--rerank-mode", "mscmat"]) == 0
    out = capsys.readouterr().out
    assert "re-ranked by MSCMAT mean over scales" in out and "caption" in out
    expected = R.search_image(index, world["model"], world["image_file"], k=3, rerank=6, rerank_mode="mscmat")
    for hit in expected:
        assert f"{hit.image_key:<24}  {hit.caption}" in out

    assert main(["search", str(world["index_dir"]), "--text", query, "--k", "2", "--rerank", "5", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == str(world["checkpoint"].resolve())
    assert [h["rank"] for h in payload["hits"]] == [1, 2] and payload["hits"][0]["mscmat"] is not None


def test_cli_index_and_errors(world, tmp_path, capsys):
    from flows.cli_retrieval import EXIT_BAD_INPUT

    out = tmp_path / "cli-index"
    assert main(["index", "--model", str(world["checkpoint"]), "--data", world["shards"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{N_IMAGES} images" in printed and world["manifest"].digest[:16] in printed
    assert R.Index.load(out).meta["data"]["split"] == "test"

    (out / R.CAPTIONS_FILE).unlink()
    assert main(["search", str(out), "--text", "fields"]) == EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert str(out / R.CAPTIONS_FILE) in err
    assert err.startswith("msa search: error: ") and len(err.strip().splitlines()) == 1


def test_cli_index_json_is_the_only_stdout(world, tmp_path, capsys):
    out = tmp_path / "json-index"
    assert main(["index", "--model", str(world["checkpoint"]), "--data", world["shards"], "--out", str(out),
                 "--batch-size", "8", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # nothing but the JSON object on stdout
    meta = R.Index.load(out).meta
    assert payload == {
        "path": str(out), "images": N_IMAGES, "captions": world["manifest"].splits["test"].captions, "dim": 128,
        "split": "test", "uri": world["shards"], "dataset_digest": world["manifest"].digest,
        "model": str(world["checkpoint"]), "registry_version": None, "ann": {"image": None, "text": None},
        "build_seconds": meta["build_seconds"],
    }
    assert f"Index {out}" in captured.err and f"{N_IMAGES} images" in captured.err


def test_cli_bad_input_exits_2_with_one_line(world, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    cases = [
        (["index", "--model", str(world["checkpoint"]), "--data", world["shards"], "--out", str(foreign), "--json"],
         "msa index: error: ", "not an msa index"),
        (["index", "--model", str(tmp_path / "absent"), "--data", world["shards"], "--out", str(tmp_path / "i")],
         "msa index: error: ", "no such checkpoint directory"),
        (["index", "--model", str(world["checkpoint"]), "--data", world["shards"], "--out", str(tmp_path / "v"),
          "--split", "val"], "msa index: error: ", "no 'val' split"),
        (["index", "--model", str(world["checkpoint"]), "--data", f"a={world['shards']},b={world['shards']}",
          "--out", str(tmp_path / "m")], "msa index: error: ", "names a mix of a, b"),
        (["search", str(tmp_path / "nothing"), "--text", "fields"], "msa search: error: ", "no such index directory"),
        (["search", str(world["index_dir"]), "--text", "  "], "msa search: error: ", "empty"),
        (["search", str(world["index_dir"]), "--image", str(tmp_path / "no-such.jpg")], "msa search: error: ",
         "no-such.jpg"),
    ]
    for argv, prefix, reason in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(prefix) and reason in captured.err, captured.err
        assert len(captured.err.strip().splitlines()) == 1
    assert (foreign / "holiday.jpg").exists()
    for argv in (["search", str(world["index_dir"]), "--text", "x", "--k", "0"],
                 ["index", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert f"msa {argv[0]}: error: " in capsys.readouterr().err


def test_cli_ann_index_progress_and_backends(world, tmp_path, capsys):
    out = tmp_path / "ann-index"
    assert main(["index", "--model", str(world["checkpoint"]), "--data", world["shards"], "--out", str(out),
                 "--ann", "always", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "embedding" in captured.err and "ANN index (images)" in captured.err  # tqdm bars on stderr
    assert "ANN index: images (IVF1,SQfp16), texts (IVF2,SQfp16)" in captured.out
    query = world["index"].captions[20]
    results = {}
    for backend in ("auto", "exact"):
        assert main(["search", str(out), "--text", query, "--k", "4", "--backend", backend, "--json"]) == 0
        results[backend] = json.loads(capsys.readouterr().out)
    assert results["auto"]["backend"] == "ann" and results["exact"]["backend"] == "exact"
    # Every list is probed in an index this small: the ANN ranking is the exact one.
    assert [h["image_key"] for h in results["auto"]["hits"]] == [h["image_key"] for h in results["exact"]["hits"]]
    assert [h["cosine"] for h in results["auto"]["hits"]] == pytest.approx(
        [h["cosine"] for h in results["exact"]["hits"]], abs=1e-5)
    assert main(["search", str(out), "--image", str(world["image_file"]), "--k", "2", "--rerank", "4"]) == 0
    assert "Ranking: cosine top 4 (ANN (IVF2,SQfp16, 32 probes))" in capsys.readouterr().out

    assert main(["search", str(world["index_dir"]), "--text", query, "--backend", "ann"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa search: error: ") and "no ANN index of the image embeddings" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["search", "index"])
def test_cli_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options = {"search": ["--text", "--image", "--k", "--rerank", "--rerank-mode", "--rerank-weight", "--model",
                          "--json", "INDEX", "--backend", "--ann-probes"],
               "index": ["--model", "--data", "--out", "--split", "--batch-size", "--endpoint-url", "--json", "--ann",
                         "--no-progress"]}[command]
    for option in options:
        assert option in text


def test_cli_parser_imports_no_heavy_modules():
    code = ("import sys, argparse; import flows.cli_retrieval as c; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'mlflow') "
            "or m in ('msa.retrieval.index', 'msa.retrieval.search', 'msa.runtime.resolver')))")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_rerank_constants_have_one_definition():
    from msa.retrieval import constants, search

    assert search.RERANK_MODES is constants.RERANK_MODES == R.RERANK_MODES == ("blend", "mscmat")
    assert search.DEFAULT_RERANK_MODE is constants.DEFAULT_RERANK_MODE
    assert search.DEFAULT_RERANK_WEIGHT is constants.DEFAULT_RERANK_WEIGHT


# ------------------------------------------------------------------------------------------ MLflow


def test_mlflow_registry_uri_is_resolved_and_pinned(world, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    import pandas as pd
    import yaml
    from PIL import Image

    from msa.encoders import build_tokenizer
    from msa.runtime.serving import log_pyfunc_model, pip_requirements

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    experiment = mlflow.create_experiment("retrieval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer(world["model"].cfg.text.model).save_pretrained(tokenizer_dir)
    with mlflow.start_run(experiment_id=experiment):
        uri = log_pyfunc_model(world["checkpoint"], tokenizer_dir, world["model"].embed_dim)
    # Logged as code with pinned requirements: no pickled model, no requirement inference (~17 s).
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "logged")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor, flavor
    assert not list(local.glob("python_model.pkl*"))
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "timm", "pillow"}
    # The pyfunc predicts L2-normalised float32 embeddings, text and image rows alike, equal to the model's.
    pyfunc = mlflow.pyfunc.load_model(uri)
    captions = [world["index"].captions[5], world["index"].captions[9]]
    image_bytes = world["image_file"].read_bytes()
    emb = pyfunc.predict(pd.DataFrame({"text": [captions[0], None, captions[1]], "image": [None, image_bytes, None]}))
    assert emb.dtype == np.float32 and emb.shape == (3, world["model"].embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[[0, 2]], _text(world["model"], captions)[0].numpy(), atol=1e-5)
    with torch.no_grad():
        pixels = world["model"].transform(Image.open(world["image_file"]))[None]
        np.testing.assert_allclose(emb[1], world["model"].model.encode_image(pixels)[0][0].numpy(), atol=1e-5)
    version = mlflow.register_model(uri, "msa-retrieval").version
    MlflowClient().set_registered_model_alias("msa-retrieval", "champion", version)

    model = R.resolve_model("models:/msa-retrieval@champion", device="cpu")
    assert model.resolved == f"models:/msa-retrieval/{version}"
    assert model.registry["version"] == str(version) and model.registry["alias"] == "champion"
    out = R.build_index(model, world["shards"], tmp_path / "mlflow-index")
    meta = R.Index.load(out).meta
    assert meta["model"]["source"] == "models:/msa-retrieval@champion"
    assert meta["model"]["registry"]["version"] == str(version)
    # Same weights as the checkpoint, so the checkpoint's index accepts it and ranks identically.
    query = world["index"].captions[5]
    assert [h.image_key for h in R.search_text(world["index"], model, query, k=5)] == [
        h.image_key for h in R.search_text(world["index"], world["model"], query, k=5)
    ]
    with pytest.raises(FileNotFoundError, match="msa-retrieval@nobody"):
        R.resolve_model("models:/msa-retrieval@nobody")
