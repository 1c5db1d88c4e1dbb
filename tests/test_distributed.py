"""Ray Train across nodes: a two-node cluster splits the shards between its workers and logs the run once.
(A killed worker resuming from the last checkpoint: tests/test_s3_training.py, with the checkpoints on S3.)"""

from __future__ import annotations

import re

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
