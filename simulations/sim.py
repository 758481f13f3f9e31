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

This module holds the run and the node lifecycle (arrivals, departures, churn events, completion),
samples and results; ``simulations/simdiscovery.py`` the discovery and dialing (a mixin of
``Simulation``), ``simulations/simstate.py`` the node, store and result types (re-exported here).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from simulations import startup
from simulations.driver import SimTransfer
from simulations.network import Network, Port, Timeline
from simulations.scenario import Scenario
from simulations.simdiscovery import Discovery
from simulations.simstate import Blob, Node, NodeResult, SimResult, SimStore, _quiet_gc

__all__ = ["Blob", "Node", "NodeResult", "SimResult", "SimStore", "Simulation", "simulate"]

INF = math.inf
BYTES_FROM_MAX_NODES = 200
"""Runs up to this many nodes record who sent each node its piece bytes (``stats.bytes_from``, as
the testbed's); larger ones would hold a count per link."""


# --------------------------------------------------------------------------- simulation


class Simulation(Discovery):
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
            share_spread=scenario.network.share_spread,
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
                    # (only drawn from with corrupt > 0: a Random is 2.5 KB, per node)
                    rng=random.Random(f"{seed}/{nid}/corrupt") if g.corrupt else None,
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
        self._valid_cache: tuple[float, list[Node], dict[Node, int]] | None = None
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
        # receiver -> {sender: piece bytes}, for small runs (BYTES_FROM_MAX_NODES)
        self.bytes_from: dict[str, dict[str, int]] | None = (
            {} if len(self.nodes) <= BYTES_FROM_MAX_NODES else None
        )

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
        if self.bytes_from is not None:
            got = self.bytes_from.setdefault(node.id, {})
            for pid, st in tr.stats.items():
                if st.bytes_down:
                    got[pid] = got.get(pid, 0) + st.bytes_down
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
        if self.bytes_from is not None:
            stats["bytes_from"] = {k: v for k, v in self.bytes_from.items() if v}
        return SimResult(
            self.sc.name, self.seed, self.end_time, self.stopped_by, nodes, self.events, self.samples, stats
        )


def simulate(scenario: Scenario, seed: int = 0, **kw: Any) -> SimResult:
    return Simulation(scenario, seed, **kw).run()
