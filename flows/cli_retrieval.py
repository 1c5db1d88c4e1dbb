"""``msa index`` and ``msa search``: build a retrieval index from a shard split, query it by text or image.

``register(subparsers)`` adds both commands. Building the parser imports only argparse, the standard
library and ``msa.retrieval.constants`` (no torch, numpy, MLflow or the retrieval code itself); the
handlers import the library when a command runs.

Exit status: 0 on success; 2 for bad input (a missing or foreign directory, a corrupt index, a model
that does not match the index, a bad query or option), with one line ``msa <command>: error: ...`` on
stderr, as argparse does for usage errors; 1 for a transient storage failure (worth retrying) and for
anything unexpected (with a traceback). With ``--json`` stdout carries only the JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

from flows.cli import json_stdout
from msa.retrieval.constants import (
    ANN_AUTO_MIN_VECTORS,
    ANN_MODES,
    DEFAULT_ANN_MODE,
    DEFAULT_ANN_PROBES,
    DEFAULT_INDEX_BATCH_SIZE,
    DEFAULT_INDEX_SPLIT,
    DEFAULT_K,
    DEFAULT_RERANK_MODE,
    DEFAULT_RERANK_WEIGHT,
    DEFAULT_SEARCH_BACKEND,
    RERANK_MODES,
    SEARCH_BACKENDS,
)
from shards.cli import int_at_least

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


# --------------------------------------------------------------------------------- argument types


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------- errors


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


@contextlib.contextmanager
def _reported(command: str, outcome: dict[str, int]) -> Iterator[None]:
    """Turn the library's bad-input errors into ``msa <command>: error: ...`` and an exit status."""
    from shards.storage import StorageError, TransientStorageError

    try:
        yield
    except TransientStorageError as e:
        print(f"msa {command}: error: {_one_line(e)} (a transient storage failure; retry)", file=sys.stderr)
        outcome["exit"] = EXIT_FAILED
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, StorageError) as e:
        # ValueError covers IndexFormatError and ModelIndexMismatch.
        print(f"msa {command}: error: {_one_line(e)}", file=sys.stderr)
        outcome["exit"] = EXIT_BAD_INPUT


# ------------------------------------------------------------------------------------------ index


def _index(args: argparse.Namespace) -> int:
    outcome = {"exit": 0}
    with json_stdout(args.json), _reported("index", outcome):
        from msa.retrieval import Index, build_index
        from shards.storage import endpoint_options

        path = build_index(
            args.model,
            args.data,
            args.out,
            split=args.split,
            batch_size=args.batch_size,
            storage_options=endpoint_options(args.endpoint_url),
            ann=args.ann,
            progress=not args.no_progress,
        )
        index = Index.load(path)
    if outcome["exit"]:
        return outcome["exit"]
    meta = index.meta
    registry = meta["model"].get("registry")
    human = sys.stderr if args.json else sys.stdout
    pinned = f" (registry version {registry['version']})" if registry else ""
    print(f"Index {path}", file=human)
    print(f"  {index.num_images} images, {index.num_captions} captions, D={index.dim}, "
          f"split {meta['data']['split']!r} of {meta['data']['uri']}", file=human)
    print(f"  dataset digest {meta['data']['dataset_digest'][:16]}, model {meta['model']['source']}{pinned}",
          file=human)
    ann = [f"{side}s ({info['kind']})" for side, info in meta["ann"].items() if info]
    print(f"  ANN index: {', '.join(ann) if ann else 'none (exact search)'}", file=human)
    print(f"  built in {meta['build_seconds']:.1f} s", file=human)
    if args.json:
        print(json.dumps(_index_summary(index), indent=2))
    return 0


def _index_summary(index: Any) -> dict[str, Any]:
    meta = index.meta
    registry = meta["model"].get("registry")
    return {
        "path": str(index.path),
        "images": index.num_images,
        "captions": index.num_captions,
        "dim": index.dim,
        "split": meta["data"]["split"],
        "uri": meta["data"]["uri"],
        "dataset_digest": meta["data"]["dataset_digest"],
        "model": meta["model"]["source"],
        "registry_version": registry["version"] if registry else None,
        "ann": {side: info["kind"] if info else None for side, info in meta["ann"].items()},
        "build_seconds": meta["build_seconds"],
    }


