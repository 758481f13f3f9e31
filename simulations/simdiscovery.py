"""Discovery and dialing of a simulation run, a mixin of ``simulations.sim.Simulation``.

Announcing, provider records, DHT lookups, the manifest requests (``ManifestAsk``), the connect loop
(``ConnectPolicy``), dials and the links they make. Split out of ``simulations/sim.py`` (issue #13):
the methods are ``Simulation``'s, unchanged, and use its state (declared below for readers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from simulations._engine import (
    FIRST_LOOKUPS,
    LOOKUP_FIRST,
    MANIFEST_ASK_HEDGE,
    MANIFEST_ASK_MAX_OUT,
    MANIFEST_VOTE_GRACE,
    MANIFEST_VOTE_MIN_GRACE,
    ConnectPolicy,
    LinkState,
    LookupSchedule,
    ManifestAsk,
    lookup_grace,
)
from simulations.driver import LinkEnd, connect
from simulations.network import Network, Timeline
from simulations.scenario import Scenario
from simulations.simstate import Node, _node_id

INF = math.inf


class _Without(Sequence[Node]):
    """``items`` without the one at ``skip``, read in place (for ``random.sample``)."""

    __slots__ = ("items", "skip")

    def __init__(self, items: list[Node], skip: int):
        self.items = items
        self.skip = skip

    def __len__(self) -> int:
        return len(self.items) - 1

    def __getitem__(self, j: int) -> Node:  # type: ignore[override]
        if j < 0:
            j += len(self.items) - 1
        if not 0 <= j < len(self.items) - 1:
            raise IndexError(j)
        return self.items[j if j < self.skip else j + 1]


class Discovery:
    """The discovery and dialing half of ``Simulation`` (see the module docstring)."""

    sc: Scenario
    tl: Timeline
    net: Network
    online: int
    vanished: int
    providers: list[Node]
    _valid_cache: tuple[float, list[Node], dict[Node, int]] | None
    mean_latency: float
    _stopping: bool
    dials: int
    dial_failures: int
    link_ends: int
    peak_link_ends: int

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        raise NotImplementedError

    def log(self, t: float, event: str, node: str, peer: str = "", value: Any = "") -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ discovery

    def _announce(self, node: Node, now: float) -> None:
        if not node.group.serve or node.announced_at is not None:
            return
        if node.record_until == -INF:  # its first announce: it goes last, as a rebuild would put it
            self.providers.append(node)
            if self._valid_cache is not None:
                _, valid, pos = self._valid_cache
                pos[node] = len(valid)
                valid.append(node)
        else:
            self._valid_cache = None
        node.announced_at = now
        self.log(now, "announce", node.id)

    def _valid_providers(self, now: float) -> list[Node]:
        """Nodes whose provider record a lookup can find now: online announcers, and departed ones
        until their last record expires. Cached until the set can change, with each one's
        position (``_find``)."""
        if self._valid_cache is None or now >= self._valid_cache[0]:
            valid, until = [], INF
            for p in self.providers:
                if p.announced_at is not None:
                    valid.append(p)
                elif p.record_until > now:
                    valid.append(p)
                    until = min(until, p.record_until)
            self._valid_cache = (until, valid, {p: i for i, p in enumerate(valid)})
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
        hops = self._lookup_delay(node)
        delay = self.sc.startup.lookup_delay(hops)
        if self.vanished:  # GET_PROVIDERS to a vanished routing-table entry never answers
            dht = self.sc.dht
            timeout = dht.lookup_timeout_first if first else dht.lookup_timeout
            if any(p is not node for p in self._valid_providers(now)):
                # A live DHT peer names the providers (records outlive their hosts): the node's
                # lookup ends lookup_grace after that first answer (swarm/net/providers.py)
                # instead of waiting for the vanished entries' requests to time out. The first
                # answer comes after the hops; ``lookup_round`` is the least a lookup takes in
                # all (the node's own work), not when its first answer comes.
                delay = min(timeout, max(delay, hops + lookup_grace(hops)))
            else:
                delay = max(delay, timeout)
        self.at(now + delay, self._resolve if first else self._lookup_done, node, node.session)

    def _find(self, node: Node, now: float) -> list[Node]:
        """``k`` providers other than ``node``, drawn by ``rng.sample`` from the valid records (in
        announce order) without ``node``. The draw only reads the positions it picks, so the list
        without ``node`` is a view (``_Without``), not a copy: copying it for every lookup made a
        run's CPU grow as N^2 (10^5 nodes: ~10^10 list items)."""
        valid = self._valid_providers(now)
        if node.announced_at is not None or node.record_until > now:  # node's own record is there
            assert self._valid_cache is not None
            view: Sequence[Node] = _Without(valid, self._valid_cache[2][node])
        else:
            view = valid
        k = self.sc.dht.max_providers
        return node.rng.sample(view, k) if len(view) > k else list(view)

    def _live(self, node: Node, sess: int) -> bool:
        return node.online and sess == node.session and node.transfer is not None and not node.transfer.done

    def _order(self, node: Node, providers: list[Node], now: float) -> list[Node]:
        """node.py's ``_order_providers``: failed lately last, linked first, else shuffled."""
        linked = node.transfer.peers if node.transfer is not None else node.links
        return node.scores.order(providers, now, connected=linked, rng=node.rng, key=_node_id)

    def _resolve(self, node: Node, sess: int) -> None:
        """The node's manifest step after its first lookup (swarm/node/vote.py): ask the providers
        found as ``ManifestAsk`` decides, as a fetch by name under `open` does: a provider silent
        for MANIFEST_ASK_HEDGE makes room for the next, stragglers get an adaptive grace once one
        answered (MANIFEST_VOTE_MIN_GRACE to MANIFEST_VOTE_GRACE). An online provider answers after
        a connection and a round trip, a stopped node's host refuses at once, a vanished host
        answers never (``manifest_timeout``). With no answer the node gives up (Hub fallback);
        here the node looks again."""
        if not self._live(node, sess):
            return
        now = self.tl.now()
        found = self._order(node, self._find(node, now), now)
        plan = ManifestAsk(
            found,
            stale=lambda pid: node.scores.failed_recently(pid, now),
            grace=MANIFEST_VOTE_GRACE,
            min_grace=MANIFEST_VOTE_MIN_GRACE,  # the node's `open` vote by name (node/vote.py)
            hedge=MANIFEST_ASK_HEDGE,
            max_out=MANIFEST_ASK_MAX_OUT,
            key=_node_id,
            fanout=self.sc.dht.manifest_fanout,
            now=now,
        )
        node.ask, node.ask_found = plan, []
        for p in plan.start(False, now):
            self._ask(node, p, now)
        if not plan.out:
            self._asked_all(node, sess, plan)
        else:
            self._hedge_later(node, sess, plan)

    def _hedge_later(self, node: Node, sess: int, plan: ManifestAsk[Node]) -> None:
        """node/vote.py's ``move_on_at(plan.wake_at)``: a provider silent for MANIFEST_ASK_HEDGE
        makes room for the next one."""
        if math.isfinite(plan.wake_at):
            self.at(plan.wake_at, self._hedge, node, sess, plan)

    def _hedge(self, node: Node, sess: int, plan: ManifestAsk[Node]) -> None:
        if node.ask is not plan or not self._live(node, sess) or plan.over(self.tl.now()):
            return
        now = self.tl.now()
        for q in plan.start(bool(node.ask_found), now):
            self._ask(node, q, now)
        self._hedge_later(node, sess, plan)

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
        if not node.ask_found:
            self._hedge_later(node, sess, plan)
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
