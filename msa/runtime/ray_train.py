"""Ray Train V2 around the engine: each worker calls ``msa.engine.fit`` with a sink that reports to Ray.

Rank 0 logs each epoch to MLflow and reports it with a checkpoint; every rank calls
``ray.train.report`` once per epoch (it is a barrier). Resume is Ray's: the same run name and
storage path hand the newest checkpoint back to ``fit``; an unreadable one is skipped for the
newest readable one the run reported (``resume_from``).

S3 (``storage_path=s3://...``, shards on ``s3://``): checkpoints go through a pyarrow S3 filesystem on the
run's endpoint (``RunSpec.endpoint_url``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) whose requests
are retried for about 25 s (``S3_RETRY_ATTEMPTS``; Ray's own 3 upload attempts come on top), and the
workers read shards through s3fs with botocore's standard retry mode (``S3_READ_RETRIES``), so an endpoint
that is down for several seconds mid-run delays an epoch instead of failing a worker.

Credentials (``SECRET_ENV``) are never put into a filesystem object, a runtime_env, a log or a parameter: the
processes of a local cluster inherit them from the driver's environment, and the nodes of a remote cluster
need their own (instance role, Kubernetes secret: infra/README.md). Ray's runtime_env agent logs the
``env_vars`` it sets up in plain text, so only ``forwarded_env`` (endpoints, settings) goes there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msa.checkpoint import HISTORY_FILE, load_checkpoint, load_newest
from msa.checkpoint import LOG as CHECKPOINT_LOG
from msa.paths import OFFLINE_ENV
from msa.runtime.spec import RunSpec

# One record per finished epoch, on the driver (``extra``: ``epoch_metrics``, ``epochs``); `msa demo` draws its
# progress bar from it.
EPOCH_LOG = logging.getLogger("msa.runtime.epochs")
# Never forwarded to workers through a runtime_env (see the module docstring).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Attempts per request of the checkpoint storage on S3: AWS's default strategy waits 2^k x 25 ms between
# them, about 25 s in all for 10.
S3_RETRY_ATTEMPTS = 10
# botocore retry settings of the workers' shard reads (s3fs ``config_kwargs``): exponential backoff up to 20 s.
S3_READ_RETRIES = {"mode": "standard", "max_attempts": 10}


@dataclass
class TrainJob:
    """Everything a training run needs, as plain data (it crosses process and node boundaries)."""

    data_uri: str
    config: dict[str, Any]
    run_name: str
    dataset_digest: str
    run: dict[str, Any] = field(default_factory=dict)  # RunSpec fields
    mlflow_run_id: str | None = None

    @property
    def spec(self) -> RunSpec:
        return RunSpec(**self.run)


@dataclass
class TrainOutcome:
    best_checkpoint: str  # URI or local path of the checkpoint with the best validation mR
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


class RayReportSink:
    """``fit``'s epoch sink inside a Ray Train worker: Ray's checkpoints to resume from, MLflow and Ray reports.

    Rank 0 logs each epoch through ``tracking.EpochMetricsLog`` (held through a tracking-server outage); a
    resumed run holds the checkpoint's history again, so epochs an outage kept from MLflow are sent, and
    ``finish`` flushes what is still held.
    """

    def __init__(self, job: TrainJob, rank: int):
        self.job, self.rank = job, rank
        self.metrics_log = None
        if rank == 0 and job.mlflow_run_id:
            from msa.runtime.tracking import EpochMetricsLog

            self.metrics_log = EpochMetricsLog(job.mlflow_run_id)

    def resume_state(self, device) -> dict[str, Any] | None:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        state = resume_from(
            latest,
            lambda: ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED),
            device,
            log=CHECKPOINT_LOG.warning if self.rank == 0 else lambda line: None,  # every rank resumes; one says so
        )
        if state is not None and self.metrics_log is not None:
            self.metrics_log.hold(state["history"])
        return state

    def end_epoch(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        import ray.train

        if write_checkpoint is None:
            ray.train.report(metrics)
            return
        if self.metrics_log is not None:
            self.metrics_log.add(metrics)
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def finish(self) -> None:
        """After ``fit``: TrackingUnavailableError (naming the tracking URI) if some epochs never reached MLflow."""
        if self.metrics_log is not None:
            self.metrics_log.flush()


def resume_from(latest, reported: Callable[[], list], device, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The state of the newest readable checkpoint: ``latest`` (Ray's ``get_checkpoint()``), else the run's other
    reported checkpoints (``reported()``: ``ReportedCheckpoint``s, listed only when ``latest`` is unreadable),
    newest epoch first. Ray's retention (``train.keep_checkpoints``) is the only thing that deletes any."""

    def load(checkpoint) -> dict[str, Any]:
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory, map_location=device)

    def candidates():
        yield Path(latest.path).name, lambda: load(latest)
        older = [r for r in reported() if r.checkpoint.path != latest.path]
        for r in sorted(older, key=lambda r: r.metrics.get("epoch", -1), reverse=True):
            yield Path(r.checkpoint.path).name, lambda c=r.checkpoint: load(c)

    return load_newest(candidates(), log)


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from msa.config import MSAConfig
    from msa.data import plan_splits
    from msa.engine import Distributed, fit
    from msa.runtime import tracking
    from msa.runtime.datasets import DataMix
    from msa.runtime.weights import materialize_weights
    from shards.manifest import read_manifest
    from shards.storage import register_webdataset_s3

    job = TrainJob(**job_dict)
    cfg = MSAConfig.from_dict(job.config)
    ctx = ray.train.get_context()
    options = _with_read_retries(job.spec.storage_options)
    register_webdataset_s3(options)
    plan = [plan_splits(read_manifest(c.uri, options), cfg.train.val_fraction, name=c.name, weight=c.weight)
            for c in DataMix.parse(job.data_uri).corpora]
    dist = Distributed(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        prepare_model=ray.train.torch.prepare_model,
        where=f" on node {ray.get_runtime_context().get_node_id()[:12]}",
    )
    # One system-metrics sampler per node (they measure the whole machine), named by node when there are several.
    sampler = contextlib.nullcontext()
    if job.mlflow_run_id and (dist.rank == 0 or ctx.get_local_rank() == 0):
        tracking.use_tracking(job.spec.mlflow_uri)
        if ctx.get_local_rank() == 0:
            several = ctx.get_local_world_size() < ctx.get_world_size()
            sampler = tracking.system_metrics(job.mlflow_run_id, f"node{ctx.get_node_rank()}" if several else None)
    sink = RayReportSink(job, dist.rank)
    local_cfg = materialize_weights(cfg, options)  # s3:// weights -> this node's cache; checkpoints keep the URIs
    with sampler:
        fit(local_cfg, plan, sink=sink, dataset_digest=job.dataset_digest, device=ray.train.torch.get_device(),
            dist=dist, checkpoint_config=cfg)
    sink.finish()


