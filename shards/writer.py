"""Write a captioned image corpus as deterministic WebDataset shards.

``write_shards`` works in three phases:

1. Check: read the annotations and check every image, in-process, in a process pool
   (``workers > 1``) or as Ray tasks (``ray_address``). With ``on_error="fail"`` any problem raises
   :class:`~shards.readers.InputError` here, before anything is written; with ``"skip"`` the bad
   samples go to the manifest's quarantine list. A first write (no manifest in the output) through a
   pool or Ray, or in-process with large images (in threads), checks and writes in one pass
   instead, so each image is read and hashed once and checks overlap with writes: the shards are
   drafted from the files' sizes, each task checks its drafts' images and writes the good ones, and
   phase 3 keeps a drafted shard only where the final plan is the same (its content key tells) and
   writes the rest. With ``on_error="fail"`` a problem removes every drafted shard before the error
   is raised, so nothing is left behind either.
2. Plan (:mod:`shards.plan`): each sample's shard follows from its key (:mod:`shards.assign`) and
   each shard gets a content key. If the output already holds a complete set with the same source
   digest and options, nothing is written (``Manifest.reused`` is True). Otherwise a shard of the
   previous set with the same name and content key, still present with its size, is kept as it is
   (``Manifest.reused_shards``).
3. Write: delete the old manifest first, write every other shard atomically
   (:mod:`shards.shardfile`; in-process, in the pool or as Ray tasks, each writing whole shards),
   remove shards the new set does not list, then write ``sizes.json`` and, last,
   ``manifest.json``. An interrupted run never leaves a manifest covering missing or partial
   shards (the next run, finding no manifest, rewrites every shard).

Output is byte-identical for the same input and options, whatever ``workers`` or ``ray_address``:
a shard's members and their order follow from the sample keys, and tar members are sorted and
carry fixed mtime/uid/gid/uname/mode.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from .distributed import Executor, process_pool, progress_bar, ray_executor, thread_pool
from .manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_RE,
    SIZES_NAME,
    Leak,
    Manifest,
    QuarantineEntry,
    ShardInfo,
    SplitInfo,
    _load,
    dataset_digest,
)
from .plan import content_salt, final_plan, plan_shards, unchanged_shards
from .readers import ImageInfo, InputError, Listing, Problem, Sample, inspect_image, read_annotations
from .shardfile import (
    TAR_MTIME,
    CheckOptions,
    Member,
    ShardPlan,
    check_and_write,
    read_member,
    write_batch,
    write_plans,
)
from .storage import TMP_RE, StorageError, Store, TransientStorageError, resolve_storage_options

__all__ = ["write_shards", "DEFAULT_SHARD_BYTES", "TAR_MTIME"]

log = logging.getLogger("shards")

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB soft limit per shard
_MAX_REPORT = 50
_KEEP_BYTES = 512 << 20  # image bytes kept in memory between the check and write phases (in-process)
_LAYOUT_OPTIONS = ("shard_size", "shard_bytes", "resize")  # the options that decide where every shard is cut
_CHECK_BATCH = 256  # images per check task (threads, pool, Ray)
_CHECK_THREADS = 2  # in-process threads for large images (bench/bench_shards.py --like rsitmd)
_THREAD_MIN_BYTES = 64 << 10  # mean image size from which they pay off
_WRITE_BATCH = 512  # samples per write task: whole shards, at least one
_STAT_BATCH = 4096  # files per size task (a first write through a pool or Ray drafts its shards from them)


def _report(problems: list[Problem], listing: Listing) -> str:
    lines = [f"{len(problems)} problem(s) in corpus {listing.corpus} ({listing.annotations}):"]
    lines += [f"  {p}" for p in problems[:_MAX_REPORT]]
    if len(problems) > _MAX_REPORT:
        lines.append(f"  ... and {len(problems) - _MAX_REPORT} more")
    return "\n".join(lines)


def _size_warnings(listing: Listing, good: list[tuple[Sample, ImageInfo]]) -> list[str]:
    spec = listing.spec
    if spec is None or not good:
        return []
    want = (spec.image_size, spec.image_size)
    off = [(s, i) for s, i in good if (i.width, i.height) != want]
    if not off:
        return []
    s, i = off[0]
    return [f"{listing.annotations}: {len(off)} of {len(good)} images are not {want[0]}x{want[1]} as in "
            f"{spec.name} (e.g. {s.filename} is {i.width}x{i.height})"]


def _find_leaks(good: list[tuple[Sample, ImageInfo]]) -> list[Leak]:
    """Pairs of samples in different splits with identical image bytes (``exact``) or an identical
    8x8 average hash (``ahash``, near-duplicates such as re-encoded copies)."""
    groups: dict[tuple[str, object], list[Sample]] = defaultdict(list)
    for s, info in good:
        groups[("exact", info.digest)].append(s)
        if info.ahash is not None:
            groups[("ahash", info.ahash)].append(s)
    seen: set[tuple[str, str]] = set()
    leaks: list[Leak] = []
    for kind in ("exact", "ahash"):
        for (k, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if k != kind or len({m.split for m in members}) < 2:
                continue
            members = sorted(members, key=lambda m: (m.split, m.filename))
            for a, b in itertools.combinations(members, 2):
                if a.split == b.split or (a.key, b.key) in seen:
                    continue
                seen.add((a.key, b.key))
                leaks.append(Leak(kind=kind,
                                  a={"split": a.split, "filename": a.filename, "key": a.key},
                                  b={"split": b.split, "filename": b.filename, "key": b.key}))
    return leaks


def _source_digest(listing: Listing, good: list[tuple[Sample, ImageInfo]], problems: list[Problem],
                   options: dict) -> str:
    h = hashlib.sha256()
    head = {"schema_version": SCHEMA_VERSION, "annotations_sha256": listing.annotations_sha256,
            "corpus": listing.corpus, "options": options}
    if options.get("resize"):
        import PIL

        head["pillow"] = PIL.__version__  # re-encoded bytes depend on the encoder build
    h.update(json.dumps(head, sort_keys=True).encode())
    for s, info in sorted(good, key=lambda si: si[0].key):
        h.update(f"{s.key}\0{s.split}\0{s.filename}\0{info.digest}\n".encode("utf-8", "surrogateescape"))
    for p in problems:
        h.update(f"!{p}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _previous(store: Store) -> Manifest | None:
    """The output's manifest; None if there is none or it cannot be read (the set is then rewritten)."""
    try:
        return _load(store)
    except TransientStorageError:
        raise
    except (FileNotFoundError, StorageError):
        return None


