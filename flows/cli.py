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


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _tune(args: argparse.Namespace) -> int:
    """msa tune: msa.tune.run_tune directly (no Prefect)."""
    import time

    from msa.config import parse_overrides, resolve_config
    from msa.paths import default_ray_storage
    from msa.pipeline import verify_dataset
    from msa.tune import DEFAULT_SPACE, TuneJob, run_tune
    from shards.storage import endpoint_options

    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    cfg = resolve_config(args.preset, overrides)
    digest = verify_dataset(args.data, endpoint_options(args.endpoint_url))
    job = TuneJob(
        data_uri=args.data,
        dataset_digest=digest,
        storage_path=args.storage_path or default_ray_storage(),
        name=args.name or f"tune-{cfg.preset}-{digest[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
        preset=args.preset,
        overrides=overrides,
        space=args.space or dict(DEFAULT_SPACE),
        search=args.search,
        num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent_trials,
        workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        seed=args.seed,
        mlflow_uri=args.mlflow_uri,
        storage_options=endpoint_options(args.endpoint_url) or {},
    )
    outcome = run_tune(job, ray_address=args.ray_address, register=not args.no_register).to_dict()
    for trial in outcome["trials"]:
        best = "-" if trial["best_val_mR"] is None else f"{trial['best_val_mR']:.2f}"
        print(f"trial {trial['trial_id']}: {trial['status']:<13} epochs {trial['epochs']}  best val mR {best}")
    print(f"best trial {outcome['best_trial_id']}: {json.dumps(outcome['best_config'], sort_keys=True)}")
    print(f"MLflow parent run {outcome['parent_run_id']}; registered version {outcome['model_version']}")
    if args.json:
        print(json.dumps(outcome, indent=2, default=str))
    return 0


