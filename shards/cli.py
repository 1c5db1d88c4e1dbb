"""``msa corpus synth`` and ``msa shard`` / ``msa shard verify`` commands.

``register(subparsers, json_stdout)`` adds the commands to the ``msa`` argparse CLI (which passes its
``--json`` stdout guard, flows.cli.json_stdout); ``main(argv)`` runs them standalone (``python -m
shards.cli shard ...``). Handlers return the process exit code. With ``--json`` stdout carries one
JSON document and everything meant for people goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

__all__ = ["register", "build_parser", "main", "EXIT_OK", "EXIT_INPUT", "EXIT_STORAGE"]

EXIT_OK = 0
EXIT_INPUT = 2  # bad annotations/images, bad arguments (argparse usage errors also exit 2)
EXIT_STORAGE = 3  # storage/I-O failure, or `verify` found a missing/corrupt/extra shard

EXIT_CODES_HELP = """\
exit codes:
  0  success (for verify: every shard present and intact)
  1  unexpected internal error (a traceback is printed)
  2  input error: invalid annotations or images (every problem is listed, naming the file and the
     reason; nothing is written with --on-error fail), or invalid command-line arguments
  3  storage/I-O error: the output could not be read or written (permissions, missing bucket,
     unreachable endpoint...), or verify found a missing, corrupt or extra shard or no manifest
"""

SHARD_USAGE = ("%(prog)s ANNOTATIONS --images DIR --out URI [options]\n"
               "       %(prog)s verify URI [--endpoint-url URL] [--json]")

SHARD_DESCRIPTION = """\
Two forms:

  msa shard ANNOTATIONS --images DIR --out URI [options]
      Write the corpus as deterministic WebDataset shards: URI/<split>/<split>-000000.tar ...,
      URI/sizes.json and, last, URI/manifest.json. One sample = one image (stored bytes, or
      re-encoded with --resize) plus a json member with its captions and metadata. A sample's
      shard follows from its key, so after changing, adding or removing some samples only the
      shards that hold them are rewritten and the others are kept (the report says how many);
      rerunning with the same input and options writes nothing. An interrupted run never leaves a
      manifest that covers missing or partial shards. --workers N or --ray [ADDRESS] spread the
      work over processes or a Ray cluster, with the same output; there a first write (no
      manifest at URI) checks and writes each shard's images in one pass, reading each once.

  msa shard verify URI [--endpoint-url URL]
      Re-hash every shard listed in URI/manifest.json; report missing, corrupt and extra shards.

ANNOTATIONS: a Karpathy-layout JSON (RSICD dataset_rsicd.json, RSITMD dataset_RSITMD.json,
UCM/Sydney dataset.json, synth dataset_synth.json), or a generic JSONL / JSON list / CSV / TSV
with an image column (filename|image|path|filepath|file), captions (a list) or one caption per
row (caption|text|title), and an optional split column (default train).

URI: a local directory or s3://bucket/prefix. S3 credentials come from the usual AWS environment
variables or profiles; the endpoint from --endpoint-url or AWS_ENDPOINT_URL. Secrets are never
printed.

