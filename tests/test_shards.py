"""Tests of the shards package: readers, writer, manifest/verify, CLI (local storage)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import cli
from shards.manifest import read_manifest, verify_shards
from shards.readers import InputError, Sample, read_annotations, sample_key
from shards.shardfile import Member
from shards.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"jpg": "JPEG", "png": "PNG", "tif": "TIFF"}


def _image_bytes(seed: int, ext: str = "jpg", size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    # a coarse random pattern, upsampled: distinct average hashes per seed
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, FORMATS[ext], **({"quality": 90} if ext == "jpg" else {}))
    return buf.getvalue()


def _record(i: int, filename, split="train", n_captions=5, **extra) -> dict:
    rec = {"filename": filename, "imgid": i, "split": split,
           "sentences": [{"raw": f"image {i} caption {j}", "imgid": i, "sentid": i * 5 + j} for j in range(n_captions)]}
    rec.update(extra)
    return rec


def _good_corpus(root: Path, n=(6, 3, 3)) -> tuple[Path, Path, list[dict]]:
    """A clean Karpathy corpus: jpg/png/tif images split train/val/test."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    i = 0
    for split, count in zip(("train", "val", "test"), n):
        for _ in range(count):
            ext = ("jpg", "png", "tif")[i % 3]
            fn = f"g{i}.{ext}"
            (images / fn).write_bytes(_image_bytes(i, ext))
            records.append(_record(i, fn, split))
            i += 1
    ann = root / "dataset_synth.json"
    ann.write_text(json.dumps({"images": records, "dataset": "synth"}))
    return ann, images, records


# Every bad case, with the problem the report must give for it: (source, reason fragment).
EXPECTED_PROBLEMS = {
    ("missing.jpg", "image file not found"),
    ("empty.jpg", "empty (0 bytes)"),
    ("garbage.jpg", "not a decodable image"),
    ("truncated.jpg", "truncated"),
    ("nocaps.jpg", "no captions"),
    ("nosentences.jpg", "no captions"),
    ("blankcaps.jpg", "no captions"),
    ("g0.jpg", "duplicate filename"),
    ("../outside.jpg", "escapes the image folder"),
    ("/etc/hostname", "absolute image path"),
    ("badutf8.jpg", "not valid UTF-8"),
    ("badsplit.jpg", "invalid split"),
    ("listsplit.jpg", "invalid split"),
    ("nosplit.jpg", "missing split"),
    ("dataset_synth.json record 26", "record is not an object"),
    ("dataset_synth.json record 27", "missing or empty image filename"),
}


def _bad_corpus(root: Path) -> tuple[Path, Path, list[dict]]:
    ann, images, good = _good_corpus(root)
    (images / "empty.jpg").write_bytes(b"")
    (images / "garbage.jpg").write_bytes(os.urandom(300))
    full = _image_bytes(99, "jpg", 32)
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    for name in ("nocaps.jpg", "nosentences.jpg", "blankcaps.jpg", "badutf8.jpg", "badsplit.jpg", "listsplit.jpg", "nosplit.jpg"):
        (images / name).write_bytes(_image_bytes(len(name), "jpg"))
    (root / "outside.jpg").write_bytes(_image_bytes(7, "jpg"))  # exists, but outside the image folder
    bad = [
        _record(100, "missing.jpg"),
        _record(101, "empty.jpg", "val"),
        _record(102, "garbage.jpg", "test"),
        _record(103, "truncated.jpg"),
        _record(104, "nocaps.jpg", n_captions=0),
        {"filename": "nosentences.jpg", "imgid": 105, "split": "train"},
        {"filename": "blankcaps.jpg", "imgid": 106, "split": "train", "sentences": [{"raw": "  "}, {"raw": ""}]},
        _record(107, "g0.jpg", "test"),  # duplicate of a good training image
        _record(108, "../outside.jpg"),
        _record(109, "/etc/hostname"),
        {"filename": "badutf8.jpg", "imgid": 110, "split": "train",
         "sentences": [{"raw": "fine caption"}, {"raw": "BAD__BYTES here"}]},
        _record(111, "badsplit.jpg", "train/../x"),
        _record(113, "listsplit.jpg", ["train"]),  # not text (nor hashable)
        {"filename": "nosplit.jpg", "imgid": 112, "sentences": [{"raw": "a caption"}]},
    ]
    records = good + bad
    assert len(records) == 26  # records 26 and 27 follow
    records += ["not an object", {"imgid": 121, "split": "train", "sentences": [{"raw": "x"}]}]
    text = json.dumps({"images": records, "dataset": "synth"})
    ann.write_bytes(text.encode().replace(b"BAD__BYTES", b"caf\xe9 \xff"))  # latin-1 bytes: invalid UTF-8
    return ann, images, good


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _problem_pairs(problems) -> set[tuple[str, str]]:
    found = set()
    for p in problems:
        match = [e for e in EXPECTED_PROBLEMS if e[0] == p.source and e[1] in p.reason]
        found.add(match[0] if match else (p.source, p.reason))
    return found


def _write(ann, images, out, **kw):
    kw.setdefault("progress", False)
    return write_shards(ann, images, str(out), **kw)


# --------------------------------------------------------------------------------------------------
# bad input


