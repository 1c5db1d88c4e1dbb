"""Promotion under load and crashes, through the commit lease every flow uses (flows.lease) on the
real Prefect server (``prefect_stack``) and the real MLflow server (``mlflow_server``).

- 20 rounds of two promotions racing in two worker processes while two busy-loop processes keep both
  cores busy: each round exactly one winner, no errors, the champion alias present after every round
  and never worse than the champion before it or than a version promoted in that round.
- A holder killed with SIGKILL while it holds the lease blocks the next promotion for at most 30 s.
- Nothing but the registered models the tests made appears in the registry.

Evaluation is the expensive part and not what these tests exercise: the promotion processes replace
``registry.evaluate_version`` with a figure the test sends with each job; everything else is the
real thing (dataset verification, registry reads and writes, the lease, the decision's MLflow run
and tags). The versions are real versions of a real run's artifact, registered before the load
starts; the two processes are started (and their imports paid) before it too, and the SIGKILL test
reuses them: it kills one while it holds the lease, and the other one promotes next.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from load import busy_cores
from mlflow.tracking import MlflowClient

from flows.lease import limit_name
from msa.runtime import registry, tracking
from msa.runtime.tracking import CHAMPION, DIGEST_TAG
from shards.manifest import read_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 20
MARGIN = 1.5  # round r's candidates have mR 4r+1 and 4r+2: each beats the last champion, not the other
REPLY_TIMEOUT_S = 300

# A promotion process. Jobs are JSON lines: {"promote": version, "model", "data_uri", "digest", "margin",
# "figures": {version: mR}, "barrier": bool} or {"hold": model}; replies are "@@<json>" lines. With
# "barrier" it stops before its commit (on_evaluated) until the test writes "go", so that both
# promotions of a round commit against the same champion.
WORKER = r"""
import contextlib, json, sys, time
from msa.runtime import registry
from flows.lease import promotion_lease

figures = {}
registry.evaluate_version = lambda version, uri, **kw: {"mR": figures[version]}

def say(**message):
    print("@@" + json.dumps(message), flush=True)

say(ready=True)
while line := sys.stdin.readline():
    job, waits, seen = json.loads(line), [], []
    if "hold" in job:
        with promotion_lease(job["hold"])():
            say(held=True)
            time.sleep(3600)
    figures.update(job["figures"])
    lease = promotion_lease(job["model"])

    @contextlib.contextmanager
    def timed_lease():
        asked = time.monotonic()
        with lease() as deadline:
            waits.append((asked, time.monotonic()))  # CLOCK_MONOTONIC: comparable across processes
            yield deadline

    def hook(champion_seen):
        seen.append(champion_seen)
        if job["barrier"] and len(seen) == 1:
            say(evaluated=champion_seen)
            sys.stdin.readline()

    try:
        result = registry.promote(job["promote"], data_uri=job["data_uri"], digest=job["digest"],
                                  margin=job["margin"], model_name=job["model"], lease=timed_lease,
                                  on_evaluated=hook)
        say(decision=result.decision, champion_version=result.champion_version, attempts=result.attempts,
            waits=waits)
    except Exception as exc:
        say(error=repr(exc), waits=waits)
