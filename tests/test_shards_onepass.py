"""A first write through a pool or Ray checks and writes in one pass (shards.writer's module doc):
the bytes of the in-process writer, each image read once, bad images handled as in two phases.

The pool runs in threads here (``Executor`` over a thread pool, the protocol of the process pool),
so that the tests can count reads and change what the tasks see; tests/test_shards.py and
tests/test_shards_ray.py run the same path in real worker processes and Ray tasks."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import shards.readers.images as images_module
import shards.shardfile as shardfile
import shards.writer as writer
from shards.distributed import Executor
from shards.manifest import verify_shards
from shards.readers import InputError
from shards.writer import write_shards


@pytest.fixture
def thread_pool(monkeypatch):
    """``workers > 1`` runs its tasks in threads of this process; returns how many tasks ran."""
    tasks = collections.Counter()

    def pool(workers: int, preload: str) -> Executor:
        ex = cf.ThreadPoolExecutor(workers)

        def submit(fn, batch):
            tasks[getattr(fn, "func", fn).__name__] += 1
            return ex.submit(fn, batch)

        return Executor(submit, 2 * workers, lambda: ex.shutdown(cancel_futures=True), lambda f: f.cancel())

    monkeypatch.setattr(writer, "process_pool", pool)
    monkeypatch.setattr(writer, "_WRITE_BATCH", 6)  # several tasks, so both threads write
    return tasks


@pytest.fixture
def reads(monkeypatch) -> collections.Counter:
    """Reads of each image file, by the checks and by the writers."""
    counts: collections.Counter = collections.Counter()
    read = images_module.read_file

    def counting(path):
        counts[Path(path).name] += 1
        return read(path)

    monkeypatch.setattr(images_module, "read_file", counting)
    monkeypatch.setattr(shardfile, "read_file", counting)
    return counts


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _corpus(tiny_corpus, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny corpus that a test may damage."""
    ann, images = tiny_corpus
    root = tmp_path / "corpus"
    shutil.copytree(images, root / "images")
    shutil.copy(ann, root / ann.name)
    return root / ann.name, root / "images"


def test_first_write_reads_each_image_once_and_equals_the_in_process_set(tiny_corpus, tmp_path, thread_pool, reads):
    ann, images = tiny_corpus
    local = write_shards(ann, images, str(tmp_path / "local"), shard_size=6, progress=False)
    reads.clear()
    pooled = write_shards(ann, images, str(tmp_path / "pool"), shard_size=6, workers=2, progress=False)
    assert thread_pool["check_and_write"] >= 3
    assert "_check_batch" not in thread_pool and "write_batch" not in thread_pool  # no second phase
    assert set(reads.values()) == {1} and len(reads) == 80  # every image read once, by the task writing it
    assert pooled.digest == local.digest and pooled.source_digest == local.source_digest
    assert _files(tmp_path / "pool") == _files(tmp_path / "local")  # shards, sizes.json, manifest.json
    assert pooled.reused_shards == [] and verify_shards(str(tmp_path / "pool")).ok

    # the set exists now: a rerun checks first (two phases) and finds it up to date
    thread_pool.clear()
    again = write_shards(ann, images, str(tmp_path / "pool"), shard_size=6, workers=2, progress=False)
    assert again.reused and thread_pool["_check_batch"] >= 1 and "check_and_write" not in thread_pool


def test_skip_mode_in_one_pass_quarantines_as_the_in_process_writer(tiny_corpus, tmp_path, thread_pool):
    ann, images = _corpus(tiny_corpus, tmp_path)
    names = sorted(p.name for p in images.iterdir())
    cut = images / names[3]
    cut.write_bytes(cut.read_bytes()[:-40])  # truncated: no end-of-image marker
    (images / names[40]).unlink()
    kw = {"shard_size": 6, "on_error": "skip", "progress": False}
    local = write_shards(ann, images, str(tmp_path / "local"), **kw)
    pooled = write_shards(ann, images, str(tmp_path / "pool"), workers=2, **kw)
    assert sorted((q.source, q.reason) for q in pooled.quarantine) == sorted(
        (q.source, q.reason) for q in local.quarantine)
    assert {q.source for q in local.quarantine} == {names[3], names[40]}
    assert _files(tmp_path / "pool") == _files(tmp_path / "local")
    assert pooled.digest == local.digest and verify_shards(str(tmp_path / "pool")).ok


def test_drafts_the_final_plan_disagrees_with_are_rewritten_and_removed(tiny_corpus, tmp_path, thread_pool,
                                                                         monkeypatch):
    """Drafts come from the files' sizes; if a size is wrong by the time of the check (here: all of
    them), the drafts that differ from the final plan are replaced and none is left behind."""
    ann, images = tiny_corpus
    kw = {"shard_size": 8, "shard_bytes": 8 * 1024, "progress": False}
    local = write_shards(ann, images, str(tmp_path / "local"), **kw)
    monkeypatch.setattr(writer, "_file_sizes", lambda paths: [1] * len(paths))  # drafts ignore the byte limit
    rewritten = []
    write_batch = writer.write_batch
    monkeypatch.setattr(writer, "write_batch", lambda *a: rewritten.extend(p.name for p in a[-1]) or write_batch(*a))
    pooled = write_shards(ann, images, str(tmp_path / "pool"), workers=2, **kw)
    assert 0 < len(rewritten) <= len(local.shards())
    assert _files(tmp_path / "pool") == _files(tmp_path / "local")  # no draft left over
    assert pooled.digest == local.digest


