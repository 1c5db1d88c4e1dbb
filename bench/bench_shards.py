"""Sharding throughput next to a plain ``tar -cf`` of the same image files.

    python bench/bench_shards.py                 # 5,000 random JPEGs (2-10 KB each)
    python bench/bench_shards.py --like rsitmd   # 2,000 256 px uncompressed RGB TIFFs (196 KB, as UCM/RSITMD)
    python bench/bench_shards.py --like rsicd    # 4,000 224 px textured JPEGs (as RSICD's)
    python bench/bench_shards.py --small         # 200 images, a quick smoke run
    python bench/bench_shards.py --corpus DIR    # an existing corpus: DIR/dataset_*.json + DIR/images
    python bench/bench_shards.py --work /dev/shm # corpus and outputs on tmpfs: no disk write-back noise

Prints images/s for ``write_shards`` (in-process, first write into an empty folder) and for
``tar -cf`` (a subprocess) of the same files, each the best of ``--repeat`` runs, and their ratio;
the target is a ratio within 2x when no --resize is given. ``write_shards`` also prints its CPU
seconds: in-process it hashes each shard in a second thread and, for images of 64 KB or more, checks
them in two threads, so it may use more than one core where ``tar`` uses one. With ``--workers`` it
also prints the CPU time per image in this process (the driver: annotations, plan, task traffic), work
no cluster shares out, and so the most any number of workers can speed the run up. For scale it also
times reading and hashing every file as the writer does, on one core (BLAKE3 image digests for the source
digest and content keys, and the same bytes again inside each shard's sha256 for the manifest), Python's own
``tarfile`` adding the same files without any checks, an up-to-date rerun (annotations + image
checks + digest, nothing written), an incremental rerun after one caption changed, and
``verify_shards``. ``--scaling`` times 1, 2, 4, ... worker processes. ``--driver-memory`` traces one
more write (with ``--workers``: the driver's objects only) and prints its peak bytes a sample, what grows
with the corpus. ``--annotations N`` measures the memory the annotation reader needs (part of the
driver's, whatever the workers) on N records shaped like RSICD's (raw text, tokens and ids per
sentence), against ``json.loads`` of the whole document; with ``--workers``, also how long those records
take as JSONL read here and read in parts by the workers, and this process's CPU a record either way.
``--jsonl`` writes the generated corpus's annotations as JSONL (the layout the workers read in parts).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from shards.distributed import process_pool  # noqa: E402
from shards.manifest import verify_shards  # noqa: E402
from shards.readers import image_digest, read_annotations  # noqa: E402
from shards.writer import write_shards  # noqa: E402

# --like: image side, format, count and how the pixels are drawn (noise JPEGs compress poorly, so the
# rsicd preset draws a coarse pattern plus mild noise, giving sizes close to RSICD's 224 px JPEGs)
LIKE = {"tiny": (None, "JPEG", 5000), "rsicd": (224, "JPEG", 4000), "rsitmd": (256, "TIFF", 2000)}


def make_corpus(root: Path, n: int, seed: int = 0, like: str = "tiny", jsonl: bool = False) -> Path:
    """n images in root/images, 80/10/10 split, 5 captions each. ``tiny``: random-noise JPEGs of
    56-128 px (about 2-10 KB); ``rsicd``: 224 px JPEGs; ``rsitmd``: 256 px uncompressed RGB TIFFs.
    Annotations in Karpathy JSON, or with ``jsonl`` a record a line (``captions`` lists)."""
    side, fmt, _ = LIKE[like]
    ext = {"JPEG": "jpg", "TIFF": "tif"}[fmt]
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        if side is None:
            s = int(rng.integers(56, 129))
            arr = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        else:
            base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
            arr = np.kron(base, np.ones((8, 8, 1), np.uint8)) | rng.integers(0, 32, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **({"quality": 70 if side is None else 90} if fmt == "JPEG" else {}))
        name = f"{i:05d}.{ext}"
        (images / name).write_bytes(buf.getvalue())
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        records.append({"filename": name, "imgid": i, "split": split,
                        "sentences": [{"raw": f"a synthetic scene number {i}, view {j}"} for j in range(5)]})
    if jsonl:
        ann = root / "bench.jsonl"
        ann.write_text("".join(json.dumps(jsonl_record(r)) + "\n" for r in records))
    else:
        ann = root / "dataset_bench.json"
        ann.write_text(json.dumps({"images": records, "dataset": "bench"}))
    return ann


def jsonl_record(rec: dict) -> dict:
    """A Karpathy record as a generic JSONL one."""
    return {"filename": rec["filename"], "imgid": rec["imgid"], "split": rec["split"],
            "captions": [s["raw"] for s in rec["sentences"]]}


def karpathy_like(path: Path, n: int, seed: int = 0) -> None:
    """n records shaped like RSICD's ``dataset_rsicd.json``: 5 sentences of 8-18 words, each with its raw
    text, tokens and ids (about 1.4 KB a record)."""
    rng = np.random.default_rng(seed)
    words = ("a an the green large small red roof river road bridge building buildings several many trees near "
             "beside parking lot with cars white field bare land").split()
    records = []
    for i in range(n):
        sentences = []
        for j in range(5):
            tokens = [words[k] for k in rng.integers(0, len(words), int(rng.integers(8, 19)))]
            sentences.append({"tokens": tokens, "raw": " ".join(tokens) + " .", "imgid": i, "sentid": 5 * i + j})
        records.append({"filename": f"{i:06d}.jpg", "imgid": i, "sentences": sentences, "split": "train",
                        "sentids": list(range(5 * i, 5 * i + 5))})
    path.write_text(json.dumps({"images": records, "dataset": "bench"}))


def traced_peak(fn) -> int:
    """The peak bytes tracemalloc sees while ``fn`` runs, the GC paused as write_shards pauses it."""
    gc.disable()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


def annotation_memory(n: int, work: Path) -> dict:
    """Peak memory (tracemalloc) and time of reading n RSICD-like records, against json.loads of the document."""
    path = work / "dataset_memory.json"
    karpathy_like(path, n)

    def measure(fn) -> tuple[float, int]:
        gc.disable()  # as write_shards runs it
        try:
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
        finally:
            gc.enable()
        return seconds, traced_peak(fn)

    t_reader, peak_reader = measure(lambda: read_annotations(path, work, corpus="bench"))
    t_json, peak_json = measure(lambda: json.loads(path.read_text()))
    size = path.stat().st_size
    print(f"annotations  : {n} RSICD-like records ({size / n:.0f} bytes each) read in {t_reader:.2f} s "
          f"(json.loads alone {t_json:.2f} s); peak {peak_reader / n:.0f} bytes a record, against "
          f"{peak_json / n:.0f} for json.loads of the document ({peak_json / peak_reader:.1f}x)")
    return {"records": n, "file_bytes": size, "read_s": t_reader, "peak_bytes": peak_reader,
            "json_loads_peak_bytes": peak_json}


def annotation_tasks(n: int, work: Path, workers: int) -> dict:
    """Reading n RSICD-like records as JSONL in this process, then in parts by ``workers`` processes
    (started and warm first): wall time and this process's CPU a record, what bounds any cluster."""
    path, source = work / "annotations.jsonl", work / "dataset_memory.json"
    if not source.exists():  # annotation_memory's records, else the same again
        karpathy_like(source, n)
    records = json.loads(source.read_text())["images"]
    path.write_text("".join(json.dumps({**jsonl_record(r), "split": "train"}) + "\n" for r in records))
    del records

    def timed(tasks) -> tuple[float, float]:
        gc.disable()  # as write_shards runs it
        try:
            t, c = time.perf_counter(), time.process_time()
            read_annotations(path, work, corpus="bench", tasks=tasks)
            return time.perf_counter() - t, time.process_time() - c
        finally:
            gc.enable()

    serial = timed(None)
    with process_pool(workers, "shards.readers") as pool:
        list(pool.map(len, [[]] * workers))  # every worker started and importing done
        parted = timed(lambda: pool.map)
    print(f"annotations  : {n} JSONL records in this process {serial[0]:.2f} s ({serial[1] / n * 1e6:.1f} us/record), "
          f"in parts by {workers} workers {parted[0]:.2f} s ({parted[1] / n * 1e6:.1f} us/record in this process: "
          f"at most {serial[1] / parted[1]:.1f}x faster on any cluster)")
    return {"records": n, "serial_s": serial[0], "serial_cpu_s": serial[1], "tasks_s": parted[0],
            "tasks_cpu_s": parted[1], "workers": workers}


