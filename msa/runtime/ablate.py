"""Multi-seed ablations: named config variants x seeds as ONE Ray Tune grid, each trial tested once.

A variant is a name and a dict of dotted config overrides applied on top of the base configuration
(preset + overrides); every variant is trained with every seed (``train.seed``). The whole grid is one
``Tuner`` over ``{"variant": grid_search(...), "seed": grid_search(...)}`` with no scheduler (FIFO: no
early stopping), so trials run concurrently as far as ``max_concurrent_trials`` and the cluster's CPUs
allow. Each trial is msa.runtime.tune's trial (``fit_trial``: an MLflow child run, one TorchTrainer
reporting each epoch to Tune) followed by ONE evaluation of its best-validation checkpoint on the test
split (``test_*`` metrics on the child run). Nothing is registered: an ablation measures, it ships nothing.

MLflow: a parent run (``msa.kind=ablation``: the base config, the variants, the seeds) holding the
table (``ablation.json``, ``ablation.md``) and ``figures/ablation.png``; child runs tagged
``msa.kind=ablation-trial``, ``ablation.variant`` and ``ablation.seed``.

The table (``ablation_table``, a pure function) gives per variant the mean and the sample standard
deviation over seeds of every recall and mR, and the difference of mR to the FIRST variant with a
paired t-based confidence interval: a seed trains every variant from the same initialisation and the
same data order, so differences are taken seed by seed and only seeds present in both variants count.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msa.config import resolve_config
from msa.metrics import RECALL_KEYS
from msa.runtime import registry, tracking
from msa.runtime.ablation_table import CONFIDENCE, ablation_markdown, ablation_table
from msa.runtime.spec import RunSpec

KIND = "ablation"
TRIAL_KIND = "ablation-trial"
VARIANT_TAG, SEED_TAG = "ablation.variant", "ablation.seed"
# The grid's own keys: a variant may not set them (the seed is the grid's second axis, and every variant
# trains for the same number of epochs so that the comparison is at equal budget).
GRID_KEYS = ("train.seed", "train.epochs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# The loss terms of spec section 3 (L = L_tri + w_align * sum L_align + w_cons * sum L_cons) switched off
# as a 2 x 2 factorial over {alignment, consistency}, plus one addition:
# - "no-alignment" keeps consistency. Consistency pulls the scales 1-3 score distributions towards the
#   scale-4 scores, and without alignment nothing trains those scores to mean "this caption matches": it is
#   then a self-distillation of untrained scores. That is the point of keeping the cell: the spec's design
#   assumes consistency is useful only on top of alignment, and this variant measures what consistency does
#   alone (against "triplet-only", which has neither), so it is not a duplicate of "triplet-only".
# - "infonce" adds the symmetric InfoNCE term on the global embeddings to the full objective (weight 1; note
#   that the triplet term is a SUM over the batch, so InfoNCE's mean is a small share of the total).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-consistency": {"loss.w_cons": 0.0},
    "no-alignment": {"loss.w_align": 0.0},
    "triplet-only": {"loss.w_align": 0.0, "loss.w_cons": 0.0},
    "infonce": {"loss.w_infonce": 1.0},
}
DEFAULT_SEEDS: list[int] = [1, 2, 3]


# ---------------------------------------------------------------------------------- the grid


@dataclass
class AblationJob:
    """Everything one ablation needs, as plain data; ``run`` is the RunSpec of every trial's training."""

    data_uri: str
    dataset_digest: str
    name: str
    run: dict[str, Any] = field(default_factory=dict)
    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_VARIANTS)))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources fit
    trial_driver_cpus: float = 0.01  # the trial function waits on its TorchTrainer, then tests one checkpoint

    @property
    def spec(self) -> RunSpec:
        return RunSpec(**self.run)

    def trial_overrides(self, variant: str, seed: int) -> dict[str, Any]:
        return {**self.overrides, **self.variants[variant], "train.seed": int(seed)}


