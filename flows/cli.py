"""The ``msa`` command line: one entry point over the library, the shard tools and the flows.

It lives in flows/ because some commands run Prefect flows; msa/ and shards/ contribute their own
commands through ``register`` and never import Prefect themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from msa.paths import LOCAL_STATE

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server needs ~20 s on two busy cores; Prefect's default wait is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def _prepare_environment() -> None:
    """Defaults for a fresh machine: offline hubs, no telemetry, Prefect state under .msa/."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(LOCAL_STATE / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the leaf


def _print_recall_table(result: dict) -> None:
    test = result["test"]
    names = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR")
    print("\nTest recall (%) of the selected checkpoint, epoch", int(test["selected_epoch"]) + 1)
    print("  " + "  ".join(f"{n:>8}" for n in names))
    print("  " + "  ".join(f"{test[n]:8.2f}" for n in names))
    ratio = test["mR"] / test["chance_mR"] if test["chance_mR"] else float("inf")
    print(f"  chance mR {test['chance_mR']:.2f}  ->  mR is {ratio:.1f}x chance")


def _train(args: argparse.Namespace) -> int:
    from flows.train_msa import train_msa
    from msa.config import parse_overrides
    from msa.tracking import default_tracking_uri

    params = dict(
        preset=args.preset,
        overrides=parse_overrides(args.set),
        epochs=args.epochs,
        workers=args.workers,
        use_gpu=args.gpu,
        max_failures=args.max_failures,
        ray_address=args.ray_address,
        mlflow_uri=args.mlflow_uri,
        run_name=args.run_name,
        endpoint_url=args.endpoint_url,
    )
    if args.data:
        params["data_uri"] = args.data
    if getattr(args, "demo_images", None):
        params["demo_images"] = dict(zip(("train", "val", "test"), args.demo_images))
    result = train_msa(**params)
    _print_recall_table(result)
    uri = args.mlflow_uri or default_tracking_uri()
    print(f"\nMLflow run {result['run_id']} ({result['run_name']}), registered model msa-retrieval "
          f"version {result['model_version']}, dataset digest {result['dataset_digest'][:16]}")
    print(f"MLflow store: {uri}")
    if uri.startswith("sqlite:"):
        print(f"Open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser, default_epochs: int | None) -> None:
    from msa.config import PRESETS

    parser.add_argument("--data", help="shard set URI (local path or s3://); default: the synthetic demo shards")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="configuration preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (see `msa config`); repeatable")
    parser.add_argument("--epochs", type=int, default=default_epochs, help="override train.epochs")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    parser.add_argument("--max-failures", type=int, default=1, help="worker failures survived by resuming")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or .msa/mlflow.db)")
    parser.add_argument("--run-name", help="run name; reusing one resumes that run's latest checkpoint")
    parser.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards (e.g. a local moto/MinIO)")
    parser.add_argument("--json", action="store_true", help="also print the flow's result as JSON")


def _split_sizes(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(part) for part in text.split(","))
    if len(sizes) != 3 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three counts TRAIN,VAL,TEST")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    import msa.cli
    import shards.cli

    parser = argparse.ArgumentParser(
        prog="msa",
        description="MSA remote-sensing image-text retrieval: synthesise or read corpora, shard them, "
        "train on Ray with MLflow tracking, search, and run the Prefect flows.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="the whole pipeline on embedded defaults (synthetic corpus -> shards -> Ray -> MLflow)",
        description="Generate the synthetic demo corpus if absent, shard it, train the small preset "
        "with Ray Train (2 CPU workers, DDP over gloo), evaluate test recall, register the model in "
        "MLflow, and print the recall table. Runs as the Prefect flow train-msa.",
    )
    _add_train_arguments(demo, default_epochs=None)
    demo.add_argument("--demo-images", type=_split_sizes, metavar="TRAIN,VAL,TEST",
                      help="images per split of the synthetic corpus when it must be generated (default 300,100,100)")
    demo.set_defaults(handler=_train)
    train = sub.add_parser(
        "train",
        help="run the train-msa flow on a shard set",
        description="Train MSA on a shard set (verify -> train -> evaluate -> register), as the "
        "Prefect flow train-msa run locally.",
    )
    _add_train_arguments(train, default_epochs=None)
    train.set_defaults(handler=_train)
    msa.cli.register(sub)
    shards.cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
