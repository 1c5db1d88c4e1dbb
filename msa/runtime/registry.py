"""The model registry's champion/challenger logic: evaluate, compare on the same shards, move ``champion``.

Promotion (``promote``) evaluates a candidate version and the current ``champion`` on the SAME test
shards (one dataset digest, re-verified against its manifest; stored figures are never trusted),
moves the alias only when the candidate's mR beats the champion's by at least ``margin``, and
records the decision on the candidate version (tags) and as an MLflow run in experiment ``msa``.

Race safety. Two promotions may evaluate at the same time; only the commit is serialised, by a
lease the caller passes (``lease: CommitLease``). The flows pass ``flows.lease.promotion_lease``: a
global concurrency limit of 1 per registered model on the Prefect server, whose slot frees itself
20 s after it was taken and whose holder writes only within 10 s of asking for it.

1. Evaluation runs without the lease, against the champion read at that moment (``seen``).
2. Holding the lease, the commit re-reads the champion alias. If it is still ``seen`` and the
   lease's write deadline has not passed, the alias moves. If another promotion moved it
   meanwhile, the lease is released and the candidate is re-evaluated against the new champion
   (its own figures are cached) before trying again; a passed deadline also means release and try
   again, without writing.

Why the champion is never absent: nothing here deletes the alias or a version, and
``set_registered_model_alias`` replaces the alias in one statement, so once there is a champion
every read sees one. Why it never regresses: under the lease, each alias move is decided against
the champion current at that moment, and only a candidate that beats it by the margin moves it; a
second candidate that evaluated against an older champion finds the new one at its re-read and is
compared with that (a KEPT decision against an older champion also holds against a newer one,
which beat the older by the margin). The bound: mutual exclusion holds while each holder's alias
write reaches the tracking server within the lease's margin (sent before the 10 s deadline, the
slot cannot pass on before 20 s). A write delayed beyond that could land after the next holder's
move; it only ever replaces a champion its candidate beat at the re-read, so the champion could
fall back to a candidate that beat its predecessor, never below it. A holder killed with SIGKILL
leaves nothing in the registry and blocks the others until its slot frees itself: at most 20 s
after it was taken, plus one poll (measured: 20.0 s; tests/test_promotion_stress.py). The lease
is advisory: a person moving the alias in the UI bypasses it.

Without a Prefect server, ``promote`` still needs a lease: it has no default, so forgetting one is
a TypeError, never an unguarded commit. ``flows.lease.promotion_lease`` works against the
configured Prefect server or, with none configured, Prefect's ephemeral local server (the limit
lives in its database under PREFECT_HOME, shared by the processes of one machine); tests with a
single promoter pass a context manager of their own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msa.metrics import RECALL_KEYS
from msa.runtime import tracking
from msa.runtime.tracking import CHAMPION, DIGEST_TAG, EXPERIMENT, REGISTERED_MODEL

log = logging.getLogger("msa.runtime.registry")

SOURCE_DIGEST_TAG = "source_digest"  # shards.Manifest.source_digest of the corpus a version was trained on
KIND_TAG = "msa.kind"  # tune | tune-trial | promotion | retrain on runs this module creates


def client(mlflow_uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.use_tracking(mlflow_uri))


def _error_code(exc: MlflowException) -> str:
    return getattr(exc, "error_code", "") or ""


# ---------------------------------------------------------------------------------------------
# Runs (the MLflow side of tuning, promotion and retraining)
# ---------------------------------------------------------------------------------------------


def start_run(
    name: str,
    *,
    kind: str,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    mlflow_uri: str | None = None,
) -> str:
    """A run in experiment ``msa`` tagged ``msa.kind``; returns its id."""
    c = client(mlflow_uri)
    all_tags = {KIND_TAG: kind, "mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(tracking.ensure_experiment(), run_name=name, tags=all_tags)
    if params:
        log_params(run.info.run_id, params)
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    values = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(values), 100):
        MlflowClient().log_batch(run_id, params=values[start : start + 100])


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    MlflowClient().log_dict(run_id, data, artifact_file)


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def find_runs(filter_string: str, *, order_by: list[str] | None = None, max_results: int = 1000) -> list:
    """Runs of experiment ``msa`` matching an MLflow search filter."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return MlflowClient().search_runs(
        [experiment.experiment_id], filter_string, order_by=order_by, max_results=max_results
    )


