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

A flow's sender task is parked until the flow's finish time; when its rate changes, the remaining
bytes are settled and a new finish time is put on the timeline (the old entry goes stale; no task is
cancelled and re-slept). So a sender blocks in ``send(PieceData)`` while its piece is on the wire,
which is the back-pressure of a TCP stream: control messages queued behind it wait, as on one yamux
stream.

Latency
-------
One-way delay between a and b is ``latency(a) + latency(b)`` (access latency of each node to a
core with no congestion), plus optional jitter. A message is visible to the receiver that much
later; messages on one link keep their order. Each receiving link end keeps a FIFO of
(deliver_at, message); a reader with nothing due parks, and the timeline wakes it when its head is
due, so a delivery costs no extra task and a burst of due messages is read in one go.

Timeline
--------
One task serves a heap of (time, seq, action) for the whole simulation: link wake-ups, flow finishes
and the simulator's own actions (arrivals, departures, DHT lookups). Tasks wait with
``trio.lowlevel.wait_task_rescheduled`` and are woken with ``reschedule``: no cancel scope per wait.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from simulations._engine import LinkClosed
from swarm import wire

INF = math.inf
_PieceData = wire.PieceData
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_reschedule = trio.lowlevel.reschedule
_current_task = trio.lowlevel.current_task
_park = trio.lowlevel.wait_task_rescheduled

#: Relative change of a level below which propagation stops.
LEVEL_TOLERANCE = 1e-9
#: Safety bound on level recomputations for one flow start/end (the worklist converges long before).
MAX_LEVEL_STEPS = 20_000


class Timeline:
    """Timed actions served by one task (``run``), in (time, insertion) order.

    Actions due at the same instant share one bucket (times are mostly on the network's grid), so
    the heap holds distinct times only."""

    def __init__(self, clock: trio.abc.Clock | None = None):
        self.times: list[float] = []
        self.buckets: dict[float, list[tuple[Any, tuple]]] = {}
        self.scope: trio.CancelScope | None = None
        self.clock = clock
        self.actions = 0
        # MockClock with rate 0 keeps virtual time in ``_virtual_base``: reading it is ~10x cheaper
        # than trio.current_time() (which also calls perf_counter and discards it).
        if not (
            isinstance(clock, trio.testing.MockClock)
            and clock.rate == 0
            and isinstance(getattr(clock, "_virtual_base", None), float)
        ):
            self.now = trio.current_time  # type: ignore[method-assign]

    def now(self) -> float:
        return self.clock._virtual_base  # type: ignore[union-attr]

    def at(self, t: float, fn: Any, *args: Any) -> None:
        b = self.buckets.get(t)
        if b is None:
            self.buckets[t] = [(fn, args)]
            heapq.heappush(self.times, t)
            cs = self.scope
            if cs is not None and t < cs.deadline:
                cs.deadline = t
        else:
            b.append((fn, args))

    async def run(self) -> None:
        times = self.times
        buckets = self.buckets
        pop = heapq.heappop
        while True:
            now = self.now()
            while times and times[0] <= now:
                bucket = buckets.pop(pop(times))
                self.actions += len(bucket)
                for fn, args in bucket:
                    fn(*args)
            cs = trio.CancelScope(deadline=times[0] if times else INF)
            self.scope = cs
            with cs:
                await trio.sleep_forever()
            self.scope = None


