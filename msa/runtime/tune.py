"""Ray Tune over the training driver: one TorchTrainer per trial, ASHA early stopping, random or Optuna search.

Ray 2.60 pattern (Train V2): ``Tuner(trial_fn)`` where ``trial_fn(config)`` resolves the trial's
configuration, opens an MLflow child run and calls ``msa.runtime.ray_train.run_training`` with
``ray.tune.integration.ray_train.TuneReportCallback``, which forwards rank 0's per-epoch report
(``val_mR`` and the checkpoint path) to Tune, so ASHA can stop a trial between epochs.

MLflow: one parent run (``msa.kind=tune``: the base config, the search space, the settings, the best
trial) with a child run per trial (``mlflow.parentRunId``; per-epoch metrics from rank 0). The best
trial's best checkpoint (highest validation mR over all trials and epochs) is evaluated on the test
split once and registered as a new version of ``msa-retrieval`` (msa.runtime.pipeline.evaluate_test +
publish_model). The search space is plain JSON (a flow parameter), keyed by dotted config keys::

    {"optim.lr": {"loguniform": [1e-4, 3e-3]}, "train.batch_size": {"choice": [16, 32]},
     "loss.cons_temperature": {"uniform": [0.5, 4.0]}, "train.seed": 3}

Distribution forms: ``uniform``/``loguniform``/``randint`` ([low, high]), ``choice`` (values); a
bare value is a constant.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msa.checkpoint import HISTORY_FILE
from msa.config import MSAConfig, resolve_config
from msa.metrics import RECALL_KEYS
from msa.runtime import registry, tracking
from msa.runtime.datasets import absolute_uri
from msa.runtime.ray_train import TrainJob, TrainOutcome, ensure_ray, ray_storage, run_training
from msa.runtime.spec import RunSpec

METRIC = "val_mR"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback adds to each forwarded report

# At least: learning rate, weight decay, both loss weights, consistency temperature, batch size, backbone.
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr": {"loguniform": [1e-4, 3e-3]},
    "optim.weight_decay": {"loguniform": [1e-4, 1e-1]},
    "loss.w_align": {"uniform": [1.0, 20.0]},
    "loss.w_cons": {"uniform": [1.0, 15.0]},
    "loss.cons_temperature": {"uniform": [0.5, 4.0]},
    "train.batch_size": {"choice": [16, 32]},
    "image.backbone": {"choice": ["resnet10t", "resnet18"]},
}
SEARCHES = ("random", "optuna")


@dataclass
class TuneJob:
    """Everything one tuning run needs, as plain data; ``run`` holds the RunSpec of every trial's training
    (``workers`` per trial, ``cpus_per_worker``, ``use_gpu``: one GPU per worker) and the services."""

    data_uri: str
    dataset_digest: str
    name: str
    run: dict[str, Any] = field(default_factory=dict)
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    search: str = "random"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    trial_driver_cpus: float = 0.01  # the trial function only waits on its TorchTrainer (0 is refused)
    grace_period: int = 1
    reduction_factor: float = 2.0
    seed: int = 0

    @property
    def spec(self) -> RunSpec:
        return RunSpec(**self.run)


@dataclass
class TrialSummary:
    trial_id: str
    run_id: str | None
    status: str  # completed | stopped-early | error
    epochs: int
    best_val_mR: float | None
    best_checkpoint: str | None
    config: dict[str, Any]
    error: str | None = None


@dataclass
class TuneOutcome:
    parent_run_id: str
    name: str
    trials: list[TrialSummary]
    best_trial_id: str
    best_run_id: str
    best_val: dict[str, float]
    best_config: dict[str, Any]
    best_checkpoint: str
    model_version: str | None = None
    test: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_space(space: dict[str, Any], preset: str, overrides: dict[str, Any] | None = None) -> None:
    """Every key must be a config key and every value a known distribution; raises ValueError."""
    sample: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise ValueError(f"{key}: a distribution is one of uniform/loguniform/randint/choice, got {spec}")
            (kind, args), = spec.items()
            if kind in ("uniform", "loguniform", "randint"):
                if not (isinstance(args, (list, tuple)) and len(args) == 2 and args[0] < args[1]):
                    raise ValueError(f"{key}: {kind} needs [low, high] with low < high, got {args!r}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs a positive low bound")
                sample[key] = args[0]
            elif kind == "choice":
                if not isinstance(args, (list, tuple)) or not args:
                    raise ValueError(f"{key}: choice needs a non-empty list of values")
                sample[key] = args[0]
            else:
                raise ValueError(f"{key}: unknown distribution {kind!r} (uniform, loguniform, randint, choice)")
        else:
            sample[key] = spec
    resolve_config(preset, {**(overrides or {}), **sample})  # unknown keys and bad types raise here


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        (kind, args), = spec.items()
        if kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(args[0], args[1] + 1)  # inclusive high, like the other forms
        else:
            out[key] = tune.choice(list(args))
    return out


def _plain(value: Any) -> Any:
    """numpy scalars from the samplers -> Python values (JSON, MLflow params, dataclass configs)."""
    return value.item() if hasattr(value, "item") else value


def fit_trial(
    cfg: MSAConfig,
    spec: RunSpec,
    *,
    name: str,
    data_uri: str,
    dataset_digest: str,
    parent_run_id: str,
    tags: dict[str, Any],
) -> tuple[str, TrainOutcome]:
    """The training part of any Tune trial whose trainable runs one TorchTrainer (tuning, ablations).

    Opens the trial's MLflow child run of ``parent_run_id`` (named ``<name>-<trial id>``, tagged
    ``tune.trial_id`` and ``tags``), fits with ``TuneReportCallback`` (rank 0's per-epoch report reaches
    Tune) and logs ``best_val_*``. Returns (run id, outcome) with the run still open: the caller adds
    its own steps and closes it. A training error marks the run FAILED and propagates.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    spec = spec.model_copy(update={"max_failures": 0})
    tracking.use_tracking(spec.mlflow_uri)
    run_name = f"{name}-{trial_id}"
    run_id = tracking.start_training_run(
        cfg, spec, dataset_digest=dataset_digest, data_uri=data_uri, run_name=run_name, parent_run_id=parent_run_id,
    )
    registry.set_run_tags(run_id, {"tune.trial_id": trial_id, **tags})
    train_job = TrainJob(data_uri=data_uri, config=cfg.to_dict(), run_name=run_name,
                         dataset_digest=dataset_digest, run=spec.model_dump(), mlflow_run_id=run_id)
    try:
        outcome = run_training(train_job, callbacks=[TuneReportCallback()])
        tracking.log_metrics(run_id, {f"best_val_{k}": outcome.best_metrics[f"val_{k}"] for k in RECALL_KEYS}, 0)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    return run_id, outcome