"""


class Worker:
    """A promotion process speaking "@@<json>" lines on stdout (everything else is its logging)."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(line[2:].strip())
        self.lines.put("")  # end of output

    def next(self, timeout: float = REPLY_TIMEOUT_S) -> dict:
        line = self.lines.get(timeout=timeout)
        return json.loads(line) if line else {"error": f"exited with {self.proc.wait()}"}

    def send(self, message: dict | str) -> None:
        self.proc.stdin.write((json.dumps(message) if isinstance(message, dict) else message) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL (a no-op once it has exited)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workers(mlflow_server, prefect_stack):
    """Two started promotion processes pointed at the stack's Prefect server and ``mlflow_server``."""
    env = {**os.environ, "PREFECT_API_URL": prefect_stack["PREFECT_API_URL"],
           "PREFECT_HOME": prefect_stack["PREFECT_HOME"], "MLFLOW_TRACKING_URI": mlflow_server}
    pair = [Worker(env) for _ in range(2)]
    try:
        assert [w.next() for w in pair] == [{"ready": True}] * 2
        yield pair
    finally:
        for worker in pair:
            worker.kill()


def _versions(client: MlflowClient, mlflow_server: str, name: str, data_uri: str, n: int) -> list[str]:
    """``n`` new versions of ``name``, all of one finished run's artifact, tagged with the shards' digest."""
    tracking.use_tracking(mlflow_server)
    run_id = registry.start_run(f"{name}-source", kind="test", tags={"data_uri": data_uri})
    registry.log_dict(run_id, {"what": "the artifact the promotion stress versions point at"}, "model/source.json")
    tracking.finish_run(run_id)
    source = f"{registry.get_run(run_id).info.artifact_uri}/model"
    client.create_registered_model(name)
    digest = read_manifest(data_uri).digest
    return [str(client.create_model_version(name, source, run_id=run_id, tags={DIGEST_TAG: digest}).version)
            for _ in range(n)]


def test_twenty_rounds_of_racing_promotions_under_load(workers, mlflow_server, tiny_shards) -> None:
    client = MlflowClient(mlflow_server)
    name = "promotion-stress"
    before = {m.name for m in client.search_registered_models()}
    first, *candidates = _versions(client, mlflow_server, name, tiny_shards, 1 + 2 * ROUNDS)
    client.set_registered_model_alias(name, CHAMPION, first)
    figures = {first: 0.0} | {v: 4.0 * (i // 2 + 1) + 1 + i % 2 for i, v in enumerate(candidates)}
    job = {"model": name, "data_uri": tiny_shards, "digest": read_manifest(tiny_shards).digest, "margin": MARGIN,
           "figures": figures, "barrier": True}
    rounds: list[dict] = []
    started = time.monotonic()
    with busy_cores():
        for r in range(ROUNDS):
            pair = candidates[2 * r: 2 * r + 2][:: 1 if r % 2 else -1]  # the better one on either side
            for worker, version in zip(workers, pair):
                worker.send({**job, "promote": version})
            replies = [worker.next() for worker in workers]
            for worker, reply in zip(workers, replies):
                if "evaluated" in reply:
                    worker.send("go")
            replies = [worker.next() if "evaluated" in reply else reply for worker, reply in zip(workers, replies)]
            champion = client.get_registered_model(name).aliases.get(CHAMPION)
            rounds.append({"round": r + 1, "replies": dict(zip(pair, replies)), "champion": champion,
                           "promoted": [v for v, reply in zip(pair, replies) if reply.get("decision") == "promoted"],
                           "previous": rounds[-1]["champion"] if rounds else first})
    elapsed = time.monotonic() - started
    errors = [(x["round"], v, reply["error"]) for x in rounds for v, reply in x["replies"].items() if "error" in reply]
    replies = [reply for x in rounds for reply in x["replies"].values()]
    waits = [taken - asked for reply in replies for asked, taken in reply.get("waits", [])]
    print(f"\npromotion stress: {len(rounds)} rounds, {sum(len(x['promoted']) for x in rounds)} winners, "
          f"{len(errors)} errors, longest lease wait {max(waits, default=0):.2f}s, {elapsed:.0f}s")
    assert not errors, errors
    for x in rounds:
        assert x["champion"] is not None, x  # never absent
        assert len(x["promoted"]) == 1, x  # exactly one winner ...
        assert x["champion"] == x["promoted"][0], x  # ... and it is the champion
        assert figures[x["champion"]] >= figures[x["previous"] or first], x  # never a regression
        loser = next(reply for reply in x["replies"].values() if reply["decision"] != "promoted")
        assert loser["decision"] == "kept" and loser["champion_version"] == x["champion"], x
    assert len(rounds) == ROUNDS
    # Nothing else in the registry: only the model this test made, and every model has versions.
    after = {m.name for m in client.search_registered_models()}
    assert after - before == {name}
    assert all(client.search_model_versions(f"name='{m}'") for m in after)


def test_sigkilled_holder_blocks_the_next_promotion_at_most_30s(workers, mlflow_server, tiny_shards) -> None:
    """One process takes the lease and is SIGKILLed holding it; the other promotes next."""
    client = MlflowClient(mlflow_server)
    name = "promotion-sigkill"
    (version,) = _versions(client, mlflow_server, name, tiny_shards, 1)
    holder, next_one = workers
    holder.send({"hold": name})
    assert holder.next() == {"held": True}
    holder.kill()
    killed = time.monotonic()
    assert holder.proc.returncode == -signal.SIGKILL

    next_one.send({"promote": version, "model": name, "data_uri": tiny_shards, "margin": 0.0, "barrier": False,
                   "digest": read_manifest(tiny_shards).digest, "figures": {version: 50.0}})
    reply = next_one.next()
    assert "error" not in reply, reply
    wait = reply["waits"][0][1] - killed
    print(f"\nSIGKILLed holder: the next promotion took the lease {wait:.1f}s after the kill")
    assert reply["decision"] == "promoted" and client.get_registered_model(name).aliases[CHAMPION] == version
    assert 5.0 < wait <= 30.0  # it was really held (not free at once), and freed in time
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        assert prefect.read_global_concurrency_limit_by_name(limit_name(name)).active_slots == 0  # released
