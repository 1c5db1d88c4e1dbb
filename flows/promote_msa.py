"""Prefect flow ``promote-msa``: move the ``champion`` alias to a candidate version only if it wins.

The candidate (default: the newest version of ``msa-retrieval``) and the current champion are both
evaluated on the same test shards (the candidate's dataset digest, re-verified); the alias moves
only when the candidate's mR beats the champion's by at least ``margin`` points, or when there is
no champion yet. The decision, both figures and the digest are tagged on the candidate version and
logged as an MLflow run (``msa.kind=promotion``) and published as the flow run's
``promote-msa-decision`` artifact. Concurrent promotions (also retrain-msa's) commit one at a time
under ``flows.lease.promotion_lease``: see msa.runtime.registry, "Race safety"; the deployment also
runs one flow run at a time (prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows import artifacts
from flows.lease import promotion_lease
from msa.runtime import registry
from msa.runtime.spec import RunSpec
from msa.runtime.tracking import REGISTERED_MODEL


@task(name="evaluate-and-promote")
def promote(candidate_version: str | None, data_uri: str | None, digest: str | None, margin: float,
            model_name: str, spec: RunSpec) -> dict[str, Any]:
    return registry.promote(candidate_version, data_uri=data_uri, digest=digest, margin=margin,
                            model_name=model_name, mlflow_uri=spec.mlflow_uri,
                            storage_options=spec.storage_options, lease=promotion_lease(model_name)).to_dict()


@flow(name="promote-msa", log_prints=True)
def promote_msa(
    candidate_version: str | None = None,
    margin: float = 0.0,
    data_uri: str | None = None,
    digest: str | None = None,
    model_name: str = REGISTERED_MODEL,
    mlflow_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``candidate_version`` against the champion on the same test shards; promote if it wins.

    ``data_uri`` defaults to the shard set the candidate was trained on (its run's ``data_uri``),
    ``digest`` to the candidate's ``dataset_digest`` tag; the shards found must have that digest.
    ``margin`` is in mR points (percent). Returns the decision with both figures.
    """
    spec = RunSpec(mlflow_uri=mlflow_uri, endpoint_url=endpoint_url)
    result = promote(None if candidate_version in (None, "") else str(candidate_version), data_uri, digest,
                     float(margin), model_name, spec)
    champion = "none" if result["champion_mR"] is None else f"{result['champion_mR']:.2f}"
    get_run_logger().info(
        "%s v%s: %s (candidate mR %.2f, champion v%s mR %s, digest %s)",
        result["model_name"], result["candidate_version"], result["decision"], result["candidate_mR"],
        result["champion_version"], champion, result["dataset_digest"][:16],
    )
    artifacts.publish_promotion(result)
    return result