class Resource:
    """One direction of one node's access link."""

    __slots__ = ("cap", "flows", "mu", "node", "queued", "up")

    def __init__(self, node: Port, cap: float, up: bool):
        self.node = node
        self.cap = cap
        self.up = up
        self.flows: list[Flow] = []
        self.mu = INF
        self.queued = False

    def level(self) -> float:
        flows = self.flows
        n = len(flows)
        if n == 0:
            return INF
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
        "rate",
        "remaining",
        "size",
        "src_res",
        "t",
        "task",
        "version",
    )

    def __init__(self, src: Port, dst: Port, size: int, cap: float, now: float):
        self.src_res = src.up
        self.dst_res = dst.down
        self.size = size
        self.remaining = float(size)
        self.cap = cap
        self.rate = 0.0
        self.t = now
        self.task: Any = None  # the sender, while parked
        self.version = 0
        self.active = False
        self.aborted = False
        self.frozen = False  # its receiver vanished: no bandwidth, the sender stays blocked

    def abort_park(self, _raise_cancel: Any) -> Any:
        self.task = None
        return _SUCCEEDED


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
    ):
        self.tl = timeline
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
        t = f.task
        if t is not None:
            f.task = None
            _reschedule(t)

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
                if f.cap < rate:
                    rate = f.cap
                if rate != f.rate:
                    self._set_rate(f, rate, now)
        if touched is not None and touched.active:
            rate = min(touched.src_res.mu, touched.dst_res.mu, touched.cap)
            if rate != touched.rate:
                self._set_rate(touched, rate, now)

    def start_flow(self, f: Flow, now: float) -> None:
        f.active = True
        f.t = now
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

    async def transmit(self, link: SimLink, nbytes: int) -> None:
        """Move ``nbytes`` from the link's owner to its peer at the fair-share rate; returns when the
        last byte has left (the caller then delivers after the propagation delay)."""
        now = self.tl.now()
        f = Flow(link.port, link.remote.port, nbytes, link.flow_cap, now)
        link.flow = f
        f.task = _current_task()
        self.start_flow(f, now)
        try:
            await _park(f.abort_park)
        finally:
            link.flow = None
            if f.active:  # cancelled from outside (our node left)
                f.aborted = True
                self.end_flow(f, self.tl.now())
        if f.aborted:
            self.flows_aborted += 1
            raise LinkClosed("connection lost while sending a piece")
        self.flows_done += 1

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

    async def stall(self, link: SimLink, nbytes: int) -> None:
        """A piece sent on a link whose peer vanished: blocks until the link end is closed."""
        f = Flow(link.port, link.remote.port, nbytes, link.flow_cap, self.tl.now())
        f.frozen = True
        link.flow = f
        f.task = _current_task()
        try:
            await _park(f.abort_park)
        finally:
            link.flow = None
        raise LinkClosed("connection reset: the peer stopped answering")

    # ------------------------------------------------------------------ messages

    def ceil(self, t: float) -> float:
        """``t`` rounded up to the time grid: events that fall within one grid step share one
        instant, so many wake-ups are served by one pass of the event loop."""
        g = self.grid
        return math.ceil(t / g - 1e-6) * g

    def deliver_at(self, link: SimLink, now: float) -> float:
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

    def connect(self, a: Port, a_id: str, b: Port, b_id: str) -> tuple[SimLink, SimLink]:
        """Two ends of one connection: the first is held by ``a`` and names ``b_id`` as its peer."""
        d = self.delay(a, b)
        cap = self.flow_cap(a, b)
        ab = SimLink(self, a, b_id, d, cap)
        ba = SimLink(self, b, a_id, d, cap)
        ab.remote, ba.remote = ba, ab
        return ab, ba


_CLOSED: Any = object()