def child_runs(parent_run_id: str) -> list:
    return find_runs(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# ---------------------------------------------------------------------------------------------
# Versions and aliases
# ---------------------------------------------------------------------------------------------


def latest_version(model_name: str = REGISTERED_MODEL) -> str | None:
    versions = MlflowClient().search_model_versions(f"name='{model_name}'")
    return max((str(v.version) for v in versions), key=int, default=None)


def champion_version(model_name: str = REGISTERED_MODEL) -> str | None:
    """The version the ``champion`` alias points at, or None (aliases are read from the model itself)."""
    try:
        aliases = MlflowClient().get_registered_model(model_name).aliases
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


def set_version_tags(version: str, tags: dict[str, Any], model_name: str = REGISTERED_MODEL) -> None:
    c = MlflowClient()
    for key, value in tags.items():
        c.set_model_version_tag(model_name, str(version), key, str(value))


def version_tags(version: str, model_name: str = REGISTERED_MODEL) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(model_name, str(version)).tags)


def evaluate_version(
    version: str,
    data_uri: str,
    *,
    model_name: str = REGISTERED_MODEL,
    split: str = "test",
    storage_options: dict | None = None,
) -> dict[str, float]:
    """Recall of a registered version's own checkpoint on ``split`` of the shard set(s) ``data_uri`` names."""
    from msa.runtime.pipeline import split_figures
    from msa.runtime.resolver import resolve_model

    model = resolve_model(f"models:/{model_name}/{version}", mlflow_uri=mlflow.get_tracking_uri())
    return split_figures(model, data_uri, split, storage_options)[0]


# ---------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------

PROMOTED, KEPT, ALREADY_CHAMPION = "promoted", "kept", "already-champion"

# Takes the commit's mutual exclusion on entry (raising when it cannot) and yields the
# ``time.monotonic()`` deadline before which the alias write must be sent; releases it on exit.
CommitLease = Callable[[], AbstractContextManager[float]]


@dataclass
class PromotionDecision:
    model_name: str
    candidate_version: str
    champion_version: str | None  # the champion the candidate was compared with (None: there was none)
    decision: str  # promoted | kept | already-champion
    reason: str
    candidate_mR: float
    champion_mR: float | None
    margin: float
    dataset_digest: str
    data_uri: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    run_id: str | None = None

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_margin(margin: float) -> float:
    """``margin`` as a float; ValueError when it is negative or NaN. A negative margin would read as
    "promote a slightly worse candidate", which the rule never does (the candidate must be strictly
    better), so it is refused rather than silently treated as 0."""
    margin = float(margin)
    if not margin >= 0:
        raise ValueError(f"promotion margin must be >= 0 mR points, got {margin}")
    return margin


def beats_champion(candidate_mR: float, champion_mR: float | None, margin: float = 0.0) -> bool:
    """The promotion rule: True when there is no champion (``champion_mR`` None), or when the
    candidate's mR is strictly higher than the champion's AND higher by at least ``margin`` points.
    Equal figures never promote, whatever the margin; exactly ``margin`` better promotes."""
    margin = check_margin(margin)
    if champion_mR is None:
        return True
    return candidate_mR > champion_mR and candidate_mR - champion_mR >= margin