@dataclass
class AblationTrial:
    variant: str
    seed: int
    trial_id: str
    run_id: str | None
    status: str  # completed | error
    best_val_mR: float | None
    best_checkpoint: str | None
    test: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class AblationOutcome:
    parent_run_id: str
    name: str
    dataset_digest: str
    variants: dict[str, dict[str, Any]]
    seeds: list[int]
    table: list[dict[str, Any]]
    trials: list[AblationTrial]
    markdown: str
    chance_mR: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_grid(variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], preset: str,
                  overrides: Mapping[str, Any] | None = None) -> None:
    """Names, overrides and seeds of a grid, checked before anything starts; raises ValueError
    (msa.config.ConfigError, a ValueError, for a bad key or value, naming the variant)."""
    from msa.config import ConfigError

    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants: give at least one variant (a JSON object of name -> overrides)")
    for name, changes in variants.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"variant name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        if not isinstance(changes, Mapping):
            raise ValueError(f"variant {name}: overrides must be a JSON object of dotted keys, got {changes!r}")
        for key in GRID_KEYS:
            if key in changes:
                raise ValueError(f"variant {name}: {key} is set by the grid (seeds, epochs), not by a variant")
        try:
            resolve_config(preset, {**(overrides or {}), **changes})
        except ConfigError as exc:
            raise ConfigError(f"variant {name}: {exc}") from None
    if isinstance(seeds, (str, bytes)) or not seeds:
        raise ValueError("seeds: give at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
            raise ValueError(f"seed {seed!r}: seeds are integers in [0, 2**32 - 1]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)}: each seed once")


def evaluate_test_split(checkpoint: str, data_uri: str, spec: RunSpec) -> dict[str, float]:
    """Recall of one checkpoint on the test split (and the split's chance mR, the selected epoch)."""
    from msa.runtime.pipeline import split_figures
    from msa.runtime.resolver import resolve_model

    model = resolve_model(checkpoint, storage_options=spec.storage_options)
    return {**split_figures(model, data_uri, "test", spec.storage_options)[0],
            "selected_epoch": float(model.checkpoint_epoch or 0)}


def trial_fn(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One cell of the grid: train (tune.fit_trial), then test the best-validation checkpoint once."""
    from msa.runtime.tune import fit_trial

    aj = AblationJob(**job["ablation"])
    variant, seed = str(config["variant"]), int(config["seed"])
    cfg = resolve_config(aj.preset, aj.trial_overrides(variant, seed))
    run_id, outcome = fit_trial(
        cfg, aj.spec, name=aj.name, data_uri=aj.data_uri, dataset_digest=aj.dataset_digest,
        parent_run_id=job["parent_run_id"],
        tags={registry.KIND_TAG: TRIAL_KIND, VARIANT_TAG: variant, SEED_TAG: seed,
              "ablation.overrides": json.dumps(aj.variants[variant], sort_keys=True)},
    )
    try:
        test = evaluate_test_split(outcome.best_checkpoint, aj.data_uri, aj.spec)
        epoch = int(test["selected_epoch"])
        tracking.log_metrics(run_id, {**{f"test_{k}": test[k] for k in RECALL_KEYS},
                                      "test_chance_mR": test["chance_mR"], "selected_epoch": epoch}, step=epoch)
        registry.set_run_tags(run_id, {"tune.status": "completed", "best_checkpoint": outcome.best_checkpoint})
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)


def _trials(summaries, parent: str, names: list[str]) -> list[AblationTrial]:
    """Each Tune trial with its variant, seed and the test metrics its MLflow child run holds."""
    runs = {r.info.run_id: r for r in registry.child_runs(parent)}
    out = []
    for s in summaries:
        run = runs.get(s.run_id) if s.run_id else None
        metrics = run.data.metrics if run is not None else {}
        test = {k: float(metrics[f"test_{k}"]) for k in RECALL_KEYS if f"test_{k}" in metrics}
        if "test_chance_mR" in metrics:
            test["chance_mR"] = float(metrics["test_chance_mR"])
        complete = s.status == "completed" and all(k in test for k in RECALL_KEYS)
        out.append(AblationTrial(
            variant=str(s.config.get("variant")), seed=int(s.config.get("seed")), trial_id=s.trial_id,
            run_id=s.run_id, status="completed" if complete else "error", best_val_mR=s.best_val_mR,
            best_checkpoint=s.best_checkpoint, test=test,
            error=s.error or (None if complete else "no test metrics on the trial's MLflow run"),
        ))
    return sorted(out, key=lambda t: (names.index(t.variant) if t.variant in names else len(names), t.seed))


def run_ablation(job: AblationJob) -> AblationOutcome:
    """Run the grid, then log the table, the markdown and the figure on the parent run."""
    from ray import tune

    from msa.runtime.datasets import absolute_uri
    from msa.runtime.ray_train import ensure_ray
    from msa.runtime.tune import METRIC, link_child_runs, trial_summaries, tune_run_config

    if job.max_concurrent_trials < 0:
        raise ValueError("max_concurrent_trials must be >= 0 (0: no limit)")
    validate_grid(job.variants, job.seeds, job.preset, job.overrides)
    base = resolve_config(job.preset, job.overrides)
    mlflow_uri = tracking.use_tracking(job.spec.mlflow_uri)
    spec = job.spec.model_copy(update={"mlflow_uri": mlflow_uri, "storage_path": job.spec.storage})
    job = AblationJob(**{**asdict(job), "run": spec.model_dump(), "data_uri": absolute_uri(job.data_uri)})
    names = list(job.variants)
    parent = tracking.start_training_run(
        base, spec, dataset_digest=job.dataset_digest, data_uri=job.data_uri, run_name=job.name,
        extra_params={
            "ablation.variants": json.dumps(job.variants, sort_keys=True),
            "ablation.seeds": json.dumps(job.seeds),
            "ablation.reference": names[0],
            "ablation.max_concurrent_trials": job.max_concurrent_trials,
        },
    )
    registry.set_run_tags(parent, {registry.KIND_TAG: KIND})
    registry.log_dict(parent, job.variants, "variants.json")
    started = time.perf_counter()
    try:
        ensure_ray(spec.ray_address)
        _warn_if_trials_cannot_overlap(job, spec)
        trainable = tune.with_resources(
            tune.with_parameters(trial_fn, job={"ablation": asdict(job), "parent_run_id": parent}),
            {"CPU": job.trial_driver_cpus},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search(names), "seed": tune.grid_search(list(job.seeds))},
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=1,
                                        max_concurrent_trials=job.max_concurrent_trials or None),
            run_config=tune_run_config(job.name, spec),
        )
        results = tuner.fit()
        summaries = trial_summaries(results, spec.storage, base.train.epochs)
        link_child_runs(parent, summaries)
        trials = _trials(summaries, parent, names)
        done = [t for t in trials if t.status == "completed"]
        if not done:
            raise RuntimeError(f"no trial of ablation {job.name} finished: " +
                               "; ".join(f"{t.variant}/seed {t.seed}: {t.error}" for t in trials))
        table = ablation_table([{"variant": t.variant, "seed": t.seed, **t.test} for t in done], names)
        chances = {round(t.test["chance_mR"], 6) for t in done if "chance_mR" in t.test}
        chance = chances.pop() if len(chances) == 1 else None
        notes = [f"{len(done)} of {len(trials)} trials finished; seeds {job.seeds}; preset `{job.preset}`, "
                 f"{base.train.epochs} epoch(s), dataset `{job.dataset_digest[:16]}`; test split evaluated once "
                 "per trial at its best-validation checkpoint; ± is the sample standard deviation over seeds."]
        if chance is not None:
            notes.append(f"Chance mR of the test split: {chance:.2f}.")
        markdown = ablation_markdown(table, title=f"Ablation {job.name}", notes=notes)
        outcome = AblationOutcome(parent_run_id=parent, name=job.name, dataset_digest=job.dataset_digest,
                                  variants=job.variants, seeds=list(job.seeds), table=table, trials=trials,
                                  markdown=markdown, chance_mR=chance)
        _log_parent(outcome, job, base.train.epochs, time.perf_counter() - started)
    except BaseException:
        tracking.finish_run(parent, "FAILED")
        raise
    tracking.finish_run(parent)
    return outcome


def _warn_if_trials_cannot_overlap(job: AblationJob, spec: RunSpec) -> None:
    """Each trial holds ``trial_driver_cpus`` beside its workers: on 2 CPUs, two trials of one 1-CPU worker
    do not fit (2 x 1.01 > 2) and run one after the other. Say so rather than let it pass silently."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    per_trial = spec.workers * spec.cpus_per_worker + job.trial_driver_cpus
    wanted = len(job.variants) * len(job.seeds)
    if job.max_concurrent_trials:
        wanted = min(wanted, job.max_concurrent_trials)
    fit = int(cpus // per_trial)
    if fit < wanted:
        logging.getLogger(__name__).warning(
            "the cluster's %.2f CPUs fit %d trial(s) at once (each %d worker(s) x %.2f CPU + %.2f for the trial "
            "itself), not %d: lower cpus_per_worker (e.g. %.2f) to run them side by side",
            cpus, fit, spec.workers, spec.cpus_per_worker, job.trial_driver_cpus, wanted,
            max(0.01, (cpus / wanted - job.trial_driver_cpus) / spec.workers) // 0.01 * 0.01)


def _log_parent(outcome: AblationOutcome, job: AblationJob, epochs: int, seconds: float) -> None:
    from msa.plots import plot_ablation

    parent = outcome.parent_run_id
    metrics: dict[str, float] = {"trials": len(outcome.trials), "ablation_seconds": seconds,
                                 "trials_failed": sum(t.status != "completed" for t in outcome.trials)}
    for entry in outcome.table:
        name = entry["variant"]
        if entry["n"]:
            metrics[f"{name}/mR"] = entry["mean"]["mR"]
        if entry["std"]["mR"] is not None:
            metrics[f"{name}/mR_std"] = entry["std"]["mR"]
        diff = entry["diff_mR"]
        if diff and diff["mean"] is not None:
            metrics[f"{name}/mR_diff"] = diff["mean"]
            if diff["ci_low"] is not None:
                metrics[f"{name}/mR_diff_ci_low"] = diff["ci_low"]
                metrics[f"{name}/mR_diff_ci_high"] = diff["ci_high"]
    tracking.log_metrics(parent, metrics, step=0)
    document = {
        "name": outcome.name, "dataset_digest": outcome.dataset_digest, "data_uri": job.data_uri,
        "preset": job.preset, "overrides": job.overrides, "epochs": epochs, "variants": outcome.variants,
        "seeds": outcome.seeds, "reference": outcome.table[0]["variant"], "confidence": CONFIDENCE,
        "chance_mR": outcome.chance_mR, "table": outcome.table,
        "trials": [asdict(t) for t in outcome.trials],
    }
    registry.log_dict(parent, document, "ablation.json")
    with tempfile.TemporaryDirectory() as tmp:
        markdown = Path(tmp) / "ablation.md"
        markdown.write_text(outcome.markdown + "\n", encoding="utf-8")
        tracking.log_artifact(parent, markdown)
        figure = plot_ablation(outcome.table, Path(tmp) / "ablation.png", title=f"{outcome.name}: test mR",
                               chance=outcome.chance_mR)
        tracking.log_artifact(parent, figure, "figures")
