"""Prefect artifacts the flows publish: what a person looks for on a flow run's page.

The one place for the artifacts' keys and formatting. Builders (``*_rows``, ``*_markdown``, ``*_url``) are
pure functions of plain data, unit-tested without a server; each ``publish_*`` creates one flow's artifacts
and must be called inside that flow (or one of its tasks) so that Prefect attaches them to the run.

Keys (lowercase and dashes, as Prefect requires; each flow run adds a new version under its key):

- ``train-msa-test-recall`` (table), ``train-msa-summary`` (markdown), ``train-msa-mlflow-run`` and
  ``train-msa-model-version`` (links to the MLflow UI when the tracking URI is an http(s) server; markdown
  naming the run id / ``models:/`` URI otherwise, since a SQLite or file store has no web page);
- ``promote-msa-decision`` (markdown);
- ``ablate-msa-table`` (markdown: the ablation table, built by msa.runtime.ablation_table.ablation_markdown);
- ``shard-corpus-counts`` (table), ``shard-corpus-quarantine`` (markdown; "none" when nothing was).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

TRAIN_RECALL_KEY = "train-msa-test-recall"
TRAIN_SUMMARY_KEY = "train-msa-summary"
TRAIN_RUN_KEY = "train-msa-mlflow-run"
TRAIN_MODEL_KEY = "train-msa-model-version"
PROMOTE_DECISION_KEY = "promote-msa-decision"
ABLATE_TABLE_KEY = "ablate-msa-table"
SHARD_COUNTS_KEY = "shard-corpus-counts"
SHARD_QUARANTINE_KEY = "shard-corpus-quarantine"


# ---------------------------------------------------------------------------------- builders


def recall_rows(test: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows of the test recall table: each recall (i2t_R1 .. mR) in percent, then the chance mR."""
    from msa.metrics import RECALL_KEYS

    rows = [{"metric": key, "recall_pct": round(float(test[key]), 2)} for key in RECALL_KEYS]
    rows.append({"metric": "chance_mR", "recall_pct": round(float(test["chance_mR"]), 2)})
    return rows


def mlflow_web_base(tracking_uri: str) -> str | None:
    """The MLflow UI's base URL when ``tracking_uri`` is a tracking server (http/https), else None."""
    if urlsplit(tracking_uri).scheme.lower() not in ("http", "https"):
        return None
    return tracking_uri.rstrip("/")


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (the URL MLflow itself prints), or None without a web UI."""
    base = mlflow_web_base(tracking_uri)
    return None if base is None else f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, model_name: str, version: str) -> str | None:
    """The registered model version's page in the MLflow UI, or None without a web UI."""
    base = mlflow_web_base(tracking_uri)
    return None if base is None else f"{base}/#/models/{quote(model_name, safe='')}/versions/{version}"


