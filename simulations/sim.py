"""One simulation run: a scenario, one seed, the real engine, virtual time.

Every node runs the node's own engine core, an unmodified ``swarm.engine.TransferCore``, driven by
``simulations/driver.py`` (``SimTransfer``) over ``LinkEnd`` objects of the simulated network. There
is no event loop but the timeline (``simulations/network.py``): a heap of timed actions (message
deliveries, flow finishes, engine ticks, arrivals, departures, DHT lookups, dials, scheduled
events, samples) run in (time, insertion) order. Nothing here reads the wall clock, opens a
socket, starts a thread or imports trio.

Determinism: one root seed. Node ``x`` draws engine choices from ``Random(f"{seed}/{x}/{session}")``
and its own discovery choices from ``Random(f"{seed}/{x}/sim")``; the network (jitter, loss) has
``Random(f"{seed}/net")``. Actions at one instant run in the order they were scheduled, and nothing
iterates a set of objects, so a seed gives one event log.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from simulations import startup
from simulations._engine import (
    FIRST_LOOKUPS,
    LOOKUP_FIRST,
    MANIFEST_VOTE_GRACE,
    ConnectPolicy,
    LinkState,
    LookupSchedule,
    ManifestAsk,
    PieceHashMismatch,
    ProviderScores,
)
from simulations.driver import LinkEnd, SimTransfer, connect
from simulations.network import Network, Port, Timeline
from simulations.scenario import Group, Scenario

INF = math.inf


# --------------------------------------------------------------------------- store


class Blob:
    """A piece payload stand-in: only its length exists (the engine only calls ``len``)."""

    __slots__ = ("bad", "n")

    def __init__(self, n: int, bad: bool = False):
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n


class SimStore:
    """engine.PieceStore over lengths: verified pieces are a set of indices."""

    __slots__ = ("_bad", "_blobs", "_have", "corrupt", "lengths", "rng")

    def __init__(
        self, lengths: list[int], have: bool = False, corrupt: float = 0.0, rng: random.Random | None = None
    ):
        self.lengths = lengths
        self._have: set[int] = set(range(len(lengths))) if have else set()
        cache: dict[int, Blob] = {}
        self._blobs = [cache.setdefault(n, Blob(n)) for n in lengths]
        self._bad = [Blob(n, bad=True) for n in lengths] if corrupt else []
        self.corrupt = corrupt  # probability that a piece we serve fails verification
        self.rng = rng

    @property
    def have(self) -> frozenset[int]:
        return frozenset(self._have)

    def read_piece(self, index: int) -> Blob:
        if self.corrupt and self.rng is not None and self.rng.random() < self.corrupt:
            return self._bad[index]
        return self._blobs[index]

    def write_piece(self, index: int, data: Any) -> bool:
        if len(data) != self.lengths[index] or getattr(data, "bad", False):
            raise PieceHashMismatch(index, f"piece {index}: blake3 mismatch (simulated)")
        self._have.add(index)
        return True

    @property
    def complete(self) -> bool:
        return len(self._have) == len(self.lengths)


# --------------------------------------------------------------------------- nodes


def _node_id(n: Node) -> str:
    return n.id


class Node:
    def __init__(self, nid: str, group: Group, index: int, port: Port, store: SimStore, seed: int):
        self.id = nid
        self.group = group
        self.index = index
        self.port = port
        self.store = store
        self.rng = random.Random(f"{seed}/{nid}/sim")
        self.session = 0
        self.online = False
        self.vanished = False  # offline because its host's link went dark (see Simulation._vanish)
        self.gone = False  # left for good without the model
        self.transfer: SimTransfer | None = None
        self.links: dict[str, LinkEnd] = {}
        self.dialing: dict[str, None] = {}
        self.scores = ProviderScores()  # swarm.discovery, as in swarm/node/: outlives sessions
        self.ask: ManifestAsk[Node] | None = None  # the manifest requests of this session
        self.ask_found: list[Node] = []  # the providers of the lookup being asked, answered first
        self.connect: ConnectPolicy[Node] | None = None  # this session's connect loop
        self.draining = False  # leaving gracefully (startup.leave)
        self.first_arrival: float | None = None
        self.completed_at: float | None = None
        self.configs_at: float | None = None
        self.first_piece_at: float | None = None
        self.last_piece_at = 0.0
        self.announced_at: float | None = None  # start of this session's announcing
        self.record_until = -INF  # provider record validity after leaving
        self.departures = 0
        self.lookups = 0
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def fetches(self) -> bool:
        return self.group.role == "fetch"


@attrs.frozen
class NodeResult:
    id: str
    group: str
    role: str
    first_arrival: float | None
    completed_at: float | None
    configs_at: float | None
    departures: int
    bytes_up: int
    bytes_down: int

    @property
    def completion_time(self) -> float | None:
        if self.completed_at is None or self.first_arrival is None:
            return None
        return self.completed_at - self.first_arrival


@attrs.frozen
class SimResult:
    scenario: str
    seed: int
    end_time: float
    stopped_by: str  # "done" (every fetching node finished or left for good) or "stop_at"
    nodes: tuple[NodeResult, ...]
    events: list[tuple]
    samples: list[tuple]  # (t, completed, {group: uploaded bytes})
    stats: dict[str, Any]

    def completion_times(self, group: str | None = None) -> list[float]:
        return sorted(
            n.completion_time
            for n in self.nodes
            if n.role == "fetch" and n.completion_time is not None and (group is None or n.group == group)
        )


# --------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """No cyclic GC passes during a run: with ~10^6 live objects every full pass walks them all.
    Garbage is collected once at the end."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