def _is_complete(store: Store, m: Manifest) -> bool:
    present = store.list_files()
    if SIZES_NAME not in present:
        return False
    return all(present.get(s.name) == s.bytes for s in m.shards())


def _check_batch(want_ahash: bool, full_decode: bool, paths: list[str], keep_data: bool = False) -> list[ImageInfo]:
    """A check task (a worker's: without the images' bytes): the images' infos."""
    return [inspect_image(p, want_ahash, full_decode, keep_data) for p in paths]


def _check(samples: list[Sample], executor: Executor | None, *, check_leaks: bool, full_decode: bool,
           keep: bool, progress: bool) -> list[ImageInfo]:
    """Every sample's image info. In-process, ``keep`` keeps the bytes (up to ``_KEEP_BYTES``) so the
    write phase needs no second read; when the first batch's images average ``_THREAD_MIN_BYTES`` or
    more, the rest are checked in ``_CHECK_THREADS`` threads (reading and hashing release the GIL and
    then dominate; for small files the threads' contention for the GIL costs more than they save)."""
    bar = progress_bar(len(samples), "check", progress)
    paths = [s.image_path for s in samples]
    batches = [paths[i:i + _CHECK_BATCH] for i in range(0, len(paths), _CHECK_BATCH)]
    try:
        if executor is not None:
            fn = functools.partial(_check_batch, check_leaks, full_decode)
            return [info for part in executor.map(fn, batches, len, bar) for info in part]
        fn = functools.partial(_check_batch, check_leaks, full_decode, keep_data=keep)
        if not batches:
            return []
        first = fn(batches[0])
        threads = _CHECK_THREADS if _large([i.size for i in first]) else 1
        pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="shard-check")
        try:
            parts = itertools.chain([first], pool.map(fn, batches[1:]) if threads > 1 else map(fn, batches[1:]))
            infos: list[ImageInfo] = []
            kept = 0
            for part in parts:
                for info in part:
                    if info.data is not None:
                        kept += info.size
                        if kept > _KEEP_BYTES:
                            info = info.without_data()
                    infos.append(info)
                bar.update(len(part))
            return infos
        finally:
            pool.shutdown(cancel_futures=True)  # after an error (Ctrl-C too), do not read the rest
    finally:
        bar.close()