def test_fail_mode_reports_every_problem_and_writes_nothing(tmp_path):
    ann, images, _ = _bad_corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError) as ei:
        _write(ann, images, out)
    assert _problem_pairs(ei.value.problems) == EXPECTED_PROBLEMS
    assert len(ei.value.problems) == len(EXPECTED_PROBLEMS)
    msg = str(ei.value)
    for source, reason in EXPECTED_PROBLEMS:
        assert f"{source}: " in msg and reason in msg
    assert not out.exists()  # validation happens before any write


def test_fail_mode_leaves_existing_set_untouched(tmp_path):
    ann, images, _ = _good_corpus(tmp_path / "good")
    out = tmp_path / "out"
    _write(ann, images, out, shard_size=2)
    before = _snapshot(out)
    bad_ann, bad_images, _ = _bad_corpus(tmp_path / "bad")
    with pytest.raises(InputError):
        _write(bad_ann, bad_images, out, shard_size=2)
    assert _snapshot(out) == before
    assert verify_shards(str(out)).ok


def test_skip_mode_quarantines_exactly_the_bad_samples(tmp_path):
    ann, images, good = _bad_corpus(tmp_path)
    out = tmp_path / "out"
    m = _write(ann, images, out, on_error="skip", shard_size=4)
    assert _problem_pairs(m.quarantine) == EXPECTED_PROBLEMS
    assert len(m.quarantine) == len(EXPECTED_PROBLEMS)
    assert {s: m.splits[s].images for s in m.splits} == {"train": 6, "val": 3, "test": 3}
    assert sum(i.captions for i in m.splits.values()) == 5 * len(good)
    on_disk = read_manifest(str(out))
    assert [q.source for q in on_disk.quarantine] == [q.source for q in m.quarantine]
    keys = {member.rsplit(".", 1)[0] for url in m.shard_urls("train") + m.shard_urls("val") + m.shard_urls("test")
            for member in tarfile.open(url).getnames()}
    assert keys == {sample_key("synth", r["filename"]) for r in good}
    assert verify_shards(str(out)).ok


