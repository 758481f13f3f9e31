"""The simulated network: flow-level bandwidth sharing, per-link latency, loss and jitter, and the
``PeerLink`` implementation the engine talks through.

Bandwidth (flow level, as SimGrid models TCP, not per packet)
------------------------------------------------------------
Every node has two resources, its upload and its download capacity. A piece in transit is one *flow*
from the sender's upload to the receiver's download. Rates are max-min fair: each resource r has a
*level* mu_r, the rate of the flows it bottlenecks, solving

    sum over its flows f of min(mu_other(f), cap_f, mu_r) = C_r        (mu_r = inf if r is not full)

and a flow runs at min(mu_up(sender), mu_down(receiver), cap_f). When a flow starts or ends, the two
levels it touches are recomputed and changes are propagated along flows to the levels at their
other ends until nothing moves (a worklist; in practice a few resources). This is the fixed point
of the distributed max-min algorithm, i.e. the same allocation a global progressive filling gives,
computed locally. ``cap_f`` is the optional per-flow cap (TCP window / RTT, Mathis loss rate).

A flow's sender (the link end that sends the piece) is told when the flow finishes; when its rate
changes, the remaining bytes are settled and a new finish time is put on the timeline (the old entry
goes stale). A link end sends nothing else while its piece is on the wire, which is the
back-pressure of a TCP stream: control messages queued behind it wait, as on one yamux stream.

Latency
-------
One-way delay between a and b is ``latency(a) + latency(b)`` (access latency of each node to a
core with no congestion), plus optional jitter. A message is visible to the receiver that much
later; messages on one link keep their order. Each receiving link end keeps a FIFO of
(deliver_at, message) (``simulations/driver.py``: ``LinkEnd``); the timeline hands it the messages
due when its head is due, so a burst of due messages is read in one go.

Timeline
--------
One loop serves a heap of timed actions for the whole simulation: message deliveries, flow finishes,
engine ticks and the simulator's own actions (arrivals, departures, DHT lookups), in (time,
insertion) order, plus actions to run as soon as the current one returns (``soon``). No trio: the
engine's core (``swarm.engine.TransferCore``) is driven by plain calls.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Any

INF = math.inf

#: Relative change of a level below which propagation stops.
LEVEL_TOLERANCE = 1e-9
#: Safety bound on level recomputations for one flow start/end (the worklist converges long before).
MAX_LEVEL_STEPS = 20_000


class Timeline:
    """Timed actions run by ``run``, in (time, insertion) order, and actions run as soon as the
    current one returns (``soon``).

    Actions due at the same instant share one bucket (times are mostly on the network's grid), so
    the heap holds distinct times only."""

    def __init__(self) -> None:
        self.t = 0.0
        self.times: list[float] = []
        self.buckets: dict[float, list[tuple[Any, tuple]]] = {}
        self.ready: deque[tuple[Any, tuple]] = deque()
        self.actions = 0
        self.stopped = False

    def now(self) -> float:
        return self.t

    def at(self, t: float, fn: Any, *args: Any) -> None:
        if t < self.t:
            t = self.t
        b = self.buckets.get(t)
        if b is None:
            self.buckets[t] = [(fn, args)]
            heapq.heappush(self.times, t)
        else:
            b.append((fn, args))

    def soon(self, fn: Any, *args: Any) -> None:
        self.ready.append((fn, args))

    def stop(self) -> None:
        """Run nothing more (``run`` returns once the current action does)."""
        self.stopped = True

    def run(self) -> None:
        times = self.times
        buckets = self.buckets
        ready = self.ready
        pop = heapq.heappop
        while not self.stopped:
            while ready:
                fn, args = ready.popleft()
                self.actions += 1
                fn(*args)
                if self.stopped:
                    return
            if not times:
                return
            t = pop(times)
            self.t = t
            bucket = buckets.pop(t)
            self.actions += len(bucket)
            for fn, args in bucket:
                fn(*args)
                while ready:
                    fn2, args2 = ready.popleft()
                    self.actions += 1
                    fn2(*args2)
                if self.stopped:
                    return


class Resource:
    """One direction of one node's access link."""

    __slots__ = ("cap", "flows", "mu", "node", "queued", "up", "weighted")

    def __init__(self, node: Port, cap: float, up: bool):
        self.node = node
        self.cap = cap
        self.up = up
        self.flows: list[Flow] = []
        self.mu = INF
        self.queued = False
        self.weighted = False  # a flow with a weight other than 1 has used it (share_spread)

    def level(self) -> float:
        flows = self.flows
        n = len(flows)
        if n == 0:
            return INF
        if self.weighted:
            return self._weighted_level()
        if n == 1:
            f = flows[0]
            lim = f.dst_res.mu if self.up else f.src_res.mu
            if f.cap < lim:
                lim = f.cap
            return self.cap if lim >= self.cap else INF
        if self.up:
            lims = sorted([f.dst_res.mu if f.dst_res.mu < f.cap else f.cap for f in flows])
        else:
            lims = sorted([f.src_res.mu if f.src_res.mu < f.cap else f.cap for f in flows])
        rem = self.cap
        for i, lim in enumerate(lims):
            share = rem / (n - i)
            if lim >= share:
                return share
            rem -= lim
        return INF

    def _weighted_level(self) -> float:
        """The level with flow weights (``Network.share_spread``): a flow's rate is its weight
        times the level, so mu is a rate per unit weight; the same water-filling otherwise."""
        lims = []
        weight = 0.0
        for f in self.flows:
            other = f.dst_res.mu if self.up else f.src_res.mu
            per_w = f.cap / f.w
            lims.append((other if other < per_w else per_w, f.w))
            weight += f.w
        lims.sort()
        rem = self.cap
        for lim, w in lims:
            share = rem / weight
            if lim >= share:
                return share
            rem -= lim * w
            weight -= w
        return INF


class Port:
    """A node's network attachment: upload and download resources and access latency."""

    __slots__ = ("down", "latency", "name", "recv_bytes", "sent_bytes", "up")

    def __init__(self, name: str, upload: float, download: float, latency: float):
        self.name = name
        self.up = Resource(self, upload, True)
        self.down = Resource(self, download, False)
        self.latency = latency
        self.sent_bytes = 0.0  # settled bytes uploaded (see Network.sent)
        self.recv_bytes = 0.0


class Flow:
    __slots__ = (
        "aborted",
        "active",
        "cap",
        "dst_res",
        "frozen",
        "owner",
        "rate",
        "remaining",
        "size",
        "src_res",
        "t",
        "version",
        "w",
    )

    def __init__(self, src: Port, dst: Port, size: int, cap: float, now: float, w: float = 1.0):
        self.src_res = src.up
        self.dst_res = dst.down
        self.size = size
        self.remaining = float(size)
        self.cap = cap
        self.rate = 0.0
        self.t = now
        self.owner: Any = None  # the sending link end, told by ``_flow_over(flow)`` when it ends
        self.version = 0
        self.active = False
        self.aborted = False
        self.frozen = False  # its receiver vanished: no bandwidth, the sender stays blocked
        self.w = w  # its weight in the max-min share (Network.share_spread)


class Network:
    """Flows, latency and the links between ports. One per simulation run."""

    def __init__(
        self,
        timeline: Timeline,
        rng: random.Random,
        *,
        jitter: float = 0.0,
        loss: float = 0.0,
        mss: int = 1460,
        min_rto: float = 0.2,
        window: int = 0,
        grid: float = 0.0,
        blackhole_reset: float = INF,
        share_spread: float = 0.0,
    ):
        self.tl = timeline
        self.share_spread = share_spread
        self.blackhole_reset = blackhole_reset
        self.grid = grid
        self.rng = rng
        self.jitter = jitter
        self.loss = loss
        self.mss = mss
        self.min_rto = min_rto
        self.window = window
        self.flows_started = 0
        self.flows_done = 0
        self.flows_aborted = 0
        self.level_steps = 0
        self.level_overruns = 0
        self.rate_changes = 0
        self.messages = 0
        self.msg_counts: dict[type, int] = {}
        # deliver_at is one delay, the grid and the link's order (the driver inlines it then).
        self.plain_delivery = not jitter and not loss
        self.active_flows = 0
        self.peak_flows = 0

    # ------------------------------------------------------------------ geometry

    @staticmethod
    def delay(a: Port, b: Port) -> float:
        return a.latency + b.latency

    def flow_cap(self, a: Port, b: Port) -> float:
        cap = INF
        rtt = 2 * (a.latency + b.latency)
        if rtt > 0:
            if self.window:
                cap = self.window / rtt
            if self.loss > 0:
                cap = min(cap, 1.22 * self.mss / (rtt * math.sqrt(self.loss)))
        return cap

    # ------------------------------------------------------------------ flows

    def _set_rate(self, f: Flow, rate: float, now: float) -> None:
        if rate == INF:  # both ends unsaturated: cannot happen at a fixed point; be safe
            rate = min(f.src_res.cap, f.dst_res.cap)
        if rate == f.rate:
            return
        self.rate_changes += 1
        done = f.rate * (now - f.t)
        if done:
            f.remaining -= done
            f.src_res.node.sent_bytes += done
            f.dst_res.node.recv_bytes += done
        f.t = now
        f.rate = rate
        rem = f.remaining if f.remaining > 0 else 0.0
        f.version += 1
        due = now + rem / rate
        g = self.grid
        if g:
            due = math.ceil(due / g - 1e-6) * g
        self.tl.at(due, self._flow_due, f, f.version)

    def _flow_due(self, f: Flow, version: int) -> None:
        if version != f.version or not f.active:
            return  # stale: the rate changed since
        self.end_flow(f, self.tl.now())
        self._wake_sender(f)

    @staticmethod
    def _wake_sender(f: Flow) -> None:
        owner = f.owner
        if owner is not None:
            f.owner = None
            owner._flow_over(f)

    def _rebalance(self, start: list[Resource], touched: Flow | None, now: float) -> None:
        work = deque(start)
        for r in start:
            r.queued = True
        changed: dict[Resource, None] = {}
        steps = 0
        while work:
            r = work.popleft()
            r.queued = False
            steps += 1
            if steps > MAX_LEVEL_STEPS:
                self.level_overruns += 1
                for q in work:
                    q.queued = False
                break
            new = r.level()
            old = r.mu
            if new == old or (new != INF and old != INF and abs(new - old) <= LEVEL_TOLERANCE * old):
                continue
            r.mu = new
            changed[r] = None
            if r.up:
                for f in r.flows:
                    o = f.dst_res
                    if not o.queued:
                        o.queued = True
                        work.append(o)
            else:
                for f in r.flows:
                    o = f.src_res
                    if not o.queued:
                        o.queued = True
                        work.append(o)
        self.level_steps += steps
        for r in changed:
            for f in r.flows:
                a, b = f.src_res.mu, f.dst_res.mu
                rate = a if a < b else b
                if f.w != 1.0:
                    rate *= f.w
                if f.cap < rate:
                    rate = f.cap
                if rate != f.rate:
                    self._set_rate(f, rate, now)
        if touched is not None and touched.active:
            rate = min(touched.src_res.mu, touched.dst_res.mu) * touched.w
            if touched.cap < rate:
                rate = touched.cap
            if rate != touched.rate:
                self._set_rate(touched, rate, now)

    def start_flow(self, f: Flow, now: float) -> None:
        f.active = True
        f.t = now
        if f.w != 1.0:
            f.src_res.weighted = f.dst_res.weighted = True
        f.src_res.flows.append(f)
        f.dst_res.flows.append(f)
        self.flows_started += 1
        self.active_flows += 1
        if self.active_flows > self.peak_flows:
            self.peak_flows = self.active_flows
        self._rebalance([f.dst_res, f.src_res], f, now)

    def end_flow(self, f: Flow, now: float) -> None:
        if not f.active:
            return
        f.active = False
        self.active_flows -= 1
        # Credit what was sent: all that remained for a finished flow, the part so far if aborted.
        sent = f.rate * (now - f.t) if f.aborted else f.remaining
        f.src_res.node.sent_bytes += sent
        f.dst_res.node.recv_bytes += sent
        f.remaining -= sent
        f.t = now
        f.rate = 0.0
        f.version += 1
        f.src_res.flows.remove(f)
        f.dst_res.flows.remove(f)
        self._rebalance([f.src_res, f.dst_res], None, now)

    def sent(self, port: Port, now: float) -> float:
        """Bytes ``port`` has uploaded by ``now``, counting flows in progress."""
        out = port.sent_bytes
        for f in port.up.flows:
            out += f.rate * (now - f.t)
        return out

    def transmit(self, owner: Any, src: Port, dst: Port, nbytes: int, cap: float) -> Flow:
        """Start moving ``nbytes`` from ``src`` to ``dst`` at the fair-share rate; ``owner`` is
        told (``_flow_over``) when the last byte has left or the flow was aborted."""
        now = self.tl.now()
        w = 1.0
        if self.share_spread:
            w = self.rng.uniform(1.0 - self.share_spread, 1.0 + self.share_spread)
        f = Flow(src, dst, nbytes, cap, now, w)
        f.owner = owner
        self.start_flow(f, now)
        return f

    def abort(self, f: Flow) -> None:
        if f.active:
            f.aborted = True
            self.end_flow(f, self.tl.now())
            self._wake_sender(f)
        elif f.frozen:
            f.aborted = True
            self._wake_sender(f)

    def freeze(self, f: Flow) -> None:
        """The receiver vanished: the flow stops using bandwidth (what was sent is counted), and its
        sender stays blocked in ``send`` (a full TCP send buffer) until its link end is closed."""
        if f.active:
            f.aborted = True
            self.end_flow(f, self.tl.now())
        f.frozen = True

    def stall(self, owner: Any, src: Port, dst: Port, nbytes: int, cap: float) -> Flow:
        """A piece sent on a link whose peer vanished: its sender stays blocked until the flow is
        aborted (its link end closed, or TCP gave up)."""
        f = Flow(src, dst, nbytes, cap, self.tl.now())
        f.frozen = True
        f.owner = owner
        return f

    # ------------------------------------------------------------------ messages

    def deliver_at(self, link: Any, now: float) -> float:
        at = now + link.delay
        if self.jitter:
            at += self.rng.uniform(0.0, self.jitter)
        if self.loss and self.rng.random() < self.loss:
            at += max(self.min_rto, 4 * link.delay)  # one retransmission timeout (RTO ~ 2 RTT)
        g = self.grid
        if g:
            at = math.ceil(at / g - 1e-6) * g
        last = link.last_at
        if at < last:
            at = last
        link.last_at = at
        return at
