"""The ``msa`` command line: one entry point over the flows, the retrieval tools and the shard tools.

Style: argparse, one sub-command per action, every handler imports what it needs when it runs, so
``msa --help`` and every ``msa CMD --help`` stay well under a second (no torch, Ray or MLflow import).
Run settings (workers, GPU, storage, tracking, S3 endpoint) are generated from ``RunSpec``'s fields;
configuration goes through ``--preset`` and ``--set`` and is validated before any server starts.
``--json`` writes only JSON to stdout; everything meant for people goes to stderr then.
Exit codes: 0 success, 1 unexpected error, 2 bad input (arguments, config, files), 3 storage errors,
failed verification or (``promote --exit-code``) a candidate that was not promoted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msa.paths import LOCAL_STATE, OFFLINE_ENV

EXIT_INPUT = 2
EXIT_NOT_PROMOTED = 3
# The temporary server needs ~20 s on two busy cores; Prefect's default wait is 20 s.
_CLI_ENV = {**OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _prepare_environment() -> None:
    """Defaults for a fresh machine: offline hubs, no telemetry, Prefect state under .msa/."""
    for key, value in _CLI_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(LOCAL_STATE / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the leaf


@contextlib.contextmanager
def json_stdout(json_mode: bool) -> Iterator[Any]:
    """With --json, route everything (including Ray's and Prefect's output) to stderr and yield the
    real stdout for the one JSON document; otherwise yield sys.stdout."""
    if not json_mode:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(saved, "w")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        real.flush()
        os.dup2(saved, 1)
        real.close()


def _emit(result: Any, out) -> None:
    print(json.dumps(result, indent=2, default=str), file=out)


# ---------------------------------------------------------------------------------- options


def _add_run_options(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (), **defaults: Any) -> None:
    """One option per RunSpec field (``--workers``, ``--use-gpu``, ...), with its type, default and help."""
    from msa.runtime.spec import RunSpec

    group = parser.add_argument_group("run specification")
    for name, field in RunSpec.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name, field.default)
        help_text = field.description if "default" in field.description else f"{field.description} (default: {default})"
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = {int: int, float: float}.get(field.annotation, str)
            group.add_argument(flag, type=kind, default=default, metavar=name.upper(), help=help_text)


def _run_params(args: argparse.Namespace, flow_fn) -> dict[str, Any]:
    """The RunSpec fields the command line set, restricted to those ``flow_fn`` takes."""
    import inspect

    from msa.runtime.spec import RunSpec

    accepted = inspect.signature(flow_fn).parameters
    return {name: getattr(args, name) for name in RunSpec.model_fields if name in accepted and hasattr(args, name)}


def _add_config_options(parser: argparse.ArgumentParser, *, epochs: bool = True) -> None:
    from msa.config import PRESETS

    parser.add_argument("--preset", default="small", choices=sorted(PRESETS),
                        help="configuration preset (default: small)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (see `msa config`); repeatable")
    if epochs:
        parser.add_argument("--epochs", type=int, help="override train.epochs")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Validated overrides: a bad key or value exits 2 with one line, before any server starts."""
    from msa.config import ConfigError, parse_overrides, resolve_config

    try:
        overrides = parse_overrides(args.set)
        if getattr(args, "epochs", None) is not None:
            overrides["train.epochs"] = args.epochs
        resolve_config(args.preset, overrides)
    except ConfigError as e:
        raise _InputError(f"msa {args.command}: error: {e}") from None
    return overrides


class _InputError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct non-negative seeds")
    return seeds


