"""Training end to end on S3 (issue 14, items 2 and 6): train-msa reads ``s3://`` shards and writes its Ray
checkpoints to an ``s3://`` storage path, through :class:`s3proxy.FlakyProxy` in front of a moto server, with
the job's own AWS credentials in its environment. Three faults and a scan, in one run:

- the endpoint goes down for ``OUTAGE_S`` seconds the moment the first checkpoint upload starts: retried
  (msa.runtime.ray_train's S3 storage filesystem and the workers' shard reads), no worker fails over it;
- a Ray Train worker is SIGKILLed once that checkpoint is registered: the run resumes from it and finishes;
- no object under a checkpoint's final name is ever partial (every version seen matches its manifest);
- the secret key and the access key id appear nowhere in MLflow (params, tags, metric names, every
  artifact of the run and of its logged model, the model version), the Prefect flow run (logs, parameters)
  or the Ray session's logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import string
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3proxy import FlakyProxy

pytestmark = pytest.mark.slow

BUCKET = "msa-shards"  # created by the s3_endpoint fixture (conftest)
OUTAGE_S = 5.0
EPOCHS = 3
CHECKPOINT_DIR = re.compile(r"checkpoint_\d")  # Ray's checkpoint_<date>, not checkpoint_manager_snapshot.json


@pytest.fixture
def job_credentials(s3_endpoint, monkeypatch) -> dict[str, str]:
    """Fresh random AWS credentials in the job's environment, as a user sets them (moto accepts any)."""
    alphabet = string.ascii_uppercase + string.digits
    creds = {
        "AWS_ACCESS_KEY_ID": "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)[:40],
    }
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return creds


class FaultStager:
    """Watches the Ray storage prefix straight from moto (not through the proxy) every 50 ms, in a thread:

    - the first object of a checkpoint directory (its upload has started): ``proxy.outage(OUTAGE_S)``;
    - a checkpoint registered by Ray (checkpoint_manager_snapshot.json names one): SIGKILL one Ray Train
      worker of this test's cluster (a descendant of this process: never another job's);
    - every version of every object under a checkpoint directory: (size, sha256), to check none was partial.
    """

    def __init__(self, endpoint: str, prefix: str, proxy: FlakyProxy):
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.prefix, self.proxy = prefix.rstrip("/") + "/", proxy
        self.seen: dict[str, set[tuple[int, str]]] = {}  # key under the prefix -> versions seen
        self.manifests: dict[str, dict] = {}  # checkpoint dir -> the files its manifest.json lists
        self.first_seen: dict[str, float] = {}  # key -> when it was first listed (time.time())
        self._etags: set[tuple[str, str]] = set()
        self.outage: dict | None = None  # checkpoint dir, its keys at the fault, time
        self.kill: dict | None = None  # pid, time, snapshot's latest checkpoint then
        self.polls = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-stager", daemon=True)

    def __enter__(self) -> FaultStager:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()  # the final state

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.poll()
                self._stop.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def _get(self, name: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=self.prefix + name)["Body"].read()

    def poll(self) -> None:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix).get("Contents", [])
        self.polls += 1
        keys = {o["Key"][len(self.prefix):]: o["ETag"] for o in listing}
        checkpoint_keys = sorted(k for k in keys if CHECKPOINT_DIR.match(k))
        now = time.time()
        for name in checkpoint_keys:
            self.first_seen.setdefault(name, now)
        if self.outage is None and checkpoint_keys:
            self.proxy.outage(OUTAGE_S)
            self.outage = {"dir": checkpoint_keys[0].split("/")[0], "keys": checkpoint_keys, "at": time.time()}
        for name in checkpoint_keys:
            if not name.endswith("/") and (name, keys[name]) not in self._etags:
                try:
                    body = self._get(name)
                except self.s3.exceptions.NoSuchKey:  # deleted since the listing (Ray's retention)
                    continue
                self._etags.add((name, keys[name]))
                self.seen.setdefault(name, set()).add((len(body), hashlib.sha256(body).hexdigest()))
                if name.endswith("/manifest.json"):
                    self.manifests[name.split("/")[0]] = json.loads(body)["files"]
        if self.kill is None and self.outage is not None and "checkpoint_manager_snapshot.json" in keys:
            latest = json.loads(self._get("checkpoint_manager_snapshot.json")).get("latest_checkpoint_result")
            if latest:
                self._kill_a_worker(latest)

    def _kill_a_worker(self, latest: dict) -> None:
        import psutil

        workers = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    workers.append(proc.pid)
            except psutil.Error:
                continue
        if workers:
            pid = max(workers)
            os.kill(pid, signal.SIGKILL)
            self.kill = {"pid": pid, "at": time.time(), "workers": len(workers),
                         "latest_dir": latest["checkpoint_dir_name"], "latest_epoch": int(latest["metrics"]["epoch"])}


