"""Sharding as Ray tasks (2 local workers) writes exactly what the single process writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shards import cli, writer
from shards.manifest import verify_shards
from shards.readers import generic
from shards.writer import write_shards

pytestmark = pytest.mark.slow


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ray_sharding_equals_single_process_byte_for_byte(ray_cluster, tiny_corpus, tmp_path, monkeypatch, capsys):
    import ray

    assert ray.cluster_resources().get("CPU", 0) >= 2
    ann, images = tiny_corpus
    local = write_shards(ann, images, str(tmp_path / "local"), shard_size=6, progress=False)
    # small tasks, so both workers check images and write shards
    monkeypatch.setattr(writer, "_CHECK_BATCH", 8)
    monkeypatch.setattr(writer, "_WRITE_BATCH", 6)
    distributed = write_shards(ann, images, str(tmp_path / "ray"), shard_size=6, progress=False, ray_address="auto")
    assert distributed.digest == local.digest and distributed.source_digest == local.source_digest
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # every shard, sizes.json and manifest.json
    assert len(local.shards()) >= 12 and verify_shards(str(tmp_path / "ray")).ok
    assert ray.is_initialized()  # a cluster the caller started is left running

    # `msa shard --ray` on the running cluster: the same set, reported as JSON
    argv = ["shard", str(ann), "--images", str(images), "--out", str(tmp_path / "cli"), "--shard-size", "6",
            "--ray", "--json", "--no-progress"]
    assert cli.main(argv) == cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "written" and summary["digest"] == local.digest
    assert summary["shards_rewritten"] == len(local.shards()) and summary["shards_reused"] == 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "local")


def test_ray_reads_a_jsonl_file_in_tasks_and_writes_the_same_set(ray_cluster, tiny_corpus, tmp_path, monkeypatch):
    """A JSONL file's parts are checked as Ray tasks; the set is the single process's."""
    ann, images = tiny_corpus
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_text("".join(json.dumps({"filename": r["filename"], "split": r["split"],
                                         "captions": [s["raw"] for s in r["sentences"]]}) + "\n"
                             for r in json.loads(Path(ann).read_text())["images"]))
    local = write_shards(jsonl, images, str(tmp_path / "local"), shard_size=6, progress=False)
    monkeypatch.setattr(generic, "_PART_BYTES", 1000)
    monkeypatch.setattr(generic, "_TASKS_MIN_BYTES", 0)
    parts: list[int] = []
    cut = generic._jsonl_parts

    def counted(*args):
        for part in cut(*args):
            parts.append(part.first_line)
            yield part

    monkeypatch.setattr(generic, "_jsonl_parts", counted)
    distributed = write_shards(jsonl, images, str(tmp_path / "ray"), shard_size=6, progress=False, ray_address="auto")
    assert len(parts) > 3  # the driver cut the file into parts for the tasks
    assert distributed.digest == local.digest and _files(tmp_path / "ray") == _files(tmp_path / "local")
