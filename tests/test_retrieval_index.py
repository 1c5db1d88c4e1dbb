"""The retrieval index at scale, without a model: float16 memmaps written by ``IndexWriter`` and read back,
exact search against brute force, the faiss IVF backend's recall against exact search, and the errors
for old, corrupt or incomplete indexes. Synthetic clustered unit vectors stand in for embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msa import retrieval as R

DIM = 64
SCALE_DIMS = (8, 16)
CHUNK = 700  # rows per add_images call: not a divisor of the counts, so the last chunk is ragged


def _data(n: int, m: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": R.clustered_unit_vectors(n, DIM, clusters=max(1, n // 50), seed=seed),
        "texts": R.clustered_unit_vectors(m, DIM, clusters=max(1, n // 50), seed=seed, part=1),
        "scales": [rng.standard_normal((n, c)).astype(np.float32) for c in SCALE_DIMS],
        "keys": [f"img_{i:06d}" for i in range(n)],
        "caption_image": np.arange(m) % n,
        "captions": [f"caption {j}" for j in range(m)],
    }


def _write(out: Path, data: dict, ann: str = "never") -> Path:
    n, m = len(data["keys"]), len(data["captions"])
    with R.IndexWriter(out, n, m, DIM, SCALE_DIMS, source="synthetic") as writer:
        for start in range(0, n, CHUNK):
            part = slice(start, start + CHUNK)
            assert writer.add_images(data["images"][part], [s[part] for s in data["scales"]],
                                     data["keys"][part]) == start
        writer.add_captions(data["texts"], data["caption_image"], data["captions"])
        return writer.commit({"data": {"uri": "synthetic", "split": "test"}}, ann=ann)


def _queries(count: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Fresh points around the data's centroids: near many rows, equal to none."""
    return list(torch.from_numpy(R.clustered_unit_vectors(count, DIM, clusters=max(1, n // 50), seed=seed, part=9)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3,000 images and 1,200 captions written with exact search only, and the vectors they came from."""
    data = _data(3000, 1200)
    return data, _write(tmp_path_factory.mktemp("small") / "index", data)


@pytest.fixture(scope="module")
def with_ann(tmp_path_factory):
    """4,000 images and 2,000 captions with faiss IVF indexes on both sides."""
    data = _data(4000, 2000, seed=1)
    return data, _write(tmp_path_factory.mktemp("ann") / "index", data, ann="always")


# ------------------------------------------------------------------------------------------ round trip


def test_memory_mapped_index_round_trip(small):
    data, path = small
    assert sorted(p.name for p in path.parent.iterdir()) == ["index"]  # no temp dir left behind
    assert R.ANN_FILES["image"] not in {p.name for p in path.iterdir()}  # "never": no ANN files
    index = R.Index.load(path)
    arrays = [index.image_emb, index.text_emb, index.caption_image, *index.image_scales]
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)
    assert {a.dtype for a in (index.image_emb, index.text_emb, *index.image_scales)} == {np.dtype(np.float16)}
    assert np.array_equal(index.image_emb, data["images"].astype(np.float16))
    assert np.array_equal(index.text_emb, data["texts"].astype(np.float16))
    for stored, original in zip(index.image_scales, data["scales"]):
        assert np.array_equal(stored, original.astype(np.float16))
    assert index.image_keys == data["keys"] and index.captions == data["captions"]
    assert index.caption_image.tolist() == data["caption_image"].tolist()
    meta = json.loads((path / R.META_FILE).read_text())
    assert meta["format_version"] == R.INDEX_FORMAT_VERSION == 2 and meta["dtype"] == "float16"
    assert meta["ann"] == {"image": None, "text": None} and meta["data"]["uri"] == "synthetic"

    for side, original in (("image", data["images"]), ("text", data["texts"])):
        stored = torch.from_numpy(original.astype(np.float16).astype(np.float32))
        for query in _queries(10, 3000):
            scores, rows = R.nearest(index, side, query, 10, backend="exact")
            # Top-k identical to a float32 brute force over the same (stored) vectors ...
            assert rows.tolist() == (stored @ query).topk(10).indices.tolist()
            # ... and scores within float16 rounding of the float32 originals' cosines.
            np.testing.assert_allclose(scores.numpy(), original[rows.numpy()] @ query.numpy(), atol=1e-3)
    query = _queries(1, 3000)[0]
    whole = R.exact_scores(index.image_emb, query, chunk_rows=10**6)
    assert torch.equal(R.exact_scores(index.image_emb, query, chunk_rows=128), whole)  # chunking is invisible
    torch.testing.assert_close(whole, torch.from_numpy(np.asarray(index.image_emb, np.float32)) @ query)


def test_scale_rows_reads_the_rows_asked_for(small):
    data, path = small
    index = R.Index.load(path)
    rows = [2999, 5, 1234, 5]
    for got, original in zip(index.scale_rows(torch.tensor(rows), "cpu"), data["scales"]):
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(original[rows].astype(np.float16).astype(np.float32)))


def test_writer_refuses_wrong_counts_and_bad_values(tmp_path):
    data = _data(100, 30)
    with R.IndexWriter(tmp_path / "i", 50, 30, DIM, SCALE_DIMS, source="shards X") as writer:
        with pytest.raises(ValueError, match="shards X: more than the 50 images declared"):
            writer.add_images(data["images"], data["scales"], data["keys"])
    with pytest.raises(ValueError, match="shards X: read 50 images / 0 captions, expected 50 / 30"):
        with R.IndexWriter(tmp_path / "i", 50, 30, DIM, SCALE_DIMS, source="shards X") as writer:
            writer.add_images(data["images"][:50], [s[:50] for s in data["scales"]], data["keys"][:50])
            writer.commit({})
    bad = data["images"][:50].copy()
    bad[7, 3] = np.nan
    big = [s[:50] * 1e5 for s in data["scales"]]  # beyond float16's range
    for emb, scales, file in ((bad, [s[:50] for s in data["scales"]], R.IMAGE_EMB_FILE),
                              (data["images"][:50], big, R.scale_file(0))):
        with pytest.raises(ValueError, match=f"infinite or beyond-float16 values for rows 0..49 of {file}"):
            with R.IndexWriter(tmp_path / "i", 50, 30, DIM, SCALE_DIMS, source="shards X") as writer:
                writer.add_images(emb, scales, data["keys"][:50])
    with pytest.raises(ValueError, match="ann must be one of"):
        R.wants_ann("sometimes", 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no temp dirs left


# ------------------------------------------------------------------------------------------------ ANN


def _recall_at_10(index: R.Index, side: str, queries, **options) -> float:
    found = 0
    for query in queries:
        exact = set(R.nearest(index, side, query, 10, backend="exact")[1].tolist())
        found += len(exact & set(R.nearest(index, side, query, 10, **options)[1].tolist()))
    return found / (10 * len(queries))


def test_ann_recall_at_10_against_exact_search(with_ann):
    data, path = with_ann
    index = R.Index.load(path)
    meta = index.meta["ann"]
    assert meta["image"]["kind"] == f"IVF{R.ivf_lists(4000)},SQfp16" and meta["image"]["file"] == "image_emb.ivf"
    assert meta["text"]["kind"] == f"IVF{R.ivf_lists(2000)},SQfp16" and (path / "text_emb.ivf").is_file()
    queries = _queries(100, 4000, seed=1)
    for side in R.SIDES:
        assert _recall_at_10(index, side, queries, backend="ann") >= 0.99
    assert _recall_at_10(index, "image", queries, backend="ann", probes=1) < 0.99  # it is approximate
    for query in queries[:10]:
        scores, rows = R.nearest(index, "image", query, 10, backend="ann")
        assert torch.equal(rows, R.nearest(index, "image", query, 10)[1])  # "auto" uses the ANN index
        # The IVF codes are the stored float16 rows: its scores are the exact cosines of the rows it returns.
        exact = torch.from_numpy(np.asarray(index.image_emb[rows.numpy()], np.float32)) @ query
        torch.testing.assert_close(scores, exact, atol=1e-5, rtol=0)
        assert scores.tolist() == sorted(scores.tolist(), reverse=True)


# --------------------------------------------------------------------------------------------- errors


def test_format_version_1_is_refused_with_the_directory_and_rebuild(small, tmp_path):
    _, path = small
    old = tmp_path / "v1"
    old.mkdir()
    for file in path.iterdir():
        (old / file.name).write_bytes(file.read_bytes())
    meta = json.loads((old / R.META_FILE).read_text())
    meta["format_version"] = 1
    (old / R.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(R.IndexFormatError) as err:
        R.Index.load(old)
    message = str(err.value)
    assert str(old / R.META_FILE) in message and f"rebuild the index {old}" in message and "version 1" in message


def _copy(path: Path, to: Path) -> Path:
    to.mkdir()
    for file in path.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


@pytest.mark.parametrize("damage", ["truncate", "float32", "header"])
def test_corrupt_vector_file_is_named(small, tmp_path, damage):
    broken = _copy(small[1], tmp_path / "broken")
    file = broken / R.scale_file(1)
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-100])
    elif damage == "float32":
        np.save(file, np.zeros((3000, SCALE_DIMS[1]), dtype=np.float32))
    else:
        file.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(R.IndexFormatError) as err:
        R.Index.load(broken)
    assert str(file) in str(err.value)
    if damage == "float32":
        assert "dtype float32, expected (3000, 16) float16" in str(err.value)


def test_nan_rows_are_reported_by_the_search_that_reads_them(small, tmp_path):
    broken = _copy(small[1], tmp_path / "nan")
    for name, row in ((R.IMAGE_EMB_FILE, 17), (R.scale_file(0), 42)):
        array = np.load(broken / name, mmap_mode="r+")
        array[row] = np.nan
        array.flush()
        del array
    index = R.Index.load(broken)  # loading reads headers only
    with pytest.raises(R.IndexFormatError, match=f"{broken / R.IMAGE_EMB_FILE}: NaN"):
        R.nearest(index, "image", _queries(1, 3000)[0], 5)
    assert len(index.scale_rows([1, 2, 3], "cpu")) == 2  # healthy rows read fine
    with pytest.raises(R.IndexFormatError, match=f"{broken / R.scale_file(0)}: NaN or infinite values in rows"):
        index.scale_rows([1, 42], "cpu")


def test_missing_or_corrupt_ann_index_is_named(with_ann, small, tmp_path):
    missing = _copy(with_ann[1], tmp_path / "missing")
    (missing / "text_emb.ivf").unlink()
    with pytest.raises(R.IndexFormatError, match=f"{missing / 'text_emb.ivf'}: missing"):
        R.Index.load(missing)

    corrupt = _copy(with_ann[1], tmp_path / "corrupt")
    (corrupt / "image_emb.ivf").write_bytes(b"not a faiss index at all")
    index = R.Index.load(corrupt)
    with pytest.raises(R.IndexFormatError, match=f"{corrupt / 'image_emb.ivf'}: unreadable or corrupt faiss index"):
        R.nearest(index, "image", _queries(1, 4000)[0], 5)

    foreign = _copy(with_ann[1], tmp_path / "foreign")
    (foreign / "image_emb.ivf").write_bytes((with_ann[1] / "text_emb.ivf").read_bytes())  # 2,000 vectors
    with pytest.raises(R.IndexFormatError, match="faiss index of 2000 x 64 vectors, expected an IVF index of 4000"):
        R.nearest(R.Index.load(foreign), "image", _queries(1, 4000)[0], 5)

    exact_only = R.Index.load(small[1])
    with pytest.raises(ValueError, match="no ANN index of the image embeddings.*--backend exact"):
        R.nearest(exact_only, "image", _queries(1, 3000)[0], 5, backend="ann")
    with pytest.raises(ValueError, match="backend must be one of"):
        R.nearest(exact_only, "image", _queries(1, 3000)[0], 5, backend="magic")
    with pytest.raises(ValueError, match="probes must be >= 1"):
        R.nearest(exact_only, "image", _queries(1, 3000)[0], 5, probes=0)