def ensure_ray(ray_address: str | None = None) -> None:
    """Attach to ``ray_address``/RAY_ADDRESS, else start a local cluster whose workers know its address.

    Ray Train's PlacementGroupCleaner (which frees the workers' placement group when Tune stops a
    trial under its TorchTrainer, as ASHA does) finds its cluster through the State API, and with
    no RAY_ADDRESS that lookup fails when several Ray instances run on one machine (CI, shared
    hosts): the stopped trial's CPUs then stay reserved and the next trial never starts. So a
    local cluster gets a known GCS port, and every worker gets RAY_ADDRESS pointing at it.
    """
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    # Ray Train's print patch sends a worker's print to stdout and to its logger (stderr), and the driver
    # shows both copies: without it each engine line arrives once.
    env = {**OFFLINE_ENV, **forwarded_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        if any(name in os.environ for name in SECRET_ENV):
            logging.getLogger(__name__).warning(
                "the AWS credentials of this environment are not sent to the Ray cluster at %s (Ray would log "
                "them): its nodes read S3 with their own (instance role or Kubernetes secret, infra/README.md)",
                address)
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def run_training(job: TrainJob, callbacks: list | None = None) -> TrainOutcome:
    """Fit on the Ray cluster of ``job.spec`` and pick the epoch with the best validation mR.

    ``callbacks`` go into the Train ``RunConfig`` (msa.runtime.tune passes Tune's ``TuneReportCallback``);
    inside a Tune trial Ray is already initialised, so ``ensure_ray`` connects nothing there.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from msa.config import MSAConfig

    spec = job.spec
    ensure_ray(spec.ray_address)
    cfg = MSAConfig.from_dict(job.config)
    storage_path, storage_filesystem = ray_storage(spec)
    with _epochs_to_driver(cfg.train.epochs) as relay:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=asdict(job),
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=spec.workers,
                use_gpu=spec.use_gpu,
                resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=job.run_name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                callbacks=[*(callbacks or []), *relay],
                failure_config=FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.train.keep_checkpoints,
                    checkpoint_score_attribute="val_mR",
                    checkpoint_score_order="max",
                ),
            ),
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    candidates = result.best_checkpoints or []
    if not candidates:
        raise RuntimeError(f"training run {job.run_name} reported no checkpoint")
    checkpoint, metrics = max(candidates, key=lambda pair: pair[1].get("val_mR", float("-inf")))
    latest = result.checkpoint
    with latest.filesystem.open_input_stream(f"{latest.path}/{HISTORY_FILE}") as stream:
        history = json.loads(stream.read())
    return TrainOutcome(_checkpoint_uri(checkpoint), dict(metrics), history)


@contextlib.contextmanager
def _epochs_to_driver(epochs: int) -> Iterator[list]:
    """Train callbacks that log each finished epoch (rank 0's metrics) on EPOCH_LOG in this process while
    the block trains; none when nobody listens (EPOCH_LOG has no handler of its own).

    Train's callbacks run in its controller, a process of its own, so they relay through a Ray queue.
    """
    if not EPOCH_LOG.handlers:
        yield []
        return
    import threading

    from ray.train import UserCallback
    from ray.util.queue import Empty, Queue

    class RelayEpochs(UserCallback):
        def __init__(self, queue: Queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            self.queue.put(next((m for m in metrics if "val_mR" in m), metrics[0]))

    queue, done = Queue(actor_options={"num_cpus": 0}), threading.Event()

    def relay() -> None:
        while not done.is_set() or not queue.empty():
            try:
                m = queue.get(timeout=0.5)
            except Empty:
                continue
            EPOCH_LOG.info("epoch %d/%d loss %.3f val mR %.2f", int(m["epoch"]) + 1, epochs, m["train_loss"],
                           m.get("val_mR", float("nan")), extra={"epoch_metrics": m, "epochs": epochs})

    thread = threading.Thread(target=relay, name="msa-epoch-relay", daemon=True)
    thread.start()
    try:
        yield [RelayEpochs(queue)]
    finally:
        done.set()
        thread.join()
        queue.shutdown()


def forwarded_env() -> dict[str, str]:
    """Endpoints and settings the workers need, from the driver's environment, for the runtime_env of every
    worker. Never credentials (``SECRET_ENV``): Ray logs a runtime_env's variables."""
    names = (
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PYTHONPATH",
    )
    return {name: os.environ[name] for name in names if name in os.environ}


def _checkpoint_uri(checkpoint) -> str:
    if checkpoint.filesystem.type_name == "s3":
        return f"s3://{checkpoint.path}"
    return str(Path(checkpoint.path))


def _with_read_retries(storage_options: dict | None) -> dict:
    """A copy of ``storage_options`` whose s3fs client retries (``S3_READ_RETRIES``) unless they say otherwise;
    local paths ignore it."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_READ_RETRIES))
    return {**options, "config_kwargs": config}


def ray_storage(spec: RunSpec) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's ``RunConfig``: a local path as it is; ``s3://bucket/prefix``
    as ``bucket/prefix`` on ``s3_storage_filesystem`` (the run's endpoint; without one, the bucket's region, as
    pyarrow would resolve it)."""
    storage = spec.storage
    if not storage.startswith("s3://"):
        return storage, None
    from shards.storage import resolve_storage_options

    path = storage[len("s3://"):].rstrip("/")
    endpoint = resolve_storage_options(storage, spec.storage_options).get("endpoint_url")
    region = None
    if not endpoint:
        import pyarrow.fs

        with contextlib.suppress(OSError):
            region = pyarrow.fs.resolve_s3_region(path.split("/")[0])
    return path, s3_storage_filesystem(endpoint, region)


def s3_storage_filesystem(endpoint_url: str | None = None, region: str | None = None,
                          attempts: int = S3_RETRY_ATTEMPTS):
    """A ``pyarrow.fs.S3FileSystem`` on ``endpoint_url`` (None: AWS) that retries each request ``attempts`` times
    and keeps doing so in every process it is pickled to (pyarrow's own pickling drops the retry strategy,
    apache/arrow#47348). Credentials come from the environment of the process that uses it."""
    return _retrying_s3_class()(endpoint_url, region, attempts)


@functools.cache
def _retrying_s3_class():
    """Built on first use, so that importing this module does not import pyarrow.fs."""
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        def __init__(self, endpoint_url: str | None, region: str | None, attempts: int):
            options = {"endpoint_override": endpoint_url, "region": region}
            super().__init__(retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=attempts),
                             **{k: v for k, v in options.items() if v})
            self._msa_args = (endpoint_url, region, attempts)

        def __reduce__(self):
            return s3_storage_filesystem, self._msa_args

    return RetryingS3FileSystem
