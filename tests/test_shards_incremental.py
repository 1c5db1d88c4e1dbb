"""Incremental sharding: a sample's shard follows from its key, so a re-shard after changing, adding
and removing samples rewrites only the shards that hold or receive them, and equals a fresh write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shards import cli
from shards.assign import cut, leaf_label, order_hash
from shards.manifest import SHARD_RE, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _leaves(keys: list[str], shard_size: int) -> dict[str, frozenset[str]]:
    """label -> keys of every shard of one split (100 bytes a sample; no byte limit)."""
    ordered = sorted(keys, key=order_hash)
    leaves = cut([order_hash(k) for k in ordered], [100] * len(ordered), shard_size, 1 << 40)
    assert [lo for _, lo, _ in leaves] == sorted(lo for _, lo, _ in leaves)  # in hash order...
    assert [label for label, _, _ in leaves] == sorted(label for label, _, _ in leaves)  # ...and name order
    return {label: frozenset(ordered[lo:hi]) for label, lo, hi in leaves}


def test_assignment_is_local_and_shards_stay_near_the_requested_size():
    rng = random.Random(0)
    keys = [f"rsicd_{i}" for i in range(3000)]
    size = 40
    before = _leaves(keys, size)
    counts = [len(v) for v in before.values()]
    assert sum(counts) == 3000 and max(counts) <= size
    assert sum(counts) / len(counts) >= size / 2  # a leaf splits only when over the limit
    assert all(SHARD_RE.match(f"train/train-{label}.tar") for label in before)

    removed = set(rng.sample(keys, 5))
    added = {f"rsicd_new_{i}" for i in range(5)}
    after = _leaves([k for k in keys if k not in removed] + sorted(added), size)
    assert max(len(v) for v in after.values()) <= size
    unchanged = {label for label, members in after.items() if before.get(label) == members}
    losing = [members for members in before.values() if members & removed]
    for label, members in after.items():
        if label in unchanged:
            continue
        # rewritten: it receives an added sample, or holds samples of a shard that lost one
        assert members & added or any(members & old for old in losing), label
    for label, members in before.items():
        if label not in unchanged:  # gone or changed: it lost a sample, or its samples went where one arrived
            assert members & removed or any(members & new for new in after.values() if new & added), label
    assert len(after) - len(unchanged) <= 2 * (len(removed) + len(added))
    assert len(unchanged) >= len(before) - 2 * (len(removed) + len(added))


def test_leaf_names_sort_in_hash_order_at_any_depth():
    assert leaf_label(0, 0) == "000000"
    assert leaf_label(1, 1) == "262144" and leaf_label(19, 2**19 - 1) == "524287"
    assert leaf_label(21, 0b101) == "00000101"  # below 19 bits: further bits as binary digits
    deep = [leaf_label(21, p) for p in range(8)] + [leaf_label(19, 2), leaf_label(20, 6)]
    assert deep == sorted(deep) and len(set(deep)) == len(deep)
    assert all(SHARD_RE.match(f"val/val-{label}.tar") for label in deep)


def _state(out: Path) -> dict[str, tuple[int, int, str]]:
    """Shard name -> (inode, mtime_ns, sha256) of every shard file."""
    found = {}
    for p in sorted(out.glob("*/*.tar")):
        st = p.stat()
        found[f"{p.parent.name}/{p.name}"] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return found


def _members(uri: str) -> dict[str, set[str]]:
    """Shard name -> sample keys, read from the tars."""
    import tarfile

    m = read_manifest(uri)
    return {s.name: {n.rsplit(".", 1)[0] for n in tarfile.open(Path(uri) / s.name).getnames()} for s in m.shards()}


def _msa_shard(*args: str) -> dict:
    """`msa shard ... --json` in a subprocess: stdout must be one JSON document."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "shard", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_reshard_after_edits_rewrites_only_the_shards_holding_them(tiny_corpus, tmp_path):
    src_ann, src_images = tiny_corpus
    images = tmp_path / "images"
    shutil.copytree(src_images, images)
    ann = tmp_path / src_ann.name
    doc = json.loads(src_ann.read_text())
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out"
    common = ["--images", str(images), "--out", str(out), "--shard-size", "8", "--no-progress"]
    first = _msa_shard(str(ann), *common)
    assert first["shards_reused"] == 0 and first["shards_rewritten"] == len(_state(out)) >= 10
    before, members_before = _state(out), _members(str(out))

    # one changed caption (in the last training shard), one removed sample (in the first: packing in
    # order would shift every later shard) and one added sample (a copy of an image under a new name)
    # that falls between them
    train_shards = sorted(n for n in members_before if n.startswith("train/"))
    by_key = {f"synth_{r['filename'].rsplit('.', 1)[0]}": r for r in doc["images"]}
    removed = by_key[min(members_before[train_shards[0]])]
    changed = by_key[min(members_before[train_shards[-1]])]
    low = min(map(order_hash, members_before[train_shards[1]]))
    high = max(map(order_hash, members_before[train_shards[-2]]))
    added = next(f"synth_added_{i}" for i in range(1000) if low < order_hash(f"synth_synth_added_{i}") < high)
    changed["sentences"][0]["raw"] = "an edited caption: a bright red roof beside the river"
    doc["images"].remove(removed)
    template = by_key[min(members_before[train_shards[1]])]
    shutil.copy(images / template["filename"], images / f"{added}.jpg")
    doc["images"].append({**template, "filename": f"{added}.jpg", "imgid": 9999, "sentids": []})
    ann.write_text(json.dumps(doc))

    second = _msa_shard(str(ann), *common)
    after, members_after = _state(out), _members(str(out))
    m = read_manifest(str(out))
    touched = {f"synth_{changed['filename'].rsplit('.', 1)[0]}", f"synth_{added}"}
    lost = members_before[train_shards[0]]
    expected = {name for name, keys in members_after.items() if keys & touched or keys & lost}
    rewritten = set(after) - set(m.reused_shards)
    assert rewritten == expected and 3 <= len(expected) <= 4  # 4: the removal merged two shards
    assert second["shards_rewritten"] == len(rewritten) and second["shards_reused"] == len(m.reused_shards)
    assert second["status"] == "written" and second["digest"] == m.digest != first["digest"]
    for name in m.reused_shards:  # kept: the very same file (inode, mtime, bytes)
        assert after[name] == before[name], name
    for name in rewritten:
        assert after[name][:2] != before.get(name, (None, None))[:2]
    assert cli.main(["shard", "verify", str(out), "--no-progress"]) == cli.EXIT_OK

    # the incremental result is exactly what a fresh write of the edited corpus gives
    fresh = tmp_path / "fresh"
    assert cli.main(["shard", str(ann), *common[:2], "--out", str(fresh), "--shard-size", "8", "--no-progress"]) == 0
    assert read_manifest(str(fresh)).digest == m.digest
    assert {n: v[2] for n, v in _state(fresh).items()} == {n: v[2] for n, v in after.items()}
    assert not [p for p in out.rglob(".*")] and sorted(os.listdir(out)) == sorted(os.listdir(fresh))


