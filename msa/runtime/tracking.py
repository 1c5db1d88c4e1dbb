"""MLflow at the edge: one run per training, its metrics, artifacts, model and registry version.

Names that tie the product together live here: experiment ``msa``, registered model
``msa-retrieval``, aliases ``champion``/``challenger``, and the dataset digest tag.

Per-epoch metrics (``EpochMetricsLog``) outlive a tracking-server outage. Retrying is left to MLflow's
client, the one mechanism: it retries refused connections and 429/5xx answers with exponential backoff,
so one call waits for the server for a bounded time, set by MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7)
and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (default 2): about 4 minutes by default, 1 minute with 5 retries.
What is still unsent then is held (with its step and the epoch's own timestamp) and sent with the next
epoch; training goes on. Sending again is harmless: MLflow stores a metric with the same key, step,
timestamp and value once. If the server is still unreachable when training ends, ``flush`` raises
TrackingUnavailableError naming the tracking URI and the epochs not logged; they are in the checkpoint's
history, and re-running the same training resumes from its last checkpoint and sends them. An answer that
rejects the metrics (a RestException, e.g. a deleted run) is raised at once, never held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from msa.config import MSAConfig
from msa.metrics import RECALL_KEYS
from msa.paths import LOCAL_STATE, PROJECT_ROOT
from msa.runtime.spec import RunSpec

EXPERIMENT = "msa"
REGISTERED_MODEL = "msa-retrieval"
CHAMPION, CHALLENGER = "champion", "challenger"
DIGEST_TAG = "dataset_digest"
SYSTEM_METRICS_INTERVAL = 5.0  # seconds


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a project-local SQLite store (never ./mlruns in the cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{LOCAL_STATE / 'mlflow.db'}"


def use_tracking(uri: str | None) -> str:
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str = EXPERIMENT) -> str:
    """Experiment id; a file store's artifacts go under .msa/, not the caller's cwd."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        location = (LOCAL_STATE / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def run_name(kind: str, dataset_digest: str, preset: str | None = None) -> str:
    """``<kind>[-<preset>]-<digest8>-<local time>``: a run name that sorts by time and says what it trained on."""
    return "-".join([kind, *([preset] if preset else []), dataset_digest[:8], time.strftime("%Y%m%d-%H%M%S")])


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_training_run(
    cfg: MSAConfig,
    spec: RunSpec | None = None,
    *,
    dataset_digest: str,
    data_uri: str,
    run_name: str,
    extra_params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create the run, log the resolved config whole (params + config.json), the run spec (``run.*``
    params: resources and where things are stored), tags and the dataset input."""
    experiment_id = ensure_experiment()
    client = MlflowClient()
    tags = {
        DIGEST_TAG: dataset_digest,
        "git_commit": git_commit(),
        "preset": cfg.preset,
        "data_uri": data_uri,
        "mlflow.runName": run_name,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    run_params = {f"run.{k}": v for k, v in spec.model_dump().items()} if spec is not None else {}
    params = {**cfg.flat_params(), **{k: str(v) for k, v in {**run_params, **(extra_params or {})}.items()}}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    log_dataset_input(run_id, dataset_digest, data_uri)
    return run_id


def log_dataset_input(run_id: str, digest: str, data_uri: str, context: str = "training") -> None:
    """The shard set as a run input known by URI and manifest digest (MLflow keeps 36 of its characters).

    Each context gets its own dataset name: MLflow keeps one input per (name, digest) and run, so the
    test split logged under the training set's name would be dropped.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    name = f"shards-{digest[:16]}" + ("" if context == "training" else f"-{context}")
    dataset = MetaDataset(source=_dataset_source(data_uri), name=name, digest=digest[:36])
    MlflowClient().log_inputs(
        run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
    )


def _dataset_source(data_uri: str):
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    url = data_uri if "://" in data_uri else Path(data_uri).resolve().as_uri()
    return HTTPDatasetSource(url=url)


@contextlib.contextmanager
def system_metrics(run_id: str, node: str | None = None) -> Iterator[None]:
    """Sample CPU, memory, disk, network and (where pynvml finds one) GPU use into the run's ``system/...``
    metrics (``system/<node>/...`` when named) while the block runs. Every SYSTEM_METRICS_INTERVAL seconds,
    short enough for a few-minute run; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it. A resumed
    run's samples continue the run's steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, node_id=node,
                                   resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_metrics(run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
    """``metrics`` at ``step``, stamped ``timestamp_ms`` (now by default)."""
    now = int(mlflow.utils.time.get_current_time_millis()) if timestamp_ms is None else timestamp_ms
    MlflowClient().log_batch(run_id,
                             metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])


LOG = logging.getLogger(__name__)


class TrackingUnavailableError(RuntimeError):
    """The tracking server stayed unreachable: some epochs' metrics were not logged."""


class EpochMetricsLog:
    """One run's per-epoch metrics (step: ``epoch``), sent as each epoch ends; what the server does not take
    is held and sent with the next epoch or by ``flush`` (see the module docstring)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.held: dict[int, dict[str, float]] = {}  # epoch -> that epoch's metrics, not yet on the server
        self.last_error = ""

    def hold(self, history: list[dict[str, float]]) -> None:
        """Queue epochs' metrics (``fit``'s history entries) without sending them."""
        for metrics in history:
            self.held[int(metrics["epoch"])] = metrics

    def add(self, metrics: dict[str, float]) -> None:
        """Queue this epoch's metrics and send everything held."""
        self.hold([metrics])
        self.send()

    def send(self) -> bool:
        """Send what is held (MLflow's client retrying); True once nothing is held."""
        for epoch, metrics in sorted(self.held.items()):
            values = {k: v for k, v in metrics.items() if k != "epoch"}
            # The epoch's own time (fit records finished_at): a resend stores nothing twice.
            stamp = int(metrics["finished_at"] * 1000) if "finished_at" in metrics else None
            try:
                log_metrics(self.run_id, values, step=epoch, timestamp_ms=stamp)
            except RestException:
                raise
            except MlflowException as exc:
                self.last_error = str(exc)[:300]
                LOG.warning("MLflow at %s unreachable: metrics of epoch(s) %s held, to be sent with the next epoch "
                            "(%s)", mlflow.get_tracking_uri(), self._held_epochs(), self.last_error)
                return False
            del self.held[epoch]
        return True

    def flush(self) -> None:
        """Send what is held; TrackingUnavailableError naming the tracking URI if the server still does not answer."""
        if not self.send():
            raise TrackingUnavailableError(
                f"MLflow tracking server {mlflow.get_tracking_uri()} unreachable: metrics of epoch(s) "
                f"{self._held_epochs()} were not logged to run {self.run_id} (last error: {self.last_error}). "
                "They are kept in the checkpoint's history: re-run the same training once the server is back; "
                "it resumes from its last checkpoint and logs them.")

    def _held_epochs(self) -> str:
        return ", ".join(str(epoch) for epoch in sorted(self.held))


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def register_model(model_uri: str, dataset_digest: str, metrics: dict[str, float]) -> str:
    """A new version of ``msa-retrieval`` that cites its digest and test recalls; returns the version."""
    version = mlflow.register_model(
        model_uri,
        REGISTERED_MODEL,
        tags={DIGEST_TAG: dataset_digest, **{f"test_{k}": f"{v:.4f}" for k, v in metrics.items()}},
    )
    return str(version.version)