def _split_sizes(text: str) -> dict[str, int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three counts TRAIN,VAL,TEST")
    return dict(zip(("train", "val", "test"), sizes))


# --------------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> int:
    from msa.config import resolve_config

    overrides = _overrides(args)
    print(resolve_config(args.preset, overrides).to_json())
    return 0


def _print_recall_table(test: dict[str, float], out) -> None:
    from msa.metrics import RECALL_KEYS

    print("\nTest recall (%) of the selected checkpoint, epoch", int(test["selected_epoch"]) + 1, file=out)
    print("  " + "  ".join(f"{n:>8}" for n in RECALL_KEYS), file=out)
    print("  " + "  ".join(f"{test[n]:8.2f}" for n in RECALL_KEYS), file=out)
    ratio = test["mR"] / test["chance_mR"] if test["chance_mR"] else float("inf")
    print(f"  chance mR {test['chance_mR']:.2f}  ->  mR is {ratio:.1f}x chance", file=out)


def _train(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    from flows.train_msa import train_msa

    params: dict[str, Any] = dict(preset=args.preset, overrides=overrides, run_name=args.run_name,
                                  **_run_params(args, train_msa))
    if args.data:
        params["data_uri"] = args.data
    if getattr(args, "demo_images", None):
        params["demo_images"] = args.demo_images
    if args.command == "demo" and not args.verbose:
        return _quiet_demo(args, train_msa, params)
    with json_stdout(args.json):
        result = train_msa(**params)
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON alone
    _print_outcome(result, args, human)
    if args.json:
        _emit(result, sys.stdout)
    return 0


def _quiet_demo(args: argparse.Namespace, train_msa, params: dict[str, Any]) -> int:
    """The demo with stages, an epoch bar and the outcome on the terminal; the rest, tracebacks included,
    in a log file."""
    from flows import console

    log_file = console.log_path("demo")
    out, human = console.divert_to_log(log_file, args.json)
    console.stage(f"starting Prefect (a temporary local server) for the flow train-msa; full log: {_shown(log_file)}")
    try:
        result = train_msa(**params)
    except BaseException as e:
        print(f"msa demo failed: {type(e).__name__}: {e}\nThe full log, with the traceback: {_shown(log_file)}",
              file=human)
        raise
    _print_outcome(result, args, human)
    print(f"Full log: {_shown(log_file)}", file=human)
    if args.json:
        _emit(result, out)
    return 0


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter on the terminal)."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _print_outcome(result: dict[str, Any], args: argparse.Namespace, out) -> None:
    from msa.runtime.tracking import default_tracking_uri

    _print_recall_table(result["test"], out)
    uri = args.mlflow_uri or default_tracking_uri()
    print(f"\nMLflow run {result['run_id']} ({result['run_name']}), registered model msa-retrieval "
          f"version {result['model_version']}, dataset digest {result['dataset_digest'][:16]}", file=out)
    print(f"MLflow store: {uri}", file=out)
    if uri.startswith("sqlite:"):
        print(f"Open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000", file=out)


def _tune(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    from flows.tune_msa import tune_msa

    with json_stdout(args.json):
        result = tune_msa(
            data_uri=args.data, preset=args.preset, overrides=overrides, space=args.space, search=args.search,
            num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent_trials,
            grace_period=args.grace_period, reduction_factor=args.reduction_factor, seed=args.seed,
            register_best=not args.no_register, name=args.name, **_run_params(args, tune_msa),
        )
    if args.json:
        _emit(result, sys.stdout)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    from msa.runtime.ablate import DEFAULT_VARIANTS, validate_grid

    variants = DEFAULT_VARIANTS if args.variants is None else args.variants
    try:
        validate_grid(variants, args.seeds, args.preset, overrides)
    except ValueError as e:  # ConfigError is one
        raise _InputError(f"msa ablate: error: {e}") from None
    from flows.ablate_msa import ablate_msa
    params: dict[str, Any] = dict(preset=args.preset, overrides=overrides, variants=variants, seeds=args.seeds,
                                  max_concurrent_trials=args.max_concurrent_trials, name=args.name,
                                  **_run_params(args, ablate_msa))
    if args.data:
        params["data_uri"] = args.data
    if args.demo_images:
        params["demo_images"] = args.demo_images
    with json_stdout(args.json):
        result = ablate_msa(**params)
    if args.json:
        _emit(result, sys.stdout)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flows.promote_msa import promote_msa

    with json_stdout(args.json):
        result = promote_msa(candidate_version=args.candidate, margin=args.margin, data_uri=args.data,
                             digest=args.digest, model_name=args.model_name, **_run_params(args, promote_msa))
    if args.json:
        _emit(result, sys.stdout)
    else:
        champion = "none" if result["champion_mR"] is None else \
            f"{result['champion_mR']:.2f} (v{result['champion_version']})"
        print(f"{result['model_name']} v{result['candidate_version']}: {result['decision']}: {result['reason']}")
        print(f"  candidate mR {result['candidate_mR']:.2f}, champion mR {champion}, "
              f"digest {result['dataset_digest'][:16]}, MLflow run {result['run_id']}")
    return EXIT_NOT_PROMOTED if args.exit_code and result["decision"] != "promoted" else 0


def _retrain(args: argparse.Namespace) -> int:
    if (args.annotations is None) != (args.images is None):
        raise _InputError("msa retrain: error: give both ANNOTATIONS and --images, or neither (the demo corpus)")
    overrides = _overrides(args)
    from flows.retrain_msa import retrain_msa

    params: dict[str, Any] = dict(annotations=args.annotations, images_dir=args.images, corpus=args.corpus,
                                  shard_size=args.shard_size, preset=args.preset, overrides=overrides,
                                  margin=args.margin, force=args.force, **_run_params(args, retrain_msa))
    if args.out:
        params["data_uri"] = args.out
    with json_stdout(args.json):
        result = retrain_msa(**params)
    if args.json:
        _emit(result, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------- parsers


def _add_train_commands(sub) -> None:
    for name, summary, description in (
        ("demo", "the whole pipeline on embedded defaults (synthetic corpus -> shards -> Ray -> MLflow)",
         "Generate the synthetic demo corpus if absent, shard it, train the small preset with Ray Train "
         "(2 CPU workers, DDP over gloo), evaluate test recall, register the model in MLflow and print the "
         "recall table. Runs the Prefect flow train-msa locally."),
        ("train", "run the train-msa flow on a shard set",
         "Train MSA on a shard set (verify -> train on Ray -> evaluate on test -> register), as the Prefect "
         "flow train-msa run locally. Reusing --run-name resumes that run's latest checkpoint."),
    ):
        p = sub.add_parser(name, help=summary, description=description)
        p.add_argument("--data", help="shard set URI (local path or s3://), or several trained jointly as "
                       "NAME=URI[@WEIGHT],... (README, 'Joint training'); default: the synthetic demo shards")
        _add_config_options(p)
        p.add_argument("--run-name", help="run name; reusing one resumes that run's latest checkpoint")
        if name == "demo":
            p.add_argument("--demo-images", type=_split_sizes, metavar="TRAIN,VAL,TEST",
                           help="images per split of the synthetic corpus when it must be made (default 300,100,100)")
            p.add_argument("--verbose", action="store_true",
                           help="show everything Prefect, Ray and MLflow print (default: stages, an epoch bar and "
                           "the outcome; the rest goes to a log file under .msa/logs/ that the demo names)")
        _add_run_options(p)
        p.add_argument("--json", action="store_true", help="print only the flow's result, as JSON, on stdout")
        p.set_defaults(handler=_train)


def _add_ops_commands(sub) -> None:
    tune = sub.add_parser(
        "tune",
        help="Ray Tune over the training driver (ASHA; random or Optuna search), register the best trial",
        description="Hyper-parameter search with Ray Tune: one TorchTrainer per trial, ASHA early stopping on "
        "validation mR, an MLflow parent run with a child run per trial; the best trial's checkpoint is tested "
        "and registered as a new msa-retrieval version. Runs the Prefect flow tune-msa locally.",
    )
    tune.add_argument("--data", required=True, help="shard set URI (local path or s3://)")
    _add_config_options(tune)
    tune.add_argument("--space", type=_json_arg, metavar="JSON",
                      help='search space, e.g. \'{"optim.lr": {"loguniform": [1e-4, 3e-3]}}\' (default: lr, weight '
                      "decay, loss weights, consistency temperature, batch size, backbone)")
    tune.add_argument("--search", choices=("random", "optuna"), default="random", help="search algorithm")
    tune.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    tune.add_argument("--max-concurrent-trials", type=int, default=1, help="trials running at once (0: no limit)")
    tune.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    tune.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor")
    tune.add_argument("--seed", type=int, default=0, help="search seed")
    tune.add_argument("--name", help="tuning run name (MLflow parent run, Ray storage folder)")
    tune.add_argument("--no-register", action="store_true", help="do not register the best trial")
    _add_run_options(tune, exclude=("max_failures",), workers=1)
    tune.add_argument("--json", action="store_true", help="print only the outcome, as JSON, on stdout")
    tune.set_defaults(handler=_tune)

    ablate = sub.add_parser(
        "ablate",
        help="multi-seed ablation: config variants x seeds as one Ray Tune grid, tested, with paired 95%% CIs",
        description="Train every named variant (config overrides on top of --preset/--set) with every seed "
        "(train.seed) as one Ray Tune grid, no early stopping; each trial is an MLflow child run tested once on "
        "the test split at its best-validation checkpoint. The MLflow parent run holds the table (mean and sd over "
        "seeds of every recall; mR's difference to the first variant with a paired t 95% confidence interval) as "
        "ablation.json/ablation.md and figures/ablation.png. Nothing is registered. Runs the Prefect flow "
        "ablate-msa locally.",
    )
    ablate.add_argument("--data", help="shard set URI (local path or s3://); default: the synthetic demo shards")
    _add_config_options(ablate)
    ablate.add_argument("--variants", type=_json_arg, metavar="JSON",
                        help='variants, name -> overrides, the first is the reference, e.g. \'{"full": {}, '
                        '"no-consistency": {"loss.w_cons": 0}}\' (default: full, no-consistency, no-alignment, '
                        "triplet-only, infonce)")
    ablate.add_argument("--seeds", type=_seed_list, default=[1, 2, 3], metavar="S1,S2,...",
                        help="train.seed values, each variant trained once per seed (default: 1,2,3)")
    ablate.add_argument("--max-concurrent-trials", type=int, default=0,
                        help="trials running at once (default 0: as many as the cluster's CPUs fit)")
    ablate.add_argument("--name", help="ablation name (MLflow parent run, Ray storage folder)")
    ablate.add_argument("--demo-images", type=_split_sizes, metavar="TRAIN,VAL,TEST",
                        help="images per split of the synthetic demo corpus when it must be made (without --data)")
    _add_run_options(ablate, exclude=("max_failures",))
    ablate.add_argument("--json", action="store_true", help="print only the outcome, as JSON, on stdout")
    ablate.set_defaults(handler=_ablate)

    promote = sub.add_parser(
        "promote",
        help="move the champion alias to a version only if it beats the champion on the same test shards",
        description="Evaluate a candidate version and the current champion on the same test shards (one dataset "
        "digest); move the champion alias only if the candidate's mR beats the champion's by at least --margin "
        "points, or if there is no champion. Records the decision on the version and as an MLflow run. Runs the "
        "Prefect flow promote-msa locally.",
    )
    promote.add_argument("--candidate", help="model version to promote (default: the newest)")
    promote.add_argument("--margin", type=float, default=0.0, help="required mR improvement, in points")
    promote.add_argument("--data", help="shard set to evaluate on (default: the candidate's training shards)")
    promote.add_argument("--digest", help="dataset digest the shards must have (default: the candidate's)")
    promote.add_argument("--model-name", default="msa-retrieval", help="registered model (default: msa-retrieval)")
    _add_run_options(promote, exclude=("workers", "use_gpu", "cpus_per_worker", "max_failures", "ray_address",
                                       "storage_path"))
    promote.add_argument("--exit-code", action="store_true", help="exit 3 when the candidate is not promoted")
    promote.add_argument("--json", action="store_true", help="print only the decision, as JSON, on stdout")
    promote.set_defaults(handler=_promote)

    retrain = sub.add_parser(
        "retrain",
        help="re-shard a corpus if it changed, retrain and promote (a no-op when nothing changed)",
        description="Re-shard ANNOTATIONS/--images into --out (idempotent) and compare the corpus's source digest "
        "with the last retrain's; when it changed (or with --force) train, register, and promote if the new "
        "model beats the champion. Runs the Prefect flow retrain-msa locally.",
    )
    retrain.add_argument("annotations", nargs="?", help="annotation file (default: the synthetic demo corpus)")
    retrain.add_argument("--images", help="image folder of ANNOTATIONS")
    retrain.add_argument("--out", help="shard set URI (default: the demo shards under .msa/)")
    retrain.add_argument("--corpus", help="corpus name (default: detected)")
    retrain.add_argument("--shard-size", type=int, help="samples per shard (default 1000; 50 for the demo corpus)")
    _add_config_options(retrain)
    retrain.add_argument("--margin", type=float, default=0.0, help="promotion margin, in mR points")
    retrain.add_argument("--force", action="store_true", help="retrain even when the corpus did not change")
    _add_run_options(retrain)
    retrain.add_argument("--json", action="store_true", help="print only the result, as JSON, on stdout")
    retrain.set_defaults(handler=_retrain)


def build_parser() -> argparse.ArgumentParser:
    import flows.cli_retrieval
    import flows.cli_weights
    import shards.cli

    parser = argparse.ArgumentParser(
        prog="msa",
        description="MSA remote-sensing image-text retrieval: synthesise or read corpora, shard them, train on "
        "Ray with MLflow tracking, tune, promote, retrain, index and search. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_commands(sub)
    _add_ops_commands(sub)
    config = sub.add_parser(
        "config",
        help="print a preset's fully resolved configuration",
        description="Print the configuration a run would use: a named preset plus --set overrides, resolved and "
        "validated once, exactly as it is logged to MLflow and stored in checkpoints.",
    )
    _add_config_options(config, epochs=False)
    config.set_defaults(handler=_config)
    flows.cli_retrieval.register(sub)
    flows.cli_weights.register(sub)
    shards.cli.register(sub, json_stdout=json_stdout)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msa-rsitr")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except _InputError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
