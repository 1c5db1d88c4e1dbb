"""Screenshots of the MLflow and Prefect UIs after one real train-msa run, for the README.

    python docs/screenshots.py                # private stack in a temp dir, one quick run, PNGs in docs/img/
    source .stack.env && python docs/screenshots.py --running    # a stack started by `make stack-up`
    source .stack.env && python docs/screenshots.py --running --flow-run ID    # an earlier run, no training

Starts a private stack (infra.stack: Prefect server + process worker + MLflow server on free ports, all
state in a temporary directory, so .msa/ and .stack/ are untouched), runs one small ``train-msa/train-msa``
deployment run through the Prefect server, then opens four pages in headless Chromium (the Debian package,
driven over the DevTools protocol: each page is captured only once its content, not a spinner, is on it):

- ``mlflow-model-metrics.png``: the MLflow run's "Model metrics" tab, val_mR and the other recalls over epochs;
- ``mlflow-recall-curves.png``: the run's artifact view of ``figures/recall_curves.png``;
- ``prefect-flow-run-artifacts.png``: the Prefect flow run's "Artifacts" tab;
- ``prefect-recall-table.png``: the flow run's test recall table artifact.

It lives in docs/ because it only makes documentation; it is not part of `make test` (it needs Chromium
and trains a model). Stops what it started; on failure the private stack's logs are kept and named.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import _split_sizes  # noqa: E402
from infra.stack import down, free_port, up  # noqa: E402  (infra/ is not installed: the line above makes it found)

IMG_DIR = ROOT / "docs" / "img"
DEPLOYMENT = "train-msa/train-msa"
MAX_PNG_BYTES = 400_000


# ---------------------------------------------------------------------------------- URLs


def mlflow_run_tab_url(tracking_uri: str, experiment_id: str, run_id: str, tab: str) -> str:
    """A tab of the MLflow run page (``model-metrics``, ``system-metrics``, ``artifacts``)."""
    from flows.artifacts import mlflow_run_url

    run_url = mlflow_run_url(tracking_uri, experiment_id, run_id)
    if run_url is None:
        raise ValueError(f"{tracking_uri}: not an MLflow tracking server (http/https), so there is no page to show")
    return f"{run_url}/{tab}"


def mlflow_artifact_url(tracking_uri: str, experiment_id: str, run_id: str, artifact_path: str) -> str:
    """The run's artifact view with ``artifact_path`` selected (an image is previewed)."""
    return f"{mlflow_run_tab_url(tracking_uri, experiment_id, run_id, 'artifacts')}/{quote(artifact_path)}"


def prefect_ui_base(api_url: str) -> str:
    """The Prefect UI that ships as the default (V2, under ``/v2``) of the server behind ``api_url``."""
    base = api_url.rstrip("/")
    if not base.endswith("/api"):
        raise ValueError(f"{api_url}: a Prefect API URL ends in /api (PREFECT_API_URL)")
    return base.removesuffix("/api") + "/v2"


def prefect_flow_run_url(api_url: str, flow_run_id: str, tab: str | None = None) -> str:
    """A flow run's page; ``tab`` opens one of its tabs (``Artifacts``, ``Logs``, ``Parameters``...)."""
    url = f"{prefect_ui_base(api_url)}/runs/flow-run/{flow_run_id}"
    return url if tab is None else f"{url}?tab={quote(tab)}"


def prefect_artifact_url(api_url: str, artifact_id: str) -> str:
    return f"{prefect_ui_base(api_url)}/artifacts/artifact/{artifact_id}"


# ---------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Shot:
    """One page to capture. ``preload``: JavaScript run before the page's own (UI preferences in localStorage);
    ``expect``: texts that are on the page only once its content has loaded; ``script``: JavaScript run then
    (filter the charts), after which the ``gone`` texts must have left the page."""

    name: str
    url: str
    expect: tuple[str, ...]
    height: int = 1000
    preload: str = ""
    script: str = ""
    gone: tuple[str, ...] = ()


# Set before MLflow's scripts run: the "Model training" navigation (a fresh browser starts in GenAI mode) and
# the Assistant chat panel closed (it opens itself beside every page on a first visit).
MLFLOW_PREFERENCES = """
try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}
"""
# The run's chart search takes a regular expression: keep the per-epoch validation charts (val_mR, val_i2t_R1...),
# not the best_val_* single values. React only sees a value set through the native setter plus an input event.
MLFLOW_VAL_CHARTS = """
const search = document.querySelector('input[placeholder="Search metric charts"]');
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(search, '^val_');
search.dispatchEvent(new Event('input', {bubbles: true}));
"""


