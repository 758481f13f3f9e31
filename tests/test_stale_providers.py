"""Stale providers (issue #12 item 1): the pure policies that keep providers that vanished (their
records still in the DHT) from holding a fetch by name. The in-process test with black-holed
providers is tests/adversarial/test_sec_discovery.py::test_vanished_providers_do_not_hold_the_manifest_choice;
the real-process figures come from scripts/bench_stale_providers.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.discovery import (
    LOOKUP_GRACE_FACTOR,
    LOOKUP_MIN_GRACE,
    MANIFEST_ASK_HEDGE,
    MANIFEST_VOTE_GRACE,
    MANIFEST_VOTE_GRACE_FACTOR,
    MANIFEST_VOTE_MIN_GRACE,
    ManifestAsk,
    lookup_grace,
)

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 5.0


def ident(p: str) -> str:
    return p


def run_plan(plan: ManifestAsk, answers: dict[str, float | None], fanout: int, hedge: float):
    """Drive ``plan`` as the node's runner does: providers in ``answers`` answer (a usable
    manifest) that many seconds after being asked, or never (None: the request fails after
    TIMEOUT, as the node's MANIFEST_ASK_TIMEOUT). Returns (the time the choice
    is made, the order asked, the stragglers), checking the invariants at every step."""
    now = 0.0
    asked: list[str] = []
    asked_at: dict[str, float] = {}
    settled = False

    def started(ps) -> None:
        for p in ps:
            assert p not in asked
            asked.append(p)
            asked_at[p] = now
        active = [p for p, t in plan.since.items() if now - t < hedge]
        assert len(active) <= fanout
        assert len(plan.out) <= plan.max_out

    started(plan.start(settled, now))
    for _ in range(10_000):
        if plan.over(now):
            break
        due = [(asked_at[p] + (answers[p] or TIMEOUT), p) for p in plan.out]
        nxt = min([*due, (plan.cutoff, None), (plan.wake_at, None)], key=lambda x: x[0])
        assert nxt[0] < math.inf, "the runner would wait forever"
        now = max(now, nxt[0])
        if nxt[1] is not None:
            settled = settled or answers[nxt[1]] is not None
            new = plan.finished(nxt[1], now, settled)
            assert not settled or new == []
            started(new)
        else:
            started(plan.start(settled, now))
    return now, asked, list(plan.out)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 20),
    st.integers(1, 10),
    st.floats(0.001, 1.0),
    st.floats(0.001, 0.5),
    st.data(),
)
def test_silent_providers_delay_the_choice_by_hedges_and_a_bounded_grace(n_silent, fanout, hedge, rtt, data):
    """``n_silent`` providers never answer, one answers ``rtt`` after it is asked, wherever it
    stands in the order: it is asked within ceil(n_silent / fanout) hedges (while max_out allows),
    and the choice is made at most the vote's grace (clamped between its bounds, in proportion to
    ``rtt``) after its answer. Nobody is asked twice; never more than ``fanout`` within a hedge."""
    pos = data.draw(st.integers(0, n_silent))
    names = [f"s{k}" for k in range(n_silent)]
    names.insert(pos, "live")
    answers: dict[str, float | None] = dict.fromkeys(names, None)
    answers["live"] = rtt
    plan = ManifestAsk(
        names,
        stale=lambda _: False,
        grace=MANIFEST_VOTE_GRACE,
        min_grace=MANIFEST_VOTE_MIN_GRACE,
        key=ident,
        fanout=fanout,
        hedge=hedge,
        max_out=3 * fanout,
    )
    took, asked, stragglers = run_plan(plan, answers, fanout, hedge)
    grace = min(MANIFEST_VOTE_GRACE, max(MANIFEST_VOTE_MIN_GRACE, MANIFEST_VOTE_GRACE_FACTOR * rtt))
    assert plan.cutoff == pytest.approx(plan.settled_at + grace)
    if pos < 3 * fanout:  # reached before max_out is full of silent ones
        hedges = pos // fanout
        assert plan.settled_at <= hedges * hedge + rtt + 1e-9
    assert took <= plan.settled_at + grace + 1e-9
    assert "live" in asked and "live" not in stragglers
    assert set(stragglers) <= {p for p in asked if p != "live"}


def test_eight_silent_providers_asked_first_cost_one_hedge_and_the_min_grace():
    """The bench's case: eight vanished providers (connected, so ordered first) and the live one
    ninth, answering in 10 ms: asked after one hedge, the choice made MANIFEST_VOTE_MIN_GRACE
    after its answer (not MANIFEST_VOTE_GRACE, nor the request timeout)."""
    names = [f"s{k}" for k in range(8)] + ["live"]
    answers: dict[str, float | None] = dict.fromkeys(names, None)
    answers["live"] = 0.01
    plan = ManifestAsk(
        names,
        stale=lambda _: False,
        grace=MANIFEST_VOTE_GRACE,
        min_grace=MANIFEST_VOTE_MIN_GRACE,
        key=ident,
        hedge=MANIFEST_ASK_HEDGE,
    )
    took, asked, stragglers = run_plan(plan, answers, 8, MANIFEST_ASK_HEDGE)
    assert asked[-1] == "live" and sorted(stragglers) == sorted(names[:8])
    assert took == pytest.approx(MANIFEST_ASK_HEDGE + 0.01 + MANIFEST_VOTE_MIN_GRACE)


def test_without_hedge_or_min_grace_the_plan_is_as_before():
    """The simulator's use (no ``hedge``, no ``min_grace``): a slot is freed only by an end, the
    grace is ``grace``."""
    plan = ManifestAsk(["a", "b", "c"], stale=lambda _: False, grace=2.0, key=ident, fanout=2)
    assert plan.start(False) == ["a", "b"] and plan.wake_at == math.inf
    assert plan.start(False, 100.0) == []
    assert plan.finished("a", 1.0, True) == [] and plan.cutoff == 3.0


def test_stale_ones_wait_for_fresh_ones_to_end_or_outlast_the_hedge():
    plan = ManifestAsk(["s1", "f1"], stale={"s1"}.__contains__, grace=1.0, key=ident, hedge=0.5)
    assert plan.start(False, 0.0) == ["f1"]
    assert plan.wake_at == 0.5
    assert plan.start(False, 0.4) == []
    assert plan.start(False, 0.5) == ["s1"]  # f1 silent for a hedge: the stale one is tried
    assert plan.finished("s1", 0.6, True) == [] and plan.out == {"f1": True}


def test_hedge_must_be_positive():
    with pytest.raises(ValueError, match="hedge"):
        ManifestAsk(["a"], stale=lambda _: False, grace=1.0, key=ident, hedge=0.0)


@given(st.floats(0.0, 100.0))
def test_lookup_grace_is_in_proportion_with_a_floor(first):
    g = lookup_grace(first)
    assert g >= LOOKUP_MIN_GRACE
    assert g == max(LOOKUP_MIN_GRACE, LOOKUP_GRACE_FACTOR * first)