def _secret_places(scan: dict[str, bytes | str], secrets_: dict[str, str]) -> list[str]:
    """``where: secret name`` for each scanned text (name -> content) that holds a secret."""
    found = []
    for where, content in scan.items():
        data = content.encode() if isinstance(content, str) else content
        for name, secret in secrets_.items():
            if secret.encode() in data:
                found.append(f"{where}: {name}")
    return found


def _mlflow_texts(client, run_id: str, version: str, tmp: Path) -> dict[str, bytes | str]:
    """What MLflow holds about the run: params, tags, metric names, every artifact file of the run and of its
    logged model, the registered model version (description, tags, source)."""
    import mlflow

    from msa.runtime.tracking import REGISTERED_MODEL

    run = client.get_run(run_id)
    texts: dict[str, bytes | str] = {
        "mlflow params": json.dumps(run.data.params),
        "mlflow tags": json.dumps(run.data.tags),
        "mlflow metric names": json.dumps(sorted(run.data.metrics)),
        "mlflow run name": run.info.run_name or "",
    }
    mv = client.get_model_version(REGISTERED_MODEL, version)
    texts["mlflow model version"] = json.dumps({"description": mv.description, "tags": mv.tags, "source": mv.source,
                                                "run_id": mv.run_id})
    run_dir = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp / "run")))
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp / "model")))
    for root in (run_dir, model_dir):
        for path in root.rglob("*"):
            if path.is_file():
                texts[f"mlflow artifact {path.relative_to(tmp)}"] = path.read_bytes()
    return texts