# ----------------------------------------------------------------------------------------- search


def _search(args: argparse.Namespace) -> int:
    outcome = {"exit": 0}
    with json_stdout(args.json), _reported("search", outcome):
        from msa.retrieval import META_FILE, Index, IndexFormatError, resolve_model, search_image, search_text

        index = Index.load(args.index)
        source = args.model or (index.meta.get("model") or {}).get("resolved")
        if not source:
            raise IndexFormatError(f"{index.path / META_FILE}: no model recorded; pass --model")
        model = resolve_model(source)
        options = dict(k=args.k, rerank=args.rerank, rerank_mode=args.rerank_mode, rerank_weight=args.rerank_weight,
                       backend=args.backend, probes=args.ann_probes)
        if args.text is not None:
            hits = search_text(index, model, args.text, **options)
        else:
            hits = search_image(index, model, args.image, **options)
    if outcome["exit"]:
        return outcome["exit"]
    query = {"text": args.text} if args.text is not None else {"image": str(args.image)}
    searched = "image" if args.text is not None else "text"
    approximate = args.backend == "ann" or (args.backend == "auto" and index.ann_info(searched) is not None)
    backend = f"ANN ({index.ann_info(searched)['kind']}, {args.ann_probes} probes)" if approximate else "exact"
    if args.json:
        print(json.dumps({
            "index": str(index.path),
            "model": source,
            "query": query,
            "k": args.k,
            "rerank": args.rerank,
            "rerank_mode": args.rerank_mode if args.rerank else None,
            "rerank_weight": args.rerank_weight if args.rerank and args.rerank_mode == "blend" else None,
            "backend": "ann" if approximate else "exact",
            "hits": [h.to_dict() for h in hits],
        }, indent=2))
        return 0
    what = f"text {args.text!r}" if args.text is not None else f"image {args.image}"
    print(f"Query: {what}")
    print(f"Index: {index.path} ({index.num_images} images, {index.num_captions} captions, "
          f"split {index.meta['data']['split']!r}); model {source}")
    if args.rerank:
        how = ("MSCMAT mean over scales" if args.rerank_mode == "mscmat"
               else f"cosine + {args.rerank_weight:g} x MSCMAT mean over scales")
        print(f"Ranking: cosine top {max(args.rerank, args.k)} ({backend}), re-ranked by {how}")
    else:
        print(f"Ranking: cosine of global embeddings ({backend})")
    header = f"{'rank':>4}  {'score':>8}  {'cosine':>8}  {'mscmat':>8}  {'image':<24}"
    if args.image is not None:
        header += "  caption"
    print(header)
    print("-" * len(header) + ("-" * 40 if args.image is not None else ""))
    for hit in hits:
        mscmat = f"{hit.mscmat:8.4f}" if hit.mscmat is not None else f"{'-':>8}"
        line = f"{hit.rank:>4}  {hit.score:8.4f}  {hit.cosine:8.4f}  {mscmat}  {hit.image_key:<24}"
        if hit.caption is not None:
            line += f"  {hit.caption}"
        print(line)
    return 0


