"""promote-msa against a real MLflow server: better -> promoted, worse -> kept, no champion ->
promoted, the margin, the same-digest rule, two concurrent promotions -> exactly one winner, and the
flow run through its deployment on the local Prefect stack (server + process worker). Every commit
goes through the promotion lease on the stack's Prefect server (flows.lease); stress and SIGKILL
cases are in test_promotion_stress.py.

Models: a checkpoint trained in-process for two epochs on the tiny shards (mR well above chance)
and randomly initialised ones (mR near chance); each case registers them under its own model name.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.cli import main as msa_main
from flows.lease import HOLD_S, limit_name, promotion_lease
from msa.config import MSAConfig, resolve_config
from msa.runtime import registry, tracking
from msa.runtime.tracking import CHAMPION, DIGEST_TAG
from shards.manifest import read_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(out: Path, shards: str, overrides: dict, *, epochs: int, seed: int) -> Path:
    """An MSA checkpoint trained in-process (no Ray) for ``epochs`` epochs; 0 = random init."""
    from msa.checkpoint import save_checkpoint
    from msa.data import ImageTransform, PairBatches, pair_loader, steps_per_epoch
    from msa.encoders import build_tokenizer
    from msa.engine import build_optimizer, seed_everything, train_epoch
    from msa.model import MSAModel

    cfg = resolve_config("small", {**overrides, "optim.lr": 2e-3})
    manifest = read_manifest(shards)
    seed_everything(seed)
    model = MSAModel(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    dataset = PairBatches(
        manifest.shard_urls("train"),
        transform=ImageTransform(cfg.image.size),
        tokenizer=build_tokenizer(cfg.text.tokenizer or cfg.text.model),
        max_tokens=cfg.text.max_tokens,
        batch_size=cfg.train.batch_size,
        steps_per_epoch=steps_per_epoch(manifest.splits["train"].captions, cfg.train.batch_size, 1),
        seed=seed,
    )
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        train_epoch(model, pair_loader(dataset, 0), optimizer, cfg, torch.device("cpu"))
    save_checkpoint(out, model=model, optimizer=None, epoch=max(epochs - 1, 0), cfg=cfg,
                    dataset_digest=manifest.digest, metrics={}, history=[])
    return out


def _log_model(checkpoint: Path, shards: str, name: str) -> str:
    """A training-style run (data_uri, digest tags) holding the pyfunc model; returns its model URI."""
    from msa.checkpoint import load_checkpoint
    from msa.encoders import build_tokenizer
    from msa.runtime.serving import log_pyfunc_model

    state = load_checkpoint(checkpoint)
    cfg = MSAConfig.from_dict(state["config"])
    digest = read_manifest(shards).digest
    run_id = tracking.start_training_run(cfg, dataset_digest=digest, data_uri=shards, run_name=name)
    tokenizer_dir = checkpoint.parent / f"{checkpoint.name}-tokenizer"
    build_tokenizer(cfg.text.tokenizer or cfg.text.model).save_pretrained(tokenizer_dir)
    with mlflow.start_run(run_id=run_id):
        uri = log_pyfunc_model(checkpoint, tokenizer_dir, int(state["model"]["image.out.weight"].shape[0]))
    tracking.finish_run(run_id)
    return uri


def _register(model_uri: str, model_name: str, digest: str, **tags) -> str:
    """A new version; a stored test_mR of 99 shows that promotion never trusts stored figures."""
    version = mlflow.register_model(model_uri, model_name, tags={DIGEST_TAG: digest, "test_mR": "99.0", **tags})
    return str(version.version)


@pytest.fixture(scope="module")
def models(mlflow_server, tiny_shards, tmp_path_factory, fast_model_logging) -> dict[str, str]:
    """Logged pyfunc models: 'strong' (2 epochs) and 'random' (untrained)."""
    tracking.use_tracking(mlflow_server)
    root = tmp_path_factory.mktemp("promote-models")
    overrides = {"image.size": 32, "train.batch_size": 16, "train.eval_batch_size": 64, "train.loader_workers": 0}
    return {
        name: _log_model(_checkpoint(root / name, tiny_shards, overrides, epochs=epochs, seed=1), tiny_shards, name)
        for name, epochs in (("strong", 2), ("random", 0))
    }


def _champion(client: MlflowClient, name: str) -> str | None:
    return client.get_registered_model(name).aliases.get(CHAMPION)


def test_first_better_worse_margin_and_digest(
    models, mlflow_server, prefect_stack, tiny_shards, tiny_corpus, tmp_path, capsys, monkeypatch
) -> None:
    client = MlflowClient(mlflow_server)
    name = "promote-ladder"
    lease = promotion_lease(name)
    digest = read_manifest(tiny_shards).digest
    weak = _register(models["random"], name, digest)
    strong = _register(models["strong"], name, digest)
    worse = _register(models["random"], name, digest)  # the weak weights again, as a new version

    # No champion yet: the first candidate is promoted.
    first = registry.promote(weak, model_name=name, mlflow_uri=mlflow_server, lease=lease)
    assert first.decision == "promoted" and first.champion_version is None and first.champion_mR is None
    assert _champion(client, name) == weak
    assert first.data_uri == tiny_shards and first.dataset_digest == digest  # from the candidate's run and tag

    # Better, but not by the margin: kept.
    held = registry.promote(strong, model_name=name, mlflow_uri=mlflow_server, margin=1000.0, lease=lease)
    assert held.decision == "kept" and held.champion_version == weak
    assert _champion(client, name) == weak

    # Better: promoted. Both figures are fresh evaluations on the same shards (stored test_mR=99 ignored).
    better = registry.promote(strong, model_name=name, mlflow_uri=mlflow_server, margin=5.0, lease=lease)
    assert better.decision == "promoted", better.reason
    assert better.candidate_mR > better.champion_mR + 5.0
    assert better.champion_mR < 99.0
    assert better.champion_mR == pytest.approx(first.candidate_mR)  # the same model on the same shards
    assert _champion(client, name) == strong

    # Worse: kept, and the champion does not move (through `msa promote`; exit 3 = not promoted).
    argv = ["promote", "--candidate", worse, "--model-name", name, "--mlflow-uri", mlflow_server,
            "--exit-code", "--json"]
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # the CLI defaults it under .msa/
    assert msa_main(argv) == 3
    out = capsys.readouterr().out
    kept = registry.PromotionDecision(**json.loads(out[out.index("{"):]))
    assert kept.decision == "kept" and kept.champion_version == strong
    assert kept.candidate_mR < kept.champion_mR
    assert _champion(client, name) == strong

    # The decision is recorded on the version and as an MLflow run with both figures and the digest.
    tags = client.get_model_version(name, worse).tags
    assert tags["promotion_decision"] == "kept"
    assert float(tags["promotion_candidate_mR"]) == pytest.approx(kept.candidate_mR, abs=1e-3)
    assert float(tags["promotion_champion_mR"]) == pytest.approx(kept.champion_mR, abs=1e-3)
    assert tags["promotion_digest"] == digest and tags["promotion_champion_version"] == strong
    run = client.get_run(tags["promotion_run_id"])
    assert run.data.tags["decision"] == "kept" and run.data.tags[DIGEST_TAG] == digest
    assert run.data.metrics["candidate_mR"] == pytest.approx(kept.candidate_mR)
    assert run.data.metrics["champion_mR"] == pytest.approx(kept.champion_mR)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "msa"

    # Shards with another digest are refused: promotion compares on the candidate's test shards only.
    from shards.writer import write_shards

    annotations, images = tiny_corpus
    other = str(tmp_path / "other-layout")
    assert write_shards(annotations, images, other, corpus="synth", shard_size=7, progress=False).digest != digest
    with pytest.raises(ValueError, match="digest"):
        registry.promote(worse, model_name=name, mlflow_uri=mlflow_server, data_uri=other, lease=lease)
    assert _champion(client, name) == strong  # never left without a champion, never moved by a refusal


def test_two_concurrent_promotions_have_one_winner(models, mlflow_server, prefect_stack, tiny_shards, caplog) -> None:
    """Two equal candidates (same weights) both beat the champion; both evaluate before either
    commits (a barrier in the pre-commit hook). Exactly one moves the alias; the other takes the
    lease after it, sees the new champion, re-evaluates against it and is kept (equal mR does not
    beat it). The threads run in copies of this context, which points Prefect at the stack."""
    client = MlflowClient(mlflow_server)
    name = "promote-race"
    digest = read_manifest(tiny_shards).digest
    champion = _register(models["random"], name, digest)
    client.set_registered_model_alias(name, CHAMPION, champion)
    a = _register(models["strong"], name, digest)
    b = _register(models["strong"], name, digest)

    barrier = threading.Barrier(2, timeout=300)
    seen: dict[str, list] = {a: [], b: []}
    results: dict[str, registry.PromotionDecision] = {}
    errors: list[BaseException] = []

    def run(version: str) -> None:
        def hook(champion_seen):
            seen[version].append(champion_seen)
            if len(seen[version]) == 1:
                barrier.wait()  # both have evaluated against the old champion before either commits

        try:
            results[version] = registry.promote(version, model_name=name, mlflow_uri=mlflow_server,
                                                lease=promotion_lease(name), on_evaluated=hook)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, v)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    decisions = sorted(r.decision for r in results.values())
    assert decisions == ["kept", "promoted"], {v: (r.decision, r.reason) for v, r in results.items()}
    winner = next(v for v, r in results.items() if r.promoted)
    loser = next(v for v, r in results.items() if not r.promoted)
    assert _champion(client, name) == winner
    assert seen[winner] == [champion] and seen[loser] == [champion, winner]
    assert results[loser].champion_version == winner and results[loser].attempts == 2
    assert results[loser].candidate_mR == pytest.approx(results[loser].champion_mR)
    # The lease was released (not left to free itself), and it lives on the Prefect server, not in the registry.
    # A server too loaded to answer within the holder's write budget is the one exception: the holder says so,
    # and the slot frees itself HOLD_S after it was taken.
    from prefect.client.orchestration import get_client

    lease_log = [r.getMessage() for r in caplog.records if r.name == "flows.lease"]
    unreleased = [m for m in lease_log if "frees itself" in m]
    with get_client(sync_client=True) as prefect:
        if unreleased:
            time.sleep(HOLD_S)
        assert prefect.read_global_concurrency_limit_by_name(limit_name(name)).active_slots == 0, unreleased
    assert {m.name for m in client.search_registered_models(f"name LIKE '{name}%'")} == {name}


def test_promote_flow_through_deployment(models, mlflow_server, tiny_shards, prefect_stack) -> None:
    """`prefect deployment run promote-msa/promote-msa --watch`, executed by the stack's process worker."""
    client = MlflowClient(mlflow_server)
    name = "promote-deployed"
    version = _register(models["strong"], name, read_manifest(tiny_shards).digest)
    env = {**os.environ, **{k: v for k, v in prefect_stack.items() if k != "STATE_DIR"}}
    params = {"candidate_version": version, "model_name": name, "mlflow_uri": mlflow_server, "margin": 0.5}
    argv = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "promote-msa/promote-msa",
            "--watch", "--watch-timeout", "400"]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=450)
    worker_log = (Path(prefect_stack["STATE_DIR"]) / "prefect-worker.log").read_text(errors="replace")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + worker_log[-5000:]
    assert "Completed" in proc.stdout
    assert _champion(client, name) == version  # no champion before: the first version is promoted
    tags = client.get_model_version(name, version).tags
    assert tags["promotion_decision"] == "promoted" and tags["promotion_champion_mR"] == "none"
    assert tags["promotion_margin"] == "0.5"

    # The deployments as prefect.yaml declares them: promotions one at a time (queued), and the
    # retrain schedule deployed inactive.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        promote_deployment = prefect.read_deployment_by_name("promote-msa/promote-msa")
        limit = promote_deployment.global_concurrency_limit
        assert promote_deployment.concurrency_limit == 1 or (limit is not None and limit.limit == 1)
        assert str(promote_deployment.concurrency_options.collision_strategy).endswith("ENQUEUE")
        retrain_deployment = prefect.read_deployment_by_name("retrain-msa/retrain-msa")
        assert [s.schedule.cron for s in retrain_deployment.schedules] == ["0 3 * * *"]
        assert not any(s.active for s in retrain_deployment.schedules)
        assert prefect.read_deployment_by_name("tune-msa/tune-msa").entrypoint == "flows/tune_msa.py:tune_msa"