def test_captions_are_stripped_and_blank_ones_dropped_with_a_warning(tmp_path):
    """All-ASCII captions (checked a record at a time) and the others (one by one) are cleaned alike;
    a plain file name and one written with a leading ``./`` give their path in the image folder."""
    images = tmp_path / "images"
    images.mkdir()
    records = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": r} for r in (" x ", " ", "y\t", "")]},
               {"filename": "b.jpg", "split": "train", "sentences": [{"raw": r} for r in (" caf\u00e9 ", "\n", "z")]},
               {"filename": "./c.jpg", "split": "train", "sentences": [{"raw": r} for r in ("\u2028", " w")]}]
    ann = tmp_path / "dataset_c.json"
    ann.write_text(json.dumps({"images": records, "dataset": "c"}))
    listing = read_annotations(ann, images)
    assert [s.captions for s in listing.samples] == [("x", "y"), ("caf\u00e9", "z"), ("w",)]
    assert listing.warnings == [f"{name}: dropped {n} blank caption(s)" for name, n in
                                (("a.jpg", 2), ("b.jpg", 1), ("./c.jpg", 1))]
    assert [s.image_path for s in listing.samples] == [str(images.resolve() / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert not listing.problems


def test_invalid_json_and_schema_are_fatal(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    bad_json = tmp_path / "dataset_rsicd.json"  # the file's line and column, though it is read a piece at a time
    bad_json.write_text('{"images": [\n  {"filename": "a.jpg"},\n  {"filename": "b.jpg",}\n]}')
    with pytest.raises(InputError, match=r"^dataset_rsicd.json: invalid JSON at line 3 column 24: Expecting property"):
        read_annotations(bad_json, images)
    bad_list = tmp_path / "ann.json"
    bad_list.write_text('[{"image": "a.jpg", "caption": "x"},\n {"image": "b.jpg" "caption": "y"}]')
    with pytest.raises(InputError, match=r"^ann.json: invalid JSON at line 2 column 20: Expecting ','"):
        read_annotations(bad_list, images)
    bad_schema = tmp_path / "dataset.json"
    bad_schema.write_text('{"pictures": []}')
    with pytest.raises(InputError, match=r"dataset.json: not a Karpathy-layout file"):
        read_annotations(bad_schema, images)
    with pytest.raises(InputError, match="annotation file not found"):
        read_annotations(tmp_path / "nope.json", images)


def test_bad_annotations_with_workers_leave_no_process_and_no_output(tmp_path):
    """The worker processes start before the annotations are read: a bad file stops them again."""
    images = tmp_path / "images"
    images.mkdir()
    bad = tmp_path / "dataset_rsicd.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    with pytest.raises(InputError, match=r"^dataset_rsicd.json: invalid JSON at line 2 column 24"):
        write_shards(bad, images, str(tmp_path / "out"), workers=2, progress=False)
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# truncated images: one fixture per image check, each refused with a reason naming its problem


def _noisy_bytes(ext: str, size: int = 64, seed: int = 5) -> bytes:
    """A noise image: pixel (scan) data is most of the file, so a cut at 90% lands inside it."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, FORMATS[ext], **({"quality": 90} if ext == "jpg" else {}))
    return buf.getvalue()


def _truncated_images() -> dict[str, tuple[bytes, str]]:
    """filename -> (bytes, the start of the reason the report must give)."""
    jpg, png, tif = _noisy_bytes("jpg"), _noisy_bytes("png"), _noisy_bytes("tif")
    sos = jpg.index(b"\xff\xda")  # start of scan; its segment ends where the entropy-coded data begins
    scan_data = sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")
    dqt = jpg.index(b"\xff\xdb")  # first quantisation table segment (67 bytes for 8-bit tables)
    jpg_cut = int(len(jpg) * 0.9)
    assert jpg.endswith(b"\xff\xd9") and dqt + 10 < sos and scan_data < jpg_cut < len(jpg) - 2
    idat = png.index(b"IDAT") - 4  # chunk start: length, type, data, crc
    idat_len = int.from_bytes(png[idat:idat + 4], "big")
    png_cut = idat + 8 + idat_len // 2
    assert png.endswith(b"\x00\x00\x00\x00IEND\xaeB`\x82") and idat_len > 1000
    assert tif[:4] == b"II*\x00"
    return {
        "jpg-cut-in-header.jpg": (jpg[:dqt + 10], "truncated JPEG (marker segment runs past the end)"),
        "jpg-cut-mid-scan.jpg": (jpg[:jpg_cut], "truncated JPEG (no end-of-image marker)"),
        "jpg-no-eoi.jpg": (jpg[:-2], "truncated JPEG (no end-of-image marker)"),
        "png-cut-mid-idat.png": (png[:png_cut], "truncated PNG (IDAT chunk runs past the end)"),
        "png-no-iend.png": (png[:-12], "truncated PNG (no IEND chunk)"),
        "tif-cut-mid-strip.tif": (tif[:int(len(tif) * 0.9)], "truncated TIFF (strip 1 of 1 runs past the end)"),
        "tif-cut-in-header.tif": (tif[:6], "truncated or corrupt TIFF (its header cannot be read)"),
    }


def _truncated_corpus(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """The intact noise images (train) and every truncated variant (train, val, test in turn)."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i, ext in enumerate(("jpg", "png", "tif")):
        (images / f"intact-{ext}.{ext}").write_bytes(_noisy_bytes(ext))
        records.append(_record(i, f"intact-{ext}.{ext}"))
    expected = {}
    for i, (name, (data, reason)) in enumerate(sorted(_truncated_images().items())):
        (images / name).write_bytes(data)
        records.append(_record(10 + i, name, ("train", "val", "test")[i % 3]))
        expected[name] = reason
    ann = root / "dataset_synth.json"
    ann.write_text(json.dumps({"images": records, "dataset": "synth"}))
    return ann, images, expected


@pytest.mark.parametrize("mode", [[], ["--full-decode"], ["--check-leaks"]], ids=["fast", "full-decode", "leaks"])
def test_truncated_images_are_quarantined_or_refused_with_their_reason(tmp_path, capsys, mode):
    ann, images, expected = _truncated_corpus(tmp_path)
    argv = ["shard", str(ann), "--images", str(images), "--no-progress", *mode]

    # --on-error fail: refused, every file named with its reason, nothing written
    assert cli.main(argv + ["--out", str(tmp_path / "refused")]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    for name, reason in expected.items():
        assert f"{name}: {reason}" in err, (name, err)
    assert "intact-" not in err
    assert not (tmp_path / "refused").exists()

    # --on-error skip: exactly the truncated files are quarantined, each with its reason
    out = tmp_path / "skipped"
    assert cli.main(argv + ["--out", str(out), "--on-error", "skip"]) == cli.EXIT_OK
    capsys.readouterr()
    m = read_manifest(str(out))
    got = {q.source: q.reason for q in m.quarantine}
    assert set(got) == set(expected)
    for name, reason in expected.items():
        assert got[name].startswith(reason), (name, got[name])
    assert {s: i.images for s, i in m.splits.items()} == {"train": 3}  # the intact originals pass every check
    assert verify_shards(str(out)).ok


# --------------------------------------------------------------------------------------------------
# readers


def _write_karpathy(path: Path, n: int, dataset: str | None = None, captions=5, splits=("train",)) -> None:
    recs = [_record(i, f"{i + 1}.tif", splits[i % len(splits)], n_captions=captions) for i in range(n)]
    doc = {"images": recs}
    if dataset:
        doc["dataset"] = dataset
    path.write_text(json.dumps(doc))


def test_karpathy_corpus_detection_and_count_warnings(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rsicd = tmp_path / "dataset_rsicd.json"
    _write_karpathy(rsicd, 3)
    lst = read_annotations(rsicd, images)
    assert lst.corpus == "rsicd" and len(lst.samples) == 3 and not lst.problems
    assert any("3 images, rsicd has 10921" in w for w in lst.warnings)
    assert any("split test has 0 images, rsicd has 1093" in w for w in lst.warnings)
    assert lst.samples[0].key == "rsicd_1" and lst.samples[0].captions[0] == "image 0 caption 0"

    rsitmd = tmp_path / "dataset_RSITMD.json"
    _write_karpathy(rsitmd, 2, captions=4)
    lst = read_annotations(rsitmd, images)
    assert lst.corpus == "rsitmd"
    assert "1.tif: 4 captions, rsitmd expects 5" in lst.warnings

    # a plain dataset.json is identified by its size...
    ucm_dir = tmp_path / "ucm"
    ucm_dir.mkdir()
    _write_karpathy(ucm_dir / "dataset.json", 2100, splits=("train",) * 8 + ("val", "test"))
    lst = read_annotations(ucm_dir / "dataset.json", images)
    assert lst.corpus == "ucm"
    assert not any("images, ucm has" in w for w in lst.warnings)
    # ...and a copy claiming to be UCM with Sydney's 613 images is flagged as swapped
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    _write_karpathy(swapped / "dataset.json", 613, dataset="ucm")
    lst = read_annotations(swapped / "dataset.json", images)
    assert lst.corpus == "ucm"
    assert any("613 images, ucm has 2100" in w and "sydney" in w and "swapped" in w for w in lst.warnings)
    # an explicit corpus name wins
    lst = read_annotations(swapped / "dataset.json", images, corpus="Sydney-Captions")
    assert lst.corpus == "sydney" and not any("dataset.json: 613 images" in w for w in lst.warnings)
    assert "dataset.json: split train has 613 images, sydney has 497" in lst.warnings


def test_generic_jsonl_and_csv(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"p{i}.png").write_bytes(_image_bytes(i, "png"))
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"image": "p0.png", "captions": ["a", "b"], "split": "train"}),
        json.dumps({"image": "p1.png", "caption": "one caption", "split": "test", "image_id": 7}),
        "{not json",
        json.dumps({"path": "p2.png", "captions": ["c"]}),  # split defaults to train
    ]) + "\n")
    lst = read_annotations(jsonl, images, corpus="MyCorpus")
    assert lst.corpus == "mycorpus"
    assert [(s.filename, s.split, s.captions, s.image_id) for s in lst.samples] == [
        ("p0.png", "train", ("a", "b"), "p0"), ("p1.png", "test", ("one caption",), 7), ("p2.png", "train", ("c",), "p2")]
    assert [str(p) for p in lst.problems] == ["ann.jsonl line 3: invalid JSON: Expecting property name enclosed "
                                              "in double quotes (column 2)"]

    csv_path = tmp_path / "ann.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "split"])
        w.writerows([["p0.png", "first", "train"], ["p1.png", "x", "val"], ["p0.png", "second", "train"],
                     ["p3.png", "y", "train"], ["p3.png", "z", "test"]])
    lst = read_annotations(csv_path, images)
    assert lst.corpus == "ann"
    assert [(s.filename, s.split, s.captions) for s in lst.samples] == [
        ("p0.png", "train", ("first", "second")), ("p1.png", "val", ("x",))]
    assert [str(p) for p in lst.problems] == ["p3.png: listed in split 'train' (ann.csv line 5) and 'test' (ann.csv line 6)"]
    m = _write(csv_path, images, tmp_path / "out", on_error="skip")
    assert {k: (v.images, v.captions) for k, v in m.splits.items()} == {"train": (1, 2), "val": (1, 1)}
    assert [q.source for q in m.quarantine] == ["p3.png"]