def _task_batches(plans: list[ShardPlan]) -> Iterator[list[ShardPlan]]:
    batch: list[ShardPlan] = []
    for plan in plans:
        batch.append(plan)
        if sum(len(p.members) for p in batch) >= _WRITE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(store: Store, todo: list[ShardPlan], executor: Executor | None, *, kept: dict[str, bytes],
           resize: int | None, storage_options: dict | None, progress: bool) -> list[ShardInfo]:
    bar = progress_bar(sum(len(p.members) for p in todo), "write", progress)
    try:
        if executor is None:
            def load(m: Member) -> tuple[str, bytes]:
                data = kept.pop(m.key, None)
                return (m.ext, data) if data is not None else read_member(m, resize)

            return write_plans(store, todo, load, on_shard=lambda info: bar.update(info.samples))
        fn = functools.partial(write_batch, store.uri, resolve_storage_options(store.uri, storage_options), resize)
        parts = executor.map(fn, _task_batches(todo), lambda b: sum(len(p.members) for p in b), bar)
        return [info for part in parts for info in part]
    finally:
        bar.close()


def _file_sizes(paths: list[str]) -> list[int]:
    """A task: the files' sizes, 0 where a file cannot be stat'ed (its check then says why)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(0)
    return sizes


def _large(sizes: list[int]) -> bool:
    """Whether these (the first) images average ``_THREAD_MIN_BYTES`` or more: in-process work on
    them then runs in threads (for small files their contention for the GIL costs more)."""
    return bool(sizes) and sum(sizes) >= _THREAD_MIN_BYTES * len(sizes)


def _check_and_write(samples: list[Sample], executor: Executor, store: Store, opts: CheckOptions, *,
                     shard_size: int, shard_bytes: int, storage_options: dict | None,
                     progress: bool) -> tuple[dict[str, list[ShardPlan]], dict[str, ImageInfo], dict[str, ShardInfo]]:
    """A first write in one pass (a pool, Ray or threads): the drafts, every sample's image info by key,
    and the shards the tasks wrote (drafted from the files' sizes, holding the good images; see the
    module doc)."""
    paths = [s.image_path for s in samples]
    batches = [paths[i:i + _STAT_BATCH] for i in range(0, len(paths), _STAT_BATCH)]
    with progress_bar(len(paths), "stat", False) as quiet:
        sizes = [n for part in executor.map(_file_sizes, batches, len, quiet) for n in part]
    drafts = plan_shards([(s, ImageInfo(True, size=n)) for s, n in zip(samples, sizes)], shard_size=shard_size,
                         shard_bytes=shard_bytes, salt=None)
    tasks = list(_task_batches(list(itertools.chain.from_iterable(drafts.values()))))
    fn = functools.partial(check_and_write, store.uri, resolve_storage_options(store.uri, storage_options))
    found: dict[str, ImageInfo] = {}
    drafted: dict[str, ShardInfo] = {}
    check_only = dataclasses.replace(opts, write=False)
    failing = False  # a problem seen with stop_on_problem: tasks submitted from now on only check

    def submitted() -> Iterator[tuple[CheckOptions, list[ShardPlan]]]:
        for task in tasks:
            yield (check_only if failing else opts), task

    with progress_bar(len(paths), "check+write", progress) as bar:
        results = executor.map(fn, submitted(), lambda t: sum(len(p.members) for p in t[1]), bar)
        for task, part in zip(tasks, results):
            for draft, (infos, shard) in zip(task, part):
                found.update(zip((m.key for m in draft.members), infos))
                failing = failing or (opts.stop_on_problem and not all(i.ok for i in infos))
                if shard is not None:
                    drafted[shard.name] = shard
    return drafts, found, drafted


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic GC off while the writer runs: its per-sample objects hold no cycles, and every
    full collection rescans all the objects alive (the annotation document, the samples, their infos):
    about half the time of reading 50,000 Karpathy records. The previous state comes back on exit."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def write_shards(
    annotations: str | Path,
    images_dir: str | Path,
    out_uri: str,
    *,
    corpus: str | None = None,
    shard_size: int = 1000,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    resize: int | None = None,
    workers: int = 1,
    on_error: str = "fail",
    storage_options: dict | None = None,
    check_leaks: bool = False,
    full_decode: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
) -> Manifest:
    """Shard a corpus into ``out_uri`` (local path or ``s3://bucket/prefix``) and return its manifest.

    Args:
        annotations: Karpathy JSON, or generic JSONL/JSON list/CSV/TSV (see :mod:`shards.readers`).
        images_dir: folder the annotation filenames are relative to.
        out_uri: output root; ``<split>/<split>-NNNNNN.tar``, ``sizes.json``, ``manifest.json``.
        corpus: corpus name (rsicd, rsitmd, ucm, sydney or any name); detected when omitted.
        shard_size: at most this many samples per shard (shards hold between about half and all of
            it: :mod:`shards.assign`).
        shard_bytes: soft size limit per shard (a single larger sample gets a shard of its own; with
            ``resize`` it is applied to the source images' sizes).
        resize: re-encode images so the shorter side is at most this many px (JPEG stays JPEG,
            PNG/TIFF become PNG); None keeps the stored bytes.
        workers: local processes checking images and writing shards; output does not depend on it.
        on_error: "fail" raises InputError, leaving an existing set untouched and no shard of its own
            (a first write's one pass removes those it wrote); "skip" quarantines bad samples.
        storage_options: fsspec options (e.g. ``{"endpoint_url": ...}``); never logged.
        check_leaks: find train/val/test duplicates (exact bytes and 8x8 average hash); decodes
            every image.
        full_decode: decode every image when checking (slower; catches corrupt pixel data that
            header, marker and CRC checks miss).
        progress: show tqdm progress bars on stderr.
        ray_address: check images and write shards as Ray tasks instead ("local": a cluster
            started here, "auto": the running one, or its address; see :mod:`shards.distributed`);
            output identical to the in-process one. Not with ``workers``.

    Raises:
        InputError: invalid annotations or, with on_error="fail", any bad sample (``.problems``).
        StorageError: the output could not be read or written (TransientStorageError when a retry
            may help).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if shard_size < 1 or shard_bytes < 1 or workers < 1 or (resize is not None and resize < 1):
        raise ValueError("shard_size, shard_bytes, workers and resize must be positive")
    if ray_address is not None and workers > 1:
        raise ValueError("workers and ray_address exclude each other (Ray runs a task per CPU of its cluster)")

    drafts: dict[str, list[ShardPlan]] = {}  # a one-pass write's: what its tasks were given,
    found: dict[str, ImageInfo] = {}  # what they saw (by sample key)
    drafted: dict[str, ShardInfo] = {}  # and the shards they wrote
    salt = content_salt(resize)
    options = {"corpus": corpus, "shard_size": shard_size, "shard_bytes": shard_bytes, "resize": resize,
               "on_error": on_error, "check_leaks": check_leaks, "full_decode": full_decode}
    executor = process_pool(workers, __name__) if workers > 1 else None  # starts while the annotations are read

    def started() -> Executor:
        """The pool, or Ray started on first use: for a layout read in tasks (JSONL) when the reader asks,
        else after the annotations are read, so that a bad file fails before a cluster starts."""
        nonlocal executor
        if executor is None:
            executor = ray_executor(ray_address)
        return executor

    try:
        size = Path(annotations).stat().st_size if Path(annotations).is_file() else None  # missing: the reader raises
        elsewhere = workers > 1 or ray_address is not None
        with progress_bar(size, "annotations", progress, unit="B") as bar:
            listing = read_annotations(annotations, images_dir, corpus, on_read=bar.update,
                                       tasks=(lambda: started().map) if elsewhere else None)
        samples = listing.samples
        store = Store(out_uri, storage_options)
        old = _previous(store)
        if ray_address is not None:
            started()
        doomed = on_error == "fail" and bool(listing.problems)  # will raise after the checks: write nothing
        one_pass = old is None and not doomed
        if executor is None and one_pass and _large(_file_sizes([s.image_path for s in samples[:_CHECK_BATCH]])):
            executor = thread_pool(_CHECK_THREADS)
        created = False  # the output folder, by the one pass
        if executor is not None and one_pass:
            created = store.makedirs()
            store.remove(MANIFEST_NAME)  # an unreadable one
            store.remove(SIZES_NAME)
            opts = CheckOptions(want_ahash=check_leaks, full_decode=full_decode, stop_on_problem=on_error == "fail",
                                resize=resize, salt=salt)
            drafts, found, drafted = _check_and_write(samples, executor, store, opts, shard_size=shard_size,
                                                      shard_bytes=shard_bytes, storage_options=storage_options,
                                                      progress=progress)
            infos = [found[s.key] for s in samples]
        else:
            # Bytes are kept when every shard will be written: not over a set of the same layout, mostly up to
            # date (a rerun, or a few shards rewritten), where keeping every image would hold up to _KEEP_BYTES
            # for nothing; what such a run does rewrite is read again.
            rewrite_all = old is None or any(old.options.get(k) != options[k] for k in _LAYOUT_OPTIONS)
            infos = _check(samples, executor, check_leaks=check_leaks, full_decode=full_decode,
                           keep=not resize and rewrite_all, progress=progress)
        problems = list(listing.problems)
        good: list[tuple[Sample, ImageInfo]] = []
        for s, info in zip(samples, infos):
            if info.ok:
                good.append((s, info))
            else:
                problems.append(Problem(s.filename, info.reason, s.split, s.key))
        warnings = listing.warnings + _size_warnings(listing, good)
        for w in warnings[:20]:
            log.warning(w)
        if len(warnings) > 20:
            log.warning("... and %d more warnings (listed in the manifest)", len(warnings) - 20)
        error = None
        if problems and on_error == "fail":
            error = InputError(_report(problems, listing), problems)
        elif not good:
            error = InputError(f"{listing.annotations}: no valid samples to write", problems)
        if error is not None:
            for name in drafted:  # a first write leaves no shards behind
                store.remove(name)
            folders = {d.name.rpartition("/")[0] for d in itertools.chain.from_iterable(drafts.values())}
            store.remove_empty_folders(folders, root=created)  # nor the folders made for them
            raise error
        for p in problems:
            log.warning("quarantined %s", p)

        leaks = _find_leaks(good) if check_leaks else None
        source_digest = _source_digest(listing, good, problems, options)

        # the source digest covers the schema version, annotations, image bytes and options
        if old is not None and old.source_digest == source_digest and _is_complete(store, old):
            log.info("%s is up to date (digest %s); nothing to write", store.uri, old.short_digest)
            old._reused = True
            return old

        if drafts:
            plans = final_plan(drafts, found, good, shard_size=shard_size, shard_bytes=shard_bytes, salt=salt)
        else:
            plans = plan_shards(good, shard_size=shard_size, shard_bytes=shard_bytes, salt=salt)
        unchanged = unchanged_shards(store, old, plans)
        done = {p.name: drafted[p.name] for p in itertools.chain.from_iterable(plans.values())
                if p.name in drafted and drafted[p.name].content == p.content}
        store.makedirs()
        store.remove(MANIFEST_NAME)  # first: from here on the set is not valid until the new manifest lands
        store.remove(SIZES_NAME)
        skip = unchanged.keys() | done.keys()
        todo = [p for p in itertools.chain.from_iterable(plans.values()) if p.name not in skip]
        kept = {s.key: info.data for s, info in good if info.data is not None}
        captions = Counter()
        for s, _ in good:
            captions[s.split] += s.caption_count
        del infos, good[:]  # the kept bytes now live only in ``kept``, freed as they are written
        written = _write(store, todo, executor, kept=kept, resize=resize, storage_options=storage_options,
                         progress=progress)
    finally:
        if executor is not None:
            executor.close()

    written += done.values()
    by_name = {**unchanged, **{info.name: info for info in written}}
    splits = {split: SplitInfo(images=sum(len(p.members) for p in split_plans), captions=captions[split],
                               shards=[by_name[p.name] for p in split_plans])
              for split, split_plans in plans.items()}
    for name in sorted(store.list_files()):
        if (SHARD_RE.match(name) and name not in by_name) or TMP_RE.search(name):
            log.info("removing stale %s", name)
            store.remove(name)

    shards = [sh for split in sorted(splits) for sh in splits[split].shards]
    manifest = Manifest(
        corpus=listing.corpus,
        annotations=listing.annotations,
        source_digest=source_digest,
        digest=dataset_digest(shards),
        splits={k: splits[k] for k in sorted(splits)},
        options=options,
        quarantine=[QuarantineEntry(**p.to_dict()) for p in problems],
        warnings=warnings,
        leaks=leaks,
        reused_shards=sorted(unchanged),
    )
    store.write_bytes(SIZES_NAME, (json.dumps(manifest.sizes(), indent=1, sort_keys=True) + "\n").encode())
    store.write_bytes(MANIFEST_NAME, manifest.to_json())  # last
    manifest._base_uri = store.uri
    log.info("wrote %d of %d shards to %s (digest %s), kept %d unchanged", len(written), len(shards), store.uri,
             manifest.short_digest, len(unchanged))
    return manifest
