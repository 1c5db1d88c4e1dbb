"""A JSONL file read in parts by tasks gives the listing the serial reader gives, byte for byte in
the shards, whatever the parts: line numbers, problems and warnings in file order, duplicates across
parts, a BOM, CR LF and lone CR line ends, invalid UTF-8."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shards.distributed import process_pool
from shards.readers import generic, read_annotations
from shards.writer import write_shards


def _line(image, captions, split="train", **extra) -> bytes:
    return json.dumps({"image": image, "captions": captions, "split": split, **extra}, ensure_ascii=False).encode()


def _tricky_jsonl(path: Path) -> None:
    lines = [
        b"\xef\xbb\xbf" + _line("a0.jpg", ["one", "two"]) + b"\r\n",  # BOM, CR LF
        b"\r\n",
        b"   \n",
        _line("a1.jpg", ["single"], "val", image_id=7) + b"\r",  # a lone CR ends a line too
        b"not json\n",
        b"[1, 2]\n",
        _line("a2.jpg", ["", " padded ", "x"]) + b"\n",  # a blank caption dropped: a warning
        *[_line(f"f{i}.jpg", [f"filler {i} {'w' * (i % 7)}"] * 5, ("train", "val", "test")[i % 3]) + b"\n"
          for i in range(40)],
        _line("a0.jpg", ["again"]) + b"\n",  # duplicate of line 1, several parts later
        _line("a4.jpg", ["k"]) + b"\n",
        _line("a4.png", ["k"]) + b"\n",  # the same sample key as a4.jpg
        b'{"image": "bad\xff.jpg", "captions": ["c"]}\n',  # invalid UTF-8
        _line("../up.jpg", ["c"]) + b"\n",
        _line("c.jpg", ["c"], "bad split") + b"\n",
        _line("d.jpg", ["caf\u00e9 \u2713", "line\u2028sep"], "test") + b"\n",
        _line("e.jpg", ["no newline at the end"]),
    ]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("part_bytes", [1, 7, 100, 1000, 1 << 21])
def test_jsonl_parts_read_as_the_serial_reader_reads(tmp_path, monkeypatch, part_bytes):
    ann = tmp_path / "ann.jsonl"
    _tricky_jsonl(ann)
    serial = read_annotations(ann, tmp_path / "images", corpus="rsicd")  # 5 captions expected: count warnings
    monkeypatch.setattr(generic, "_PART_BYTES", part_bytes)
    monkeypatch.setattr(generic, "_TASKS_MIN_BYTES", 0)
    tasks_seen: list[int] = []

    def tasks(fn, parts):
        for part in parts:
            tasks_seen.append(part.first_line)
            yield fn(part)

    read: list[int] = []
    parted = read_annotations(ann, tmp_path / "images", corpus="rsicd", tasks=lambda: tasks, on_read=read.append)
    assert parted == serial  # samples, problems, warnings (in order), sha256, corpus spec
    assert sum(read) == ann.stat().st_size
    assert tasks_seen[0] == 1 and tasks_seen == sorted(set(tasks_seen))
    if part_bytes >= ann.stat().st_size:  # all the lines that end, then the last one, which does not
        assert tasks_seen == [1, 55]
    else:
        assert len(tasks_seen) > 2
    assert parted.annotations_sha256 == hashlib.sha256(ann.read_bytes()).hexdigest()
    problems = [str(p) for p in parted.problems]
    assert problems[:2] == ["ann.jsonl line 5: invalid JSON: Expecting value (column 1)",
                            "ann.jsonl line 6: record is not an object (list)"]
    assert "a0.jpg: duplicate filename (first listed at ann.jsonl line 1)" in problems
    assert "a4.png: sample key 'rsicd_a4' collides with a4.jpg" in problems
    assert any(p.startswith("ann.jsonl line 51: image filename is not valid UTF-8") for p in problems)
    assert len(problems) == 7
    assert parted.warnings[:3] == ["a0.jpg: 2 captions, rsicd expects 5", "a1.jpg: 1 captions, rsicd expects 5",
                                   "a2.jpg: dropped 1 blank caption(s)"]
    assert [s.filename for s in parted.samples][:3] == ["a0.jpg", "a1.jpg", "a2.jpg"]
    assert parted.samples[-2].captions == ("caf\u00e9 \u2713", "line\u2028sep")


def test_a_jsonl_file_under_the_threshold_is_read_here(tmp_path, monkeypatch):
    """Below ``_TASKS_MIN_BYTES`` the tasks are not asked for (the workers are still starting)."""
    ann = tmp_path / "ann.jsonl"
    _tricky_jsonl(ann)
    monkeypatch.setattr(generic, "_PART_BYTES", 100)
    asked: list[bool] = []
    listing = read_annotations(ann, tmp_path / "images", tasks=lambda: asked.append(True) or map)
    assert asked == [] and ann.stat().st_size < generic._TASKS_MIN_BYTES
    assert listing == read_annotations(ann, tmp_path / "images") and len(listing.samples) == 46
    monkeypatch.setattr(generic, "_TASKS_MIN_BYTES", ann.stat().st_size)
    assert read_annotations(ann, tmp_path / "images", tasks=lambda: asked.append(True) or map) == listing
    assert asked == [True]


def test_jsonl_parts_in_worker_processes(tmp_path, monkeypatch):
    """Parts and their results cross process boundaries (pickled) unchanged."""
    ann = tmp_path / "ann.jsonl"
    _tricky_jsonl(ann)
    serial = read_annotations(ann, tmp_path / "images")
    monkeypatch.setattr(generic, "_PART_BYTES", 500)
    monkeypatch.setattr(generic, "_TASKS_MIN_BYTES", 0)
    with process_pool(2, "shards.readers") as pool:
        parted = read_annotations(ann, tmp_path / "images", tasks=lambda: pool.map)
    assert parted == serial and len(serial.samples) == 46 and len(serial.problems) == 7


def test_jsonl_corpus_sharded_by_workers_is_the_single_process_set(tiny_corpus, tmp_path, monkeypatch):
    """``write_shards(workers=2)`` reads a JSONL file in parts (bad lines quarantined) and writes the
    files the in-process run writes."""
    ann, images = tiny_corpus
    records = json.loads(Path(ann).read_text())["images"]
    jsonl = tmp_path / "ann.jsonl"
    lines = [json.dumps({"filename": r["filename"], "split": r["split"], "imgid": r["imgid"],
                         "captions": [s["raw"] for s in r["sentences"]]}) for r in records]
    lines[3:3] = ["{broken", json.dumps({"filename": records[0]["filename"], "captions": ["dup"]})]
    jsonl.write_text("\n".join(lines) + "\n")
    local = write_shards(jsonl, images, str(tmp_path / "local"), shard_size=6, on_error="skip", progress=False)
    monkeypatch.setattr(generic, "_PART_BYTES", 2000)  # several parts
    monkeypatch.setattr(generic, "_TASKS_MIN_BYTES", 0)
    assert jsonl.stat().st_size > 4 * 2000
    pooled = write_shards(jsonl, images, str(tmp_path / "pool"), shard_size=6, on_error="skip", progress=False,
                          workers=2)
    assert [q.reason for q in pooled.quarantine] == ["invalid JSON: Expecting property name enclosed in double "
                                                     "quotes (column 2)", "duplicate filename (first listed at "
                                                     "ann.jsonl line 1)"]
    assert pooled.digest == local.digest and pooled.source_digest == local.source_digest

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "pool") == files(tmp_path / "local")
