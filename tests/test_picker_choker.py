"""Picker and choker: properties as the spec."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.choker import Choker, PeerSlot, SlotSizer
from swarm.picker import ENDGAME_MAX_DUPLICATES, Picker


@st.composite
def swarms(draw):
    n = draw(st.integers(1, 60))
    wanted = draw(st.sets(st.integers(0, n - 1), min_size=1))
    priority = draw(st.sets(st.sampled_from(sorted(wanted))))
    npeers = draw(st.integers(1, 6))
    peers = [draw(st.sets(st.integers(0, n - 1))) for _ in range(npeers)]
    seed = draw(st.integers(0, 2**32))
    return n, wanted, priority, peers, seed


@settings(max_examples=300, deadline=None)
@given(swarms(), st.data())
def test_picker_never_asks_for_what_the_peer_lacks_or_we_have_and_terminates(sw, data):
    n, wanted, priority, peers, seed = sw
    rng = random.Random(seed)
    p = Picker(n, wanted, priority, rng=rng)
    for h in peers:
        p.peer_has(h)
    outstanding: list[set[int]] = [set() for _ in peers]
    obtainable = wanted & set().union(*peers)
    steps = 0
    while not (obtainable <= p.have):
        steps += 1
        assert steps < 10 * (n + 1) * len(peers) + 100, "picker did not terminate"
        k = data.draw(st.integers(0, len(peers) - 1))
        if outstanding[k] and data.draw(st.booleans()):
            # complete one outstanding request
            i = min(outstanding[k])
            outstanding[k].discard(i)
            p.request_ended(i)
            p.got(i)
            for o in outstanding:  # endgame copies elsewhere are cancelled
                if i in o:
                    o.discard(i)
                    p.request_ended(i)
            continue
        picks = p.pick(peers[k], outstanding[k], data.draw(st.integers(1, 4)))
        endgame = p.in_endgame()
        for i in picks:
            assert i in peers[k], "asked a peer for a piece it lacks"
            assert i not in p.have, "asked for a piece we have"
            assert i in wanted
            assert i not in outstanding[k], "asked one peer twice for a piece"
            if not endgame:
                assert i not in p.in_flight, "duplicate request outside endgame"
            if i not in priority and priority & obtainable - p.have:
                raise AssertionError("weight piece asked before configs were done")
            p.requested(i)
            assert p.in_flight[i] <= ENDGAME_MAX_DUPLICATES
            outstanding[k].add(i)
        if not picks and not any(outstanding) and not any(p.pick(h, set(), 1) for h in peers):
            # Nothing requestable from anyone and nothing pending: only unobtainable pieces may
            # remain in the current class.
            assert not (p.missing & set().union(*peers))
            break


def test_random_first_then_rarest():
    p = Picker(100, range(100), rng=random.Random(1))
    p.peer_has(range(100))
    p.peer_has(range(50))  # pieces 50..99 are rarer
    for i in range(4):
        p.got(i)
    picks = p.pick(set(range(100)), set(), 10)
    assert all(i >= 50 for i in picks)


def slots(ids, **kw):
    return [PeerSlot(i, **kw) for i in ids]


@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.floats(0, 100), st.floats(0, 1e6), st.integers(0, 3)),
        max_size=20,
    ),
    st.booleans(),
    st.floats(0, 200),
    st.booleans(),
    st.booleans(),
)
def test_choker_never_exceeds_slots_and_only_unchokes_interested(nslots, specs, seeding, now, needy, feed):
    ch = Choker(nslots, hold=2.0, needy_first=needy, feed_empty=feed)
    peers = [
        PeerSlot(f"p{k}", interested=i, unchoked=u, since=s, down_rate=r, pieces=n)
        for k, (i, u, s, r, n) in enumerate(specs)
    ]
    unchoke, choke = ch.rechoke(peers, now, seeding=seeding)
    ids_c = {p.peer_id for p in choke}
    for p in unchoke:
        assert p.interested and not p.unchoked
    for p in choke:
        assert p.unchoked
    after = {p.peer_id for p in peers if p.unchoked and p.peer_id not in ids_c} | {p.peer_id for p in unchoke}
    assert len(after) <= max(nslots, sum(1 for p in peers if p.unchoked and p.interested))
    assert all(p.interested for p in peers if p.peer_id in after)
    fill = ch.fill(peers, now)
    assert sum(1 for p in peers if p.unchoked) + len(fill) <= max(nslots, sum(1 for p in peers if p.unchoked))


def test_seeding_rotation_serves_everyone_in_turn():
    ch = Choker(2, hold=1.0)
    peers = slots([f"p{i}" for i in range(6)], interested=True)
    served = set()
    now = 0.0
    rng = random.Random(5)
    for s in ch.fill(peers, now):
        s.unchoked, s.since, s.order = True, now, now + rng.uniform(0, 1)
    for _ in range(10):
        now += 1.0
        unchoke, choke = ch.rechoke(peers, now, seeding=True)
        for s in choke:  # as the engine does: wait order = since + jitter of up to one hold
            s.unchoked, s.since, s.order = False, now, now + rng.uniform(0, 1)
        for s in unchoke:
            s.unchoked, s.since, s.order = True, now, now + rng.uniform(0, 1)
        served |= {p.peer_id for p in peers if p.unchoked}
        assert sum(p.unchoked for p in peers) == 2
    assert served == {p.peer_id for p in peers}


def test_downloading_reciprocates_best_senders():
    ch = Choker(3, hold=1.0)
    peers = [
        PeerSlot("fast", interested=True, unchoked=True, down_rate=100.0),
        PeerSlot("mid", interested=True, unchoked=False, down_rate=50.0),
        PeerSlot("zero1", interested=True, unchoked=True, down_rate=0.0, since=0.0),
        PeerSlot("zero2", interested=True, unchoked=False, down_rate=0.0, since=0.0),
    ]
    unchoke, choke = ch.rechoke(peers, 10.0, seeding=False)
    result = {p.peer_id for p in peers if p.unchoked} - {p.peer_id for p in choke}
    result |= {p.peer_id for p in unchoke}
    assert {"fast", "mid"} <= result
    assert len(result) == 3


def test_equal_rarity_in_file_order_until_contended():
    p = Picker(64, range(64), rng=random.Random(1))
    p.peer_has(range(64))
    for i in (40, 41, 42, 43):  # past the random first pieces
        p.got(i)
    everything = set(range(64))
    assert p.pick(everything, (), 6) == [0, 1, 2, 3, 4, 5]
    p.peer_has(range(3))  # pieces 0-2 are now less rare: the rarest come first, still in order
    assert p.pick(everything, (), 3) == [3, 4, 5]
    p.contended = True  # a peer rejected us: ties at random, so fetchers spread out
    picks = [tuple(p.pick(everything, (), 4)) for _ in range(5)]
    assert len(set(picks)) > 1
    assert all(not set(x) & {0, 1, 2} for x in picks)  # rarest first still holds


def test_seeds_serving_the_same_waiting_peers_do_not_herd():
    """Sixteen leechers linked to four seeds became interested at the same moment. Ordered by
    wait time alone (ties by peer id) every seed unchoked the same four and the other twelve got
    nothing (ENGINE_REQUESTS.md A1: an edge node waited 24 s, then was served by 14 seeds at
    once). Keyed by each seed's own rng (``Choker.wait_key``), the seeds serve different peers;
    seeded rngs keep it reproducible."""
    served = []
    for seed in range(4):
        ch = Choker(slots=4, hold=2.0, rng=random.Random(seed))
        slots = [
            PeerSlot(f"p{k:02d}", interested=True, since=10.0, order=ch.wait_key(10.0)) for k in range(16)
        ]
        served.append({s.peer_id for s in ch.fill(slots, 10.0)})
    assert all(len(s) == 4 for s in served)
    assert len(set().union(*served)) >= 10, served  # in lock-step it would be 4
    unkeyed = [
        {
            s.peer_id
            for s in Choker(slots=4).fill(
                [PeerSlot(f"p{k:02d}", interested=True, since=10.0, order=10.0) for k in range(16)], 10.0
            )
        }
        for _ in range(4)
    ]
    assert len(set().union(*unkeyed)) == 4  # the herd the key breaks up


def _feed(sizer, capacity, per_slot, steps=60, waiting=50, piece=1 << 20):
    """Drive a sizer once per second against an upload of ``capacity`` bytes/s whose peers take
    at most ``per_slot`` bytes/s each; returns the slot counts it chose."""
    up = pieces = 0
    seen = []
    for t in range(steps):
        rate = min(capacity, per_slot * sizer.slots)
        up += int(rate)
        pieces += max(1, int(rate) // piece)
        seen.append(sizer.update(float(t), up, pieces, seeding=True, waiting=waiting))
    return seen


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(
            st.floats(0, 1e4),
            st.integers(0, 1 << 30),
            st.integers(0, 1000),
            st.booleans(),
            st.integers(0, 64),
        ),
        max_size=40,
    ),
)
def test_slot_sizer_stays_within_its_range_and_is_base_when_not_seeding(base, calls):
    sizer = SlotSizer(base, 8 * base)
    now = up = pieces = 0
    for dt, db, dp, seeding, waiting in calls:
        now, up, pieces = now + dt, up + db, pieces + dp
        n = sizer.update(now, up, pieces, seeding=seeding, waiting=waiting)
        assert base <= n <= 8 * base
        if not seeding:
            assert n == base


def test_slot_sizer_opens_slots_when_peers_cannot_take_its_upload():
    """A 10 Gbit/s seed whose peers each take at most 500 Mbit/s: the rate grows with every slot
    it adds, so it ends at ``most`` (``heterogeneous.toml``: a datacenter node serving edge nodes)."""
    seen = _feed(SlotSizer(4, 32), capacity=1.25e9, per_slot=62.5e6)
    assert seen[-1] == 32


def test_slot_sizer_keeps_few_slots_when_its_upload_is_the_bottleneck():
    """A seed whose own upload is full with ``base`` slots gains nothing from more: each try is
    undone, tries come rarer (backoff), and most of the time it serves ``base`` peers, so first
    copies of pieces come out whole at the full rate (``flash_crowd.toml``'s worker)."""
    seen = _feed(SlotSizer(4, 32), capacity=125e6, per_slot=125e6, steps=120)
    assert seen[-1] in (4, 8)
    assert sum(n == 4 for n in seen) >= 0.8 * len(seen)
    assert max(seen) <= 8


def test_slot_sizer_does_not_grow_without_waiting_peers():
    seen = _feed(SlotSizer(4, 32), capacity=1.25e9, per_slot=1e6, waiting=0)
    assert set(seen) == {4}


def test_choker_size_slots_counts_waiting_peers_and_sets_slots():
    ch = Choker(2, hold=2.0)
    peers = slots([f"p{i}" for i in range(6)], interested=True)
    up = 0
    for t in range(30):
        up += int(min(1e9, 10e6 * ch.slots))
        ch.size_slots(peers, float(t), up, 10 * (t + 1), seeding=True)
    assert ch.slots > 2
    assert ch.size_slots(peers, 31.0, up, 400, seeding=False) == 2


def test_needy_first_gives_the_optimistic_slot_to_the_peer_with_fewest_pieces():
    """Downloading with ``needy_first``: three peers send to us and keep regular slots; the
    optimistic slot goes to the interested peer holding the fewest pieces, not the longest
    waiter (which it does without the flag)."""
    senders = slots(["s1", "s2", "s3"], interested=True, unchoked=True, since=5.0, down_rate=1e6)
    waiting = [
        PeerSlot("old", interested=True, since=0.0, pieces=9),
        PeerSlot("empty", interested=True, since=4.0, pieces=0),
        PeerSlot("some", interested=True, since=2.0, pieces=3),
    ]
    for needy, want in ((True, "empty"), (False, "old")):
        ch = Choker(4, hold=2.0, needy_first=needy)
        unchoke, choke = ch.rechoke(senders + waiting, 10.0, seeding=False)
        assert [p.peer_id for p in unchoke] == [want] and not choke


def test_feed_empty_gives_slots_to_peers_holding_nothing_before_senders():
    """Downloading with ``feed_empty``: interested peers holding no piece take slots before the
    peers that send to us (their upload is idle until they get one), the optimistic slot stays;
    a free slot goes to the peer holding the fewest pieces. Without the flag the senders keep
    their regular slots and a free slot goes to the longest waiter."""
    senders = slots(["s1", "s2", "s3"], interested=True, unchoked=True, since=5.0, down_rate=1e6)
    for p in senders:
        p.pieces = 5
    waiting = [
        PeerSlot("old", interested=True, since=0.0, order=0.0, pieces=9),
        PeerSlot("e1", interested=True, since=4.0, order=4.0, pieces=0),
        PeerSlot("e2", interested=True, since=3.0, order=3.0, pieces=0),
    ]
    for feed, want_in, want_out in ((True, {"e1", "e2", "old"}, {"s2", "s3"}), (False, {"old"}, set())):
        ch = Choker(4, hold=2.0, feed_empty=feed)
        unchoke, choke = ch.rechoke(senders + waiting, 10.0, seeding=False)
        assert {p.peer_id for p in unchoke} == want_in
        assert {p.peer_id for p in choke} == want_out
    ch = Choker(4, hold=2.0, feed_empty=True)
    assert [p.peer_id for p in ch.fill(waiting, 10.0)] == ["e2", "e1", "old"]
