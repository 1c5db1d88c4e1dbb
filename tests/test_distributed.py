"""Ray Train under faults and across nodes: a killed worker resumes from the last checkpoint, and a
two-node cluster splits the shards between its workers and logs the run once."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from msa.config import resolve_config
from msa.runtime.pipeline import train
from msa.runtime.ray_train import TrainJob, run_training
from msa.runtime.spec import RunSpec
from shards.manifest import read_manifest
from shards.synth import generate_corpus
from shards.writer import write_shards

pytestmark = pytest.mark.slow
TINY = ["train.batch_size=8", "train.eval_batch_size=64", "train.loader_workers=0", "image.size=32"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dist")
    annotations = generate_corpus(root / "corpus", splits={"train": 48, "val": 12, "test": 12}, image_size=32, seed=5)
    uri = str(root / "shards")
    write_shards(annotations, root / "corpus" / "images", uri, corpus="synth", shard_size=12, progress=False)
    return uri


@pytest.fixture
def fresh_ray():
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def _train_workers(dashboard: str) -> list:
    """Live RayTrainWorker actors of THIS cluster (others may run on the machine, so name its dashboard)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return list_actors(address=f"http://{dashboard}", filters=filters)


def test_killed_worker_resumes_from_checkpoint_and_finishes(shard_set, tmp_path, fresh_ray, capfd):
    cfg = resolve_config("small", [*TINY, "train.epochs=3"])
    storage = tmp_path / "ray"
    job = TrainJob(
        data_uri=shard_set,
        config=cfg.to_dict(),
        run_name="kill-test",
        dataset_digest=read_manifest(shard_set).digest,
        run=RunSpec(workers=2, max_failures=1, storage_path=str(storage)).model_dump(),
    )
    killed: list[tuple[int, float]] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            # Ray Train writes this snapshot once the epoch-1 checkpoint is registered (all ranks reported).
            if (storage / "kill-test" / "checkpoint_manager_snapshot.json").exists():
                pids = [a.pid for a in _train_workers(dashboard)]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)  # mid-epoch 2: the first report is behind us
                    killed.append((pids[-1], time.time()))
                    return
            time.sleep(0.5)

    dashboard = ray.init(num_cpus=2).dashboard_url
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_training(job)
    killer.join(timeout=5)
    output = capfd.readouterr()
    assert killed, "no worker was killed: the fault was never injected"
    killed_at = killed[0][1]
    assert [int(h["epoch"]) for h in outcome.history] == [0, 1, 2]
    # Resumed, not restarted: epoch 0 is the one finished before the kill, the rest came after it.
    assert outcome.history[0]["finished_at"] < killed_at < outcome.history[1]["finished_at"]
    assert "resumed from epoch 0 checkpoint" in output.out + output.err
    assert Path(outcome.best_checkpoint, "checkpoint.pt").exists()


def test_two_node_cluster_splits_shards_and_logs_once(shard_set, tmp_path, fresh_ray, capfd):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = resolve_config("small", [*TINY, "train.epochs=1"])
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        trained = train(
            cfg,
            RunSpec(workers=2, storage_path=str(tmp_path / "ray"), mlflow_uri=uri),
            data_uri=shard_set,
            dataset_digest=read_manifest(shard_set).digest,
            run_name="two-nodes",
        )
        output = capfd.readouterr()
        lines = re.findall(r"\[msa\] rank (\d) of 2 on node (\w+) reads shards (\S+)", output.out)
        reads = {int(rank): set(names.split(",")) for rank, _, names in lines}
        nodes = {int(rank): node for rank, node, _ in lines}
        assert set(reads) == {0, 1} and not reads[0] & reads[1], output.out[-3000:]
        assert nodes[0] != nodes[1]  # one worker per node
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("msa").experiment_id])
        assert [r.info.run_id for r in runs] == [trained.run_id]
        assert [m.step for m in client.get_metric_history(trained.run_id, "val_mR")] == [0]
    finally:
        ray.shutdown()
        cluster.shutdown()