Problems with single samples (missing, empty, undecodable or truncated image; no or non-UTF-8
captions; duplicate filename; a path escaping the image folder) stop the run before anything is
written (--on-error fail) or are quarantined and listed in the manifest (--on-error skip).
Caption counts and corpus sizes that differ from the known corpora's (5 captions per image;
RSICD 10,921, RSITMD 4,743, UCM 2,100, Sydney 613 images) are warnings, never errors.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def int_at_least(low: int):
    """argparse type: an integer >= ``low`` (used by every msa command that takes counts)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}: {v}")
        return v

    return parse


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def _setup_logging() -> None:
    log = logging.getLogger("shards")
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("msa: %(levelname)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# msa corpus synth


def _cmd_synth(args: argparse.Namespace) -> int:
    try:
        from .synth import generate_corpus  # lazy: only this command needs it
    except ImportError as exc:
        print(f"msa corpus synth: the synthetic corpus generator is not available ({exc})", file=sys.stderr)
        return 1
    try:
        path = generate_corpus(args.out, splits={"train": args.train, "val": args.val, "test": args.test},
                               image_size=args.size, seed=args.seed, image_format=args.format,
                               difficulty=args.difficulty, fine_scale=args.fine_scale, group_size=args.group_size,
                               progress=not args.no_progress)
    except ValueError as exc:
        print(f"msa corpus synth: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        print(f"msa corpus synth: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    print(path)
    return EXIT_OK


def _add_corpus(subparsers) -> None:
    p = subparsers.add_parser(
        "corpus", help="corpus utilities (synthetic corpus generator)", formatter_class=_Formatter,
        description="Corpus utilities.")
    sub = p.add_subparsers(dest="corpus_command", metavar="COMMAND", required=True)
    s = sub.add_parser(
        "synth", help="generate a small synthetic captioned corpus", formatter_class=_Formatter,
        description="Generate a synthetic remote-sensing-like corpus with shards.synth: OUT/dataset_synth.json "
                    "(Karpathy layout, dataset 'synth', five captions per image) and OUT/images/. The output is "
                    "a pure function of the options. Prints the annotation file's path.",
        epilog=EXIT_CODES_HELP)
    s.add_argument("out", metavar="OUT", help="output folder (created if missing)")
    s.add_argument("--train", type=_non_negative, default=800, metavar="N", help="training images (default: 800)")
    s.add_argument("--val", type=_non_negative, default=100, metavar="N", help="validation images (default: 100)")
    s.add_argument("--test", type=_non_negative, default=100, metavar="N", help="test images (default: 100)")
    s.add_argument("--size", type=_positive, default=64, metavar="PX", help="image side in pixels (default: 64)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; same seed, same corpus (default: 0)")
    s.add_argument("--format", choices=("jpg", "png", "tif"), default="jpg",
                   help="image file format (default: jpg)")
    s.add_argument("--difficulty", choices=("easy", "medium", "hard"), default="easy",
                   help="scene variety and noise of the generator (shards.synth): harder levels draw from "
                        "more land-cover classes with more jitter and noise (default: easy)")
    s.add_argument("--fine-scale", action="store_true",
                   help="fine-scale corpus: images in groups that share their coarse layout (land cover, "
                        "roads/rivers, textures) and differ only in their small objects' count, location and "
                        "colour, named in every caption (default: off, the standard corpus)")
    s.add_argument("--group-size", type=int_at_least(2), default=4, metavar="N",
                   help="images per group of the fine-scale corpus (default: 4)")
    s.add_argument("--no-progress", action="store_true", help="do not show a progress bar on stderr")
    s.set_defaults(handler=_cmd_synth)


# --------------------------------------------------------------------------------------------------
# msa shard / msa shard verify

_SHARD_ONLY = ("images", "out", "corpus", "on_error", "shard_size", "shard_bytes", "resize", "workers", "ray")
_SHARD_FLAGS = ("check_leaks", "full_decode")


def _results(args: argparse.Namespace):
    """Where results go: with --json under ``msa``, its guard's real stdout (everything else, Ray's
    output included, goes to stderr); otherwise sys.stdout."""
    guard = getattr(args, "json_stdout", None)
    return guard(args.json) if guard is not None else contextlib.nullcontext(sys.stdout)


def _emit(doc: dict, out) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False), file=out)


def manifest_summary(m) -> dict:
    """The ``msa shard --json`` document: where the set is, what it holds, what this run wrote."""
    rewritten, reused = m.write_counts
    return {
        "uri": m.uri, "manifest_uri": m.manifest_uri, "status": "up to date" if m.reused else "written",
        "corpus": m.corpus, "digest": m.digest, "source_digest": m.source_digest,
        "splits": {split: {"images": s.images, "captions": s.captions, "shards": len(s.shards)}
                   for split, s in m.splits.items()},
        "shards_rewritten": rewritten, "shards_reused": reused,
        "quarantine": [q.model_dump() for q in m.quarantine], "warnings": m.warnings,
        "leaks": None if m.leaks is None else [leak.model_dump() for leak in m.leaks],
    }


def _print_manifest(m, out=None) -> None:
    out = out or sys.stdout
    rewritten, reused = m.write_counts
    status = "up to date, nothing written" if m.reused else f"written: {rewritten} shard(s) rewritten, {reused} reused"
    print(f"{m.uri}: {status}", file=out)
    print(f"corpus {m.corpus}, digest {m.short_digest} (sha256 {m.digest})", file=out)
    for split, info in m.splits.items():
        print(f"  {split}: {info.images} images, {info.captions} captions, {len(info.shards)} shard(s)", file=out)
    if m.quarantine:
        print(f"quarantined {len(m.quarantine)} sample(s):", file=out)
        for q in m.quarantine:
            print(f"  {q.source}: {q.reason}", file=out)
    if m.warnings:
        print(f"{len(m.warnings)} warning(s) (listed in the manifest)", file=out)
    if m.leaks is not None:
        if not m.leaks:
            print("leak check: no duplicate images across splits", file=out)
        else:
            print(f"leak check: {len(m.leaks)} duplicate image pair(s) across splits:", file=out)
            for leak in m.leaks:
                print(f"  {leak.kind}: {leak.a.split}/{leak.a.filename} == {leak.b.split}/{leak.b.filename}",
                      file=out)


def _cmd_verify(args: argparse.Namespace, uri: str) -> int:
    from .manifest import verify_shards
    from .storage import StorageError, endpoint_options

    with _results(args) as out:
        human = sys.stderr if args.json else out
        try:
            rep = verify_shards(uri, endpoint_options(args.endpoint_url), progress=not args.no_progress)
        except StorageError as exc:
            print(f"msa shard verify: storage error: {exc}", file=sys.stderr)
            if args.json:
                _emit({"uri": uri, "ok": False, "problems": [f"storage error: {exc}"]}, out)
            return EXIT_STORAGE
        if args.json:
            _emit(rep.model_dump(), out)
        if rep.ok:
            print(f"{rep.uri}: OK, {rep.checked} shard(s) verified, digest {rep.digest[:16]}", file=human)
            return EXIT_OK
        print(f"{rep.uri}: FAILED ({len(rep.problems)} problem(s))", file=sys.stderr)
        for p in rep.problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_STORAGE


def _cmd_shard(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.shard_parser
    paths = args.paths
    if paths[0] == "verify":
        if len(paths) != 2:
            parser.error("verify takes exactly one URI")
        given = [f"--{n.replace('_', '-')}" for n in _SHARD_ONLY if getattr(args, n) is not None]
        given += [f"--{n.replace('_', '-')}" for n in _SHARD_FLAGS if getattr(args, n)]
        if given:
            parser.error(f"verify does not take {', '.join(given)}")
        return _cmd_verify(args, paths[1])
    if len(paths) != 1:
        parser.error(f"expected one ANNOTATIONS file (or 'verify URI'), got {len(paths)} arguments")
    if not args.images or not args.out:
        parser.error("--images DIR and --out URI are required to write shards")
    if args.ray is not None and args.workers is not None:
        parser.error("--workers and --ray exclude each other (Ray runs a task per CPU of its cluster)")

    from .readers import InputError
    from .storage import StorageError, endpoint_options
    from .writer import DEFAULT_SHARD_BYTES, write_shards

    _setup_logging()
    with _results(args) as out:
        try:
            m = write_shards(
                paths[0], args.images, args.out,
                corpus=args.corpus,
                shard_size=args.shard_size or 1000,
                shard_bytes=args.shard_bytes or DEFAULT_SHARD_BYTES,
                resize=args.resize,
                workers=args.workers or 1,
                on_error=args.on_error or "fail",
                storage_options=endpoint_options(args.endpoint_url),
                check_leaks=args.check_leaks,
                full_decode=args.full_decode,
                progress=not args.no_progress,
                ray_address=None if args.ray is None else args.ray or os.environ.get("RAY_ADDRESS") or "local",
            )
        except InputError as exc:
            print(f"msa shard: input error: {exc}", file=sys.stderr)
            if args.json:
                _emit({"error": "input", "message": str(exc).splitlines()[0],
                       "problems": [p.to_dict() for p in exc.problems]}, out)
            return EXIT_INPUT
        except StorageError as exc:
            print(f"msa shard: storage error: {exc}", file=sys.stderr)
            if args.json:
                _emit({"error": "storage", "message": str(exc)}, out)
            return EXIT_STORAGE
        _print_manifest(m, sys.stderr if args.json else out)
        if args.json:
            _emit(manifest_summary(m), out)
    return EXIT_OK


def _add_shard(subparsers, json_stdout) -> None:
    p = subparsers.add_parser(
        "shard", help="write a corpus as WebDataset shards, or verify a shard set ('shard verify URI')",
        usage=SHARD_USAGE, description=SHARD_DESCRIPTION, epilog=EXIT_CODES_HELP, formatter_class=_Formatter)
    p.add_argument("paths", nargs="+", metavar="ANNOTATIONS | verify URI",
                   help="the annotation file to shard, or the word 'verify' followed by the URI of a shard set "
                        "(to shard a file literally named 'verify', write ./verify)")
    g = p.add_argument_group("writing shards (not with verify)")
    g.add_argument("--images", metavar="DIR", help="folder the annotation filenames are relative to (required)")
    g.add_argument("--out", metavar="URI", help="output: local directory or s3://bucket/prefix (required)")
    g.add_argument("--corpus", metavar="NAME",
                   help="corpus name: rsicd, rsitmd, ucm, sydney (their sizes are checked) or any name used in "
                        "sample keys; default: detected from the file's 'dataset' field, its name and its image count")
    g.add_argument("--on-error", choices=("fail", "skip"), default=None,
                   help="fail: stop before writing anything if any sample is bad (exit 2); skip: leave bad "
                        "samples out and list them in the manifest's quarantine (default: fail)")
    g.add_argument("--shard-size", type=_positive, metavar="N",
                   help="at most N samples per shard; shards hold between about N/2 and N, as each sample's shard "
                        "follows from its key (default: 1000)")
    g.add_argument("--shard-bytes", type=_positive, metavar="N",
                   help="soft limit on a shard's size in bytes; a larger single sample gets its own shard "
                        "(default: 1073741824 = 1 GiB)")
    g.add_argument("--resize", type=_positive, metavar="PX",
                   help="re-encode images so the shorter side is at most PX pixels (JPEG stays JPEG at quality "
                        "95; PNG and TIFF become PNG); default: store the original bytes")
    g.add_argument("--workers", type=_positive, metavar="N",
                   help="local processes checking images and writing shards (and the records of a JSONL file of "
                        "16 MiB or more); the output does not depend on it (default: 1)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="check images and write shards (and a large JSONL file's records) as Ray tasks, with the "
                        "same output: on the cluster at "
                        "ADDRESS (host:port, ray://host:port, 'auto'), else at RAY_ADDRESS, else on a local cluster "
                        "started for the run; images must be readable from every node (put it after ANNOTATIONS, "
                        "or write --ray=ADDRESS)")
    g.add_argument("--check-leaks", action="store_true",
                   help="report images duplicated across splits: identical bytes, or an identical 8x8 average "
                        "hash (near-duplicates); decodes every image, results go into the manifest")
    g.add_argument("--full-decode", action="store_true",
                   help="decode every image while checking (slower); by default images are checked by header, "
                        "JPEG end marker, PNG CRCs and full TIFF decode")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars on stderr")
    p.add_argument("--json", action="store_true",
                   help="print only a JSON document on stdout (the set's summary, or verify's report); the rest "
                        "goes to stderr")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint for s3:// URIs (e.g. http://127.0.0.1:9000 for MinIO/moto); default: "
                        "AWS_ENDPOINT_URL or AWS's own")
    p.set_defaults(handler=_cmd_shard, shard_parser=p, json_stdout=json_stdout)


# --------------------------------------------------------------------------------------------------


def register(subparsers, json_stdout=None) -> None:
    """Add ``corpus synth`` and ``shard`` to an ``msa`` parser's ``add_subparsers()`` object.
    ``json_stdout(json_mode)``: a context manager yielding the stream for the JSON document while
    keeping everything else off stdout (``msa`` passes flows.cli.json_stdout)."""
    _add_corpus(subparsers)
    _add_shard(subparsers, json_stdout)


def build_parser(prog: str = "msa") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Corpus and shard tools of MSA.",
                                     epilog=EXIT_CODES_HELP, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``corpus synth`` / ``shard`` / ``shard verify``; returns the exit code (argparse usage
    errors and --help raise SystemExit as usual)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