def _resolve_data(candidate: str, model_name: str, data_uri: str | None, digest: str | None) -> tuple[str, str]:
    """(data_uri, digest): the digest defaults to the candidate's tag, the URI to its training run's."""
    mv = MlflowClient().get_model_version(model_name, candidate)
    digest = digest or mv.tags.get(DIGEST_TAG)
    if not digest:
        raise ValueError(f"{model_name} v{candidate} has no {DIGEST_TAG!r} tag; pass the dataset digest")
    if data_uri is None:
        if not mv.run_id:
            raise ValueError(f"{model_name} v{candidate} has no source run; pass data_uri")
        data_uri = MlflowClient().get_run(mv.run_id).data.tags.get("data_uri")
        if not data_uri:
            raise ValueError(f"the run of {model_name} v{candidate} records no data_uri; pass data_uri")
    return data_uri, digest


def promote(
    candidate: str | int | None = None,
    *,
    data_uri: str | None = None,
    digest: str | None = None,
    margin: float = 0.0,
    model_name: str = REGISTERED_MODEL,
    mlflow_uri: str | None = None,
    storage_options: dict | None = None,
    lease: CommitLease,
    max_attempts: int = 5,
    on_evaluated: Callable[[str | None], None] | None = None,
) -> PromotionDecision:
    """Promote ``candidate`` (default: the newest version) to ``champion`` if it beats it by ``margin``.

    Both models are evaluated on the test split of the shard set at ``data_uri`` whose dataset digest
    must equal ``digest`` (default: the candidate's ``dataset_digest`` tag; default URI: the
    candidate's training run's ``data_uri``). The candidate is promoted when ``beats_champion``: there
    is no champion, or ``candidate_mR > champion_mR`` and ``candidate_mR - champion_mR >= margin`` (mR
    in percent points; a negative margin is refused before anything is evaluated).
    ``lease`` serialises the commit (re-read the champion, compare, move the alias): see "Race
    safety" above. ``on_evaluated(champion_seen)`` is called after each evaluation, before the commit
    (tests use it to line two promotions up).
    """
    from msa.runtime.datasets import verify_dataset

    margin = check_margin(margin)
    c = client(mlflow_uri)
    candidate = str(candidate) if candidate is not None else latest_version(model_name)
    if candidate is None:
        raise ValueError(f"registered model {model_name!r} has no versions to promote")
    c.get_model_version(model_name, candidate)  # raises when absent
    data_uri, digest = _resolve_data(candidate, model_name, data_uri, digest)
    found = verify_dataset(data_uri, storage_options)
    if found != digest:
        raise ValueError(
            f"shards at {data_uri} have digest {found[:16]}, not {digest[:16]}: promotion compares on the "
            "candidate's test shards only (pass data_uri of the shard set with that digest)"
        )

    cache: dict[str, dict[str, float]] = {}

    def figures(version: str) -> dict[str, float]:
        if version not in cache:
            started = time.perf_counter()
            cache[version] = evaluate_version(version, data_uri, model_name=model_name, storage_options=storage_options)
            log.info("%s v%s on %s: mR %.2f (%.1fs)", model_name, version, digest[:16], cache[version]["mR"],
                     time.perf_counter() - started)
        return cache[version]

    cand = figures(candidate)
    for attempt in range(1, max_attempts + 1):
        seen = champion_version(model_name)
        champ = figures(seen) if seen is not None and seen != candidate else None
        if on_evaluated is not None:
            on_evaluated(seen)
        if seen == candidate:
            decision, reason = ALREADY_CHAMPION, f"v{candidate} is already the champion"
        elif beats_champion(cand["mR"], None if champ is None else champ["mR"], margin):
            decision, reason = PROMOTED, (
                "no champion yet: the first candidate is promoted" if champ is None else
                f"mR {cand['mR']:.2f} beats champion v{seen}'s {champ['mR']:.2f} by "
                f"{cand['mR'] - champ['mR']:.2f} >= margin {margin}"
            )
        else:
            decision, reason = KEPT, (
                f"mR {cand['mR']:.2f} vs champion v{seen}'s {champ['mR']:.2f}: improvement "
                f"{cand['mR'] - champ['mR']:.2f} is not > 0 and >= margin {margin}"
            )
        if decision == PROMOTED:
            with lease() as write_deadline:
                current = champion_version(model_name)
                if current != seen:
                    log.info("champion moved from v%s to v%s during evaluation; re-evaluating", seen, current)
                    continue
                if time.monotonic() >= write_deadline:
                    log.warning("the promotion lease's write deadline passed before the commit; trying again")
                    continue
                c.set_registered_model_alias(model_name, CHAMPION, candidate)
        result = PromotionDecision(
            model_name=model_name,
            candidate_version=candidate,
            champion_version=seen,
            decision=decision,
            reason=reason,
            candidate_mR=cand["mR"],
            champion_mR=None if champ is None else champ["mR"],
            margin=margin,
            dataset_digest=digest,
            data_uri=data_uri,
            candidate_metrics=dict(cand),
            champion_metrics=dict(champ or {}),
            attempts=attempt,
        )
        _record(result)
        log.info("promotion of %s v%s: %s (%s)", model_name, candidate, decision, reason)
        return result
    raise RuntimeError(f"the champion of {model_name} kept moving; gave up after {max_attempts} attempts")


