"""Ray Train across nodes: a two-node cluster splits the shards between its workers and logs the run once.
(A killed worker resuming from the last checkpoint: tests/test_s3_training.py, with the checkpoints on S3.)"""

from __future__ import annotations

import re
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from msa.config import resolve_config
from msa.runtime.pipeline import train
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


def test_two_node_cluster_splits_shards_and_logs_once(shard_set, tmp_path, fresh_ray, capfd, monkeypatch):
    import ray._private.ray_logging as ray_logging
    from ray.cluster_utils import Cluster

    # Ray's driver folds lines that differ only in words with digits ("rank 1 ... node 3f2a ... train-065536")
    # into the first one's "[repeated 1x across cluster]", printed with the next logs: after the run there
    # are none, so rank 1's line would never show. RAY_DEDUP_LOGS=0 is read when ray is imported (earlier in
    # the session), so the flag it sets is switched off here.
    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", False)

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
        # Each node's log monitor forwards its workers' lines on its own schedule: the second node's may land
        # after train() returns, so read until both ranks have spoken (or 30 s pass).
        out, deadline = "", time.monotonic() + 30
        while True:
            out += capfd.readouterr().out
            lines = re.findall(r"\[msa\] rank (\d) of 2 on node (\w+) reads shards (\S+)", out)
            if {rank for rank, _, _ in lines} == {"0", "1"} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(lines) == 2, out[-3000:]  # one line per rank: logged once, not duplicated
        reads = {int(rank): set(names.split(",")) for rank, _, names in lines}
        nodes = {int(rank): node for rank, node, _ in lines}
        assert set(reads) == {0, 1} and not reads[0] & reads[1], out[-3000:]
        assert nodes[0] != nodes[1]  # one worker per node
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("msa").experiment_id])
        assert [r.info.run_id for r in runs] == [trained.run_id]
        assert [m.step for m in client.get_metric_history(trained.run_id, "val_mR")] == [0]
    finally:
        ray.shutdown()
        cluster.shutdown()