@pytest.mark.parametrize("edit", ["shard_size", "unchanged"])
def test_option_change_keeps_shards_whose_content_is_the_same(tiny_corpus, tmp_path, edit):
    """A larger shard size re-cuts only the leaves that may merge; an up-to-date rerun writes nothing."""
    ann, images = tiny_corpus
    out = tmp_path / "out"
    argv = ["shard", str(ann), "--images", str(images), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--shard-size", "4"]) == 0
    before = _state(out)
    assert cli.main(argv + ["--shard-size", "6" if edit == "shard_size" else "4"]) == 0
    m = read_manifest(str(out))
    after = _state(out)
    assert all(after[name] == before[name] for name in m.reused_shards)
    if edit == "unchanged":
        assert after == before
    else:
        assert 0 < len(m.reused_shards) < len(after) and all(s.samples <= 6 for s in m.shards())


def test_an_image_edited_in_place_at_the_same_size_rewrites_only_its_shard(tiny_corpus, tmp_path):
    """The image digest, not the file's size, tells a shard's content: one byte changed inside one image's
    scan data rewrites the shard holding it, and the result equals a fresh write."""
    src_ann, src_images = tiny_corpus
    images = tmp_path / "images"
    shutil.copytree(src_images, images)
    argv = ["shard", str(src_ann), "--images", str(images), "--shard-size", "8", "--no-progress"]
    out = tmp_path / "out"
    assert cli.main([*argv, "--out", str(out)]) == 0
    before, members = _state(out), _members(str(out))
    name = sorted(members)[len(members) // 2]
    key = min(members[name])
    path = next(p for p in images.iterdir() if f"synth_{p.stem}" == key)
    data = bytearray(path.read_bytes())
    i = next(i for i in range(len(data) // 2, len(data) - 2) if 0xFF not in data[i - 1:i + 2])
    data[i] ^= 0x01  # entropy-coded bytes, no marker next to it: still a well-formed JPEG
    path.write_bytes(bytes(data))

    assert cli.main([*argv, "--out", str(out)]) == 0
    m, after = read_manifest(str(out)), _state(out)
    assert set(after) == set(before) and set(m.reused_shards) == set(before) - {name}
    assert after[name][2] != before[name][2]
    assert all(after[n] == before[n] for n in m.reused_shards)
    fresh = tmp_path / "fresh"
    assert cli.main([*argv, "--out", str(fresh)]) == 0
    assert read_manifest(str(fresh)).digest == m.digest


def test_a_rerun_over_the_same_layout_keeps_no_image_bytes(tmp_path):
    """A write that re-cuts every shard keeps each image's bytes from its check to its write (one read instead
    of two); a rerun over a set of the same layout rewrites a few shards or none, so it keeps none (it used to
    keep them all, up to 512 MB, for nothing)."""
    import tracemalloc

    from PIL import Image

    from shards.writer import write_shards

    rng = random.Random(0)
    images, records, total = tmp_path / "images", [], 0
    images.mkdir()
    for i in range(128):
        path = images / f"{i:03d}.jpg"
        Image.frombytes("RGB", (256, 256), rng.randbytes(256 * 256 * 3)).save(path, quality=95)  # noise: ~130 KB
        total += path.stat().st_size
        records.append({"filename": path.name, "split": "train", "sentences": [{"raw": f"scene {i}"}]})
    ann = tmp_path / "dataset_noise.json"
    ann.write_text(json.dumps({"images": records, "dataset": "noise"}))
    out = str(tmp_path / "out")

    def traced_write(shard_size: int):
        tracemalloc.start()
        try:
            manifest = write_shards(ann, images, out, shard_size=shard_size, progress=False)
            return manifest, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    traced_write(16)
    manifest, rerun = traced_write(16)
    assert manifest.reused and rerun < total / 3, (rerun, total)  # ~2 MB of read buffers
    _, new_layout = traced_write(12)  # every shard re-cut: the bytes are kept again
    assert new_layout > total, (new_layout, total)