def trial_fn(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One trial: resolve its config, open the MLflow child run, fit one TorchTrainer reporting to Tune."""
    tj = TuneJob(**job["tune"])
    sampled = {key: _plain(value) for key, value in config.items()}
    cfg = resolve_config(tj.preset, {**tj.overrides, **sampled})
    run_id, outcome = fit_trial(
        cfg, tj.spec, name=tj.name, data_uri=tj.data_uri, dataset_digest=tj.dataset_digest,
        parent_run_id=job["parent_run_id"],
        tags={registry.KIND_TAG: "tune-trial", "tune.sampled": json.dumps(sampled, sort_keys=True)},
    )
    registry.set_run_tags(run_id, {"tune.status": "completed", "best_checkpoint": outcome.best_checkpoint})
    tracking.finish_run(run_id)


def _search_alg(tj: TuneJob):
    if tj.search == "random":
        from ray.tune.search import BasicVariantGenerator

        # Tune applies max_concurrent_trials to a BasicVariantGenerator only when it builds the
        # generator itself, so a seeded one must carry the limit.
        return BasicVariantGenerator(random_state=tj.seed, max_concurrent=tj.max_concurrent_trials)
    if tj.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=tj.seed)
    raise ValueError(f"search must be one of {SEARCHES}, not {tj.search!r}")


def _checkpoint_uri(path: str, storage_path: str) -> str:
    """TuneReportCallback forwards the checkpoint's filesystem path; give S3 paths their scheme back."""
    if storage_path.startswith("s3://") and not path.startswith("s3://"):
        return f"s3://{path}"
    return path


def tune_run_config(name: str, spec: RunSpec):
    """Tune's ``RunConfig`` on the run's storage: an ``s3://`` path through the run's endpoint and retries
    (``ray_storage``), as each trial's Train run stores its checkpoints (pyarrow's own resolution of the URI
    knows no endpoint but AWS's)."""
    from ray import tune

    storage_path, storage_filesystem = ray_storage(spec)
    return tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=1)


