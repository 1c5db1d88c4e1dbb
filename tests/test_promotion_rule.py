"""The promotion rule, without servers: ``beats_champion`` at its boundaries, ``promote`` deciding
by it (MLflow, the shards and the evaluation replaced by in-memory stand-ins), and which failed
releases of the promotion lease are sent again (flows.lease; the lease itself runs on a real server
in test_promote and test_promotion_stress).

Rule: promote when there is no champion, or when candidate_mR > champion_mR and
candidate_mR - champion_mR >= margin. The figures below are exact binary fractions, so "exactly at
the margin" is exact; ``math.nextafter`` gives the nearest float just below it.
"""

from __future__ import annotations

import contextlib
import math
import time

import httpx
import pytest

from flows import lease
from msa.runtime import registry
from msa.runtime.registry import KEPT, PROMOTED, beats_champion

BELOW = -math.inf  # nextafter direction: the float just below
ABOVE = math.inf
UNCONTENDED = lambda: contextlib.nullcontext(math.inf)  # noqa: E731 - one promoter: a lease never waited on


@pytest.mark.parametrize("margin", [0.0, 0.5, 2.5])
@pytest.mark.parametrize("mR", [0.0, 37.25, 50.0, 100.0])
def test_equal_mR_never_promotes(mR, margin):
    assert beats_champion(mR, mR, margin) is False


def test_exactly_at_the_margin_promotes():
    assert beats_champion(52.5, 50.0, 2.5) is True
    assert beats_champion(50.125, 50.0, 0.125) is True


def test_just_below_the_margin_is_kept():
    assert beats_champion(math.nextafter(52.5, BELOW), 50.0, 2.5) is False  # candidate a hair short
    assert beats_champion(52.5, 50.0, math.nextafter(2.5, ABOVE)) is False  # margin a hair higher
    assert beats_champion(52.5, 50.0, 2.75) is False


def test_any_improvement_promotes_with_margin_zero_and_worse_never_does():
    assert beats_champion(math.nextafter(50.0, ABOVE), 50.0, 0.0) is True
    assert beats_champion(60.0, 50.0, 0.0) is True
    assert beats_champion(math.nextafter(50.0, BELOW), 50.0, 0.0) is False
    assert beats_champion(10.0, 50.0, 0.0) is False


@pytest.mark.parametrize("margin", [0.0, 5.0, 1000.0])
def test_no_champion_promotes_whatever_the_figures(margin):
    assert beats_champion(0.0, None, margin) is True
    assert beats_champion(99.0, None, margin) is True


@pytest.mark.parametrize("margin", [-0.5, -1e-9, math.nan])
def test_negative_or_nan_margin_is_refused(margin):
    with pytest.raises(ValueError, match="promotion margin must be >= 0"):
        beats_champion(60.0, 50.0, margin)
    with pytest.raises(ValueError, match="promotion margin must be >= 0"):
        beats_champion(60.0, None, margin)
    with pytest.raises(ValueError, match="promotion margin must be >= 0"):
        # refused before any server is contacted
        registry.promote("1", margin=margin, mlflow_uri="http://127.0.0.1:9", lease=UNCONTENDED)


# --------------------------------------------------------------------------------------------------
# promote() decides by the rule: the same boundaries through the whole decision, alias and all


class _Registry:
    """In-memory stand-ins for what ``promote`` reaches: versions with fixed mR, the champion alias."""

    def __init__(self, figures: dict[str, float], champion: str | None):
        self.figures, self.champion, self.recorded = figures, champion, []

    def install(self, monkeypatch) -> None:
        import msa.runtime.datasets as datasets

        outer = self

        class Client:
            def get_model_version(self, name, version):
                assert version in outer.figures

            def set_registered_model_alias(self, name, alias, version):
                assert alias == registry.CHAMPION
                outer.champion = version

        monkeypatch.setattr(registry, "client", lambda mlflow_uri=None: Client())
        monkeypatch.setattr(registry, "_resolve_data", lambda c, m, uri, digest: ("mem://shards", "d" * 64))
        monkeypatch.setattr(datasets, "verify_dataset", lambda uri, opts=None: "d" * 64)
        monkeypatch.setattr(registry, "evaluate_version", lambda v, uri, **kw: {"mR": self.figures[v]})
        monkeypatch.setattr(registry, "champion_version", lambda model_name=None: self.champion)
        monkeypatch.setattr(registry, "_record", self.recorded.append)


