"""The local stack: Prefect server + process worker, MLflow server (SQLite + artifact root), deployments.

``python -m infra.stack up`` starts everything, deploys prefect.yaml and writes ``.stack.env``
(what a shell needs: ``source .stack.env && prefect deployment run train-msa/train-msa --watch``);
``down`` stops it. Ray is not a service here: each training run starts a local Ray (or attaches to
RAY_ADDRESS). Every process's pid is recorded under the state directory so ``down`` stops exactly
what ``up`` started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from msa.paths import OFFLINE_ENV

ROOT = Path(__file__).resolve().parent.parent
WORK_POOL = "msa-process"
QUIET_ENV = {**OFFLINE_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s; see {log}")


def _spawn(name: str, argv: list[str], env: dict[str, str], state: Path) -> subprocess.Popen:
    log = state / f"{name}.log"
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    pids = _read_pids(state)
    pids[name] = proc.pid
    (state / "pids.json").write_text(json.dumps(pids))
    return proc


def _read_pids(state: Path) -> dict[str, int]:
    path = state / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def up(state: Path, prefect_port: int, mlflow_port: int, env_file: Path, with_worker: bool = True) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    if _read_pids(state):
        down(state, env_file)
    base = {**os.environ, **QUIET_ENV}
    prefect_home = state / "prefect"
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    stack_env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(prefect_home),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MSA_PROJECT_DIR": str(ROOT),
        "MSA_HOME": str(state / "msa"),
    }
    env = {**base, **stack_env}
    started = time.monotonic()
    prefect = _spawn(
        "prefect-server",
        [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        # The UI asks the server at PREFECT_UI_API_URL; without it, a non-default port breaks the UI.
        {**env, "PREFECT_API_URL": "", "PREFECT_UI_API_URL": api_url},
        state,
    )
    mlflow = _spawn(
        "mlflow-server",
        [
            _bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
            "--artifacts-destination", str(state / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        ],
        env,
        state,
    )
    _wait_http(f"{api_url}/health", 180, prefect, state / "prefect-server.log")
    _wait_http(f"{mlflow_uri}/health", 180, mlflow, state / "mlflow-server.log")
    subprocess.run(
        [_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        env=env, cwd=ROOT, check=True, capture_output=True,
    )
    subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, check=True)
    if with_worker:
        _spawn("prefect-worker", [_bin("prefect"), "worker", "start", "--pool", WORK_POOL], env, state)
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in stack_env.items()))
    print(f"stack up in {time.monotonic() - started:.0f}s: Prefect {api_url}, MLflow {mlflow_uri}")
    print(f"wrote {env_file}: `source {env_file.name} && prefect deployment run train-msa/train-msa --watch`")
    return stack_env


def down(state: Path, env_file: Path) -> None:
    """SIGINT first (a Prefect worker stops cleanly on it), then SIGKILL whatever is left."""
    pids = _read_pids(state)
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGINT)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 20
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    (state / "pids.json").unlink(missing_ok=True)
    env_file.unlink(missing_ok=True)
    if pids:
        print(f"stopped {', '.join(pids)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description="Start or stop the local stack: Prefect server and process worker, MLflow server "
        "with SQLite backend and a local artifact root; `up` also deploys prefect.yaml and writes .stack.env.",
    )
    parser.add_argument("action", choices=["up", "down"], help="start or stop the stack")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".stack",
                        help="databases, logs, pids (default .stack/)")
    parser.add_argument("--env-file", type=Path, default=ROOT / ".stack.env", help="shell exports written by `up`")
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("MSA_PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MSA_MLFLOW_PORT", 5000)))
    args = parser.parse_args(argv)
    if args.action == "up":
        up(args.state_dir.resolve(), args.prefect_port, args.mlflow_port, args.env_file)
    else:
        down(args.state_dir.resolve(), args.env_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
