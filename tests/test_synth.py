"""Tests for shards.synth: Karpathy layout, determinism, caption honesty, learnability signal."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import synth
from shards.synth import (
    LANDCOVERS,
    Linear,
    ObjectGroup,
    Region,
    SceneAttrs,
    describe_scene,
    generate_corpus,
    knobs,
    make_sample,
    render_scene,
)

SPLITS = {"train": 6, "val": 3, "test": 3}
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "tif": "TIFF"}

# token -> what it names (captions are tokenised to lowercase words)
OBJECT_WORDS = {"building": {"building", "buildings"}, "vehicle": {"car", "cars", "vehicle", "vehicles"},
                "ship": {"ship", "ships", "boat", "boats", "vessel", "vessels"},
                "plane": {"plane", "planes", "airplane", "airplanes", "aircraft"}, "tank": {"tank", "tanks"}}
LINEAR_WORDS = {"road": {"road", "street", "highway"}, "river": {"river", "stream"},
                "runway": {"runway", "airstrip"}, "railway": {"railway", "railroad", "rail"}}
COVER_WORDS = {"farmland": {"farmland", "fields", "cropland"},
               "forest": {"forest", "woodland", "trees", "wooded"},
               "desert": {"desert", "sandy", "sand"}, "water": {"sea", "water", "lake"},
               "residential": {"residential", "neighborhood", "houses"},
               "grassland": {"grassland", "meadow", "grassy"},
               "bare_land": {"bare", "soil", "barren", "dirt"}, "industrial": {"industrial", "factories"}}
NUMBER_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
MANY_WORDS = {"many", "numerous", "plenty", "number"}  # "a large number of"
PLACE_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
               "lower": "bottom", "center": "center", "middle": "center"}


def _load(ann: Path) -> dict:
    return json.loads(ann.read_text(encoding="utf-8"))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _names(words: set[str], table: dict[str, set[str]]) -> set[str]:
    return {k for k, ws in table.items() if words & ws}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A 60-image easy corpus plus a 30-image hard one (32 px) shared by the caption tests."""
    out = {}
    for diff, n in (("easy", 60), ("hard", 30)):
        ann = generate_corpus(tmp_path_factory.mktemp(diff), splits={"train": n}, image_size=32, seed=7,
                              difficulty=diff)
        out[diff] = (ann, _load(ann))
    return out


# --------------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("fmt,size", [("jpg", 48), ("png", 32), ("tif", 32), ("mixed", 40)])
def test_karpathy_layout_and_images(tmp_path, fmt, size):
    ann = generate_corpus(tmp_path, splits=SPLITS, image_size=size, seed=1, image_format=fmt)
    assert ann == tmp_path / "dataset_synth.json"
    doc = _load(ann)
    assert doc["dataset"] == "synth"
    images = doc["images"]
    assert Counter(e["split"] for e in images) == Counter(SPLITS)
    assert [e["split"] for e in images] == ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    assert len({e["imgid"] for e in images}) == len(images) == 12
    assert len({e["filename"] for e in images}) == 12
    sentids = [s["sentid"] for e in images for s in e["sentences"]]
    assert len(sentids) == len(set(sentids)) == 60
    exts = set()
    for e in images:
        assert set(e) >= {"filename", "imgid", "split", "sentids", "sentences"}
        assert len(e["sentences"]) == 5
        assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
        assert len({s["raw"] for s in e["sentences"]}) == 5, "captions of one image must differ"
        for s in e["sentences"]:
            assert s["imgid"] == e["imgid"]
            assert s["raw"].strip() and s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        SceneAttrs.from_json(e["synth_attrs"])  # round-trips
        ext = e["filename"].rsplit(".", 1)[1]
        exts.add(ext)
        if fmt != "mixed":
            assert ext == fmt
        path = tmp_path / "images" / e["filename"]
        assert path.is_file()
        with Image.open(path) as im:
            assert im.format == PIL_FORMAT[ext]
            im.load()
            assert im.size == (size, size) and im.mode == "RGB"
            if ext == "tif":  # no timestamps or software tags in the TIFF
                assert not {305, 306} & set(im.tag_v2)
    assert exts == ({"jpg", "png", "tif"} if fmt == "mixed" else {fmt})
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers
    assert {p.name for p in (tmp_path / "images").iterdir()} == {e["filename"] for e in images}