# ----------------------------------------------------------------------------------------- parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``index`` and ``search``; each sets ``handler`` (returns the exit status)."""
    index = subparsers.add_parser(
        "index",
        help="embed a shard split once into a retrieval index directory",
        description="Embed every image and every caption of one split of a shard set with a trained model "
        "and write a retrieval index directory (embeddings, image scale vectors for MSCMAT re-ranking, keys, "
        "captions, meta.json). The directory is written atomically: a temp dir renamed into place; an "
        "existing index there is replaced, any other non-empty directory is refused. Exit status 2 for bad "
        "input, with one `msa index: error: ...` line on stderr.",
    )
    index.add_argument("--model", required=True, metavar="SRC",
                       help="a checkpoint directory (holding checkpoint.pt) or an MLflow model URI: "
                       "models:/msa-retrieval/3, models:/msa-retrieval@champion or models:/msa-retrieval/latest "
                       "(tracking store: MLFLOW_TRACKING_URI, else .msa/mlflow.db); the registry version is pinned "
                       "in meta.json")
    index.add_argument("--data", required=True, metavar="URI", help="shard set URI (local path or s3://...)")
    index.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    index.add_argument("--split", default=DEFAULT_INDEX_SPLIT,
                       help=f"which split of the shard set to index (default: {DEFAULT_INDEX_SPLIT})")
    index.add_argument("--batch-size", type=int_at_least(1), default=DEFAULT_INDEX_BATCH_SIZE,
                       help=f"images/captions per forward pass (default {DEFAULT_INDEX_BATCH_SIZE})")
    index.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards (e.g. a local MinIO)")
    index.add_argument("--ann", choices=ANN_MODES, default=DEFAULT_ANN_MODE,
                       help="also build a faiss IVF index (approximate search) over the image and the caption "
                       f"embeddings: 'auto' for a side of at least {ANN_AUTO_MIN_VECTORS:,} vectors, 'always', "
                       f"'never' (default {DEFAULT_ANN_MODE})")
    index.add_argument("--no-progress", action="store_true", help="do not show progress bars on stderr")
    index.add_argument("--json", action="store_true",
                       help="print only a JSON summary on stdout (path, images, captions, dim, split, uri, "
                       "dataset_digest, model, registry_version, ann, build_seconds); the human summary goes to "
                       "stderr")
    index.set_defaults(handler=_index)

    search = subparsers.add_parser(
        "search",
        help="search an index by text or by image",
        description="Rank an index's images for a text query, or its captions for an image query, by cosine "
        "of the global embeddings; optionally re-rank the top candidates with MSCMAT's multi-scale scores. "
        "Exit status 2 for bad input, with one `msa search: error: ...` line on stderr.",
    )
    search.add_argument("index", metavar="INDEX", help="an index directory written by `msa index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query: returns images")
    query.add_argument("--image", metavar="PATH", help="image file query: returns captions (with their image)")
    search.add_argument("--k", type=int_at_least(1), default=DEFAULT_K,
                        help=f"number of results (default {DEFAULT_K})")
    search.add_argument("--rerank", type=int_at_least(0), default=0, metavar="R",
                        help="re-score the top max(R, k) cosine candidates with MSCMAT and re-sort them "
                        "(default 0: cosine only)")
    search.add_argument("--rerank-mode", choices=RERANK_MODES, default=DEFAULT_RERANK_MODE,
                        help="re-rank score: 'blend' = cosine + WEIGHT x MSCMAT mean over scales, 'mscmat' = "
                        f"the MSCMAT mean alone (default {DEFAULT_RERANK_MODE})")
    search.add_argument("--rerank-weight", type=_finite_float, default=DEFAULT_RERANK_WEIGHT, metavar="WEIGHT",
                        help=f"MSCMAT weight in 'blend' mode (default {DEFAULT_RERANK_WEIGHT:g})")
    search.add_argument("--backend", choices=SEARCH_BACKENDS, default=DEFAULT_SEARCH_BACKEND,
                        help="how the global embeddings are searched: 'exact' (every vector), 'ann' (the index's "
                        "faiss IVF index; an error if it has none), 'auto' (ann where the index has one) "
                        f"(default {DEFAULT_SEARCH_BACKEND})")
    search.add_argument("--ann-probes", type=int_at_least(1), default=DEFAULT_ANN_PROBES, metavar="P",
                        help=f"IVF lists the ANN search probes: more is slower and closer to exact "
                        f"(default {DEFAULT_ANN_PROBES})")
    search.add_argument("--model", metavar="SRC",
                        help="checkpoint directory or MLflow model URI (default: the model recorded in the "
                        "index's meta.json, its registry version pinned); must be the model the index was built with")
    search.add_argument("--json", action="store_true", help="print only the hits as JSON on stdout, no table")
    search.set_defaults(handler=_search)