def _promote(args: argparse.Namespace) -> int:
    """msa promote: msa.registry.promote directly (no Prefect). Exit 0 promoted/already, 3 kept."""
    from msa.registry import PROMOTED, promote
    from msa.tracking import REGISTERED_MODEL
    from shards.storage import endpoint_options

    result = promote(
        args.candidate,
        data_uri=args.data,
        digest=args.digest,
        margin=args.margin,
        model_name=args.model_name or REGISTERED_MODEL,
        mlflow_uri=args.mlflow_uri,
        storage_options=endpoint_options(args.endpoint_url),
    )
    champion = "none" if result.champion_mR is None else f"{result.champion_mR:.2f} (v{result.champion_version})"
    print(f"{result.model_name} v{result.candidate_version}: {result.decision}: {result.reason}")
    print(f"  candidate mR {result.candidate_mR:.2f}, champion mR {champion}, "
          f"digest {result.dataset_digest[:16]}, MLflow run {result.run_id}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    return 3 if args.exit_code and result.decision != PROMOTED else 0


def _retrain(args: argparse.Namespace) -> int:
    """msa retrain: the retrain-msa steps without Prefect."""
    from flows.retrain_msa import retrain
    from msa.config import parse_overrides

    if (args.annotations is None) != (args.images is None):
        raise SystemExit("msa retrain: give both ANNOTATIONS and --images, or neither (the demo corpus)")
    params = dict(
        annotations=args.annotations, images_dir=args.images, corpus=args.corpus, shard_size=args.shard_size,
        preset=args.preset, overrides=parse_overrides(args.set), epochs=args.epochs, workers=args.workers,
        use_gpu=args.gpu, margin=args.margin, force=args.force, mlflow_uri=args.mlflow_uri,
        storage_path=args.storage_path, ray_address=args.ray_address, endpoint_url=args.endpoint_url,
    )
    if args.out:
        params["data_uri"] = args.out
    result = retrain(**params)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _add_ops_commands(sub) -> None:
    """msa tune / promote / retrain: the tune-msa, promote-msa and retrain-msa flows without Prefect."""
    from msa.config import PRESETS

    tune = sub.add_parser(
        "tune",
        help="Ray Tune over the training driver (ASHA; random or Optuna search), register the best trial",
        description="Hyper-parameter search with Ray Tune: one TorchTrainer per trial, ASHA early stopping "
        "on validation mR, an MLflow parent run with a child run per trial; the best trial's checkpoint is "
        "tested and registered as a new msa-retrieval version (the tune-msa flow's steps, without Prefect).",
    )
    tune.add_argument("--data", required=True, help="shard set URI (local path or s3://)")
    tune.add_argument("--preset", default="small", choices=sorted(PRESETS), help="base configuration preset")
    tune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="fixed override of the base config; repeatable")
    tune.add_argument("--epochs", type=int, help="epochs per trial (ASHA's budget; default: the preset's)")
    tune.add_argument("--space", type=_json_arg, metavar="JSON",
                      help='search space, e.g. \'{"optim.lr": {"loguniform": [1e-4, 3e-3]}}\' '
                      "(default: lr, weight decay, loss weights, consistency temperature, batch size, backbone)")
    tune.add_argument("--search", choices=("random", "optuna"), default="random", help="search algorithm")
    tune.add_argument("--num-samples", type=int, default=8, help="trials")
    tune.add_argument("--max-concurrent-trials", type=int, default=1, help="trials running at once (0: no limit)")
    tune.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    tune.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker")
    tune.add_argument("--gpus-per-worker", type=float, default=0.0, choices=[0.0, 1.0], help="GPUs per worker")
    tune.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    tune.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor")
    tune.add_argument("--seed", type=int, default=0, help="search seed")
    tune.add_argument("--name", help="tuning run name (MLflow parent run, Ray storage folder)")
    tune.add_argument("--no-register", action="store_true", help="do not register the best trial")
    tune.add_argument("--storage-path", help="Ray storage (default .msa/ray_results)")
    tune.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    tune.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or .msa/mlflow.db)")
    tune.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards")
    tune.add_argument("--json", action="store_true", help="also print the outcome as JSON")
    tune.set_defaults(handler=_tune)

    promote = sub.add_parser(
        "promote",
        help="move the champion alias to a version only if it beats the champion on the same test shards",
        description="Evaluate a candidate version and the current champion on the same test shards (one "
        "dataset digest); move the champion alias only if the candidate's mR beats the champion's by at "
        "least --margin points, or if there is no champion. Records the decision on the version and as an "
        "MLflow run (the promote-msa flow's logic, without Prefect).",
    )
    promote.add_argument("--candidate", help="model version to promote (default: the newest)")
    promote.add_argument("--margin", type=float, default=0.0, help="required mR improvement, in points")
    promote.add_argument("--data", help="shard set to evaluate on (default: the candidate's training shards)")
    promote.add_argument("--digest", help="dataset digest the shards must have (default: the candidate's)")
    promote.add_argument("--model-name", help="registered model (default: msa-retrieval)")
    promote.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or .msa/mlflow.db)")
    promote.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards")
    promote.add_argument("--exit-code", action="store_true", help="exit 3 when the candidate is not promoted")
    promote.add_argument("--json", action="store_true", help="also print the decision as JSON")
    promote.set_defaults(handler=_promote)

    retrain = sub.add_parser(
        "retrain",
        help="re-shard a corpus if it changed, retrain and promote (a no-op when nothing changed)",
        description="Re-shard ANNOTATIONS/--images into --out (idempotent), compare the corpus's source "
        "digest with the last retrain's; when it changed (or with --force) train, register, and promote if "
        "the new model beats the champion. The retrain-msa flow's steps, without Prefect.",
    )
    retrain.add_argument("annotations", nargs="?", help="annotation file (default: the synthetic demo corpus)")
    retrain.add_argument("--images", help="image folder of ANNOTATIONS")
    retrain.add_argument("--out", help="shard set URI (default: the demo shards under .msa/)")
    retrain.add_argument("--corpus", help="corpus name (default: detected)")
    retrain.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    retrain.add_argument("--preset", default="small", choices=sorted(PRESETS), help="configuration preset")
    retrain.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config field; repeatable")
    retrain.add_argument("--epochs", type=int, help="override train.epochs")
    retrain.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    retrain.add_argument("--gpu", action="store_true", help="one GPU per worker")
    retrain.add_argument("--margin", type=float, default=0.0, help="promotion margin, in mR points")
    retrain.add_argument("--force", action="store_true", help="retrain even when the corpus did not change")
    retrain.add_argument("--storage-path", help="Ray storage (default .msa/ray_results)")
    retrain.add_argument("--ray-address", help="Ray cluster address")
    retrain.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or .msa/mlflow.db)")
    retrain.add_argument("--endpoint-url", help="S3 endpoint for s3:// shards")
    retrain.add_argument("--json", action="store_true", help="also print the result as JSON")
    retrain.set_defaults(handler=_retrain)


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
    _add_ops_commands(sub)
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