def test_sample_keys_are_stable_and_dot_free():
    assert sample_key("ucm", "1.tif") == "ucm_1"
    assert sample_key("rsicd", "airport_12.jpg") == "rsicd_airport_12"
    k = sample_key("x", "sub dir/a.b.jpg")
    assert "." not in k and k.startswith("x_sub_dir_a_b-") and k == sample_key("x", "sub dir/a.b.jpg")
    assert sample_key("x", "a_b.jpg") != sample_key("x", "a.b.jpg")


# --------------------------------------------------------------------------------------------------
# output format and determinism


def test_shards_readable_by_tar_and_webdataset(tmp_path):
    import webdataset as wds

    ann, images, good = _good_corpus(tmp_path)
    m = _write(ann, images, tmp_path / "out", shard_size=2)
    seen = {}
    for split in ("train", "val", "test"):
        urls = m.shard_urls(split)
        assert len(urls) >= (3 if split == "train" else 2) and all(s.samples <= 2 for s in m.splits[split].shards)
        for url in urls:
            names = subprocess.run(["tar", "-tf", url], check=True, capture_output=True, text=True).stdout.split()
            pairs = [names[i:i + 2] for i in range(0, len(names), 2)]  # each sample: its two members, sorted
            assert all(a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0] and a < b for a, b in pairs)
            assert all(n.rsplit(".", 1)[1] in ("jpg", "png", "tif", "json") for n in names)
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            ext = next(k for k in ("jpg", "png", "tif") if k in sample)
            seen[sample["__key__"]] = (meta, ext, sample[ext])
            assert meta["split"] == split
    assert len(seen) == len(good)
    for rec in good:
        meta, ext, data = seen[sample_key("synth", rec["filename"])]
        assert meta == {"captions": [s["raw"] for s in rec["sentences"]], "image_id": rec["imgid"],
                        "filename": rec["filename"], "split": rec["split"], "corpus": "synth"}
        assert ext == rec["filename"].rsplit(".", 1)[1]
        assert data == (images / rec["filename"]).read_bytes()  # stored bytes, untouched
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {s.name: s.samples for s in m.shards()} and sum(sizes.values()) == len(good)
    with tarfile.open(m.shard_urls("train")[0]) as tf:
        for ti in tf.getmembers():
            assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == (1577836800, 0, 0, "", "", 0o644)


def test_shard_bytes_limit(tmp_path):
    ann, images, good = _good_corpus(tmp_path)
    m = _write(ann, images, tmp_path / "out", shard_bytes=4096)
    assert all(s.samples == 1 for s in m.shards())  # each sample alone exceeds half the limit
    assert sum(s.samples for s in m.shards()) == len(good)


