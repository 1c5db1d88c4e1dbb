"""``msa`` commands that need only the model library (no orchestration): config, search, bench."""

from __future__ import annotations

import argparse


def _config(args: argparse.Namespace) -> int:
    from msa.config import resolve_config

    print(resolve_config(args.preset, args.set).to_json())
    return 0


def _index(args: argparse.Namespace) -> int:
    import sys

    from msa.retrieval import Index, IndexFormatError, ModelIndexMismatch, build_index
    from shards.storage import endpoint_options

    try:
        path = build_index(
            args.model,
            args.data,
            args.out,
            split=args.split,
            batch_size=args.batch_size,
            storage_options=endpoint_options(args.endpoint_url),
        )
        index = Index.load(path)
    except (FileNotFoundError, FileExistsError, IndexFormatError, ModelIndexMismatch, ValueError) as e:
        print(f"msa index: error: {e}", file=sys.stderr)
        return 1
    meta = index.meta
    registry = meta["model"].get("registry")
    pinned = f" (registry version {registry['version']})" if registry else ""
    print(f"Index {path}")
    print(f"  {index.num_images} images, {index.num_captions} captions, D={index.dim}, "
          f"split {meta['data']['split']!r} of {meta['data']['uri']}")
    print(f"  dataset digest {meta['data']['dataset_digest'][:16]}, model {meta['model']['source']}{pinned}")
    print(f"  built in {meta['build_seconds']:.1f} s")
    return 0


def _search(args: argparse.Namespace) -> int:
    import json
    import sys

    from msa.retrieval import (
        Index,
        IndexFormatError,
        ModelIndexMismatch,
        load_model,
        search_image,
        search_text,
    )

    try:
        index = Index.load(args.index)
        source = args.model or index.meta["model"]["resolved"]
        model = load_model(source)
        options = dict(k=args.k, rerank=args.rerank, rerank_mode=args.rerank_mode, rerank_weight=args.rerank_weight)
        if args.text is not None:
            hits = search_text(index, model, args.text, **options)
        else:
            hits = search_image(index, model, args.image, **options)
    except (FileNotFoundError, IndexFormatError, ModelIndexMismatch, ValueError) as e:
        print(f"msa search: error: {e}", file=sys.stderr)
        return 1
    query = {"text": args.text} if args.text is not None else {"image": str(args.image)}
    if args.json:
        print(json.dumps({
            "index": str(index.path),
            "model": source,
            "query": query,
            "k": args.k,
            "rerank": args.rerank,
            "rerank_mode": args.rerank_mode if args.rerank else None,
            "rerank_weight": args.rerank_weight if args.rerank and args.rerank_mode == "blend" else None,
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
        print(f"Ranking: cosine top {max(args.rerank, args.k)}, re-ranked by {how}")
    else:
        print("Ranking: cosine of global embeddings")
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


def _register_retrieval(subparsers: argparse._SubParsersAction) -> None:
    from msa.retrieval import DEFAULT_RERANK_MODE, DEFAULT_RERANK_WEIGHT, RERANK_MODES

    index = subparsers.add_parser(
        "index",
        help="embed a shard split once into a retrieval index directory",
        description="Embed every image and every caption of one split of a shard set with a trained model "
        "and write a retrieval index directory (embeddings, image scale vectors for MSCMAT re-ranking, keys, "
        "captions, meta.json). The directory is written atomically: a temp dir renamed into place; an "
        "existing index there is replaced, any other non-empty directory is refused.",
    )
    index.add_argument("--model", required=True, metavar="SRC",
                       help="a checkpoint directory (holding checkpoint.pt) or an MLflow model URI: "
                       "models:/msa-retrieval/3, models:/msa-retrieval@champion or models:/msa-retrieval/latest "
                       "(tracking store: MLFLOW_TRACKING_URI, else .msa/mlflow.db); the registry version is pinned "
                       "in meta.json")
    index.add_argument("--data", required=True, metavar="URI", help="shard set URI (local path or s3://...)")
    index.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    index.add_argument("--split", default="test", help="which split of the shard set to index (default: test)")
    index.add_argument("--batch-size", type=int, default=128, help="images/captions per forward pass (default 128)")
    index.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards (e.g. a local MinIO)")
    index.set_defaults(handler=_index)

    search = subparsers.add_parser(
        "search",
        help="search an index by text or by image",
        description="Rank an index's images for a text query, or its captions for an image query, by cosine "
        "of the global embeddings; optionally re-rank the top candidates with MSCMAT's multi-scale scores.",
    )
    search.add_argument("index", metavar="INDEX", help="an index directory written by `msa index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query: returns images")
    query.add_argument("--image", metavar="PATH", help="image file query: returns captions (with their image)")
    search.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--rerank", type=int, default=0, metavar="R",
                        help="re-score the top max(R, k) cosine candidates with MSCMAT and re-sort them "
                        "(default 0: cosine only)")
    search.add_argument("--rerank-mode", choices=RERANK_MODES, default=DEFAULT_RERANK_MODE,
                        help="re-rank score: 'blend' = cosine + WEIGHT x MSCMAT mean over scales, 'mscmat' = "
                        f"the MSCMAT mean alone (default {DEFAULT_RERANK_MODE})")
    search.add_argument("--rerank-weight", type=float, default=DEFAULT_RERANK_WEIGHT, metavar="WEIGHT",
                        help=f"MSCMAT weight in 'blend' mode (default {DEFAULT_RERANK_WEIGHT:g})")
    search.add_argument("--model", metavar="SRC",
                        help="checkpoint directory or MLflow model URI (default: the model recorded in the "
                        "index's meta.json, its registry version pinned); must be the model the index was built with")
    search.add_argument("--json", action="store_true", help="print the hits as JSON instead of a table")
    search.set_defaults(handler=_search)


def register(subparsers: argparse._SubParsersAction) -> None:
    from msa.config import PRESETS

    config = subparsers.add_parser(
        "config",
        help="print a preset's fully resolved configuration",
        description="Print the configuration a run would use: a named preset plus --set overrides, "
        "resolved once, exactly as it is logged to MLflow and stored in checkpoints.",
    )
    config.add_argument("--preset", default="small", choices=sorted(PRESETS), help="named preset (default: small)")
    config.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one field; repeatable"
    )
    config.set_defaults(handler=_config)
    _register_retrieval(subparsers)