@pytest.mark.parametrize(
    ("candidate_mR", "champion_mR", "margin", "expected"),
    [
        (50.0, 50.0, 0.0, KEPT),  # equal: kept, even with no margin
        (52.5, 50.0, 2.5, PROMOTED),  # exactly at the margin
        (math.nextafter(52.5, BELOW), 50.0, 2.5, KEPT),  # just below it
        (49.0, 50.0, 0.0, KEPT),  # worse
        (50.0, None, 5.0, PROMOTED),  # no champion
    ],
)
def test_promote_moves_the_alias_exactly_when_the_rule_says(monkeypatch, candidate_mR, champion_mR, margin, expected):
    figures = {"2": candidate_mR} | ({} if champion_mR is None else {"1": champion_mR})
    fake = _Registry(figures, champion=None if champion_mR is None else "1")
    fake.install(monkeypatch)
    result = registry.promote("2", margin=margin, model_name="rule-test", lease=UNCONTENDED)
    assert result.decision == expected, result.reason
    assert fake.champion == ("2" if expected == PROMOTED else ("1" if champion_mR is not None else None))
    assert result.candidate_mR == candidate_mR and result.champion_mR == champion_mR and result.margin == margin
    assert fake.recorded == [result]


def test_promote_has_no_default_lease():
    with pytest.raises(TypeError, match="lease"):  # no silent unguarded commit
        registry.promote("1", mlflow_uri="http://127.0.0.1:9")


def test_no_alias_write_once_the_lease_deadline_has_passed(monkeypatch):
    """Past its lease's write deadline a holder lets go without writing, and tries again."""
    fake = _Registry({"1": 50.0, "2": 60.0}, champion="1")
    fake.install(monkeypatch)
    deadlines, champion_at_entry = iter([-math.inf, math.inf]), []

    @contextlib.contextmanager
    def lease():
        champion_at_entry.append(fake.champion)
        yield next(deadlines)

    result = registry.promote("2", model_name="rule-test", lease=lease)
    assert champion_at_entry == ["1", "1"]  # the first holding wrote nothing
    assert result.decision == PROMOTED and result.attempts == 2 and fake.champion == "2"


class _Releases:
    """A Prefect client whose ``release_concurrency_slots`` answers ``replies`` in turn (None: done)."""

    def __init__(self, *replies: BaseException | None):
        self.replies, self.calls = list(replies), 0

    def release_concurrency_slots(self, names, slots, occupancy_seconds) -> None:
        self.calls += 1
        reply = self.replies.pop(0)
        if reply is not None:
            raise reply


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect/api/v2/concurrency_limits/decrement")
    return httpx.HTTPStatusError(str(code), request=request, response=httpx.Response(code, request=request))


@pytest.mark.parametrize(("replies", "calls"), [
    ((None,), 1),
    ((_status(503), _status(503), None), 3),  # the database was busy and rolled back: sent again
    ((_status(500),), 1),  # anything else may have happened: a second decrement could free the next holder
    ((httpx.ReadTimeout("reply lost"),), 1),
])
def test_release_is_resent_only_after_a_rolled_back_503(replies, calls, monkeypatch):
    monkeypatch.setattr(lease, "POLL_S", 0.0)
    client = _Releases(*replies)
    lease._release(client, "msa-promotion:m", asked=time.monotonic(), deadline=time.monotonic() + 60)
    assert client.calls == calls


def test_release_past_the_write_budget_is_never_sent(monkeypatch):
    monkeypatch.setattr(lease, "POLL_S", 0.0)
    client = _Releases(None)
    lease._release(client, "msa-promotion:m", asked=time.monotonic() - 30, deadline=time.monotonic() - 1)
    assert client.calls == 0