def trial_summaries(results, storage_path: str, epochs: int) -> list[TrialSummary]:
    """One summary per trial of a Tune ``ResultGrid`` (best validation epoch, its checkpoint, status)."""
    out: list[TrialSummary] = []
    for result in results:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        rows = [] if frame is None or METRIC not in frame else frame[frame[METRIC].notna()].to_dict("records")
        best = max(rows, key=lambda r: r[METRIC], default=None)
        config = {key: _plain(value) for key, value in (result.config or {}).items()}
        if result.error is not None:
            status = "error"
        elif len(rows) < epochs:
            status = "stopped-early"  # ASHA cut it at a rung
        else:
            status = "completed"
        out.append(
            TrialSummary(
                trial_id=str(trial_id),
                run_id=None,
                status=status,
                epochs=len(rows),
                best_val_mR=None if best is None else float(best[METRIC]),
                best_checkpoint=None if best is None or not best.get(CHECKPOINT_PATH_KEY)
                else _checkpoint_uri(str(best[CHECKPOINT_PATH_KEY]), storage_path),
                config=config,
                error=None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:500],
            )
        )
    return out


def run_tune(job: TuneJob, *, register: bool = True) -> TuneOutcome:
    """Tune, then evaluate and register the best trial's checkpoint; returns the outcome."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from msa.runtime import pipeline

    if job.num_samples < 1 or job.max_concurrent_trials < 0:
        raise ValueError("num_samples must be >= 1, max_concurrent_trials >= 0")
    if job.search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, not {job.search!r}")
    validate_space(job.space, job.preset, job.overrides)
    base = resolve_config(job.preset, job.overrides)
    epochs = base.train.epochs
    for key in ("train.epochs",):
        if key in job.space:
            raise ValueError(f"{key} cannot be tuned: it is ASHA's time budget (set it in overrides)")
    grace = max(1, min(job.grace_period, epochs))

    mlflow_uri = tracking.use_tracking(job.spec.mlflow_uri)
    spec = job.spec.model_copy(update={"mlflow_uri": mlflow_uri, "storage_path": job.spec.storage})
    job = TuneJob(**{**asdict(job), "run": spec.model_dump(), "data_uri": absolute_uri(job.data_uri)})
    parent = tracking.start_training_run(
        base,
        spec,
        dataset_digest=job.dataset_digest,
        data_uri=job.data_uri,
        run_name=job.name,
        extra_params={
            "tune.search": job.search,
            "tune.num_samples": job.num_samples,
            "tune.max_concurrent_trials": job.max_concurrent_trials,
            "tune.scheduler": f"ASHA(max_t={epochs}, grace_period={grace}, reduction_factor={job.reduction_factor})",
            "tune.seed": job.seed,
        },
    )
    registry.set_run_tags(parent, {registry.KIND_TAG: "tune"})
    registry.log_dict(parent, job.space, "search_space.json")
    started = time.perf_counter()
    try:
        ensure_ray(spec.ray_address)
        trainable = tune.with_resources(
            tune.with_parameters(trial_fn, job={"tune": asdict(job), "parent_run_id": parent}),
            {"CPU": job.trial_driver_cpus},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(job.space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=epochs,
                    grace_period=grace,
                    reduction_factor=job.reduction_factor,
                ),
                search_alg=_search_alg(job),
                num_samples=job.num_samples,
                max_concurrent_trials=(job.max_concurrent_trials or None) if job.search != "random" else None,
            ),
            run_config=tune_run_config(job.name, spec),
        )
        results = tuner.fit()
        trials = trial_summaries(results, spec.storage, epochs)
        link_child_runs(parent, trials)
        scored = [t for t in trials if t.best_val_mR is not None and t.best_checkpoint]
        if not scored:
            raise RuntimeError(f"no trial of {job.name} reported a checkpoint: " +
                               "; ".join(f"{t.trial_id}: {t.error}" for t in trials))
        best = max(scored, key=lambda t: t.best_val_mR)
        outcome = TuneOutcome(
            parent_run_id=parent,
            name=job.name,
            trials=trials,
            best_trial_id=best.trial_id,
            best_run_id=best.run_id or "",
            best_val={},
            best_config=best.config,
            best_checkpoint=best.best_checkpoint,
        )
        history = _history(best.best_checkpoint, spec.storage_options)
        best_epoch = max(history, key=lambda h: h.get(METRIC, -math.inf)) if history else {}
        outcome.best_val = {k: float(v) for k, v in best_epoch.items() if k.startswith("val_")}
        tracking.log_metrics(
            parent,
            {"best_val_mR": best.best_val_mR, "trials": len(trials),
             "trials_stopped_early": sum(t.status == "stopped-early" for t in trials),
             "trials_failed": sum(t.status == "error" for t in trials),
             "tune_seconds": time.perf_counter() - started},
            step=0,
        )
        registry.set_run_tags(parent, {"best_trial_id": best.trial_id, "best_run_id": outcome.best_run_id,
                                       "best_config": json.dumps(best.config, sort_keys=True)})
        registry.log_dict(parent, [asdict(t) for t in trials], "trials.json")
        if register:
            trained = pipeline.TrainedRun(
                run_id=outcome.best_run_id,
                run_name=f"{job.name}-{best.trial_id}",
                dataset_digest=job.dataset_digest,
                best_checkpoint=best.best_checkpoint,
                best_val=outcome.best_val,
                history=history,
            )
            test = pipeline.evaluate_test(trained, data_uri=job.data_uri, spec=spec)
            outcome.test = {k: float(v) for k, v in test.items()}
            outcome.model_version = pipeline.publish_model(trained, test, spec=spec)
            registry.set_version_tags(outcome.model_version, {"tune_parent_run_id": parent,
                                                              "tune_trial_id": best.trial_id})
            tracking.log_metrics(parent, {f"test_{k}": v for k, v in outcome.test.items() if k in RECALL_KEYS}, 0)
            registry.set_run_tags(parent, {"model_version": outcome.model_version})
    except BaseException:
        tracking.finish_run(parent, "FAILED")
        raise
    tracking.finish_run(parent)
    return outcome


def _history(checkpoint_uri: str, storage_options: dict | None) -> list[dict[str, float]]:
    from shards.storage import open_url

    try:
        with open_url(f"{checkpoint_uri.rstrip('/')}/{HISTORY_FILE}", "rb", storage_options) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return []


def link_child_runs(parent: str, trials: list[TrialSummary]) -> None:
    """Attach each trial's MLflow child run; close the runs of trials Tune stopped (ASHA, errors)."""
    by_trial = {r.data.tags.get("tune.trial_id"): r for r in registry.child_runs(parent)}
    for trial in trials:
        run = by_trial.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        # A run still RUNNING lost its actor; one FAILED although Tune saw no error was interrupted by
        # Tune's own stop (ASHA) inside the training call. Both get the status Tune saw.
        if run.info.status == "RUNNING" or (run.info.status == "FAILED" and trial.status != "error"):
            # The trial actor was stopped under the run (ASHA) or died: close it with what Tune saw.
            registry.set_run_tags(trial.run_id, {"tune.status": trial.status})
            if trial.best_val_mR is not None:
                tracking.log_metrics(trial.run_id, {"best_val_mR": trial.best_val_mR}, step=0)
            # A trial that reported its last epoch can still be stopped before its own cleanup ran
            # (ASHA stops at max_t): it finished; one cut at a rung was killed.
            status = {"completed": "FINISHED", "error": "FAILED"}.get(trial.status, "KILLED")
            tracking.finish_run(trial.run_id, status)
        else:
            registry.set_run_tags(trial.run_id, {"tune.status": trial.status})
