"""``msa weights fetch``: stage a preset's hub weights once where every node can read them (msa.runtime.weights).

``register(subparsers)`` adds the command; building the parser imports only argparse and the light config
and spec modules, the handler imports the rest when it runs. Exit status: 0 written; 2 bad input (config,
a preset with nothing to fetch, a missing --clip-checkpoint file); 3 the hub or the destination failed.
"""

from __future__ import annotations

import argparse
import sys

from flows.cli import _add_run_options, _emit, _InputError, _overrides, json_stdout

EXIT_FAILED = 3


def _fetch(args: argparse.Namespace) -> int:
    overrides = _overrides(args)  # a bad --set exits 2 before anything is downloaded
    from msa.pretrained import WeightsUnavailableError
    from msa.runtime.weights import MANIFEST, fetch
    from shards.storage import StorageError, endpoint_options

    with json_stdout(args.json) as out:
        try:
            bundle = fetch(args.preset, args.to, endpoint_options(args.endpoint_url), overrides,
                           clip_checkpoint=args.clip_checkpoint, hub_cache=args.hub_cache, from_cache=args.from_cache)
        except (ValueError, FileNotFoundError) as e:  # NothingToFetchError and ConfigError are ValueErrors
            raise _InputError(f"msa weights fetch: error: {e}") from None
        except (StorageError, WeightsUnavailableError) as e:
            print(f"msa weights fetch: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            _emit(bundle.to_dict(), out)
            return 0
    towers = ", ".join(f"{tower}: {src.get('hf_hub_id') or src.get('model') or src.get('file')}"
                       + (f" @ {src['revision'][:12]}" if src.get("revision") else "")
                       for tower, src in bundle.sources.items())
    size = sum(entry["size"] for entry in bundle.files.values())
    print(f"Fetched the {bundle.preset} weights into {bundle.uri} ({towers}): {len(bundle.files)} files, "
          f"{size / 1e6:.1f} MB, {MANIFEST} written last.")
    print("Train with them (on every node; s3:// weights are copied once per node):")
    print("  " + " ".join(f"--set {arg}" for arg in bundle.override_args()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``weights`` with its action ``fetch``."""
    from msa.config import PRESETS

    weights = subparsers.add_parser(
        "weights",
        help="stage a preset's pretrained weights where machines without a hub read them",
        description="Pretrained weights for offline machines and clusters. Everything else runs offline; "
        "`msa weights fetch` is the one command that reaches a model hub.",
    )
    actions = weights.add_subparsers(dest="weights_action", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        help="download a preset's hub weights once into a local directory or s3:// prefix",
        description="Download the weights a preset takes from a hub (timm's pretrained image backbone as "
        "image.safetensors, the transformers text model and tokenizer as text/) once, with the hub reachable for "
        "this command only, and write them to DEST with weights.json last (sha256 and size of every file, the "
        "sources, the package versions). Prints the --set overrides that use them; training reads s3:// weights "
        "on every node through a per-node cache (MSA_HOME/weights), checked against weights.json. CLIP presets "
        "take an open_clip state-dict file (RemoteCLIP, GeoRSCLIP) with --clip-checkpoint, copied to DEST. A "
        "preset with no hub weights (small, pretrained-lite) has nothing to fetch: exit 2. Exit 3 when the hub or "
        "DEST fails.",
    )
    fetch.add_argument("preset", choices=sorted(PRESETS), metavar="PRESET",
                       help=f"configuration preset: {', '.join(sorted(PRESETS))}")
    fetch.add_argument("--to", required=True, metavar="DEST",
                       help="where the weights go: a local directory or s3://bucket/prefix")
    fetch.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config field before deciding what to fetch (e.g. image.backbone=...); "
                       "repeatable")
    fetch.add_argument("--clip-checkpoint", metavar="FILE",
                       help="CLIP presets: the open_clip state dict (RemoteCLIP, GeoRSCLIP) to copy to DEST")
    fetch.add_argument("--hub-cache", metavar="DIR",
                       help="hub cache directory for the downloads (default: huggingface_hub's, under HF_HOME)")
    fetch.add_argument("--from-cache", action="store_true",
                       help="take the weights from this machine's hub cache only, never the network (e.g. a "
                       "workstation's warm cache staged for a cluster)")
    _add_run_options(fetch, exclude=("workers", "use_gpu", "cpus_per_worker", "max_failures", "ray_address",
                                     "storage_path", "mlflow_uri"))
    fetch.add_argument("--json", action="store_true",
                       help="print only the bundle (uri, preset, overrides, files, sources) as JSON on stdout")
    fetch.set_defaults(handler=_fetch)
