"""tune-msa: Ray Tune over the training driver (one TorchTrainer per trial, ASHA), an MLflow parent
run with a child run per trial, the best trial registered, Ray's storage on S3 (moto); the search space
and both search algorithms (random, Optuna) without training; the `msa tune` command line."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from msa.runtime.tracking import DIGEST_TAG, REGISTERED_MODEL
from msa.runtime.tune import DEFAULT_SPACE, METRIC, TuneJob, _search_alg, to_tune_space, validate_space
from shards.manifest import read_manifest

SPACE = {
    "optim.lr": {"loguniform": [3e-4, 3e-3]},
    "optim.weight_decay": {"loguniform": [1e-4, 1e-1]},
    "loss.w_align": {"uniform": [1.0, 20.0]},
    "loss.w_cons": {"uniform": [1.0, 15.0]},
    "loss.cons_temperature": {"uniform": [0.5, 4.0]},
    "train.batch_size": {"choice": [8, 16]},
    "image.backbone": {"choice": ["resnet10t", "resnet18"]},
}


def _noop(config: dict) -> None:
    pass


def test_default_space_covers_the_required_hyper_parameters() -> None:
    required = {"optim.lr", "optim.weight_decay", "loss.w_align", "loss.w_cons", "loss.cons_temperature",
                "train.batch_size", "image.backbone"}
    assert required <= set(DEFAULT_SPACE)
    validate_space(DEFAULT_SPACE, "small")


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.learning_rate": {"uniform": [0.1, 0.2]}}, "unknown config key"),
        ({"optim.lr": {"normal": [0, 1]}}, "unknown distribution"),
        ({"optim.lr": {"loguniform": [0.0, 1e-3]}}, "positive"),
        ({"optim.lr": {"uniform": [0.2, 0.1]}}, "low < high"),
        ({"train.batch_size": {"choice": []}}, "non-empty"),
    ],
)
def test_bad_search_spaces_are_refused(space, message) -> None:
    with pytest.raises(ValueError, match=message):
        validate_space(space, "small")


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_both_search_algorithms_sample_the_space(search) -> None:
    job = TuneJob(data_uri="unused", dataset_digest="0" * 64, name="t",
                  space=SPACE, search=search, num_samples=3, max_concurrent_trials=3, seed=7)
    alg = _search_alg(job)
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        assert isinstance(alg, OptunaSearch)
        assert alg.set_search_properties(METRIC, "max", to_tune_space(SPACE))
        configs = [alg.suggest(f"trial{i}") for i in range(3)]
    else:
        from ray.tune.search import BasicVariantGenerator

        assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == 3  # carries the limit
        alg.add_configurations({"t": {"run": _noop, "config": to_tune_space(SPACE), "num_samples": 3}})
        configs = [alg.next_trial().config for _ in range(3)]
    for config in configs:
        assert set(config) == set(SPACE)
        assert 3e-4 <= config["optim.lr"] <= 3e-3 and config["train.batch_size"] in (8, 16)
        assert config["image.backbone"] in ("resnet10t", "resnet18")
    assert len({round(c["optim.lr"], 12) for c in configs}) == 3


def test_msa_tune_command_line_parses() -> None:
    from flows.cli import build_parser

    args = build_parser().parse_args(
        ["tune", "--data", "shards/", "--search", "optuna", "--num-samples", "3", "--max-concurrent-trials", "2",
         "--cpus-per-worker", "0.5", "--space", '{"optim.lr": {"loguniform": [1e-4, 1e-3]}}', "--epochs", "2"]
    )
    assert args.handler.__name__ == "_tune" and args.search == "optuna" and args.cpus_per_worker == 0.5
    assert args.workers == 1 and args.use_gpu is False and not hasattr(args, "max_failures")
    assert args.space == {"optim.lr": {"loguniform": [1e-4, 1e-3]}}


@pytest.mark.slow
def test_tune_flow_three_trials_on_s3_storage_registers_the_best(
    mlflow_server, tiny_shards, prefect_stack, s3_endpoint, s3_ray, tiny_overrides, fast_model_logging
) -> None:
    """Ray's storage is an ``s3://`` path and the endpoint only the run's ``endpoint_url`` (as on a cluster,
    where Tune needs shared storage): Tune's own state goes there too, not to AWS."""
    import boto3

    from flows.tune_msa import tune_msa

    client = MlflowClient(mlflow_server)
    before = {v.version for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")}
    result = tune_msa(
        data_uri=tiny_shards,
        overrides=tiny_overrides,
        epochs=2,
        space=SPACE,
        search="random",
        num_samples=3,
        max_concurrent_trials=2,
        workers=1,
        cpus_per_worker=0.5,
        grace_period=1,
        reduction_factor=2,
        seed=3,
        mlflow_uri=mlflow_server,
        storage_path="s3://msa-shards/ray",
        endpoint_url=s3_endpoint,
        name="tune-test",
    )
    trials = result["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials), trials
    assert all(t["status"] in ("completed", "stopped-early") and 1 <= t["epochs"] <= 2 for t in trials)
    assert any(t["status"] == "completed" for t in trials)
    assert len({t["trial_id"] for t in trials}) == 3 and all(set(t["config"]) == set(SPACE) for t in trials)
    best = max(trials, key=lambda t: t["best_val_mR"])
    assert result["best_trial_id"] == best["trial_id"] and result["best_config"] == best["config"]
    assert all(t["best_checkpoint"].startswith("s3://msa-shards/ray/") for t in trials)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket="msa-shards", Prefix="ray/tune-test/")["Contents"]]
    assert any(k.startswith("ray/tune-test/experiment_state") for k in stored), stored  # Tune's own state

    # One parent run, a child run per trial with per-epoch validation metrics, none left RUNNING.
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["msa.kind"] == "tune"
    assert parent.data.metrics["best_val_mR"] == pytest.approx(best["best_val_mR"])
    assert parent.data.params["tune.num_samples"] == "3" and parent.data.params["tune.search"] == "random"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["tune.trial_id"] for c in children} == {t["trial_id"] for t in trials}
    for child in children:
        trial = next(t for t in trials if t["trial_id"] == child.data.tags["tune.trial_id"])
        assert child.info.run_id == trial["run_id"] and child.info.status in ("FINISHED", "KILLED")
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_mR"))
        assert steps == list(range(trial["epochs"]))
        assert child.data.params["optim.lr"] == str(trial["config"]["optim.lr"])
        assert child.data.params["image.backbone"] == trial["config"]["image.backbone"]

    # The best trial's checkpoint is registered as a new version, tested once, tied to its run.
    version = client.get_model_version(REGISTERED_MODEL, result["model_version"])
    assert result["model_version"] not in before
    assert version.run_id == result["best_run_id"] == best["run_id"]
    assert version.tags[DIGEST_TAG] == read_manifest(tiny_shards).digest
    assert version.tags["tune_parent_run_id"] == parent.info.run_id
    assert 0.0 <= result["test"]["mR"] <= 100.0
    assert client.get_run(best["run_id"]).data.metrics["test_mR"] == pytest.approx(result["test"]["mR"])
