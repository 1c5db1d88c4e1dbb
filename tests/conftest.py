"""Shared fixtures: a real MLflow server, a tiny synthetic shard set, the local Prefect stack.

Session-scoped unless noted; each starts only when a test asks for it:

- ``mlflow_server``: ``mlflow server`` on 127.0.0.1 (free port), SQLite backend and a proxied
  artifact root in a temporary directory, one worker and background jobs off (starts in ~15 s
  instead of ~50 s); yields the tracking URI. The store is shared by every test of the session,
  so tests use their own registered-model names or assert on what they created.
- ``s3_endpoint`` (per test): moto's threaded S3 server on 127.0.0.1 (free port) with fake AWS
  credentials in the environment and one bucket, ``msa-shards``; yields its endpoint URL.
- ``tiny_corpus`` / ``tiny_shards``: a 48/16/16-image synthetic corpus (32 px) and its shards
  (written once with ``shards.writer.write_shards``); ``tiny_shards`` yields the shard set's path.
- ``learning_shards``: 48 train images in shards of 16, what the tests that check a run learns train on.
- ``ray_cluster`` (per test): a local Ray cluster for tests that train (msa.runtime.ray_train.ensure_ray), shut down at
  session end; ``tiny_overrides``: config overrides for tiny runs.
- ``fast_model_logging`` (per module): skips MLflow's slow pip-requirement inference when logging models.
- ``prefect_stack``: ``infra.stack.up`` in a temporary state directory with free ports (Prefect
  server, process worker, MLflow server, every deployment of prefect.yaml); yields the stack's
  environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, ...) and points in-process flow runs at it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parent.parent
TINY_SPLITS = {"train": 48, "val": 16, "test": 16}
TINY_IMAGE_SIZE = 32
# Config overrides that keep a small-preset run tiny on two CPU cores.
TINY_OVERRIDES = {
    "image.size": TINY_IMAGE_SIZE,
    "train.batch_size": 16,
    "train.eval_batch_size": 64,
    "train.loader_workers": 0,
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``root``'s SQLite store and artifact root (one worker,
    background jobs off), healthy on return; started again on the same ``root`` it serves the same runs."""
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=env, cwd=root, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=180)
    except BaseException:
        _stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow tracking server (SQLite + local artifact root), stopped at session end."""
    port = _free_port()
    proc = _start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server with fake credentials and one bucket (msa-shards); yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-0123",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="msa-shards")
        yield endpoint
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(annotations, images_dir) of a tiny synthetic Karpathy-layout corpus."""
    from shards.synth import generate_corpus

    root = tmp_path_factory.mktemp("tiny-corpus")
    annotations = generate_corpus(root, splits=TINY_SPLITS, image_size=TINY_IMAGE_SIZE, seed=0)
    return annotations, root / "images"


@pytest.fixture(scope="session")
def tiny_shards(tiny_corpus, tmp_path_factory) -> str:
    """Path of a verified shard set of the tiny corpus (one shard per split)."""
    from shards.writer import write_shards

    annotations, images = tiny_corpus
    uri = str(tmp_path_factory.mktemp("tiny-shards") / "synth")
    write_shards(annotations, images, uri, corpus="synth", progress=False)
    return uri


@pytest.fixture(scope="session")
def learning_shards(tmp_path_factory) -> str:
    """Path of the shard set the training tests learn on: 48 train images (32 px, seed 11) in shards of 16."""
    from shards.synth import generate_corpus
    from shards.writer import write_shards

    root = tmp_path_factory.mktemp("learn")
    annotations = generate_corpus(root / "corpus", splits={"train": 48}, image_size=32, seed=11)
    write_shards(annotations, root / "corpus" / "images", str(root / "shards"), corpus="synth", shard_size=16,
                 progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    """The local stack (infra.stack.up) with free ports; in-process flows run against its server too."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from infra.stack import down, up

    # Prefect's console handler takes sys.stderr when its logging is first set up (the first flow import): do it
    # now, on the session's stream, not inside a test whose capfd stream is closed when the test ends.
    ensure_logging_setup()

    state = tmp_path_factory.mktemp("stack") / "state"
    env_file = state.parent / "stack.env"
    # The worker inherits this environment: poll for scheduled runs every 2 s, not 10 s.
    saved = os.environ.get("PREFECT_WORKER_QUERY_SECONDS")
    os.environ["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    try:
        stack_env = up(state, _free_port(), _free_port(), env_file)
    except BaseException:
        down(state, env_file)
        raise
    finally:
        if saved is None:
            os.environ.pop("PREFECT_WORKER_QUERY_SECONDS", None)
        else:
            os.environ["PREFECT_WORKER_QUERY_SECONDS"] = saved
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack_env["PREFECT_API_URL"],
                                         PREFECT_HOME: stack_env["PREFECT_HOME"]}):
            yield {**stack_env, "STATE_DIR": str(state)}
    finally:
        down(state, env_file)


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down, at session end, the Ray cluster ``ray_cluster`` started (if still up)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """A local Ray cluster (started once, re-started if another test shut it down) whose workers
    know its address (msa.runtime.ray_train.ensure_ray), so Ray Train's placement-group cleaner works even when
    other Ray instances run on the machine."""
    from msa.runtime.ray_train import ensure_ray

    ensure_ray(None)
    yield


@pytest.fixture
def s3_ray(s3_endpoint) -> Path:
    """A Ray cluster of this test, started (msa.runtime.ray_train.ensure_ray) once the S3 credentials are in
    the environment: its processes inherit them, as a user's local cluster does (list a fixture that sets other
    credentials before this one). Yields its session's log directory (every Ray process of this cluster writes
    there, the train workers included); the next test's ``ray_cluster`` starts a fresh one."""
    import ray

    from msa.runtime.ray_train import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(None)
    try:
        yield Path(ray._private.worker._global_node.get_logs_dir_path())
    finally:
        ray.shutdown()


@pytest.fixture
def tiny_overrides() -> dict:
    """Config overrides that keep a small-preset run tiny on two CPU cores."""
    return dict(TINY_OVERRIDES)


@pytest.fixture(scope="module")
def fast_model_logging():
    """Skip MLflow's pip-requirement inference when a test logs a pyfunc model without explicit
    requirements: the inference re-imports the model in a subprocess (~20 s per model on two busy
    cores; 0.2 s without it). The logged model is otherwise exactly the product's."""
    import functools

    import mlflow.pyfunc

    original = mlflow.pyfunc.log_model

    @functools.wraps(original)
    def log_model(*args, **kwargs):
        if kwargs.get("pip_requirements") is None and kwargs.get("extra_pip_requirements") is None:
            kwargs["pip_requirements"] = ["torch", "timm", "transformers", "mlflow"]
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlflow.pyfunc, "log_model", log_model)
        yield
