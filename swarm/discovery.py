"""How a fetch finds its peers: the decisions, without I/O.

Three small state machines, driven by whoever owns the clock and the sockets: the node's trio
runners (``swarm/node/vote.py``: ``_resolve``, ``_ask_in_turn``; ``swarm/node/fetch.py``:
``_connect_loop``) and the simulator's timeline (``simulations/sim.py``) call the very same objects,
so what the simulator measures is what the node runs. Nothing here imports trio or libp2p, reads a
clock or opens a socket: time comes in as ``now`` (seconds, any monotonic origin), randomness as a
``random.Random``.

- ``ProviderScores``: which providers failed us lately (asked last, for a while).
- ``ManifestAsk``: which providers to ask for the manifest next, and when to stop waiting.
- ``ConnectPolicy``: which providers to dial after each lookup, and when to look up again.

Providers are any objects; a ``key`` function gives their peer id (``PeerAddr.peer_id`` in the node,
a simulated node's ``id`` in the simulator).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from typing import Any, Generic, TypeVar

import attrs

T = TypeVar("T")

MANIFEST_ASK_FANOUT = 8
"""Providers asked for manifests at once; more adds load without changing the vote much."""
MANIFEST_STRAGGLER_GRACE = 0.25
"""Seconds a fetch pinned to a manifest hash waits for providers still out once the manifest is
in (any answer is as good as eight): providers that vanished (their records live 48 h in the DHT)
would otherwise hold the fetch for the node's MANIFEST_ASK_TIMEOUT. Connected providers answer in
ms."""
MANIFEST_VOTE_GRACE = 2.0
"""The most a fetch by name waits for providers still out once a usable manifest is in, where the
other answers count (the majority vote; the newest release under trusted-publishers): long enough
for providers that need a dial across a WAN to answer, short of the node's MANIFEST_ASK_TIMEOUT.
The node waits less (``MANIFEST_VOTE_MIN_GRACE``, ``MANIFEST_VOTE_GRACE_FACTOR``)."""
MANIFEST_VOTE_MIN_GRACE = 0.1
"""The least a fetch by name waits for the others once a usable manifest is in."""
MANIFEST_VOTE_GRACE_FACTOR = 3.0
"""A fetch by name waits for the others this many times as long as the first usable answer took
from its request (at least MANIFEST_VOTE_MIN_GRACE, at most MANIFEST_VOTE_GRACE): providers as
near as the first one answer in about the same time, a provider that answers never (vanished: no
FIN, no RST; its record lives on in the DHT for 48 h) holds the fetch no longer than that
(issue #12)."""
MANIFEST_ASK_HEDGE = 0.05
"""Seconds after which a provider that has not answered the manifest request no longer holds one
of the MANIFEST_ASK_FANOUT places: the next provider is asked too (the slow one stays out). So
eight vanished providers asked first delay the one that answers by this much, not by the node's
MANIFEST_ASK_TIMEOUT."""
MANIFEST_ASK_MAX_OUT = 3 * MANIFEST_ASK_FANOUT
"""Manifest requests out at once, slow ones included."""
PROVIDER_FAILURE_MEMORY = 600.0
"""Seconds a provider that failed to answer or to be dialled is asked last; then it is forgiven
(made-up provider records, vanished peers, peers that were only busy)."""
MAX_REMEMBERED_FAILURES = 4096
"""Providers remembered as failing; the oldest is forgotten first (made-up ids are free)."""
LOOKUP_FIRST = 0.3
"""Seconds between the first DHT lookups of a fetch, while fellow fetchers are announcing."""
FIRST_LOOKUPS = 4
"""Lookups made LOOKUP_FIRST apart at the start of a fetch (a flash crowd announces in ~1 s)."""
LOOKUP_RETRY = 1.0
"""Seconds between DHT lookups while a fetch has too few peers."""
FEW_PEERS = 4
"""Below this many linked peers a fetch looks up every LOOKUP_RETRY, else every LOOKUP_SETTLED."""
LOOKUP_SETTLED = 5.0
"""Seconds between DHT lookups of a fetch with enough peers (it only looks for better ones)."""
LOOKUP_MIN_GRACE = 0.05
"""The least a provider lookup goes on once one DHT peer has named providers (``lookup_grace``)."""
LOOKUP_GRACE_FACTOR = 1.0
"""A provider lookup goes on this many times as long as the first answer naming providers took
(at least LOOKUP_MIN_GRACE), then returns what it has: DHT peers that vanished (no FIN, no RST;
they stay in routing tables until a refresh drops them) would otherwise hold it to its timeout.
The connect loop looks up again (``LookupSchedule``) for providers that came late."""
LOOKUP_HEDGE = 0.05
"""Seconds a GET_PROVIDERS request without an answer holds one of the lookup's ALPHA places; then
the next DHT peer is asked too (the request goes on)."""
MAX_LINKS_PER_FETCH = 16
"""Outbound links a fetch opens; inbound ones from other fetchers come on top."""


def lookup_grace(first_answer_after: float) -> float:
    """Seconds a provider lookup goes on once, ``first_answer_after`` seconds in, a DHT peer
    named providers."""
    return max(LOOKUP_MIN_GRACE, LOOKUP_GRACE_FACTOR * max(0.0, first_answer_after))


def _peer_id(p: Any) -> str:
    return p.peer_id


# --------------------------------------------------------------------------- failure memory


class ProviderScores:
    """Providers that failed us (no answer, no dial) in the last ``memory`` seconds, oldest first,
    at most ``limit`` of them. One per node: it outlives fetches."""

    def __init__(self, memory: float = PROVIDER_FAILURE_MEMORY, limit: int = MAX_REMEMBERED_FAILURES):
        self.memory = memory
        self.limit = limit
        self._failed: dict[str, float] = {}  # peer id -> when it last failed us (oldest first)

    def __len__(self) -> int:
        return len(self._failed)

    def failed_recently(self, peer_id: str, now: float) -> bool:
        when = self._failed.get(peer_id)
        if when is None:
            return False
        if now - when > self.memory:
            del self._failed[peer_id]
            return False
        return True

    def note_failed(self, peer_id: str, now: float) -> None:
        self._failed.pop(peer_id, None)
        self._failed[peer_id] = now
        while len(self._failed) > self.limit:
            del self._failed[next(iter(self._failed))]

    def note_answered(self, peer_id: str) -> None:
        self._failed.pop(peer_id, None)

    def order(
        self,
        providers: Iterable[T],
        now: float,
        *,
        connected: Container[str],
        rng: random.Random,
        key: Callable[[T], str] = _peer_id,
        group: int = MANIFEST_ASK_FANOUT,
    ) -> list[T]:
        """The order to try providers in: those that failed us in the last ``memory`` seconds
        last, peers we are connected to first, otherwise the lookup's order (first-hand records
        before hearsay) shuffled within groups of ``group`` to spread the load."""
        keyed = [
            ((self.failed_recently(key(p), now), key(p) not in connected, i // group, rng.random()), p)
            for i, p in enumerate(providers)
        ]
        return [p for _, p in sorted(keyed, key=lambda kp: kp[0])]


# --------------------------------------------------------------------------- manifest requests


class ManifestAsk(Generic[T]):
    """Asking providers for the manifest, ``fanout`` at a time, in the order given (see
    ``ProviderScores.order``). While no usable manifest is in (``settled`` false), each answer or
    failure makes room for the next provider, so providers that are made up or gone cannot end a
    fetch while untried ones remain; so does a provider out for ``hedge`` seconds without an
    answer (it stays out: a slow answer still counts), at most ``max_out`` out in all. Providers
    that failed us recently (``stale``) are asked only once every other one has finished (or
    been out for ``hedge``) without a usable manifest. Once one is in, nothing new is asked, and
    those still out get a grace (``cutoff``) before they are cut off: ``grace`` seconds, or with
    ``min_grace`` set, ``factor`` times as long as the first usable answer took (since its
    provider was asked), at least ``min_grace`` and at most ``grace``.

    The runner: ask each provider ``start`` returns, report each end with ``finished`` (asking
    those it returns), call ``start`` again at ``wake_at`` (the next hedge), and stop once ``out``
    is empty or the clock reaches ``cutoff``; the ids still in ``out`` then are the stragglers."""

    def __init__(
        self,
        providers: Iterable[T],
        *,
        stale: Callable[[str], bool],
        grace: float,
        key: Callable[[T], str] = _peer_id,
        fanout: int = MANIFEST_ASK_FANOUT,
        hedge: float = math.inf,
        max_out: int | None = None,
        min_grace: float | None = None,
        factor: float = MANIFEST_VOTE_GRACE_FACTOR,
        now: float = 0.0,
    ):
        if fanout < 1:
            raise ValueError(f"fanout must be >= 1, not {fanout}")
        if hedge <= 0:
            raise ValueError(f"hedge must be > 0, not {hedge}")
        self.key = key
        self.grace = grace
        self.fanout = fanout
        self.hedge = hedge
        self.max_out = max(fanout, max_out if max_out is not None else 3 * fanout)
        self.min_grace = min_grace
        self.factor = factor
        self.began = now
        unique: dict[str, T] = {}  # a lookup may name a provider twice: asked once
        for p in providers:
            unique.setdefault(key(p), p)
        self.providers = list(unique.values())
        self._fresh = [p for pid, p in unique.items() if not stale(pid)][::-1]  # popped from the end
        self._stale = [p for pid, p in unique.items() if stale(pid)][::-1]
        self.out: dict[str, bool] = {}  # peer id -> is it a fresh one
        self.since: dict[str, float] = {}  # peer id -> when it was asked (those out)
        self.asked = 0
        self.cutoff = math.inf
        self.settled_at: float | None = None
        self._now = now

    def _active(self, now: float) -> list[str]:
        """Those out that still hold a place (asked less than ``hedge`` ago)."""
        return [pid for pid, t in self.since.items() if now - t < self.hedge]

    def start(self, settled: bool, now: float | None = None) -> list[T]:
        """The providers to ask now (``now``: the last time given if None)."""
        if now is None:
            now = self._now
        self._now = max(self._now, now)
        ask: list[T] = []
        if settled:
            return ask
        active = self._active(now)
        while len(active) < self.fanout and len(self.out) < self.max_out:
            if self._fresh:
                p, fresh = self._fresh.pop(), True
            elif self._stale and not any(self.out[pid] for pid in active):
                p, fresh = self._stale.pop(), False
            else:
                break
            pid = self.key(p)
            self.out[pid] = fresh
            self.since[pid] = now
            active.append(pid)
            self.asked += 1
            ask.append(p)
        return ask

    def finished(self, peer_id: str, now: float, settled: bool) -> list[T]:
        """``peer_id`` answered or failed at ``now``; ``settled``: a usable manifest is in.
        Returns the providers to ask next."""
        self._now = max(self._now, now)
        self.out.pop(peer_id, None)
        asked_at = self.since.pop(peer_id, self.began)
        if not settled:
            return self.start(False, now)
        if self.settled_at is None:
            self.settled_at = now
            grace = self.grace
            if self.min_grace is not None:
                grace = min(grace, max(self.min_grace, self.factor * (now - asked_at)))
            self.cutoff = now + grace
        return []

    @property
    def wake_at(self) -> float:
        """When ``start`` may next have someone to ask though nobody answered (a hedge ends)."""
        if self.settled_at is not None or not (self._fresh or self._stale):
            return math.inf
        if len(self.out) >= self.max_out:
            return math.inf
        ends = [t + self.hedge for t in self.since.values() if t + self.hedge > self._now]
        return min(ends, default=math.inf)

    @property
    def untried(self) -> int:
        return len(self._fresh) + len(self._stale)

    def over(self, now: float) -> bool:
        """Whether the runner stops waiting: nothing out, or the grace is over."""
        return not self.out or now >= self.cutoff


# --------------------------------------------------------------------------- connecting


@attrs.frozen
class LinkState:
    """What the connect policy needs to know of a transfer's links."""

    useful_links: int
    """Links to peers that can still send us something we want (``Transfer.useful_links``)."""
    peers: Collection[str]
    """Peer ids linked (either direction)."""
    banned: Container[str]
    max_peers: int

    @classmethod
    def of(cls, t: Any) -> LinkState:
        """From an engine ``Transfer``."""
        return cls(t.useful_links, t.peers, t.banned, t.config.max_peers)


@attrs.frozen
class LookupSchedule:
    """When a fetch looks up providers again: LOOKUP_FIRST apart for the first FIRST_LOOKUPS
    (fellow fetchers announce as they begin), then LOOKUP_RETRY while it has fewer than FEW_PEERS
    peers, else LOOKUP_SETTLED."""

    first: float = LOOKUP_FIRST
    first_count: int = FIRST_LOOKUPS
    retry: float = LOOKUP_RETRY
    few_peers: int = FEW_PEERS
    settled: float = LOOKUP_SETTLED

    def delay(self, lookups: int, peers: int) -> float:
        """Seconds to the next lookup after the ``lookups``-th round, with ``peers`` linked."""
        if lookups <= self.first_count:
            return self.first
        return self.retry if peers < self.few_peers else self.settled


@attrs.frozen
class ConnectStep(Generic[T]):
    dials: list[T]
    next_lookup_at: float


class ConnectPolicy(Generic[T]):
    """The connect loop of one fetch: after each lookup (and once with the providers the manifest
    came from), dial providers not yet tried, in the order given, while the transfer has room:
    fewer than ``max_links`` useful links (links to peers with nothing we lack, that stopped
    answering or keep us choked don't count, so a late fetcher keeps looking for peers it can
    trade with) and fewer than ``max_peers`` peers. Never itself, a banned peer or one linked
    already. When a lookup names no provider that was not tried, the tried ones we hold no link to
    are tried again (a peer we lost may be back, or was only busy)."""

    def __init__(
        self,
        self_id: str,
        *,
        key: Callable[[T], str] = _peer_id,
        max_links: int = MAX_LINKS_PER_FETCH,
        schedule: LookupSchedule = LookupSchedule(),
    ):
        self.self_id = self_id
        self.key = key
        self.max_links = max_links
        self.schedule = schedule
        self.tried: dict[str, None] = {}
        self.rounds = 0

    def step(self, now: float, providers: Sequence[T], links: LinkState) -> ConnectStep[T]:
        """``providers``: the last lookup's (the first time: those of the manifest), in the order
        to try them. Returns whom to dial now and when to look up next."""
        key = self.key
        # (Ourselves and banned peers aside: never dialled, they are no new names; a banned peer
        # still announcing kept the lost ones from being tried again.)
        named = [pid for pid in map(key, providers) if pid != self.self_id and pid not in links.banned]
        if self.rounds and all(pid in self.tried for pid in named):
            self.tried = {pid: None for pid in self.tried if pid in links.peers}
        room = min(self.max_links - links.useful_links, links.max_peers - len(links.peers))
        dials: list[T] = []
        for p in providers:
            if len(dials) >= room:
                break
            pid = key(p)
            if pid in self.tried or pid == self.self_id or pid in links.banned or pid in links.peers:
                continue
            self.tried[pid] = None
            dials.append(p)
        self.rounds += 1
        return ConnectStep(dials, now + self.schedule.delay(self.rounds, len(links.peers)))