def test_planned_bytes_are_the_archives_with_long_member_names(tmp_path):
    """What the planner counts for a sample (for a draft too, before the image's format is known) is
    what its two members take in the tar, GNU longname blocks included for names over 100 bytes."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    stems = ["n" * n for n in (10, 85, 86, 88, 89, 92, 200)] + ["/".join(["d" * 200] * 3)]
    for i, stem in enumerate(stems):  # member names of 21-627 bytes
        fn = f"{stem}{i}.{('jpg', 'png', 'tif')[i % 3]}"
        (images / fn).parent.mkdir(parents=True, exist_ok=True)
        (images / fn).write_bytes(_image_bytes(i, fn[-3:]))
        records.append(_record(i, fn))
    ann = tmp_path / "dataset_synth.json"
    ann.write_text(json.dumps({"images": records, "dataset": "synth"}))
    m = _write(ann, images, tmp_path / "out", shard_size=1)
    assert len(m.shards()) == len(records)
    lengths = []
    for shard in m.shards():
        with tarfile.open(tmp_path / "out" / shard.name) as tf:
            members = tf.getmembers()
            end = tf.offset  # where the end-of-archive blocks start
        image, meta = sorted(members, key=lambda ti: ti.name.endswith(".json"))
        key = meta.name.removesuffix(".json")
        for ext in ("", image.name.rsplit(".", 1)[1]):  # a draft's member, then the written one
            planned = Member(key, "", ext, image.size, "", b"x" * meta.size)
            assert planned.tar_bytes() == end, (shard.name, len(image.name))
        lengths += [len(image.name), len(meta.name)]
    assert min(lengths) <= 100 < max(lengths) and 100 in lengths and 101 in lengths


def test_json_member_is_what_json_dumps_writes():
    """The json member, assembled by hand for speed, is byte for byte json.dumps of the sample's
    fields with sorted keys and ensure_ascii=False: quotes, escapes, controls, non-ASCII, U+2028,
    astral characters, integer and text ids."""
    rng = random.Random(0)
    chars = ['a', '"', "\\", "\n", "\x00", "\x1f", "\x7f", "\u00e9", "\u2028", "\U0001f30d", "/", " ", "\x85"]

    def text() -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 8)))

    for _ in range(2000):
        captions = [text() for _ in range(rng.randint(0, 6))]
        s = Sample.of(text(), "k", text(), text(), "", captions, rng.choice([rng.randint(-10**20, 10**20), text()]))
        fields = {"captions": captions, "corpus": s.corpus, "filename": s.filename, "image_id": s.image_id,
                  "split": s.split}
        assert s.meta == json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        assert s.captions == tuple(captions) and s.caption_count == len(captions)


def test_two_runs_are_byte_identical_whatever_the_workers(tmp_path):
    ann, images, _ = _good_corpus(tmp_path)
    m1 = _write(ann, images, tmp_path / "a", shard_size=3, check_leaks=True)
    m2 = _write(ann, images, tmp_path / "b", shard_size=3, check_leaks=True, workers=2)
    assert m1.digest == m2.digest and m1.source_digest == m2.source_digest
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_resize_reencodes_deterministically(tmp_path):
    ann, images, good = _good_corpus(tmp_path)
    m1 = _write(ann, images, tmp_path / "a", resize=8)
    m2 = _write(ann, images, tmp_path / "b", resize=8)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    with tarfile.open(m1.shard_urls("train")[0]) as tf:
        for ti in tf.getmembers():
            if not ti.name.endswith(".json"):
                assert ti.name.rsplit(".", 1)[1] in ("jpg", "png")  # tif became png
                assert Image.open(tf.extractfile(ti)).size == (8, 8)
    assert m1.options["resize"] == 8 and m1.digest == m2.digest


# --------------------------------------------------------------------------------------------------
# idempotence, atomicity, verification


def test_rerun_skips_and_option_change_rewrites_without_stale_shards(tmp_path):
    ann, images, _ = _good_corpus(tmp_path)
    out = tmp_path / "out"
    m1 = _write(ann, images, out, shard_size=1)
    assert not m1.reused and len(m1.splits["train"].shards) == 6
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    time.sleep(0.01)
    m2 = _write(ann, images, out, shard_size=1)
    assert m2.reused and m2.digest == m1.digest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    m3 = _write(ann, images, out, shard_size=4)
    assert not m3.reused and len(m3.splits["train"].shards) < 6
    assert all(s.samples <= 4 for s in m3.shards())
    assert sorted(f"train/{p.name}" for p in (out / "train").iterdir()) == [s.name for s in m3.splits["train"].shards]
    rep = verify_shards(str(out))
    assert rep.ok and rep.checked == len(m3.shards()) and not rep.extra
    # a changed image changes the source digest and forces a rewrite
    (images / "g0.jpg").write_bytes(_image_bytes(1234, "jpg"))
    m4 = _write(ann, images, out, shard_size=4)
    assert not m4.reused and m4.source_digest != m3.source_digest and m4.digest != m3.digest


_SLOW_MAIN = """
import sys, time
sys.path.insert(0, {root!r})
import shards.shardfile as w
_finish = w._ShardWriter.finish
def slow_finish(self, content):
    time.sleep(0.4)
    return _finish(self, content)
