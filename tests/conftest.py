"""Shared fixtures: a real MLflow server, a tiny synthetic shard set, the local Prefect stack.

All are session-scoped and start lazily (only when a test asks for them):

- ``mlflow_server``: ``mlflow server`` on 127.0.0.1 (free port), SQLite backend and a proxied
  artifact root in a temporary directory, one worker and background jobs off (starts in ~15 s
  instead of ~50 s); yields the tracking URI. The store is shared by every test of the session,
  so tests use their own registered-model names or assert on what they created.
- ``tiny_corpus`` / ``tiny_shards``: a 48/16/16-image synthetic corpus (32 px) and its shards
  (written once with ``shards.writer.write_shards``); ``tiny_shards`` yields the shard set's path.
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow tracking server (SQLite + local artifact root), stopped at session end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
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
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(f"{uri}/health", proc, log, timeout=180)
        yield uri
    finally:
        _stop(proc)


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
def prefect_stack(tmp_path_factory):
    """The local stack (infra.stack.up) with free ports; in-process flows run against its server too."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from infra.stack import down, up

    state = tmp_path_factory.mktemp("stack")
    env_file = state / "stack.env"
    try:
        stack_env = up(state / "state", _free_port(), _free_port(), env_file)
        with temporary_settings(updates={PREFECT_API_URL: stack_env["PREFECT_API_URL"],
                                         PREFECT_HOME: stack_env["PREFECT_HOME"]}):
            yield {**stack_env, "STATE_DIR": str(state / "state")}
    finally:
        down(state / "state", env_file)