def model_version_uri(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def _cell(value: Any) -> str:
    """A value as a markdown table cell (pipes escaped, one line)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def train_summary_markdown(
    *,
    preset: str,
    dataset_digest: str,
    data_uri: str,
    selected_epoch: int,
    checkpoint: str,
    run_id: str,
    run_name: str,
    model_name: str,
    model_version: str,
    tracking_uri: str,
    test: Mapping[str, float],
) -> str:
    """The train-msa summary: preset, data, selected epoch (1-based, as ``msa train`` prints it), checkpoint."""
    return "\n".join([
        f"# train-msa: {run_name}",
        "",
        _markdown_table(["", ""], [
            ["preset", f"`{preset}`"],
            ["dataset digest", f"`{dataset_digest}`"],
            ["shards", f"`{data_uri}`"],
            ["selected epoch", f"{selected_epoch + 1} (best validation mR)"],
            ["checkpoint", f"`{checkpoint}`"],
            ["test mR", f"{float(test['mR']):.2f} (chance {float(test['chance_mR']):.2f})"],
            ["MLflow run", f"`{run_id}`"],
            ["model", f"`{model_version_uri(model_name, model_version)}`"],
            ["tracking URI", f"`{tracking_uri}`"],
        ]),
    ])


def mlflow_reference_markdown(title: str, tracking_uri: str, **refs: str) -> str:
    """Where a run or model version lives when the tracking store has no web page (SQLite, files)."""
    rows = [[name.replace("_", " "), f"`{value}`"] for name, value in refs.items()]
    rows.append(["tracking URI", f"`{tracking_uri}`"])
    return f"# {title}\n\n" + _markdown_table(["", ""], rows)


def promotion_markdown(result: Mapping[str, Any]) -> str:
    """promote-msa's decision: both versions and their mR on the same test shards, margin, reason, digest."""
    champion_version = result.get("champion_version")
    champion_mr = result.get("champion_mR")
    rows = [
        ["candidate", f"v{result['candidate_version']}", f"{float(result['candidate_mR']):.2f}"],
        ["champion", "none" if champion_version is None else f"v{champion_version}",
         "-" if champion_mr is None else f"{float(champion_mr):.2f}"],
    ]
    return "\n".join([
        f"# promote-msa: {result['decision']}",
        "",
        f"**{result['model_name']} v{result['candidate_version']}: {result['decision']}** - {_cell(result['reason'])}",
        "",
        _markdown_table(["", "version", "test mR"], rows),
        "",
        _markdown_table(["", ""], [
            ["decision", result["decision"]],
            ["margin (mR points)", f"{float(result['margin']):g}"],
            ["dataset digest", f"`{result['dataset_digest']}`"],
            ["shards", f"`{result.get('data_uri') or ''}`"],
            ["promotion run", f"`{result.get('run_id') or 'none'}`"],
        ]),
    ])


def split_count_rows(counts: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """One row per split (sorted): images, captions and shards."""
    return [{"split": split, "images": int(c["images"]), "captions": int(c["captions"]), "shards": int(c["shards"])}
            for split, c in sorted(counts.items())]


def quarantine_markdown(quarantine: list[Mapping[str, Any]]) -> str:
    """Each quarantined source with its reason; "none" when nothing was quarantined."""
    if not quarantine:
        return "# Quarantine\n\nnone"
    rows = [[q["source"], q["reason"]] for q in quarantine]
    return f"# Quarantine\n\n{len(rows)} quarantined\n\n" + _markdown_table(["source", "reason"], rows)


# ---------------------------------------------------------------------------------- publishers


def publish_training(
    trained: Mapping[str, Any],
    test: Mapping[str, float],
    model_version: str,
    *,
    preset: str,
    data_uri: str,
    tracking_uri: str,
    model_name: str,
) -> None:
    """train-msa's artifacts: the test recall table, the summary, and where the MLflow run and model are."""
    run_id, digest = trained["run_id"], trained["dataset_digest"]
    create_table_artifact(recall_rows(test), key=TRAIN_RECALL_KEY,
                          description=f"Test recall (%) of the selected checkpoint; dataset `{digest[:16]}`")
    create_markdown_artifact(
        train_summary_markdown(
            preset=preset, dataset_digest=digest, data_uri=data_uri, selected_epoch=int(test["selected_epoch"]),
            checkpoint=trained["best_checkpoint"], run_id=run_id, run_name=trained["run_name"],
            model_name=model_name, model_version=model_version, tracking_uri=tracking_uri, test=test,
        ),
        key=TRAIN_SUMMARY_KEY, description="What was trained, on which data, and where the checkpoint is",
    )
    model_uri = model_version_uri(model_name, model_version)
    if mlflow_web_base(tracking_uri) is None:
        create_markdown_artifact(mlflow_reference_markdown("MLflow run", tracking_uri, run_id=run_id),
                                 key=TRAIN_RUN_KEY, description="The training run (no web UI for this store)")
        create_markdown_artifact(mlflow_reference_markdown("Registered model", tracking_uri, model_uri=model_uri),
                                 key=TRAIN_MODEL_KEY, description="The registered version (no web UI for this store)")
        return
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    create_link_artifact(mlflow_run_url(tracking_uri, experiment_id, run_id),
                         link_text=f"MLflow run {trained['run_name']}", key=TRAIN_RUN_KEY,
                         description=f"The training run `{run_id}`")
    create_link_artifact(model_version_url(tracking_uri, model_name, model_version),
                         link_text=f"{model_name} v{model_version}", key=TRAIN_MODEL_KEY,
                         description=f"The registered version `{model_uri}`")


def publish_promotion(result: Mapping[str, Any]) -> None:
    create_markdown_artifact(promotion_markdown(result), key=PROMOTE_DECISION_KEY,
                             description=f"{result['model_name']} v{result['candidate_version']}: {result['decision']}")


def publish_ablation(result: Mapping[str, Any]) -> None:
    """ablate-msa's table (per variant: mean +- sd over seeds, mR's paired difference to the first variant)."""
    create_markdown_artifact(result["markdown"], key=ABLATE_TABLE_KEY,
                             description=f"Ablation {result['name']}: MLflow parent run `{result['parent_run_id']}`")


def publish_shard_report(summary: Mapping[str, Any]) -> None:
    """shard-corpus's artifacts: split counts and the quarantine report."""
    create_table_artifact(split_count_rows(summary["counts"]), key=SHARD_COUNTS_KEY,
                          description=f"Shard set `{summary['uri']}`, digest `{summary['short_digest']}`")
    create_markdown_artifact(quarantine_markdown(summary["quarantine"]), key=SHARD_QUARANTINE_KEY,
                             description=f"Samples left out of `{summary['uri']}` and why")