def model_card(
    *,
    version: str,
    cfg: MSAConfig,
    corpus: str,
    data_uri: str,
    dataset_digest: str,
    test: dict[str, float],
    run_id: str,
    tracking_uri: str,
) -> str:
    """The registered version's description (markdown): what it was trained on, how well it retrieves on
    the test split, and how to load it. ``test`` holds the recalls, ``chance_mR`` and ``selected_epoch``."""
    towers = (f"open_clip `{cfg.clip.arch}`" if cfg.clip.arch else
              f"image `{cfg.image.backbone}`, text `{cfg.text.model}`")
    ratio = test["mR"] / test["chance_mR"] if test["chance_mR"] else float("inf")
    model_uri = f"models:/{REGISTERED_MODEL}/{version}"
    return "\n".join([
        f"# {REGISTERED_MODEL} v{version}",
        "",
        "MSA image-text retrieval: `predict` embeds captions (`text` column) and images (`image` column, "
        "encoded bytes) into one L2-normalised space.",
        "",
        "| | |",
        "| --- | --- |",
        f"| corpus | `{corpus}` at `{data_uri}` |",
        f"| dataset digest | `{dataset_digest}` |",
        f"| preset | `{cfg.preset}` |",
        f"| towers | {towers}; {cfg.image.size} px images, {cfg.text.max_tokens} tokens |",
        f"| training | {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.optim.lr:g}, "
        f"seed {cfg.train.seed}; loss weights align {cfg.loss.w_align:g}, consistency {cfg.loss.w_cons:g}, "
        f"InfoNCE {cfg.loss.w_infonce:g} |",
        f"| selected epoch | {int(test['selected_epoch']) + 1} (best validation mR) |",
        f"| MLflow run | `{run_id}` (full config: `config.json`) |",
        "",
        "## Test recall (%)",
        "",
        "| " + " | ".join(RECALL_KEYS) + " |",
        "|" + " ---: |" * len(RECALL_KEYS),
        "| " + " | ".join(f"{test[k]:.2f}" for k in RECALL_KEYS) + " |",
        "",
        f"Chance mR on this split: {test['chance_mR']:.2f} (mR is {ratio:.1f}x chance).",
        "",
        "## How to load",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'mlflow.set_tracking_uri("{tracking_uri}")',
        f'model = mlflow.pyfunc.load_model("{model_uri}")',
        'embeddings = model.predict(pd.DataFrame({"text": ["a river through farmland"]}))',
        "```",
        "",
        "```bash",
        f"msa index --model {model_uri} --data {data_uri} --out .msa/index",
        'msa search .msa/index --text "a river through farmland"',
        "```",
    ]) + "\n"


def describe_version(version: str, description: str) -> None:
    MlflowClient().update_model_version(REGISTERED_MODEL, version, description=description)