w._ShardWriter.finish = slow_finish
from shards.cli import main
sys.exit(main({argv!r}))
"""


def test_interrupted_run_leaves_no_manifest_and_rerun_completes(tmp_path):
    ann, images, _ = _good_corpus(tmp_path)
    out = tmp_path / "out"
    argv = ["shard", str(ann), "--images", str(images), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--shard-size", "4"]) == 0  # an existing, valid set
    code = _SLOW_MAIN.format(root=str(ROOT), argv=argv + ["--shard-size", "1"])
    started = time.time_ns()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(tmp_path))

    def new_shards() -> int:
        return sum(p.stat().st_mtime_ns >= started for p in out.glob("*/*.tar"))

    try:
        deadline = time.monotonic() + 60
        # the new run deletes the old manifest first, then writes its shards one by one
        while time.monotonic() < deadline and new_shards() < 3:
            assert proc.poll() is None, "the run finished before it could be interrupted"
            time.sleep(0.02)
        assert new_shards() >= 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()  # never a manifest covering a partial set
    assert not verify_shards(str(out)).ok
    assert cli.main(argv + ["--shard-size", "1"]) == 0
    rep = verify_shards(str(out))
    assert rep.ok, rep.problems
    assert rep.checked == 12 and not rep.extra
    assert not [p for p in out.rglob(".*")]  # no temporaries left
    fresh = _write(ann, images, tmp_path / "fresh", shard_size=1)
    assert read_manifest(str(out)).digest == fresh.digest


def test_verify_detects_corrupt_missing_and_extra_shards(tmp_path, capsys):
    ann, images, _ = _good_corpus(tmp_path)
    out = tmp_path / "out"
    m = _write(ann, images, out, shard_size=2)
    assert verify_shards(str(out)).ok
    assert cli.main(["shard", "verify", str(out)]) == 0
    first, second = m.shard_urls("train")[:2]
    data = bytearray(Path(first).read_bytes())
    data[700] ^= 0x01  # flip one bit inside the first image
    Path(first).write_bytes(bytes(data))
    Path(second).unlink()
    (out / "val" / "val-000099.tar").write_bytes(b"\0" * 1024)
    rep = verify_shards(str(out))
    assert not rep.ok
    first_name, second_name = (s.name for s in m.splits["train"].shards[:2])
    assert rep.corrupt == [first_name]
    assert rep.missing == [second_name]
    assert rep.extra == ["val/val-000099.tar"]
    assert cli.main(["shard", "verify", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"{first_name}: sha256" in err and f"{second_name}: missing" in err
    # a manifest-less folder is not a shard set
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = verify_shards(str(empty))
    assert not rep.ok and "no manifest" in rep.problems[0]


def _edit_manifest(out: Path, edit) -> None:
    doc = json.loads((out / "manifest.json").read_text())
    edit(doc)
    (out / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _drop_last_train_shard(out: Path):
    """Remove the last training shard from the set and from its listing, counts and sizes.json, so
    that only the dataset digest still tells: the listing is no longer the one that was written."""
    def edit(doc):
        dropped = doc["splits"]["train"]["shards"].pop()
        doc["splits"]["train"]["images"] -= dropped["samples"]
        (out / dropped["name"]).unlink()
        sizes = json.loads((out / "sizes.json").read_text())
        del sizes[dropped["name"]]
        (out / "sizes.json").write_text(json.dumps(sizes))
    return edit


def _swap_digest(doc):
    doc["digest"] = hashlib.sha256(b"another shard set").hexdigest()


@pytest.mark.parametrize("edit", ["digest", "shard-list"])
def test_edited_manifest_is_refused_by_verify_and_by_training(tmp_path, capsys, edit):
    from msa.runtime.datasets import verify_dataset

    ann, images, _ = _good_corpus(tmp_path)
    out = tmp_path / "out"
    _write(ann, images, out, shard_size=2)
    assert cli.main(["shard", "verify", str(out)]) == cli.EXIT_OK
    assert verify_dataset(str(out)) == read_manifest(str(out)).digest
    capsys.readouterr()

    _edit_manifest(out, _swap_digest if edit == "digest" else _drop_last_train_shard(out))
    rep = verify_shards(str(out))
    assert not rep.ok
    # nothing but the digest gives the edit away: every listed shard is present and intact
    assert rep.problems == ["manifest.json: dataset digest does not match its shard list"]
    assert not rep.missing and not rep.corrupt and not rep.extra
    assert cli.main(["shard", "verify", str(out)]) == cli.EXIT_STORAGE
    err = capsys.readouterr().err
    assert "FAILED" in err and "manifest.json: dataset digest does not match its shard list" in err
    with pytest.raises(ValueError, match=r"failed verification: manifest.json: dataset digest does not match"):
        verify_dataset(str(out))


# --------------------------------------------------------------------------------------------------
# leak check, CLI


def test_leak_check_finds_duplicates_across_splits(tmp_path, capsys):
    ann, images, records = _good_corpus(tmp_path)
    # exact copy of a training image in test, and a PNG re-encoding of another one in val
    (images / "copy.jpg").write_bytes((images / "g0.jpg").read_bytes())
    Image.open(images / "g3.jpg").save(images / "reencoded.png")
    records += [_record(50, "copy.jpg", "test"), _record(51, "reencoded.png", "val")]
    ann.write_text(json.dumps({"images": records, "dataset": "synth"}))
    m = _write(ann, images, tmp_path / "out", check_leaks=True)
    pairs = {(leak.kind, leak.a.filename, leak.b.filename) for leak in m.leaks}
    assert ("exact", "copy.jpg", "g0.jpg") in pairs
    assert ("ahash", "g3.jpg", "reencoded.png") in pairs or ("ahash", "reencoded.png", "g3.jpg") in pairs
    assert all(leak.a.split != leak.b.split for leak in m.leaks)
    assert read_manifest(str(tmp_path / "out")).leaks == m.leaks
    rc = cli.main(["shard", str(ann), "--images", str(images), "--out", str(tmp_path / "out2"),
                   "--check-leaks", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "leak check:" in text and "test/copy.jpg == train/g0.jpg" in text
    m_plain = _write(ann, images, tmp_path / "out3")
    assert m_plain.leaks is None


def test_cli_exit_codes_and_help(tmp_path, capsys):
    ann, images, _ = _good_corpus(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["shard", str(ann), "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    assert "written" in capsys.readouterr().out
    assert cli.main(["shard", str(ann), "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    assert "up to date, nothing written" in capsys.readouterr().out
    bad_ann, bad_images, _ = _bad_corpus(tmp_path / "bad")
    assert cli.main(["shard", str(bad_ann), "--images", str(bad_images), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg: image file not found" in err and "badutf8.jpg: caption 2 is not valid UTF-8" in err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["shard", str(ann), "--images", str(images), "--out", str(blocker / "sub"),
                     "--no-progress"]) == 3
    assert "storage error" in capsys.readouterr().err
    assert cli.main(["shard", "verify", str(tmp_path / "nowhere")]) == 3
    with pytest.raises(SystemExit) as ei:
        cli.main(["shard", "verify", str(out), "--images", str(images)])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["shard", str(ann)])  # --images/--out missing
    assert ei.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        cli.main(["shard", "--help"])
    assert ei.value.code == 0
    help_text = capsys.readouterr().out
    for fragment in ("msa shard ANNOTATIONS --images DIR --out URI", "msa shard verify URI", "--on-error",
                     "--shard-size", "--shard-bytes", "--resize", "--workers", "--endpoint-url", "--check-leaks",
                     "exit codes:", "  2  input error", "  3  storage/I-O error"):
        assert fragment in help_text


def test_register_adds_commands_to_an_msa_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="msa")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["corpus", "synth", "out", "--train", "3", "--format", "png"])
    assert args.handler is cli._cmd_synth and args.train == 3 and args.format == "png" and args.difficulty == "easy"
    args = parser.parse_args(["shard", "verify", "s3://b/p", "--endpoint-url", "http://x"])
    assert args.handler is cli._cmd_shard and args.paths == ["verify", "s3://b/p"]


def test_shards_package_imports_no_heavy_frameworks():
    code = ("import sys; import shards, shards.cli, shards.writer, shards.readers, shards.manifest, shards.storage; "
            "shards.write_shards; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'prefect', 'ray', 'mlflow')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fast_tar_header_matches_tarfile():
    from shards.shardfile import _tarinfo, tar_header

    for name, size in [("a.jpg", 0), ("k" * 100, 5), ("k" * 101, 7), ("x_1.json", 8**11 - 1),
                       ("x_1.json", 8**11 + 5), ("caf\u00e9_1.jpg", 3), ("ucm_1.tif", 123456)]:
        assert tar_header(name, size) == _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")


def test_member_names_over_100_bytes_are_counted_and_verified(tmp_path):
    """A key past tar's 100-byte name field gets GNU longname blocks: the shard's size, padding and digest
    in the manifest are those of the file, which verifies and reads back with every member."""
    images = tmp_path / "images"
    images.mkdir()
    names = [("x" * 110) + f"{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        (images / name).write_bytes(_image_bytes(i))
    ann = tmp_path / "dataset_synth.json"
    ann.write_text(json.dumps({"images": [_record(i, n) for i, n in enumerate(names)], "dataset": "synth"}))
    m = write_shards(ann, images, str(tmp_path / "out"), progress=False)
    (shard,) = m.shards()
    path = tmp_path / "out" / shard.name
    assert shard.bytes == path.stat().st_size and shard.bytes % tarfile.RECORDSIZE == 0
    assert verify_shards(str(tmp_path / "out")).ok
    with tarfile.open(path) as tf:
        assert sorted(n.rsplit(".", 1)[1] for n in tf.getnames()) == ["jpg"] * 3 + ["json"] * 3
        assert all(len(n) > 100 for n in tf.getnames())


def test_threaded_check_and_hashing_write_the_same_bytes(tmp_path, monkeypatch):
    """Large images are checked in threads (and every shard is hashed in a thread): in one pass on a
    first write, in the check phase over an existing set. The shards, their digests and the reported
    problem are those of the one-thread path."""
    import threading

    import shards.writer as writer

    ann, images, records = _good_corpus(tmp_path)
    (images / "cut.jpg").write_bytes(_image_bytes(99)[:-2])  # the problem comes from a later batch
    doc = json.loads(ann.read_text())
    doc["images"].append(_record(99, "cut.jpg", "test"))
    ann.write_text(json.dumps(doc))
    seen: list[tuple[str, str]] = []
    for module, name in ((writer, "_check_batch"), (writer, "check_and_write")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: seen.append(
            (name, threading.current_thread().name)) or fn(*a, **k))
    monkeypatch.setattr(writer, "_CHECK_BATCH", 2)
    monkeypatch.setattr(writer, "_WRITE_BATCH", 2)
    results = {}
    for threads, min_bytes, existing in ((1, 1 << 40, False), (2, 0, False), (2, 0, True)):
        monkeypatch.setattr(writer, "_CHECK_THREADS", threads)
        monkeypatch.setattr(writer, "_THREAD_MIN_BYTES", min_bytes)
        out = tmp_path / f"threads-{threads}-{existing}"
        if existing:  # a set with other options: checked first, then every shard rewritten
            write_shards(ann, images, str(out), shard_size=3, on_error="skip", progress=False)
        seen.clear()
        m = write_shards(ann, images, str(out), shard_size=2, on_error="skip", progress=False)
        shards = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.tar")}
        results[threads, existing] = (m.digest, m.source_digest, [q.reason for q in m.quarantine], shards)
        if threads == 1:  # checked in this thread, then written
            assert {n for n, _ in seen} == {"_check_batch"} and len(seen) == 7
            assert all(t == threading.current_thread().name for _, t in seen)
        elif not existing:  # one pass in two threads
            assert {n for n, _ in seen} == {"check_and_write"} and all(t.startswith("shard-task") for _, t in seen)
        else:
            assert {n for n, _ in seen} == {"_check_batch"} and any(t.startswith("shard-check") for _, t in seen)
    assert results[1, False] == results[2, False] == results[2, True]
    assert results[1, False][2] == ["truncated JPEG (no end-of-image marker)"] and len(results[1, False][3]) >= 6
    assert verify_shards(str(tmp_path / "threads-2-False")).ok


def test_gc_is_paused_while_writing_and_restored_after(tmp_path, monkeypatch):
    import gc

    import shards.writer as writer

    ann, images, _ = _good_corpus(tmp_path)
    seen = []
    read = writer.read_annotations
    monkeypatch.setattr(writer, "read_annotations", lambda *a, **k: seen.append(gc.isenabled()) or read(*a, **k))
    assert gc.isenabled()
    write_shards(ann, images, str(tmp_path / "a"), progress=False)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(InputError):
        write_shards(ann, tmp_path / "nowhere", str(tmp_path / "b"), progress=False)
    assert gc.isenabled()
    gc.disable()
    try:
        write_shards(ann, images, str(tmp_path / "c"), progress=False)
        assert not gc.isenabled()  # a caller's choice is left as it was
    finally:
        gc.enable()


def test_a_write_leaves_no_cycle_per_sample_for_the_paused_gc(tmp_path):
    """The GC is paused while writing, so whatever a reference cycle holds stays until it runs again:
    the garbage cycles a write leaves must not grow with the corpus (a recursive closure in the trie
    cut once kept every split's list of hashes and of sizes)."""
    import gc

    left = []
    for n in (3, 100):
        ann, images, _ = _good_corpus(tmp_path / str(n), (n, n, n))
        gc.collect()
        gc.disable()
        try:
            write_shards(ann, images, str(tmp_path / f"out{n}"), progress=False)
            gc.set_debug(gc.DEBUG_SAVEALL)  # what the collection finds stays in gc.garbage, to be measured
            gc.collect()
            left.append(sum(map(sys.getsizeof, gc.garbage)))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left[1] - left[0] < 3 * (100 - 3), left  # under a byte a sample


def test_bench_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_shards.py"), "--small", "--json", "--driver-memory"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["images"] == 200 and figures["ratio"] > 0
    assert figures["annotations"]["records"] == 2000 and figures["annotations"]["peak_bytes"] > 0
    assert figures["driver_peak_bytes"] > 0 and "driver mem" in r.stdout


@pytest.mark.slow
def test_bench_smoke_jsonl_with_workers():
    """The JSONL corpus, read in parts by two workers: the sharding figures, the incremental rerun after
    an edited JSONL caption, and the driver's share of reading the records."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_shards.py"), "--n", "200", "--repeat", "1",
                        "--jsonl", "--workers", "2", "--annotations", "50000", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["images"] == 200 and figures["shards_workers_cpu_s"] > 0 and figures["incremental_s"] > 0
    assert "1 shard(s) rewritten" in r.stdout and "JSONL records" in r.stdout
    tasks = figures["annotations_in_tasks"]  # a file over _TASKS_MIN_BYTES: read in parts, this process does less
    assert tasks["records"] == 50000 and tasks["workers"] == 2 and 0 < tasks["tasks_cpu_s"] < tasks["serial_cpu_s"]


def test_json_output_is_pure_json_with_progress_on_stderr(tmp_path):
    """`msa shard --json` and `msa shard verify --json`: stdout is one JSON document, bars go to stderr."""
    ann, images, good = _good_corpus(tmp_path)
    out = tmp_path / "out"

    def msa(*args: str) -> tuple[int, dict, str]:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "shard", *args, "--json"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, json.loads(proc.stdout), proc.stderr

    rc, summary, err = msa(str(ann), "--images", str(images), "--out", str(out), "--shard-size", "2")
    assert rc == 0 and summary["status"] == "written" and summary["digest"] == read_manifest(str(out)).digest
    assert summary["splits"]["train"]["images"] == 6 and summary["shards_rewritten"] == len(read_manifest(str(out)).shards())
    assert all(bar in err for bar in ("annotations", "check", "write", "written: "))  # bars and report, on stderr
    rc, report, err = msa("verify", str(out))
    assert rc == 0 and report["ok"] and report["checked"] == summary["shards_rewritten"] and "verify" in err
    next(out.glob("train/*.tar")).write_bytes(b"\0" * 1024)
    rc, report, err = msa("verify", str(out))
    assert rc == 3 and not report["ok"] and len(report["corrupt"]) == 1 and "FAILED" in err
    rc, failure, _ = msa(str(ann), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))
    assert rc == 2 and failure["error"] == "input" and len(failure["problems"]) == len(good)