def _prefect_texts(flow_run_id) -> dict[str, str]:
    """The flow run's logs (its tasks' included) and parameters, read back from the Prefect server."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    logs = []
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                     limit=200, offset=len(logs))
            logs += batch
            if len(batch) < 200:
                break
        flow_run = client.read_flow_run(flow_run_id)
    return {"prefect logs": "\n".join(log.message for log in logs),
            "prefect flow-run parameters": json.dumps(flow_run.parameters, default=str)}


def _ray_texts(logs_dir: Path) -> dict[str, bytes]:
    return {f"ray log {p.relative_to(logs_dir)}": p.read_bytes() for p in logs_dir.rglob("*") if p.is_file()}


def test_s3_training_survives_a_killed_worker_and_an_upload_outage_and_leaks_no_secret(
        tiny_corpus, tiny_overrides, s3_endpoint, job_credentials, s3_ray, mlflow_server, prefect_stack,
        fast_model_logging, tmp_path, capfd):
    import boto3
    from mlflow.tracking import MlflowClient

    from flows.train_msa import train_msa
    from msa.checkpoint import load_checkpoint
    from shards.writer import write_shards

    started, wall = time.monotonic(), time.time()
    annotations, images = tiny_corpus
    data_uri = f"s3://{BUCKET}/shards"
    write_shards(annotations, images, data_uri, corpus="synth", storage_options={"endpoint_url": s3_endpoint},
                 progress=False)
    run_name = f"s3-faults-{secrets.token_hex(3)}"
    target = urlsplit(s3_endpoint)
    with FlakyProxy(target.hostname, target.port) as proxy, \
            FaultStager(s3_endpoint, f"ray/{run_name}", proxy) as stager:
        state = train_msa(data_uri=data_uri, preset="small", overrides=tiny_overrides, epochs=EPOCHS, workers=2,
                          max_failures=1, storage_path=f"s3://{BUCKET}/ray", mlflow_uri=mlflow_server,
                          endpoint_url=proxy.endpoint_url, run_name=run_name, return_state=True)
        refused = proxy.refused
    trained_s = time.monotonic() - started
    assert stager.error is None, f"the fault stager failed: {stager.error!r}"
    assert state.is_completed(), state
    result = state.result()

    # The outage began while the first checkpoint was being uploaded, and was retried: that very directory is
    # the checkpoint Ray registered (a worker failing over it would have restarted the run: with max_failures=1
    # the kill below would then have been one failure too many).
    assert stager.outage is not None and refused > 0, (stager.outage, refused)
    assert stager.kill is not None, "no worker was killed: the fault was never injected"
    assert stager.kill["latest_dir"] == stager.outage["dir"] and stager.kill["latest_epoch"] == 0, stager.kill
    files = {k: t for k, t in stager.first_seen.items() if k.startswith(stager.outage["dir"] + "/")
             and not k.endswith("/")}
    assert {k.split("/", 1)[1] for k in files} == {"checkpoint.pt", "history.json", "manifest.json"}, files
    waited = min(files.values()) - stager.outage["at"]  # its files were uploaded once the endpoint was back
    assert waited > OUTAGE_S - 0.5, (waited, stager.outage)

    # Resumed from the checkpoint registered before the kill, not restarted: each epoch trained once, epoch 0
    # before the kill and the later ones after it; the resumed workers said where they started.
    client = MlflowClient(mlflow_server)
    run_id = result["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    val = sorted(m.step for m in client.get_metric_history(run_id, "val_mR"))
    assert val == list(range(EPOCHS)), val
    ray_logs = _ray_texts(s3_ray)
    worker_output = b"".join(ray_logs.values()).decode(errors="replace")
    resumed = re.findall(r"\[msa\] resumed from epoch (\d+) checkpoint", worker_output)
    assert resumed == [str(stager.kill["latest_epoch"])], resumed

    # No partial object under a final name: every version of every checkpoint file ever listed is the complete
    # file its directory's manifest records; every checkpoint Ray kept loads (sizes and sha256 checked).
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = f"ray/{run_name}/"
    for name, versions in stager.seen.items():
        directory, _, file = name.partition("/")
        if file == "manifest.json":
            assert len(versions) == 1, f"{name}: {len(versions)} versions seen"
        elif directory in stager.manifests:
            want = stager.manifests[directory][file]
            assert versions == {(want["bytes"], want["sha256"])}, f"{name}: saw {versions}, manifest has {want}"
    unchecked = {n.split("/")[0] for n in stager.seen} - set(stager.manifests)  # an upload cut by the kill
    snapshot = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "checkpoint_manager_snapshot.json")["Body"].read())
    kept = {c["checkpoint_dir_name"]: int(c["metrics"]["epoch"]) for c in snapshot["checkpoint_results"]}
    assert kept and set(kept) <= set(stager.manifests), (kept, sorted(stager.manifests))
    histories = {}
    for directory in kept:
        local = tmp_path / "kept" / directory
        local.mkdir(parents=True)
        for file in [*stager.manifests[directory], "manifest.json"]:
            s3.download_file(BUCKET, f"{prefix}{directory}/{file}", str(local / file))
        histories[kept[directory]] = load_checkpoint(local)["history"]  # checks every size and sha256
    history = histories[max(histories)]
    assert max(histories) == EPOCHS - 1 and [int(h["epoch"]) for h in history] == list(range(EPOCHS))
    killed_at = stager.kill["at"]
    assert history[0]["finished_at"] < killed_at < history[1]["finished_at"], (killed_at, history)

    # Secrets: nowhere in MLflow, the Prefect flow run or the Ray session's logs (nor the test's output).
    mlflow_texts = _mlflow_texts(client, run_id, result["model_version"], tmp_path / "artifacts")
    prefect_texts = _prefect_texts(state.state_details.flow_run_id)
    out = capfd.readouterr()
    scanned = {**mlflow_texts, **prefect_texts, **ray_logs, "test stdout/stderr": out.out + out.err}
    # the scan reads what it should: the run's endpoint in its params, the flow's lines, the workers' output
    assert json.loads(mlflow_texts["mlflow params"])["run.endpoint_url"] == proxy.endpoint_url
    assert any(k.startswith("mlflow artifact model/") for k in mlflow_texts), sorted(mlflow_texts)
    assert "resolved config" in prefect_texts["prefect logs"]
    assert "[msa] epoch 1/" in worker_output
    leaks = _secret_places(scanned, job_credentials)
    assert not leaks, f"credentials found in: {leaks}"
    print(f"figures: {trained_s:.0f} s to train, evaluate and register (outage at {stager.outage['at'] - wall:.0f} s, "
          f"first file of that checkpoint {waited:.1f} s later, "
          f"kill at {killed_at - wall:.0f} s); outage at upload of {stager.outage['dir']} "
          f"({len(stager.outage['keys'])} key(s) listed), {refused} connection(s) refused; killed pid "
          f"{stager.kill['pid']} of {stager.kill['workers']} worker(s) after epoch {stager.kill['latest_epoch']}; "
          f"{len(stager.manifests)} complete checkpoint dir(s), {len(unchecked)} without manifest; "
          f"{stager.polls} polls; scanned {len(scanned)} texts, {sum(len(v) for v in scanned.values())} bytes")