def find_annotations(corpus: Path) -> Path:
    if corpus.is_file():
        return corpus
    found = sorted(corpus.glob("dataset*.json")) + sorted(corpus.glob("*.jsonl")) + sorted(corpus.glob("*.csv"))
    if not found:
        raise SystemExit(f"{corpus}: no dataset*.json, *.jsonl or *.csv annotation file")
    return found[0]


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, help="images to generate (default: 5000 tiny, 4000 rsicd, 2000 rsitmd)")
    ap.add_argument("--like", choices=sorted(LIKE), default="tiny",
                    help="generated images: tiny 2-10 KB JPEGs (default), rsicd 224 px JPEGs, rsitmd 256 px TIFFs")
    ap.add_argument("--work", type=Path, help="folder for the corpus and outputs (default: the system's temp "
                                              "folder; /dev/shm keeps disk write-back out of the figures)")
    ap.add_argument("--small", action="store_true", help="quick smoke run: 200 images, one repeat, 2,000 records")
    ap.add_argument("--corpus", type=Path, help="use this corpus (folder with dataset*.json and images/, or an "
                                                "annotation file next to images/) instead of generating one")
    ap.add_argument("--images", type=Path, help="image folder for --corpus (default: <corpus>/images)")
    ap.add_argument("--jsonl", action="store_true",
                    help="generated annotations as JSONL (read in parts by the workers) instead of Karpathy JSON")
    ap.add_argument("--workers", type=int, default=1, help="write_shards worker processes (default: 1)")
    ap.add_argument("--resize", type=int, help="re-encode to this shorter side (not comparable with tar)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each, best kept (default: 2)")
    ap.add_argument("--scaling", action="store_true",
                    help="also time 1, 2, 4, ... workers up to the CPUs available (throughput against workers)")
    ap.add_argument("--annotations", type=int, default=50_000, metavar="N",
                    help="records for the annotation reader's memory figure (default: 50000; 0: skip it)")
    ap.add_argument("--driver-memory", action="store_true",
                    help="also trace one more write (tracemalloc: slower) and print its peak bytes a sample")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.small:
        args.n, args.repeat, args.annotations = 200, 1, min(args.annotations, 2000)
    args.n = args.n or LIKE[args.like][2]

    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.work))
    try:
        if args.corpus:
            ann = find_annotations(args.corpus)
            images = args.images or ann.parent / "images"
        else:
            t = time.perf_counter()
            ann = make_corpus(work / "corpus", args.n, like=args.like, jsonl=args.jsonl)
            images = ann.parent / "images"
            print(f"generated {args.n} images in {time.perf_counter() - t:.1f} s")
        files = sorted(p for p in images.rglob("*") if p.is_file())
        n_files = len(files)
        total = sum(p.stat().st_size for p in files)
        for p in files:  # warm the page cache for both contenders
            p.read_bytes()

        def fresh(name: str) -> Path:
            """An output path, the previous run's output removed (page cache and tmpfs stay small)."""
            out = work / name
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            return out

        def run_tar():
            out = fresh("plain.tar")
            subprocess.run(["tar", "-cf", str(out), "-C", str(images.parent), images.name], check=True)
            return out

        def run_pytar():  # the floor of any pure-Python writer: read each file, add it to a tar
            out = fresh("py.tar")
            with tarfile.open(out, "w") as tf:
                for p in files:
                    tf.add(p, arcname=p.name)
            return out

        def run_edited(ann: Path, images: Path, uri: str):
            """Re-shard into ``uri`` after changing one caption (Karpathy layout, or JSONL with ``captions``
            lists; else None)."""
            text = ann.read_text()
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:  # JSONL: the first record's first caption
                first, _, rest = text.partition("\n")
                record = json.loads(first)
                if not isinstance(record, dict) or not isinstance(record.get("captions"), list):
                    return None
                record["captions"][0] = "an edited caption"
                text = json.dumps(record) + "\n" + rest
            else:
                if not isinstance(doc, dict) or not doc.get("images"):
                    return None
                doc["images"][0]["sentences"][0]["raw"] = "an edited caption"
                text = json.dumps(doc)
            edited = work / ann.name
            edited.write_text(text)
            return write_shards(edited, images, uri, workers=args.workers, resize=args.resize,
                                shard_size=args.shard_size, progress=False)

        cpu = []

        def run_shards():
            c, w = time.process_time(), os.times()
            try:
                return write_shards(ann, images, str(fresh("shards")), workers=args.workers,
                                    resize=args.resize, shard_size=args.shard_size, progress=False)
            finally:  # worker processes count once the pool has ended (it has, when write_shards returns)
                w2 = os.times()
                cpu.append((time.process_time() - c, w2.children_user + w2.children_system
                            - w.children_user - w.children_system))

        def run_hash():  # what hashing alone costs: read every file, its digest and its sha256, nothing else
            return [(image_digest(data), hashlib.sha256(data).digest()) for data in map(Path.read_bytes, files)]

        t_tar = t_shards = float("inf")
        for _ in range(args.repeat):  # interleaved: both see the same machine (page cache, write-back)
            t_tar = min(t_tar, best_of(1, run_tar)[0])
            t, m = best_of(1, run_shards)
            t_shards = min(t_shards, t)
        t_hash, _ = best_of(args.repeat, run_hash)
        t_pytar, _ = best_of(args.repeat, run_pytar)
        fresh("py.tar")
        t_rerun, m2 = best_of(1, lambda: write_shards(ann, images, m.uri, workers=args.workers, resize=args.resize,
                                                      shard_size=args.shard_size, progress=False))
        assert m2.reused
        t_verify, rep = best_of(1, lambda: verify_shards(m.uri))
        assert rep.ok, rep.problems
        t_incr, m3 = best_of(1, lambda: run_edited(ann, images, m.uri))
        n = sum(s.images for s in m.splits.values())
        ratio = t_shards / t_tar
        print(f"corpus: {n} images written of {n_files} files, {total / 1e6:.1f} MB, {len(m.shards())} shards, "
              f"workers={args.workers}, resize={args.resize}, {os.cpu_count()} CPUs, in {work.parent}")
        print(f"tar -cf      : {t_tar:7.3f} s  {n_files / t_tar:9.0f} images/s")
        print(f"read + hash  : {t_hash:7.3f} s  {n_files / t_hash:9.0f} images/s  (every file read, BLAKE3 and "
              f"sha256, one core: {t_hash / t_tar:.2f}x tar)")
        print(f"py tarfile   : {t_pytar:7.3f} s  {n_files / t_pytar:9.0f} images/s  (Python tarfile.add, no checks: "
              f"{t_pytar / t_tar:.2f}x tar)")
        cpu_here, cpu_workers = min(cpu)  # the run with the least CPU in this process
        print(f"write_shards : {t_shards:7.3f} s  {n / t_shards:9.0f} images/s  (check + write + manifest; "
              f"{cpu_here:.3f} CPU-s in this process" + (f", {cpu_workers:.3f} in its workers)" if args.workers > 1
                                                          else ")"))
        if args.workers > 1:  # what the driver does alone, whatever the cluster, bounds the speedup (Amdahl)
            print(f"driver       : {cpu_here / n * 1e6:7.1f} us/image serial in this process, "
                  f"{cpu_workers / n * 1e6:.1f} in its workers: any number of workers runs this at most "
                  f"{(cpu_here + cpu_workers) / cpu_here:.1f}x faster than one core")
        print(f"ratio        : {ratio:7.2f}x tar's time" + ("" if args.resize else
                                                            f"  (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})"))
        print(f"rerun        : {t_rerun:7.3f} s  (up to date, nothing written)")
        if m3 is not None:
            rewritten, reused = m3.write_counts
            print(f"incremental  : {t_incr:7.3f} s  (one caption changed: {rewritten} shard(s) rewritten, "
                  f"{reused} reused)")
        print(f"verify       : {t_verify:7.3f} s  ({rep.checked} shards re-hashed)")
        scaling = {}
        if args.scaling:
            for w in [1] + [k for k in (2, 4, 8, 16, 32, 64) if k <= (os.cpu_count() or 1)]:
                t_w, _ = best_of(args.repeat, lambda w=w: write_shards(
                    ann, images, str(fresh(f"shards-w{w}")), workers=w, resize=args.resize,
                    shard_size=args.shard_size, progress=False))
                scaling[w] = n / t_w
                print(f"workers {w:<4} : {t_w:7.3f} s  {n / t_w:9.0f} images/s  ({scaling[w] / scaling[1]:.2f}x "
                      "one worker)")
        driver_peak = None
        if args.driver_memory:  # traced apart: tracemalloc slows the run
            driver_peak = traced_peak(lambda: write_shards(
                ann, images, str(fresh("shards-traced")), workers=args.workers, resize=args.resize,
                shard_size=args.shard_size, progress=False))
            kept = " (in-process: with image bytes kept for the write, up to 512 MB)" if args.workers == 1 else ""
            print(f"driver mem   : peak {driver_peak / n:7.0f} bytes a sample traced in this process{kept}")
        memory = annotation_memory(args.annotations, work) if args.annotations else None
        in_tasks = None
        if args.annotations and args.workers > 1:
            in_tasks = annotation_tasks(args.annotations, work, args.workers)
        if args.json:
            print(json.dumps({"images": n, "bytes": total, "tar_s": t_tar, "hash_s": t_hash, "pytar_s": t_pytar,
                              "shards_s": t_shards, "annotations": memory, "annotations_in_tasks": in_tasks,
                              "driver_peak_bytes": driver_peak, "shards_cpu_s": cpu_here,
                              "shards_workers_cpu_s": cpu_workers, "ratio": ratio, "rerun_s": t_rerun,
                              "incremental_s": t_incr, "verify_s": t_verify, "workers": args.workers,
                              "cpus": os.cpu_count(), "scaling_images_per_s": scaling}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