def _record(result: PromotionDecision) -> None:
    """An MLflow run with both figures, then the decision on the candidate version's tags."""
    run_id = start_run(
        f"promote-{result.model_name}-v{result.candidate_version}",
        kind="promotion",
        tags={
            "decision": result.decision,
            "model_name": result.model_name,
            "candidate_version": result.candidate_version,
            "champion_version": result.champion_version or "none",
            DIGEST_TAG: result.dataset_digest,
            "data_uri": result.data_uri,
        },
        params={"margin": result.margin, "reason": result.reason, "attempts": result.attempts},
    )
    metrics = {f"candidate_{k}": v for k, v in result.candidate_metrics.items() if k in RECALL_KEYS}
    metrics |= {f"champion_{k}": v for k, v in result.champion_metrics.items() if k in RECALL_KEYS}
    tracking.log_metrics(run_id, metrics, step=0)
    log_dict(run_id, result.to_dict(), "decision.json")
    tracking.finish_run(run_id)
    result.run_id = run_id
    set_version_tags(
        result.candidate_version,
        {
            "promotion_decision": result.decision,
            "promotion_candidate_mR": f"{result.candidate_mR:.4f}",
            "promotion_champion_mR": "none" if result.champion_mR is None else f"{result.champion_mR:.4f}",
            "promotion_champion_version": result.champion_version or "none",
            "promotion_digest": result.dataset_digest,
            "promotion_margin": result.margin,
            "promotion_run_id": run_id,
            "promotion_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        result.model_name,
    )


# ---------------------------------------------------------------------------------------------
# Retraining bookkeeping
# ---------------------------------------------------------------------------------------------


def last_trained_source(data_uri: str, model_name: str = REGISTERED_MODEL) -> tuple[str | None, str]:
    """(source digest, where it was recorded) of the corpus last retrained into ``data_uri``.

    First the newest FINISHED retrain run for this shard location, else the champion's
    ``source_digest`` tag; (None, reason) when neither exists.
    """
    runs = find_runs(
        f"tags.`{KIND_TAG}` = 'retrain' and tags.data_uri = '{data_uri}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and runs[0].data.tags.get(SOURCE_DIGEST_TAG):
        run = runs[0]
        return run.data.tags[SOURCE_DIGEST_TAG], f"retrain run {run.info.run_id}"
    champion = champion_version(model_name)
    if champion is not None:
        tag = version_tags(champion, model_name).get(SOURCE_DIGEST_TAG)
        if tag:
            return tag, f"champion {model_name} v{champion}"
    return None, "no finished retrain run for this shard location and no champion with a source digest"


def dumps(result: PromotionDecision) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True)
