"""swarm/discovery.py: the discovery policies the node's runners and the simulator both drive."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.discovery import (
    FEW_PEERS,
    FIRST_LOOKUPS,
    LOOKUP_FIRST,
    LOOKUP_RETRY,
    LOOKUP_SETTLED,
    MANIFEST_ASK_FANOUT,
    ConnectPolicy,
    LinkState,
    LookupSchedule,
    ManifestAsk,
    ProviderScores,
)


def ident(p: str) -> str:
    return p


ids = st.lists(st.sampled_from([f"p{i}" for i in range(30)]), max_size=40)


# --------------------------------------------------------------------------- ProviderScores


@given(
    ids,
    st.sets(st.sampled_from([f"p{i}" for i in range(30)])),
    st.sets(st.sampled_from([f"p{i}" for i in range(30)])),
    st.integers(0, 2**32),
)
def test_order_puts_recent_failures_last_and_connected_first(providers, failed, connected, seed):
    scores = ProviderScores()
    for pid in sorted(failed):
        scores.note_failed(pid, 100.0)
    out = scores.order(providers, 150.0, connected=connected, rng=random.Random(seed), key=ident)
    assert sorted(out) == sorted(providers)  # a permutation
    ranks = [(p in failed, p not in connected) for p in out]
    assert ranks == sorted(ranks)


@given(ids, st.integers(0, 2**32))
def test_order_keeps_the_lookup_order_across_groups_of_the_fanout(providers, seed):
    out = ProviderScores().order(providers, 0.0, connected=(), rng=random.Random(seed), key=ident)
    for g in range(0, len(providers), MANIFEST_ASK_FANOUT):
        assert sorted(out[g : g + MANIFEST_ASK_FANOUT]) == sorted(providers[g : g + MANIFEST_ASK_FANOUT])


def test_failures_are_forgotten_after_the_memory_and_beyond_the_limit():
    scores = ProviderScores(memory=10.0, limit=3)
    scores.note_failed("a", 0.0)
    assert scores.failed_recently("a", 10.0)
    assert not scores.failed_recently("a", 10.5)
    for pid in "bcde":
        scores.note_failed(pid, 20.0)
    assert len(scores) == 3 and not scores.failed_recently("b", 20.0)  # the oldest went first
    scores.note_answered("e")
    assert not scores.failed_recently("e", 20.0)


# --------------------------------------------------------------------------- ManifestAsk


@settings(max_examples=300)
@given(ids, st.sets(st.sampled_from([f"p{i}" for i in range(30)])), st.integers(1, 10), st.data())
def test_manifest_ask_properties(providers, stale, fanout, data):
    """Never more than ``fanout`` out; a recently failed provider is never asked while a fresh one
    is untried or out; each provider is asked at most once; once settled nothing new is asked and
    the cutoff is the grace after the first settled end; unsettled, every provider gets asked."""
    grace = 2.0
    plan = ManifestAsk(providers, stale=stale.__contains__, grace=grace, key=ident, fanout=fanout)
    unique = list(dict.fromkeys(providers))
    fresh = [p for p in unique if p not in stale]
    asked: list[str] = []
    settled, settled_at, now = False, None, 0.0

    def started(ps: list[str]) -> None:
        for p in ps:
            assert p not in asked
            if p in stale:  # no fresh one untried or still out
                assert set(fresh) <= set(asked) and not (set(plan.out) - {p}) & set(fresh)
            asked.append(p)
        assert len(plan.out) <= fanout

    started(plan.start(settled))
    while plan.out:
        now += data.draw(st.floats(0.0, 1.0))
        pid = data.draw(st.sampled_from(sorted(plan.out)))
        if not settled and data.draw(st.booleans()):
            settled, settled_at = True, now
        new = plan.finished(pid, now, settled)
        if settled:
            assert new == [] and plan.start(True) == []
            assert plan.cutoff == settled_at + grace
        started(new)
        if settled and plan.over(now) and plan.out:
            break  # cut off: the runner stops here
    assert plan.asked == len(asked)
    if not settled:
        assert sorted(asked) == sorted(unique)
        assert plan.cutoff == float("inf")


def test_manifest_ask_asks_stale_ones_only_after_every_fresh_one_ended():
    plan = ManifestAsk(["s1", "f1", "f2"], stale={"s1"}.__contains__, grace=0.25, key=ident, fanout=8)
    assert plan.start(False) == ["f1", "f2"]
    assert plan.finished("f1", 1.0, False) == []  # f2 still out
    assert plan.finished("f2", 2.0, False) == ["s1"]
    assert plan.finished("s1", 3.0, True) == [] and plan.over(3.0)


def test_manifest_ask_refuses_a_fanout_below_one():
    with pytest.raises(ValueError, match="fanout"):
        ManifestAsk(["a"], stale=lambda _: False, grace=1.0, key=ident, fanout=0)


# --------------------------------------------------------------------------- ConnectPolicy


@st.composite
def link_states(draw):
    peers = draw(st.sets(st.sampled_from([f"p{i}" for i in range(30)]), max_size=20))
    banned = draw(st.sets(st.sampled_from([f"p{i}" for i in range(30)]), max_size=5))
    return LinkState(
        useful_links=draw(st.integers(0, len(peers))),
        peers=peers,
        banned=banned,
        max_peers=draw(st.integers(0, 24)),
    )


@settings(max_examples=300)
@given(st.lists(st.tuples(ids, link_states()), min_size=1, max_size=12), st.integers(1, 20))
def test_connect_policy_properties(rounds, max_links):
    """Dials never exceed the room left (link budget, max_peers); never itself, a banned or a
    linked peer; a peer is dialled again only after a lookup named nothing untried; the next
    lookup follows the schedule."""
    policy = ConnectPolicy("me", key=ident, max_links=max_links)
    now, tried = 0.0, set()
    for n, (providers, links) in enumerate(rounds, 1):
        providers = [*providers, "me"]
        if n > 1 and all(p in tried for p in providers if p != "me" and p not in links.banned):
            tried &= set(links.peers)  # the retry: forget the tried ones we hold no link to
        step = policy.step(now, providers, links)
        room = min(max_links - links.useful_links, links.max_peers - len(links.peers))
        assert len(step.dials) <= max(0, room)
        assert len(set(step.dials)) == len(step.dials)
        for p in step.dials:
            assert p != "me" and p not in links.banned and p not in links.peers
            assert p not in tried
        tried |= set(step.dials)
        if n <= FIRST_LOOKUPS:
            assert step.next_lookup_at - now == pytest.approx(LOOKUP_FIRST)
        elif len(links.peers) < FEW_PEERS:
            assert step.next_lookup_at - now == pytest.approx(LOOKUP_RETRY)
        else:
            assert step.next_lookup_at - now == pytest.approx(LOOKUP_SETTLED)
        now = step.next_lookup_at


def test_connect_policy_dials_in_order_up_to_the_budget_and_retries_lost_peers():
    policy = ConnectPolicy("me", key=ident, max_links=2)
    empty = LinkState(0, frozenset(), frozenset(), 64)
    assert policy.step(0.0, ["a", "b", "c"], empty).dials == ["a", "b"]
    assert policy.step(0.3, ["a", "b", "c"], empty).dials == ["c"]
    # a lookup with nothing new: the tried ones we hold no link to are tried again
    # (our own record among them does not count as new)
    linked = LinkState(1, frozenset({"a"}), frozenset(), 64)
    assert policy.step(0.6, ["me", "a", "b", "c"], linked).dials == ["b"]


def test_lookup_schedule():
    s = LookupSchedule()
    assert [s.delay(n, 0) for n in range(1, FIRST_LOOKUPS + 2)] == [LOOKUP_FIRST] * FIRST_LOOKUPS + [
        LOOKUP_RETRY
    ]
    assert s.delay(FIRST_LOOKUPS + 1, FEW_PEERS) == LOOKUP_SETTLED


def test_discovery_imports_neither_trio_nor_libp2p():
    code = (
        "import sys, swarm.discovery\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p')\n"
        "       or m.startswith('swarm.net')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