def test_annotation_written_last(tmp_path, monkeypatch):
    order = []
    real = synth.corpus._atomic_write
    monkeypatch.setattr(synth.corpus, "_atomic_write", lambda p, data: (order.append(Path(p).name), real(p, data)))
    generate_corpus(tmp_path, splits={"train": 4, "test": 2}, image_size=32)
    assert len(order) == 7 and order[-1] == "dataset_synth.json"
    assert all(n.startswith("synth_") for n in order[:-1])


@pytest.mark.parametrize("kwargs", [{"image_format": "gif"}, {"splits": {"train": -1}}, {"image_size": 8},
                                    {"difficulty": "extreme"}, {"difficulty": 1.5}, {"splits": {"a/b": 1}},
                                    {"workers": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_corpus(tmp_path, **kwargs)


# --------------------------------------------------------------------------------------------------
# determinism


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(splits={"train": 6, "test": 3}, image_size=32, image_format="mixed")
    a = _digest(generate_corpus(tmp_path / "a", seed=3, **kw).parent)
    b = _digest(generate_corpus(tmp_path / "b", seed=3, **kw).parent)
    c = _digest(generate_corpus(tmp_path / "c", seed=4, **kw).parent)
    assert len(a) == 10 and a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert "dataset_synth.json" in differing and len(differing) >= 8


def test_workers_output_identical(tmp_path, monkeypatch):
    used = []

    class Pool(synth.corpus.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            used.append(a[0] if a else k.get("max_workers"))
            super().__init__(*a, **k)

    monkeypatch.setattr(synth.corpus, "ProcessPoolExecutor", Pool)
    kw = dict(splits={"train": 8, "val": 2, "test": 2}, image_size=32, seed=5, image_format="mixed")
    one = _digest(generate_corpus(tmp_path / "w1", workers=1, **kw).parent)
    assert used == []
    two = _digest(generate_corpus(tmp_path / "w2", workers=2, **kw).parent)
    assert used == [2], "the process pool was not used"
    assert one == two


def test_progress_bar_on_stderr_changes_nothing(tmp_path, capsys):
    kw = dict(splits={"train": 3, "test": 2}, image_size=32, seed=2)
    quiet = _digest(generate_corpus(tmp_path / "quiet", **kw).parent)
    assert capsys.readouterr().err == ""
    shown = _digest(generate_corpus(tmp_path / "shown", progress=True, **kw).parent)
    captured = capsys.readouterr()
    assert "render" in captured.err and "5/5" in captured.err and captured.out == ""
    assert shown == quiet


# --------------------------------------------------------------------------------------------------
# captions are honest about the drawn scene


@pytest.mark.parametrize("diff", ["easy", "hard"])
def test_captions_name_only_what_is_drawn(corpus, diff):
    _, doc = corpus[diff]
    n_obj = 0
    for e in doc["images"]:
        a = SceneAttrs.from_json(e["synth_attrs"])
        objs = {g.kind for g in a.objects}
        lins = {x.kind for x in a.linear}
        covers = set(a.covers)
        counts = {g.count for g in a.objects}
        places = {g.location for g in a.objects if g.location}
        for r in a.regions[1:]:
            places |= {r.side, synth.scenes._OPPOSITE[r.side]}
        caps = [set(s["tokens"]) for s in e["sentences"]]
        for w in caps:
            where = f"{e['filename']}: {w} vs {e['synth_attrs']}"
            assert _names(w, OBJECT_WORDS) <= objs, where  # distractors are drawn but never named
            assert _names(w, LINEAR_WORDS) <= lins, where
            assert _names(w, COVER_WORDS) <= covers, where
            assert {NUMBER_WORDS[t] for t in w & NUMBER_WORDS.keys()} <= counts, where
            if w & MANY_WORDS:
                assert max(counts) >= synth.scenes.MANY, where
            assert {PLACE_WORDS[t] for t in w & PLACE_WORDS.keys()} <= places, where
        # every object class, every linear feature and the land cover are named somewhere
        for kind in objs:
            assert any(w & OBJECT_WORDS[kind] for w in caps), (kind, e["sentences"])
        for kind in lins:
            assert any(w & LINEAR_WORDS[kind] for w in caps), (kind, e["sentences"])
        for cover in covers:
            assert any(w & COVER_WORDS[cover] for w in caps), (cover, e["sentences"])
        n_obj += bool(objs)
    assert n_obj >= 0.7 * len(doc["images"])


def test_captions_are_varied(corpus):
    _, doc = corpus["easy"]
    openings = Counter(" ".join(s["tokens"][:2]) for e in doc["images"] for s in e["sentences"])
    assert len(openings) >= 25
    assert openings.most_common(1)[0][1] <= 0.25 * 5 * len(doc["images"])
    # captions differ across scales: an object caption and a land-cover caption for most images
    both = 0
    for e in doc["images"]:
        caps = [set(s["tokens"]) for s in e["sentences"]]
        both += any(_names(w, OBJECT_WORDS) for w in caps) and any(_names(w, COVER_WORDS) for w in caps)
    assert both >= 0.7 * len(doc["images"])


def test_describe_scene_standalone():
    a = SceneAttrs([Region("farmland"), Region("forest", "right")], [Linear("river", "horizontal")],
                   [ObjectGroup("building", 3, "left")])
    caps = describe_scene(a, np.random.default_rng(0))
    assert len(caps) == 5 == len(set(caps))
    words = [set(re.findall(r"[a-z]+", c)) for c in caps]
    assert any(w & {"building", "buildings"} for w in words)
    assert any(w & {"river", "stream"} for w in words)
    assert any(w & {"forest", "woodland", "trees", "wooded"} for w in words)
    assert not any(w & (OBJECT_WORDS["ship"] | OBJECT_WORDS["tank"] | LINEAR_WORDS["road"]) for w in words)


# --------------------------------------------------------------------------------------------------
# rendering is faithful to the attributes


@pytest.mark.parametrize("kind,regions,linear", [
    ("building", [Region("desert")], []),
    ("tank", [Region("farmland")], []),
    ("ship", [Region("water")], []),
    ("vehicle", [Region("forest")], [Linear("road", "horizontal")]),
    ("plane", [Region("grassland")], [Linear("runway", "horizontal")]),
])
def test_objects_drawn_where_described(kind, regions, linear):
    """Same seed with and without the object group: pixels change only in the stated location."""
    k, S = knobs("easy"), 64
    base = SceneAttrs(regions, linear, [])
    with_obj = SceneAttrs(regions, linear, [ObjectGroup(kind, 3, "left")])
    img0, _ = render_scene(base, np.random.default_rng(11), S, k)
    img1, drawn = render_scene(with_obj, np.random.default_rng(11), S, k)
    assert drawn.objects and drawn.objects[0].kind == kind and drawn.objects[0].location == "left"
    assert 1 <= drawn.objects[0].count <= 3
    diff = np.abs(img1.astype(np.int32) - img0.astype(np.int32)).sum(-1)
    left, right = diff[:, : int(0.4 * S)], diff[:, int(0.62 * S):]
    big = 60  # objects change pixels by far more than the (re-drawn) sensor noise
    assert (left > big).sum() >= 12, f"{kind}: too few changed pixels on the left"
    assert (right > big).sum() <= 2, f"{kind}: changed pixels outside the stated location"


def test_reported_count_is_the_drawn_count(monkeypatch):
    """Twelve buildings asked for in the small centre zone do not fit: the attributes (and so the
    captions' count words) report exactly how many were drawn."""
    drawn_calls = []
    real = synth.render.OBJECT_DRAWERS["building"]
    monkeypatch.setitem(synth.render.OBJECT_DRAWERS, "building",
                        lambda img, S, x, y, *a: (drawn_calls.append((x, y)), real(img, S, x, y, *a)))
    a = SceneAttrs([Region("farmland")], [], [ObjectGroup("building", 12, "center")])
    _, drawn = render_scene(a, np.random.default_rng(2), 48, knobs("easy"))
    (g,) = drawn.objects
    assert 1 <= g.count < 12 and g.count == len(drawn_calls)
    assert all(abs(x - 0.5) < 0.22 and abs(y - 0.5) < 0.22 for x, y in drawn_calls)
    caps = describe_scene(drawn, np.random.default_rng(0))
    words = {synth.captions.COUNT_WORDS[g.count]} if g.count < synth.scenes.MANY else MANY_WORDS
    assert all(set(re.findall(r"[a-z]+", c)) & words for c in caps if "buildings" in c), (g.count, caps)


def test_impossible_location_is_dropped():
    """Ships asked for 'left' when the only water is on the right: drawn without the location."""
    k = knobs("easy")
    for seed in range(5):
        a = SceneAttrs([Region("desert"), Region("water", "right")], [], [ObjectGroup("ship", 2, "left")])
        _, drawn = render_scene(a, np.random.default_rng(seed), 48, k)
        for g in drawn.objects:
            assert g.location != "left"


# --------------------------------------------------------------------------------------------------
# difficulty and learnability


def test_difficulty_knobs():
    assert knobs("easy").level == 0.0 and knobs("hard").level == 1.0 and knobs(0.25).level == 0.25
    assert knobs("easy").noise < knobs("hard").noise
    easy = [make_sample(0, i, 32, "easy")[2] for i in range(60)]
    hard = [make_sample(0, i, 32, "hard")[2] for i in range(60)]
    extra = set(LANDCOVERS[5:])
    assert not any(set(a.covers) & extra for a in easy)
    assert any(set(a.covers) & extra for a in hard)
    assert not any(a.distractors for a in easy)
    assert any(a.distractors for a in hard)
    assert max(len(a.objects) for a in easy) == 1 and max(len(a.objects) for a in hard) == 2


def _colour_hist(path: Path, bins: int = 4) -> np.ndarray:
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3) // (256 // bins)
    h = np.bincount(px[:, 0] * bins * bins + px[:, 1] * bins + px[:, 2], minlength=bins ** 3).astype(float)
    return h / h.sum()


def test_land_cover_is_visually_separable(corpus):
    """Nearest neighbour on plain colour histograms recovers the land cover well above chance."""
    ann, doc = corpus["easy"]
    rows = [(e["synth_attrs"]["regions"][0]["cover"], _colour_hist(ann.parent / "images" / e["filename"]))
            for e in doc["images"] if len(e["synth_attrs"]["regions"]) == 1]
    labels = np.array([r[0] for r in rows])
    H = np.stack([r[1] for r in rows])
    assert len(rows) >= 25 and len(set(labels)) >= 4
    D = np.abs(H[:, None, :] - H[None, :, :]).sum(-1)  # L1 distance
    np.fill_diagonal(D, np.inf)
    nn_acc = float(np.mean(labels[D.argmin(1)] == labels))
    chance = max(Counter(labels).values()) / len(labels)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    within, between = D[same & off].mean(), D[~same].mean()
    assert nn_acc >= max(0.6, chance + 0.25), (nn_acc, chance)
    assert within < 0.7 * between, (within, between)