@contextmanager
def stack(running: bool) -> Iterator[dict[str, str]]:
    """The stack's environment (PREFECT_API_URL, MLFLOW_TRACKING_URI): a private one, or the running one."""
    if running:
        missing = [k for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if not os.environ.get(k)]
        if missing:
            raise SystemExit(f"--running: {', '.join(missing)} not set; `source .stack.env` first")
        yield {k: os.environ[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        return
    state = Path(tempfile.mkdtemp(prefix="msa-screenshots-"))
    env_file = state / "stack.env"
    prefect_port = free_port()
    # up() starts the Prefect server with PREFECT_API_URL unset, so its UI would look for the API on the
    # default port 4200; the server (started from this environment) reads the UI's API URL from here.
    os.environ["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    try:
        yield up(state, prefect_port, free_port(), env_file)
    except BaseException:
        down(state, env_file)
        print(f"kept the private stack's state and logs for a look: {state}", file=sys.stderr)
        raise
    down(state, env_file)
    shutil.rmtree(state, ignore_errors=True)


def train_once(env: dict[str, str], params: dict[str, Any], timeout: float) -> str:
    """One deployment run through the Prefect server; returns its flow-run id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        print(f"running {DEPLOYMENT} with {json.dumps(params)}", file=sys.stderr)
        flow_run = run_deployment(DEPLOYMENT, parameters=params, timeout=timeout)
    if not (flow_run.state and flow_run.state.is_completed()):
        raise SystemExit(f"flow run {flow_run.name} ({flow_run.id}) ended {flow_run.state!r}; "
                         "see the worker's log (prefect-worker.log in the stack's state directory)")
    return str(flow_run.id)


def flow_run_artifacts(env: dict[str, str], flow_run_id: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))


def mlflow_ids(artifacts: list[Any]) -> tuple[str, str]:
    """(experiment id, run id) of the MLflow run, read from the flow run's link to it: the run it trained."""
    from flows.artifacts import TRAIN_RUN_KEY

    link = next((a.data for a in artifacts if a.key == TRAIN_RUN_KEY), None) or ""
    found = re.search(r"#/experiments/([^/]+)/runs/([0-9a-f]+)", link)
    if found is None:
        raise SystemExit(f"no link to an MLflow run in the flow run's {TRAIN_RUN_KEY!r} artifact ({link!r}): "
                         "is it a train-msa run logged to an MLflow tracking server?")
    return found.group(1), found.group(2)


def planned_shots(env: dict[str, str], experiment_id: str, run_id: str, flow_run_id: str,
                  artifacts: list[Any]) -> list[Shot]:
    from flows.artifacts import TRAIN_RECALL_KEY, TRAIN_SUMMARY_KEY

    mlflow_uri, api_url = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]
    table = next((a for a in artifacts if a.key == TRAIN_RECALL_KEY), None)
    if table is None:
        raise SystemExit(f"flow run {flow_run_id} has no {TRAIN_RECALL_KEY!r} artifact: "
                         f"{sorted(a.key or a.type for a in artifacts)}")
    return [
        Shot("mlflow-model-metrics", mlflow_run_tab_url(mlflow_uri, experiment_id, run_id, "model-metrics"),
             ("val_mR", "Auto-refresh"), height=1100, preload=MLFLOW_PREFERENCES,
             script=MLFLOW_VAL_CHARTS, gone=("best_val_mR",)),
        Shot("mlflow-recall-curves",
             mlflow_artifact_url(mlflow_uri, experiment_id, run_id, "figures/recall_curves.png"),
             ("recall_curves.png", "retrieval_examples.png"), height=640, preload=MLFLOW_PREFERENCES),
        Shot("prefect-flow-run-artifacts", prefect_flow_run_url(api_url, flow_run_id, "Artifacts"),
             (TRAIN_RECALL_KEY, TRAIN_SUMMARY_KEY)),
        Shot("prefect-recall-table", prefect_artifact_url(api_url, str(table.id)), (TRAIN_RECALL_KEY, "chance_mR"),
             height=700),
    ]


# ---------------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium over the DevTools protocol (HTTP endpoints + one websocket per tab); no extra package:
    ``websockets`` comes with Prefect."""

    def __init__(self, binary: str, width: int) -> None:
        self.width = width
        self.profile = Path(tempfile.mkdtemp(prefix="msa-chromium-"))
        self.log = open(self.profile / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-extensions", f"--window-size={width},1000", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self.endpoint = f"http://127.0.0.1:{self._port(timeout=60)}"
        except BaseException:
            self.close()
            raise

    def _port(self, timeout: float) -> int:
        """Chromium writes the port it picked into DevToolsActivePort in its profile."""
        marker, deadline = self.profile / "DevToolsActivePort", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   f"{(self.profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout:.0f}s")

    def _http(self, path: str, method: str = "GET") -> bytes:
        with urllib.request.urlopen(urllib.request.Request(self.endpoint + path, method=method), timeout=30) as r:
            return r.read()

    def capture(self, shot: Shot, timeout: float = 120, settle: float = 3.0) -> bytes:
        """Open ``shot.url`` in a new tab (``shot.preload`` first), wait until every ``shot.expect`` text is on the
        page and every image has loaded, run ``shot.script`` and wait for ``shot.gone`` to go, let animations
        finish, and return the viewport as PNG bytes."""
        from websockets.sync.client import connect

        tab = json.loads(self._http("/json/new?about:blank", method="PUT"))
        try:
            with connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
                calls = iter(range(1, 1_000_000))

                def call(method: str, **params: Any) -> dict[str, Any]:
                    call_id = next(calls)
                    ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
                    while True:
                        message = json.loads(ws.recv(timeout=60))
                        if message.get("id") == call_id:
                            if "error" in message:
                                raise RuntimeError(f"{method}: {message['error']}")
                            return message["result"]

                call("Emulation.setDeviceMetricsOverride", width=self.width, height=shot.height,
                     deviceScaleFactor=1, mobile=False)
                if shot.preload:
                    call("Page.enable")  # without it the preload script is accepted but never runs
                    call("Page.addScriptToEvaluateOnNewDocument", source=shot.preload)
                call("Page.navigate", url=shot.url)
                self._wait_for(call, shot, timeout, present=shot.expect)
                if shot.script:
                    call("Runtime.evaluate", expression=shot.script)
                    self._wait_for(call, shot, timeout, present=shot.expect, absent=shot.gone)
                time.sleep(settle)
                return base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
        finally:
            self._http(f"/json/close/{tab['id']}")

    @staticmethod
    def _wait_for(call, shot: Shot, timeout: float, present: tuple[str, ...], absent: tuple[str, ...] = ()) -> None:
        probe = ("JSON.stringify({text: document.body ? document.body.innerText : '', "
                 "images: Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)})")
        deadline, seen, missing, left = time.monotonic() + timeout, {}, list(present), []
        while time.monotonic() < deadline:
            seen = json.loads(call("Runtime.evaluate", expression=probe, returnByValue=True)["result"]["value"])
            missing = [text for text in present if text not in seen["text"]]
            left = [text for text in absent if text in seen["text"]]
            if seen["images"] and not missing and not left:
                return
            time.sleep(1)
        raise TimeoutError(f"{shot.name}: {shot.url} still lacks {missing}, still shows {left} "
                           f"(images loaded: {seen.get('images')}) "
                           f"after {timeout:.0f}s; the page shows: {seen.get('text', '')[:500]!r}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def save_png(png: bytes, path: Path, max_bytes: int = MAX_PNG_BYTES) -> int:
    """Write ``png`` optimised, as a 256-colour palette image if that is what fits ``max_bytes`` (UI pages
    have few colours), scaled down only as a last resort; atomically (temp file + rename). Returns the size."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    candidates = [image]
    for _ in range(20):  # 0.9 ** 20: down to an eighth of the width
        candidates.append(image.quantize(colors=256, method=Image.Quantize.MEDIANCUT))
        for candidate in candidates:
            buffer = io.BytesIO()
            candidate.save(buffer, format="PNG", optimize=True)
            if buffer.tell() <= max_bytes:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".png.tmp")
                tmp.write_bytes(buffer.getvalue())
                tmp.replace(path)
                return buffer.tell()
        image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS)
        candidates = []
    raise ValueError(f"{path}: the screenshot does not fit in {max_bytes} bytes even at {image.width} px wide")


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python docs/screenshots.py",
        description="Train once through a Prefect server (a private stack in a temp dir, or --running) and "
        "screenshot, in headless Chromium, the MLflow run's metrics and recall curves and the Prefect flow run's "
        "artifacts, as PNGs under docs/img/ for the README. Needs Chromium (`apt-get install chromium`); "
        "takes a few minutes on two cores.",
    )
    parser.add_argument("--running", action="store_true",
                        help="use the stack named by PREFECT_API_URL and MLFLOW_TRACKING_URI (`source .stack.env`) "
                        "instead of starting a private one")
    parser.add_argument("--flow-run", metavar="ID",
                        help="with --running: screenshot this finished train-msa flow run instead of training")
    parser.add_argument("--out", type=Path, default=IMG_DIR, help="where the PNGs go (default: docs/img/)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="the Chromium binary (default: chromium on PATH)")
    parser.add_argument("--width", type=int, default=1440, help="browser viewport width in px (default 1440)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the run: points on the charts (default 4)")
    parser.add_argument("--demo-images", type=_split_sizes, default=_split_sizes("96,32,32"), metavar="TRAIN,VAL,TEST",
                        help="images per split of the synthetic corpus the run makes (default 96,32,32)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the flow run (default 1800)")
    args = parser.parse_args(argv)
    if not args.chromium or not Path(args.chromium).exists():
        parser.error("no Chromium found: `apt-get install chromium` (Debian) or pass --chromium PATH")
    if args.flow_run and not args.running:
        parser.error("--flow-run needs --running: a private stack has no flow runs yet")

    params = {"epochs": args.epochs, "demo_images": args.demo_images, "workers": args.workers,
              "run_name": f"screenshots-{time.strftime('%Y%m%d-%H%M%S')}"}
    with stack(args.running) as env:
        flow_run_id = args.flow_run or train_once(env, params, args.timeout)
        artifacts = flow_run_artifacts(env, flow_run_id)
        shots = planned_shots(env, *mlflow_ids(artifacts), flow_run_id, artifacts)
        browser = Chromium(args.chromium, args.width)
        try:
            for shot in shots:
                size = save_png(browser.capture(shot), args.out / f"{shot.name}.png")
                print(f"{args.out / shot.name}.png  {size / 1000:.0f} KB  {shot.url}")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
