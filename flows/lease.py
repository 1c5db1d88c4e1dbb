"""The promotion lease: a global concurrency limit of 1 per registered model on the Prefect server.

``msa.runtime.registry.promote`` holds a lease around its commit (re-read the champion, compare,
move the alias); ``promotion_lease`` is the one every promotion path passes (flows/promote_msa.py,
flows/retrain_msa.py). The limit is ``msa-promotion:<model name>``, created on first use.

Why a limit whose slot decays rather than Prefect's leased slots (``prefect.concurrency.sync.
concurrency``): the API refuses leases shorter than 60 s and the server's repossessor sweeps expired
ones every 15 s, so a holder killed with SIGKILL would block the others for 60-75 s. With
``slot_decay_per_second = 1 / HOLD_S`` a taken slot frees itself HOLD_S seconds after it was taken
(measured on Prefect 3.9.1: 20.2 s, also while another caller kept asking for it), and the commit it
guards takes well under a second. Taking the slot is the server's conditional UPDATE
(``active_slots + 1 <= limit``), so exactly one of two callers gets it; the limit lives in the
Prefect database, so it also serialises processes that each run Prefect's ephemeral local server
against one PREFECT_HOME.

The holder's side of the bargain: it sends its alias write and its release only within
WRITE_BUDGET_S of asking for the slot (the deadline this lease yields to ``promote``); past that it
walks away and lets the slot free itself, because a late release could free a slot that has already
passed to the next holder. For the same reason the release is sent once, without the Prefect
client's retries: a retried decrement whose first reply was lost would free the next holder's slot.
Only a 503 is sent again: the server answers it when its database was busy and the decrement rolled back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.types.names import BANNED_CHARACTERS

if TYPE_CHECKING:  # a holder needs only Prefect, not MLflow
    from msa.runtime.registry import CommitLease

log = logging.getLogger("flows.lease")

LIMIT_PREFIX = "msa-promotion:"
HOLD_S = 20.0  # a taken slot frees itself this long after it was taken (a SIGKILLed holder's cost)
WRITE_BUDGET_S = 10.0  # the holder writes only this long after asking; the rest is the server's margin
POLL_S = 0.25  # mean wait between two asks for a busy slot
LIMIT = {"limit": 1, "slot_decay_per_second": 1.0 / HOLD_S, "active": True}


def limit_name(model_name: str) -> str:
    """The concurrency limit that serialises ``model_name``'s promotions."""
    banned = [ch for ch in BANNED_CHARACTERS if ch in model_name]
    if banned:
        raise ValueError(f"registered model name {model_name!r} contains {''.join(banned)!r}, which Prefect "
                         "refuses in concurrency limit names: no promotion lease can be named after it")
    return f"{LIMIT_PREFIX}{model_name}"


def promotion_lease(model_name: str, *, timeout_s: float = 300.0) -> CommitLease:
    """The commit lease for ``model_name`` (``registry.promote``'s ``lease``); TimeoutError after
    ``timeout_s`` of waiting for the slot."""
    name = limit_name(model_name)
    return lambda: _hold(name, timeout_s)


def _ensure_limit(client: SyncPrefectClient, name: str) -> None:
    """Create the limit, or put back its settings when someone changed them (a limit above 1 or an
    inactive one would let two commits in)."""
    try:
        found = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, **LIMIT))
            return
        except ObjectAlreadyExists:  # another promotion created it first
            found = client.read_global_concurrency_limit_by_name(name)
    if {"limit": found.limit, "slot_decay_per_second": found.slot_decay_per_second, "active": found.active} != LIMIT:
        log.warning("concurrency limit %s had limit %s, slot decay %s/s, active %s: restoring %s", name,
                    found.limit, found.slot_decay_per_second, found.active, LIMIT)
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**LIMIT))


@contextmanager
def _hold(name: str, timeout_s: float) -> Iterator[float]:
    """Hold the slot of ``name``; yields the ``time.monotonic()`` deadline for the holder's writes."""
    with get_client(sync_client=True) as client:
        try:
            _ensure_limit(client, name)
        except httpx.ConnectError as exc:
            raise RuntimeError(f"promotion takes its commit lease on the Prefect server at "
                               f"{PREFECT_API_URL.value() or '(ephemeral)'}, which is unreachable: {exc}") from exc
        started = time.monotonic()
        while True:
            asked = time.monotonic()  # the slot was taken after this, so it cannot free before asked + HOLD_S
            try:
                if not client.increment_concurrency_slots([name], 1, "concurrency").json():
                    raise RuntimeError(f"concurrency limit {name} was deleted while a promotion asked for it")
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != httpx.codes.LOCKED:
                    raise
            if asked - started > timeout_s:
                raise TimeoutError(f"promotion lease {name} still busy after {timeout_s:.0f}s")
            time.sleep(random.uniform(0.5, 1.5) * POLL_S)
        deadline = asked + WRITE_BUDGET_S
        log.info("promotion lease %s taken after %.2fs", name, asked - started)
        try:
            yield deadline
        finally:
            _release(client, name, asked, deadline)


def _release(client: SyncPrefectClient, name: str, asked: float, deadline: float) -> None:
    """Give the slot back, only before ``deadline``. A 503 is retried: it is the server's reply to a
    database that was busy (SQLite's SQLITE_BUSY, ``is_client_retryable_exception`` in Prefect's server),
    whose transaction rolled back, so the decrement did not happen and cannot happen twice. (On PostgreSQL
    a connection lost during the commit also answers 503; that the commit went through then is possible
    but would need the database to fail in the release's last milliseconds.) Any other failure is left
    to the slot's decay."""
    while time.monotonic() < deadline:
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                client.release_concurrency_slots([name], 1, max(time.monotonic() - asked, 0.1))
            return
        except httpx.HTTPError as exc:  # without a reply the decrement may have happened: never sent again
            rolled_back = (isinstance(exc, httpx.HTTPStatusError)
                           and exc.response.status_code == httpx.codes.SERVICE_UNAVAILABLE)
            if not rolled_back:
                log.warning("releasing %s failed (%s): its slot frees itself within %.0fs", name, exc, HOLD_S)
                return
            time.sleep(random.uniform(0.5, 1.5) * POLL_S)
    log.warning("promotion lease %s held past its %.0fs write budget: not released, its slot "
                "frees itself within %.0fs of being taken", name, WRITE_BUDGET_S, HOLD_S)