def test_fail_mode_in_one_pass_raises_and_leaves_no_shard(tiny_corpus, tmp_path, thread_pool):
    ann, images = _corpus(tiny_corpus, tmp_path)
    names = sorted(p.name for p in images.iterdir())
    bad = images / names[-1]
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(InputError) as local:
        write_shards(ann, images, str(tmp_path / "local"), shard_size=6, progress=False)
    out = tmp_path / "pool"
    with pytest.raises(InputError) as pooled:
        write_shards(ann, images, str(out), shard_size=6, workers=2, progress=False)
    assert str(pooled.value) == str(local.value) and names[-1] in str(pooled.value)
    assert thread_pool["check_and_write"] >= 3  # other tasks wrote their shards: all removed again
    assert not out.exists()  # and the folders made for them

    # a problem in the annotations is known before any image is read: checked first, nothing drafted
    doc = json.loads(ann.read_text())
    doc["images"][0]["sentences"] = []
    ann.write_text(json.dumps(doc))
    thread_pool.clear()
    with pytest.raises(InputError, match="no captions"):
        write_shards(ann, images, str(out), shard_size=6, workers=2, progress=False)
    assert thread_pool["_check_batch"] >= 1 and "check_and_write" not in thread_pool


def test_an_unreadable_manifest_is_replaced_in_one_pass(tiny_corpus, tmp_path, thread_pool):
    ann, images = tiny_corpus
    out = tmp_path / "pool"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    m = write_shards(ann, images, str(out), shard_size=6, workers=2, progress=False)
    assert thread_pool["check_and_write"] >= 1
    assert json.loads((out / "manifest.json").read_text())["digest"] == m.digest and verify_shards(str(out)).ok


def test_resize_in_one_pass_equals_the_in_process_set(tiny_corpus, tmp_path, thread_pool, reads):
    ann, images = tiny_corpus
    local = write_shards(ann, images, str(tmp_path / "local"), shard_size=12, resize=16, progress=False)
    reads.clear()
    pooled = write_shards(ann, images, str(tmp_path / "pool"), shard_size=12, resize=16, workers=2, progress=False)
    assert thread_pool["check_and_write"] >= 2
    assert set(reads.values()) == {1} and len(reads) == 80  # re-encoded from the bytes the check read
    assert _files(tmp_path / "pool") == _files(tmp_path / "local") and pooled.digest == local.digest


def test_a_failing_first_write_stops_writing_in_the_tasks_it_submits_after_the_problem(tiny_corpus, tmp_path,
                                                                                        thread_pool, monkeypatch):
    """With on_error="fail", once a task reports a problem the tasks submitted after it only check: a
    corpus with an early bad image is read to the end (every problem is reported), not written."""
    ann, images = _corpus(tiny_corpus, tmp_path)
    doc = json.loads(ann.read_text())
    bad = sorted(r["filename"] for r in doc["images"] if r["split"] == "test")  # "test" is drafted first
    for name in bad:
        (images / name).write_bytes((images / name).read_bytes()[:-40])
    writes = []
    check_and_write = writer.check_and_write
    monkeypatch.setattr(writer, "check_and_write", lambda uri, so, task: writes.append(
        (task[1][0].name, task[0].write)) or check_and_write(uri, so, task))
    out = tmp_path / "pool"
    with pytest.raises(InputError) as ei:
        write_shards(ann, images, str(out), shard_size=6, workers=2, progress=False)
    assert sorted(p.source for p in ei.value.problems) == bad
    flags = [write for _, write in sorted(writes)]  # in the order submitted: by shard name
    assert len(flags) >= 8 and flags[:4] == [True] * 4 and not any(flags[4:])  # 4 in flight: 2 a worker
    assert not out.exists(), sorted(out.rglob("*"))

    # an output folder that was there stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        write_shards(ann, images, str(out), shard_size=6, workers=2, progress=False)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*")] == ["notes.txt"]


@pytest.mark.slow
def test_one_pass_writes_the_same_set_every_time_under_load(tiny_corpus, tmp_path, thread_pool, monkeypatch):
    """Twenty one-pass writes through the thread pool (tasks of 1-6 shards, a bad image quarantined,
    drafts sometimes from wrong sizes) and three through real worker processes, with both cores
    busy: every one is the in-process set, file for file."""
    from load import busy_cores

    ann, images = _corpus(tiny_corpus, tmp_path)
    cut = sorted(images.iterdir())[7]
    cut.write_bytes(cut.read_bytes()[:-40])
    kw = {"shard_size": 6, "shard_bytes": 16 * 1024, "on_error": "skip", "progress": False}
    reference = _files(Path(write_shards(ann, images, str(tmp_path / "local"), **kw).uri))
    sizes = writer._file_sizes
    with busy_cores():
        for i in range(20):
            monkeypatch.setattr(writer, "_WRITE_BATCH", 1 + 6 * (i % 6))
            monkeypatch.setattr(writer, "_file_sizes", (lambda p: [1] * len(p)) if i % 4 == 3 else sizes)
            out = tmp_path / f"round-{i}"
            write_shards(ann, images, str(out), workers=2, **kw)
            assert _files(out) == reference, f"round {i}"
        monkeypatch.undo()  # the real process pool again
        for i in range(3):
            out = tmp_path / f"processes-{i}"
            write_shards(ann, images, str(out), workers=2, **kw)
            assert _files(out) == reference, f"processes round {i}"