class SimLink:
    """One end of a simulated connection, held by ``port``'s node; implements engine.PeerLink.

    Messages are wire message objects (never encoded): piece payloads are length stand-ins.
    """

    __slots__ = (
        "closed",
        "dead",
        "delay",
        "eof",
        "flow",
        "flow_cap",
        "inbox",
        "last_at",
        "net",
        "parked",
        "peer_id",
        "port",
        "remote",
        "reset_at",
        "tl",
    )

    def __init__(self, net: Network, port: Port, peer_id: str, delay: float, flow_cap: float):
        self.net = net
        self.tl = net.tl
        self.port = port
        self.peer_id = peer_id
        self.delay = delay
        self.flow_cap = flow_cap
        self.remote: SimLink = self
        # A list, not a deque: an inbox holds a few messages at a time, and an empty deque costs
        # ~760 bytes against a list's 56 (one per link end: ~40 per node at scale).
        self.inbox: list[tuple[float, Any]] = []
        self.parked: Any = None  # our reader task while it waits
        self.last_at = 0.0  # last delivery time on the remote's inbox (keeps order)
        self.flow: Flow | None = None
        self.closed = False  # this end was closed (aclose or its node left)
        self.eof = False  # the other end's close has arrived here
        self.dead = False  # one end's host vanished: nothing crosses, nothing is closed
        self.reset_at = INF  # when TCP gives up retransmitting to a vanished peer (see vanish)

    def _push(self, at: float, msg: Any) -> None:
        """Queue ``msg`` on this (receiving) end, visible at ``at``."""
        inbox = self.inbox
        inbox.append((at, msg))
        if self.parked is not None and len(inbox) == 1:
            self.tl.at(at, self._wake)

    def _wake(self) -> None:
        t = self.parked
        if t is not None:
            self.parked = None
            _reschedule(t)

    def _abort_park(self, _raise_cancel: Any) -> Any:
        self.parked = None
        return _SUCCEEDED

    async def send(self, msg: wire.Message) -> None:
        if self.dead:
            await self._send_dead(msg)
            return
        if self.closed or self.remote.closed:
            raise LinkClosed("link closed")
        net = self.net
        if type(msg) is _PieceData:
            await net.transmit(self, len(msg.data))
            if self.closed or self.remote.closed:
                raise LinkClosed("link closed")
        net.messages += 1
        counts = net.msg_counts
        t = type(msg)
        counts[t] = counts.get(t, 0) + 1
        self.remote._push(net.deliver_at(self, self.tl.now()), msg)

    async def receive(self) -> wire.Message:
        inbox = self.inbox
        while True:
            if self.closed:
                raise LinkClosed("link closed")
            if inbox:
                at, msg = inbox[0]
                if at <= self.tl.now():
                    del inbox[0]
                    if msg is _CLOSED:
                        self.eof = True
                        raise LinkClosed("peer closed")
                    return msg
                self.tl.at(at, self._wake)
            elif self.eof:
                raise LinkClosed("peer closed")
            self.parked = _current_task()
            await _park(self._abort_park)

    async def _send_dead(self, msg: wire.Message) -> None:
        """The peer vanished: a message is buffered and never arrives; once unacknowledged data
        waits, TCP resets the connection after ``Network.blackhole_reset`` seconds of retries."""
        if self.closed:
            raise LinkClosed("link closed")
        if self.reset_at == INF and self.net.blackhole_reset < INF:
            self.reset_at = self.tl.now() + self.net.blackhole_reset
            self.tl.at(self.reset_at, self._reset)
        if type(msg) is _PieceData:
            await self.net.stall(self, len(msg.data))

    def _reset(self) -> None:
        if not self.closed and not self.eof:
            self._push(self.tl.now(), _CLOSED)
            if self.flow is not None:
                self.net.abort(self.flow)

    def vanish(self) -> None:
        """Called on the end held by a host that vanished: from now on nothing crosses this link
        either way and neither end sees it close; the peer's piece in flight to us stops using
        bandwidth but keeps its sender blocked; data it had unacknowledged starts TCP's
        retransmission clock."""
        remote = self.remote
        self.dead = remote.dead = True
        if remote.flow is not None:
            self.net.freeze(remote.flow)
            if remote.reset_at == INF and self.net.blackhole_reset < INF:
                remote.reset_at = self.tl.now() + self.net.blackhole_reset
                self.tl.at(remote.reset_at, remote._reset)
        if self.flow is not None:
            self.net.abort(self.flow)

    def close(self) -> None:
        """Close this end now (synchronous): the peer sees end-of-stream after the one-way delay;
        pieces in flight either way are aborted. On a dead link (see ``vanish``) nothing reaches
        the other end and only our own piece in flight is aborted."""
        if self.closed:
            return
        self.closed = True
        if self.dead:
            if self.flow is not None:
                self.net.abort(self.flow)
            self._wake()
            return
        remote = self.remote
        for f in (self.flow, remote.flow):
            if f is not None:
                self.net.abort(f)
        if not remote.closed:
            remote._push(self.net.deliver_at(self, self.tl.now()), _CLOSED)
        self._wake()

    async def aclose(self) -> None:
        self.close()