# --------------------------------------------------------------------------- simulation


class Simulation:
    """Runs ``scenario`` with root ``seed``; ``run()`` returns a :class:`SimResult`."""

    def __init__(
        self,
        scenario: Scenario,
        seed: int = 0,
        *,
        progress: Callable[[float, int, int], None] | None = None,
        log_pieces: bool | None = None,
    ):
        self.sc = scenario
        self.seed = seed
        self.progress = progress
        self.log_pieces = scenario.log_pieces if log_pieces is None else log_pieces
        self.manifest = scenario.manifest
        lengths = [p.length for p in self.manifest.pieces]
        self.tl = Timeline()
        self.net = Network(
            self.tl,
            random.Random(f"{seed}/net"),
            jitter=scenario.network.jitter,
            loss=scenario.network.loss,
            mss=scenario.network.mss,
            min_rto=scenario.network.min_rto,
            window=scenario.network.window,
            grid=scenario.network.time_grid,
            blackhole_reset=scenario.network.blackhole_reset,
        )
        self.nodes: list[Node] = []
        self.by_id: dict[str, Node] = {}
        self.configs = {g.name: scenario.engine_config(g) for g in scenario.groups}
        for g in scenario.groups:
            for i in range(g.count):
                nid = f"{g.name}-{i:04d}"
                store = SimStore(
                    lengths,
                    have=g.role == "seed",
                    corrupt=g.corrupt,
                    rng=random.Random(f"{seed}/{nid}/corrupt"),
                )
                node = Node(nid, g, i, Port(nid, g.upload, g.download, g.latency), store, seed)
                self.nodes.append(node)
                self.by_id[nid] = node
        self.fetchers = sum(1 for n in self.nodes if n.fetches)
        self.finished = 0
        self.gone = 0
        self.online = 0
        self.vanished = 0  # nodes offline because their host vanished (see _lookup)
        self.providers: list[Node] = []  # every node that ever announced, in order
        self._valid_cache: tuple[float, list[Node]] | None = None
        self.mean_latency = sum(n.port.latency for n in self.nodes) / len(self.nodes) if self.nodes else 0.0
        self.events: list[tuple] = []
        self.samples: list[tuple] = []
        self.stopped_by = "stop_at"
        self.end_time = 0.0
        self._stopping = False
        self._next_progress = 0.1
        self.dials = 0
        self.dial_failures = 0
        self.engine_errors = 0  # Transfer.internal_errors: bugs the engine caught and logged
        self.engine_failures = 0  # transfers that failed on a store error
        self.bans = 0  # peers banned (sessions x peers)
        self.link_ends = 0  # link ends held by nodes now
        self.peak_link_ends = 0
        self.wasted_bytes = 0  # piece bytes received late or twice (Transfer.wasted_bytes)

    # ------------------------------------------------------------------ running

    def run(self) -> SimResult:
        with _quiet_gc():
            self._main()
            self.tl.run()
        return self._result()

    def _main(self) -> None:
        sc = self.sc
        for g in sc.groups:
            members = [n for n in self.nodes if n.group is g]
            times = g.arrival.times_for(len(members), random.Random(f"{self.seed}/arrivals/{g.name}"))
            for node, t in zip(members, times, strict=True):
                self.at(t, self._arrive, node)
        for i, ev in enumerate(sc.events):
            self.at(ev.at, self._event, i)
        self.at(sc.stop_at, self._stop, "stop_at")
        self.at(0.0, self._sample)
        if self.fetchers == 0:
            self.at(0.0, self._stop, "done")

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self.tl.at(t, fn, *args)

    def _stop(self, why: str) -> None:
        if self._stopping:
            return
        now = self.tl.now()
        self.stopped_by = why
        self.end_time = now
        self._stopping = True
        self._sample(reschedule=False)
        self.log(now, "stop", "", "", why)
        for node in self.nodes:
            if node.online and node.transfer is not None:
                self._retire(node, node.transfer)
                node.transfer = None
        self.tl.stop()  # nothing is delivered or scheduled any more

    def _retire(self, node: Node, tr: SimTransfer) -> None:
        """Fold a finished session's counters into the node's."""
        node.bytes_up += tr.bytes_up
        node.bytes_down += tr.bytes_down
        self.wasted_bytes += tr.wasted_bytes
        self.engine_errors += getattr(tr, "internal_errors", 0)
        self.bans += len(tr.banned)
        if getattr(tr, "error", None) is not None:
            self.engine_failures += 1

    def log(self, t: float, event: str, node: str, peer: str = "", value: Any = "") -> None:
        self.events.append((t, event, node, peer, value))

    # ------------------------------------------------------------------ sessions

    def _arrive(self, node: Node) -> None:
        if node.online or node.gone:
            return
        now = self.tl.now()
        g = node.group
        node.online = True
        if node.vanished:
            self.vanished -= 1
        node.vanished = False
        self.online += 1
        node.session += 1
        sess = node.session
        if node.first_arrival is None:
            node.first_arrival = now
        self.log(now, "arrive", node.id, "", sess)
        tr = SimTransfer(
            self.manifest,
            node.store,
            self.tl,
            config=self.configs[g.name],
            rng=random.Random(f"{self.seed}/{node.id}/{sess}"),
            may_upload=g.serve,
            hash_rate=g.hash_rate,
            on_piece=lambda i, n, node=node: self._on_piece(node, i, n),
            on_link_over=lambda end, node=node: self._link_over(node, end),
        )
        node.transfer = tr
        tr.start()
        node.announced_at = None
        if (
            (
                g.announce == "start"
                and not (self.sc.startup.announce_at_manifest and node.fetches and not tr.done)
            )
            or (g.announce == "first_piece" and node.store._have)
            or (g.announce == "complete" and tr.done)
        ):
            self._announce(node, now)
        if node.fetches and tr.done and node.completed_at is None:
            self._complete(node, now)
        dur = g.session.sample(node.rng)
        if dur < INF:
            self.at(now + dur, self._depart, node, "session", sess)
        if node.fetches and not tr.done:
            node.ask = node.connect = None
            self._lookup(node, now, first=True)

    def _depart(
        self,
        node: Node,
        why: str,
        sess: int | None = None,
        rejoin_after: float | None = None,
        vanish: bool = False,
    ) -> None:
        """The node goes offline. Normally it closes its links (peers see end-of-stream one
        latency later); if it ``vanish``es its links go dark instead: peers keep them, their
        messages and pieces to it are lost, and they only notice through their own timeouts (the
        engine's request timeouts, TCP's retransmission limit). Either way its provider record
        stays in the DHT until it expires."""
        if not node.online or (sess is not None and sess != node.session):
            return
        now = self.tl.now()
        node.online = False
        node.draining = False
        node.vanished = vanish
        self.vanished += vanish
        self.online -= 1
        node.departures += 1
        tr = node.transfer
        if tr is not None:
            self._retire(node, tr)
        node.transfer = None
        if node.announced_at is not None:
            r = self.sc.dht.republish
            last = node.announced_at + (math.floor((now - node.announced_at) / r) * r if r > 0 else 0)
            node.record_until = last + self.sc.dht.record_ttl
            node.announced_at = None
            self._valid_cache = None
        if tr is not None:
            self.link_ends -= len(tr.shutdown(vanish))
        node.links.clear()
        node.dialing.clear()
        self.log(now, "depart", node.id, "", why)
        if rejoin_after is None and why == "session" and node.group.rejoin is not None:
            rejoin_after = node.group.rejoin.sample(node.rng)
        if rejoin_after is not None and rejoin_after < INF:  # + a new process's start-up
            self.at(now + rejoin_after + self.sc.startup.node_start, self._arrive, node)
        elif node.fetches and node.completed_at is None:
            node.gone = True
            self.gone += 1
            self._check_end(now)

    def _on_piece(self, node: Node, index: int, length: int) -> None:
        now = self.tl.now()
        if self.log_pieces:
            self.log(now, "piece", node.id, "", index)
        node.last_piece_at = now
        if node.first_piece_at is None:
            node.first_piece_at = now
            self.log(now, "first_piece", node.id, "", f"{now - (node.first_arrival or 0):.6f}")
        g = node.group
        if g.announce == "first_piece" and node.announced_at is None:
            self._announce(node, now)
        tr = node.transfer
        if tr is None:
            return
        if node.configs_at is None and tr.picker.priority_done:
            node.configs_at = now
            self.log(now, "configs_ready", node.id, "", f"{now - (node.first_arrival or 0):.6f}")
        if tr.picker.done and node.completed_at is None and node.fetches:
            self._complete(node, now)

    def _complete(self, node: Node, now: float) -> None:
        node.completed_at = now
        if node.configs_at is None:
            node.configs_at = now
        self.log(now, "complete", node.id, "", f"{now - (node.first_arrival or 0):.6f}")
        g = node.group
        if g.announce == "complete" and node.announced_at is None:
            self._announce(node, now)
        if g.after_finish is not None:
            self.at(
                now + g.after_finish.sample(node.rng), startup.leave, self, node, "finished", node.session
            )
        self.finished += 1
        if self.progress is not None and self.finished >= self._next_progress * self.fetchers:
            while self._next_progress * self.fetchers <= self.finished:
                self._next_progress += 0.1
            self.progress(now, self.finished, self.fetchers)
        self._check_end(now)

    def _check_end(self, now: float) -> None:
        if self.finished + self.gone >= self.fetchers:
            self.at(now, self._stop, "done")

    # ------------------------------------------------------------------ discovery

    def _announce(self, node: Node, now: float) -> None:
        if not node.group.serve or node.announced_at is not None:
            return
        if node.record_until == -INF:
            self.providers.append(node)
        node.announced_at = now
        self._valid_cache = None
        self.log(now, "announce", node.id)

    def _valid_providers(self, now: float) -> list[Node]:
        """Nodes whose provider record a lookup can find now: online announcers, and departed ones
        until their last record expires. Cached until the set can change."""
        if self._valid_cache is None or now >= self._valid_cache[0]:
            valid, until = [], INF
            for p in self.providers:
                if p.announced_at is not None:
                    valid.append(p)
                elif p.record_until > now:
                    valid.append(p)
                    until = min(until, p.record_until)
            self._valid_cache = (until, valid)
        return self._valid_cache[1]

    # Discovery runs swarm/discovery.py's policies, the objects swarm/node/'s runners drive:
    # resolve (a DHT lookup, then ``ManifestAsk`` over the providers found), then the connect loop
    # (``ConnectPolicy.step`` after each lookup). Only the I/O is modelled here: lookup, answer and
    # dial times.

    def _lookup_delay(self, node: Node) -> float:
        """ceil(log2(online nodes) / bits_per_hop) hops of one round trip each."""
        hops = max(1, math.ceil(math.log2(max(2, self.online)) / self.sc.dht.bits_per_hop))
        return hops * 2 * (node.port.latency + self.mean_latency)

    def _lookup(self, node: Node, now: float, first: bool = False) -> None:
        node.lookups += 1
        delay = self.sc.startup.lookup_delay(self._lookup_delay(node))
        if self.vanished:  # GET_PROVIDERS to a vanished routing-table entry never answers
            dht = self.sc.dht
            delay = max(delay, dht.lookup_timeout_first if first else dht.lookup_timeout)
        self.at(now + delay, self._resolve if first else self._lookup_done, node, node.session)

    def _find(self, node: Node, now: float) -> list[Node]:
        valid = [p for p in self._valid_providers(now) if p is not node]
        k = self.sc.dht.max_providers
        return node.rng.sample(valid, k) if len(valid) > k else valid

    def _live(self, node: Node, sess: int) -> bool:
        return node.online and sess == node.session and node.transfer is not None and not node.transfer.done

    def _order(self, node: Node, providers: list[Node], now: float) -> list[Node]:
        """node.py's ``_order_providers``: failed lately last, linked first, else shuffled."""
        linked = node.transfer.peers if node.transfer is not None else node.links
        return node.scores.order(providers, now, connected=linked, rng=node.rng, key=_node_id)

    def _resolve(self, node: Node, sess: int) -> None:
        """node.py's ``_resolve`` after its first lookup: ask the providers found for the manifest
        as ``ManifestAsk`` decides (as a fetch by name: stragglers get MANIFEST_VOTE_GRACE once
        one answered). An online provider answers after a connection and a round trip, a stopped
        node's host refuses at once, a vanished host answers never (``manifest_timeout``). With no
        answer node.py gives up (Hub fallback); here the node looks again."""
        if not self._live(node, sess):
            return
        now = self.tl.now()
        found = self._order(node, self._find(node, now), now)
        plan = ManifestAsk(
            found,
            stale=lambda pid: node.scores.failed_recently(pid, now),
            grace=MANIFEST_VOTE_GRACE,
            key=_node_id,
            fanout=self.sc.dht.manifest_fanout,
        )
        node.ask, node.ask_found = plan, []
        for p in plan.start(False):
            self._ask(node, p, now)
        if not plan.out:
            self._asked_all(node, sess, plan)

    def _ask(self, node: Node, p: Node, now: float) -> None:
        rtt = 2 * Network.delay(node.port, p.port)
        if p.online:
            self.at(now + (self.sc.network.connect_rtts + 1) * rtt, self._answer, node, node.session, p, True)
        else:
            wait = self.sc.dht.manifest_timeout if p.vanished else rtt
            self.at(now + wait, self._answer, node, node.session, p, False)

    def _answer(self, node: Node, sess: int, p: Node, answered: bool) -> None:
        plan = node.ask
        if plan is None or p.id not in plan.out or not self._live(node, sess):
            return
        now = self.tl.now()
        if answered:
            node.scores.note_answered(p.id)
            node.ask_found.append(p)
        else:
            node.scores.note_failed(p.id, now)
        cutoff = plan.cutoff
        for q in plan.finished(p.id, now, bool(node.ask_found)):
            self._ask(node, q, now)
        if plan.over(now):
            self._asked_all(node, sess, plan)
        elif plan.cutoff < cutoff:
            self.at(plan.cutoff, self._ask_cutoff, node, sess, plan)

    def _ask_cutoff(self, node: Node, sess: int, plan: ManifestAsk[Node]) -> None:
        if node.ask is plan and self._live(node, sess):
            self._asked_all(node, sess, plan)

    def _asked_all(self, node: Node, sess: int, plan: ManifestAsk[Node]) -> None:
        """The manifest requests are over: the stragglers are remembered as failed, and the
        connect loop starts with the providers that answered first (node.py's holders)."""
        now = self.tl.now()
        for pid in plan.out:
            node.scores.note_failed(pid, now)
        node.ask = None
        answered, node.ask_found = node.ask_found, []
        if not answered:
            self.log(now, "manifest_failed", node.id, "", plan.asked)
            self.at(now + self.sc.dht.lookup_retry, self._relookup, node, sess, True)
            return
        dht = self.sc.dht
        node.connect = ConnectPolicy(
            node.id,
            key=_node_id,
            max_links=node.group.peers,
            schedule=LookupSchedule(
                first=LOOKUP_FIRST,
                first_count=FIRST_LOOKUPS,
                retry=dht.lookup_retry,
                few_peers=dht.min_links,
                settled=dht.lookup_retry_linked,
            ),
        )
        self.log(now, "manifest", node.id, "", f"{now - (node.first_arrival or 0):.6f}")
        if node.group.announce == "start":  # startup.py: the manifest is chosen
            self._announce(node, now)
        held = {p.id for p in answered}
        self._lookup_done(node, sess, answered + [p for p in plan.providers if p.id not in held])

    def _lookup_done(self, node: Node, sess: int, found: list[Node] | None = None) -> None:
        """One round of node.py's connect loop: ``ConnectPolicy.step`` over the lookup's
        providers, then the next lookup when it says."""
        if not self._live(node, sess) or node.connect is None:
            return
        tr = node.transfer
        assert tr is not None
        now = self.tl.now()
        if found is None:
            found = self._find(node, now)
        self.log(now, "lookup", node.id, "", len(found))
        step = node.connect.step(now, self._order(node, found, now), LinkState.of(tr))
        for p in step.dials:
            self._dial(node, p, now)
        self.at(step.next_lookup_at, self._relookup, node, sess)

    def _relookup(self, node: Node, sess: int, first: bool = False) -> None:
        if not self._live(node, sess):
            return
        self._lookup(node, self.tl.now(), first)

    def _dial(self, node: Node, peer: Node, now: float) -> None:
        node.dialing[peer.id] = None
        self.dials += 1
        self.log(now, "dial", node.id, peer.id)
        rtt = 2 * Network.delay(node.port, peer.port)
        if not peer.online or peer.draining:  # a vanished host never answers; a stopped (or
            # draining, startup.leave) node refuses
            wait = self.sc.network.dial_timeout if peer.vanished else rtt
            self.at(now + wait, self._dial_done, node, peer, node.session)
            return
        setup = self.sc.startup.connect_delay(self.sc.network.connect_rtts * rtt)
        self.at(now + setup, self._dial_done, node, peer, node.session)

    def _dial_done(self, node: Node, peer: Node, sess: int) -> None:
        if not node.online or sess != node.session:
            return
        node.dialing.pop(peer.id, None)
        now = self.tl.now()
        if not peer.online or peer.draining:
            self.dial_failures += 1
            node.scores.note_failed(peer.id, now)  # node.py's _link_to
            self.log(now, "dial_failed", node.id, peer.id)
            return
        for x, y in ((node, peer), (peer, node)):  # a link left over from before y vanished
            old = x.links.get(y.id)
            if old is not None and old.dead:
                del x.links[y.id]
                if x.transfer is not None:
                    x.transfer.lost(old)
        if peer.id in node.links or node.id in peer.links:
            return
        a, b = connect(self.net, node.port, node.id, peer.port, peer.id)
        self.log(now, "connect", node.id, peer.id)
        self._attach(node, a)
        self._attach(peer, b)

    def _attach(self, node: Node, link: LinkEnd) -> None:
        node.links[link.peer_id] = link
        self.link_ends += 1
        if self.link_ends > self.peak_link_ends:
            self.peak_link_ends = self.link_ends
        assert node.transfer is not None
        node.transfer.serve(link)

    def _link_over(self, node: Node, link: LinkEnd) -> None:
        """A link end a node's transfer served is over (``SimTransfer.on_link_over``)."""
        self.link_ends -= 1
        if node.links.get(link.peer_id) is link:
            del node.links[link.peer_id]
            if node.online and not self._stopping:
                self.log(self.tl.now(), "disconnect", node.id, link.peer_id)

    # ------------------------------------------------------------------ events, samples

    def _event(self, i: int) -> None:
        ev = self.sc.events[i]
        now = self.tl.now()
        rng = random.Random(f"{self.seed}/events/{i}")
        members = [n for n in self.nodes if n.group.name == ev.group]
        if ev.action != "join":
            pool = [n for n in members if n.online]
        else:
            pool = [n for n in members if not n.online and not n.gone and n.first_arrival is not None]
        if ev.count is not None:
            k = min(ev.count, len(pool))
        elif ev.fraction is not None:
            k = round(ev.fraction * len(pool))
        else:
            k = len(pool)
        chosen = rng.sample(pool, k) if k < len(pool) else pool
        self.log(now, f"event_{ev.action}", ev.group, "", k)
        for n in chosen:
            if ev.action != "join":
                after = ev.rejoin_after.sample(rng) if ev.rejoin_after is not None else INF
                if ev.action == "leave":  # SIGTERM: drains first (startup.py)
                    startup.leave(self, n, "event", rejoin_after=after)
                else:
                    self._depart(n, "event", rejoin_after=after, vanish=ev.action == "vanish")
            else:
                self._arrive(n)

    def _sample(self, reschedule: bool = True) -> None:
        now = self.tl.now()
        up: dict[str, float] = {g.name: 0.0 for g in self.sc.groups}
        for n in self.nodes:
            up[n.group.name] += self.net.sent(n.port, now)
        self.samples.append((now, self.finished, up))
        if reschedule:
            self.at(now + self.sc.sample_interval, self._sample)

    # ------------------------------------------------------------------ results

    def _result(self) -> SimResult:
        nodes = tuple(
            NodeResult(
                n.id,
                n.group.name,
                n.group.role,
                n.first_arrival,
                n.completed_at,
                n.configs_at,
                n.departures,
                n.bytes_up,
                n.bytes_down,
            )
            for n in self.nodes
        )
        net = self.net
        stats = {
            "messages": net.messages,
            "messages_by_type": {
                t.__name__: n for t, n in sorted(net.msg_counts.items(), key=lambda kv: -kv[1])
            },
            "flows": net.flows_done,
            "flows_aborted": net.flows_aborted,
            "peak_flows": net.peak_flows,
            "level_steps": net.level_steps,
            "level_overruns": net.level_overruns,
            "dials": self.dials,
            "dial_failures": self.dial_failures,
            "lookups": sum(n.lookups for n in self.nodes),
            "engine_internal_errors": self.engine_errors,
            "engine_failures": self.engine_failures,
            "bans": self.bans,
            "peak_link_ends": self.peak_link_ends,
            "fetchers": self.fetchers,
            "finished": self.finished,
            "gone": self.gone,
            "bytes_up": sum(n.bytes_up for n in self.nodes),
            "bytes_down": sum(n.bytes_down for n in self.nodes),
            "wasted_bytes": self.wasted_bytes,
        }
        return SimResult(
            self.sc.name, self.seed, self.end_time, self.stopped_by, nodes, self.events, self.samples, stats
        )


def simulate(scenario: Scenario, seed: int = 0, **kw: Any) -> SimResult:
    return Simulation(scenario, seed, **kw).run()
