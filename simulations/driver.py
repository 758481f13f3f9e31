"""The simulator's runner of the engine: ``SimTransfer`` drives ``swarm.engine.TransferCore`` (the
node's engine, unchanged) over ``LinkEnd`` objects on the simulated network, from the timeline.

It does what the node's trio runner (``swarm/engine/runner.py``, ``Transfer``) does, with plain
calls instead of tasks:

- handshake: send Hello and Bitfield, check the peer's, register (refused, duplicate or too slow
  links are closed with a reason, as ``serve_link`` does);
- reader: hand each message to the core in arrival order; an accepted piece is verified (taking
  ``len / hash_rate`` virtual seconds if the group has a ``hash_rate``) and written, at most
  ``writes_per_link`` at once: with as many in flight the link reads nothing more;
- writer: after anything is queued for a peer (``PeerState.wake``), send its control messages, then
  the next piece it asked for; a piece holds the link end until its flow has finished;
- ``tick`` every ``EngineConfig.tick`` seconds; links the core names idle are closed.

The simulator's nodes hold no task: a whole run is one loop over the timeline.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

from simulations._engine import (
    Drop,
    EngineConfig,
    LinkClosed,
    PeerState,
    PieceHashMismatch,
    StoreError,
    TransferCore,
)
from simulations.network import INF, Flow, Network, Port, Timeline
from swarm import wire

log = logging.getLogger(__name__)

_PieceData = wire.PieceData
_ceil = math.ceil
_CLOSED: Any = object()

HELLO, BITFIELD, TRADING, ENDED = 0, 1, 2, 3  # a link end's state; the first two: its handshake
#: ``LinkEnd.writing`` until its first write (never appended to: ``_write`` makes a list).
_NO_WRITES: Any = ()


#: PieceSet bits -> their indices, ascending: the engine iterates a peer's pieces often (the
#: picker's ``interesting`` is ``set.isdisjoint`` over them) and a crowd's nodes pass through the
#: same few sets. Bounded: cleared when full (a cache only; answers never depend on it).
_MEMBERS: dict[int, tuple[int, ...]] = {}
_MEMBERS_MAX = 1 << 16


class PieceSet:
    """A set of piece indices held as the bits of one int, for ``SimPeer``: what the engine does
    with a peer's piece sets (``in``, ``add``, ``discard``, iteration in ascending order as a set
    of small ints iterates, ``len``, truth) gives the same answers as with a ``set``. A set of 25
    indices costs 2,264 bytes and an empty one 216; this ~60-90."""

    __slots__ = ("bits",)

    def __init__(self, items: Any = ()) -> None:
        b = 0
        for i in items:
            b |= 1 << i
        self.bits = b

    def __contains__(self, i: object) -> bool:
        return i >= 0 and (self.bits >> i) & 1 == 1  # type: ignore[operator]

    def add(self, i: int) -> None:
        self.bits |= 1 << i

    def discard(self, i: int) -> None:
        if i >= 0:
            self.bits &= ~(1 << i)

    def __iter__(self) -> Any:
        b = self.bits
        t = _MEMBERS.get(b)
        if t is None:
            if len(_MEMBERS) >= _MEMBERS_MAX:
                _MEMBERS.clear()
            t = _MEMBERS[b] = tuple([i for i in range(b.bit_length()) if (b >> i) & 1])
        return iter(t)

    def __len__(self) -> int:
        return self.bits.bit_count()

    def __bool__(self) -> bool:
        return self.bits != 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PieceSet):
            return self.bits == other.bits
        if isinstance(other, (set, frozenset)):
            return len(other) == len(self) and all(i in self for i in other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PieceSet({list(self)})"


class SimPeer(PeerState):
    """The engine's ``PeerState`` with its three piece sets (``have``, ``cancelled``,
    ``held_back``) as ``PieceSet``: the same decisions (event logs identical), ~1 KB less per link
    end at 25 pieces, where a node of a large crowd holds 40-60 link ends. The engine assigns
    them only in ``PeerState.__init__`` and ``have`` in ``_check_bitfield``, which the driver
    calls (``_handshake_message``) and follows with a ``PieceSet``."""

    __slots__ = ()

    def __init__(self, link: Any, now: float):
        super().__init__(link, now)
        self.have = PieceSet()  # type: ignore[assignment]
        self.cancelled = PieceSet()  # type: ignore[assignment]
        self.held_back = PieceSet()  # type: ignore[assignment]


class LinkEnd:
    """One end of a simulated connection, held by ``port``'s node: the engine's ``PeerLink``, and
    the state of the runner for it. Messages are wire message objects (never encoded): piece
    payloads are length stand-ins."""

    __slots__ = (
        "closed",
        "dead",
        "delay",
        "eof",
        "flow",
        "flow_cap",
        "flushing",
        "held",
        "held_msg",
        "hs",
        "inbox",
        "last_at",
        "net",
        "owner",
        "paused",
        "peer",
        "peer_id",
        "port",
        "remote",
        "reset_at",
        "scheduled",
        "sending",
        "state",
        "tl",
        "writing",
    )

    def __init__(self, net: Network, port: Port, peer_id: str, delay: float, flow_cap: float):
        self.net = net
        self.tl = net.tl
        self.port = port
        self.peer_id = peer_id
        self.delay = delay
        self.flow_cap = flow_cap
        self.remote: LinkEnd = self
        # A list, not a deque: an inbox holds a few messages at a time, and an empty deque costs
        # ~760 bytes against a list's 56.
        self.inbox: list[tuple[float, Any]] = []
        self.scheduled = False  # a delivery of the inbox's head is on the timeline
        self.last_at = 0.0  # last delivery time on the remote's inbox (keeps order)
        self.flow: Flow | None = None
        self.closed = False  # this end was closed (by its runner or because its node left)
        self.eof = False  # the other end's close has arrived here
        self.dead = False  # one end's host vanished: nothing crosses, nothing is closed
        self.reset_at = INF  # when the kernel drops the link to a vanished peer (see vanish)
        # The runner's state (SimTransfer):
        self.owner: SimTransfer | None = None
        self.state = HELLO
        self.peer: PeerState | None = None
        self.hs: Any = None  # the core's Handshake while it lasts
        self.paused = False  # the reader waits for a write slot
        self.held: tuple[int, Any] | None = None  # the accepted piece waiting for it
        self.writing: list[int] = _NO_WRITES  # pieces being verified and written (hash_rate)
        self.sending: int | None = None  # the piece on the wire ...
        self.held_msg: Any = None  # ... and its message
        self.flushing = False  # a flush of the writer is queued

    # ------------------------------------------------------------------ transport

    def set(self) -> None:
        """``PeerState.wake``: something was queued for the peer; the writer runs soon."""
        if not self.flushing and self.state == TRADING:
            self.flushing = True
            self.tl.soon(_flush, self)

    def send(self, msg: wire.Message) -> None:
        """Send a control message (it arrives after the link's delay)."""
        if self.dead:
            if self.closed:
                raise LinkClosed("link closed")
            self._start_reset()
            return
        if self.closed or self.remote.closed:
            raise LinkClosed("link closed")
        self._deliver(msg)

    def _deliver(self, msg: Any) -> None:
        net = self.net
        net.messages += 1
        counts = net.msg_counts
        t = type(msg)
        counts[t] = counts.get(t, 0) + 1
        if net.plain_delivery:  # Network.deliver_at without jitter or loss, inlined (hot path)
            at = self.tl.t + self.delay
            g = net.grid
            if g:
                at = _ceil(at / g - 1e-6) * g
            if at < self.last_at:
                at = self.last_at
            self.last_at = at
        else:
            at = net.deliver_at(self, self.tl.t)
        remote = self.remote
        inbox = remote.inbox
        inbox.append((at, msg))  # remote._push, inlined
        if not remote.scheduled and len(inbox) == 1 and not remote.paused:
            remote.scheduled = True
            remote.tl.at(at, _read, remote)

    def put_piece(self, msg: wire.PieceData) -> None:
        """Put a piece on the wire; ``_flow_over`` delivers it once its last byte has left. (Not
        named ``send_piece``: that is the optional data lane of a ``PeerLink``, which
        ``PeerState`` would hold as a bound method, ~70 bytes per link end, unused here.)"""
        if self.dead:
            if self.closed:
                raise LinkClosed("link closed")
            self._start_reset()
            self.flow = self.net.stall(self, self.port, self.remote.port, len(msg.data), self.flow_cap)
        else:
            if self.closed or self.remote.closed:
                raise LinkClosed("link closed")
            self.flow = self.net.transmit(self, self.port, self.remote.port, len(msg.data), self.flow_cap)
        self.held_msg = msg

    def _flow_over(self, f: Flow) -> None:
        self.flow = None
        net = self.net
        if f.aborted or self.closed or self.remote.closed or self.dead:
            if not f.frozen or f.aborted:
                net.flows_aborted += 1
            if self.owner is not None:
                why = "connection reset: the peer stopped answering" if self.dead else "connection lost"
                self.owner._sent(self, LinkClosed(f"{why} while sending a piece"))
            return
        net.flows_done += 1
        self._deliver(self.held_msg)
        if self.owner is not None:
            self.owner._sent(self, None)

    def _push(self, at: float, msg: Any) -> None:
        """Queue ``msg`` on this (receiving) end, visible at ``at``."""
        inbox = self.inbox
        inbox.append((at, msg))
        if not self.scheduled and len(inbox) == 1 and not self.paused:
            self.scheduled = True
            self.tl.at(at, _read, self)

    def _start_reset(self) -> None:
        if self.reset_at == INF and self.net.blackhole_reset < INF:
            self.reset_at = self.tl.now() + self.net.blackhole_reset
            self.tl.at(self.reset_at, _reset, self)

    def vanish(self) -> None:
        """Called on the end held by a host that vanished: from now on nothing crosses this link
        either way and neither end sees it close; the peer's piece in flight to us stops using
        bandwidth but keeps its sender blocked. The peer's end is reset ``blackhole_reset`` later,
        idle or not (the lane's TCP_USER_TIMEOUT and keepalive, ``scenario.BLACKHOLE_RESET``)."""
        remote = self.remote
        self.dead = remote.dead = True
        if remote.flow is not None:
            self.net.freeze(remote.flow)
        remote._start_reset()
        if self.flow is not None:
            self.net.abort(self.flow)

    def close(self) -> None:
        """Close this end now: the peer sees end-of-stream after the one-way delay; pieces in
        flight either way are aborted. On a dead link (see ``vanish``) nothing reaches the other
        end and only our own piece in flight is aborted."""
        if self.closed:
            return
        self.closed = True
        self.inbox = []
        if self.dead:
            if self.flow is not None:
                self.net.abort(self.flow)
            return
        remote = self.remote
        for f in (self.flow, remote.flow):
            if f is not None:
                self.net.abort(f)
        if not remote.closed:
            remote._push(self.net.deliver_at(self, self.tl.now()), _CLOSED)


def _read(end: LinkEnd) -> None:
    """Hand the link end's due messages to its runner, in order."""
    end.scheduled = False
    inbox = end.inbox
    now = end.tl.t
    while inbox and not end.closed and not end.paused:
        at, msg = inbox[0]
        if at > now:
            end.scheduled = True
            end.tl.at(at, _read, end)
            return
        del inbox[0]
        owner = end.owner
        if msg is _CLOSED:
            end.eof = True
            if owner is not None:
                owner._eof(end)
            return
        if owner is not None:
            owner._message(end, msg)


def _reset(end: LinkEnd) -> None:
    """The kernel dropped the link to a vanished peer (TCP_USER_TIMEOUT): the connection ends."""
    if not end.closed and not end.eof:
        end._push(end.tl.now(), _CLOSED)
        if end.flow is not None:
            end.net.abort(end.flow)


def _flush(end: LinkEnd) -> None:
    end.flushing = False
    if end.owner is not None:
        end.owner._flush(end)


def connect(net: Network, a: Port, a_id: str, b: Port, b_id: str) -> tuple[LinkEnd, LinkEnd]:
    """Two ends of one connection: the first is held by ``a`` and names ``b_id`` as its peer."""
    d = net.delay(a, b)
    cap = net.flow_cap(a, b)
    ab = LinkEnd(net, a, b_id, d, cap)
    ba = LinkEnd(net, b, a_id, d, cap)
    ab.remote, ba.remote = ba, ab
    return ab, ba


class SimTransfer(TransferCore):
    """The engine's core run by the timeline (see the module docstring). ``on_link_over(end)`` is
    called once per served link end when it is over (not for those ``shutdown`` ends)."""

    def __init__(
        self,
        manifest: Any,
        store: Any,
        tl: Timeline,
        *,
        config: EngineConfig,
        rng: random.Random,
        may_upload: bool,
        hash_rate: float,
        on_piece: Callable[[int, int], None] | None,
        on_link_over: Callable[[LinkEnd], None],
    ):
        self.tl = tl
        self.hash_rate = hash_rate
        self.on_link_over = on_link_over
        self.ends: dict[LinkEnd, None] = {}
        self.stopped = False
        super().__init__(
            manifest, store, clock=tl.now, config=config, rng=rng, may_upload=may_upload, on_piece=on_piece
        )

    def start(self) -> None:
        now = self.tl.now()
        self._next_rechoke = now + self.config.rechoke_interval
        self.tl.at(now + self.config.tick, self._tick)

    def shutdown(self, vanish: bool = False) -> list[LinkEnd]:
        """The node left: every link end is closed (or goes dark, ``vanish``) at once, nothing more
        runs. Returns the ends that were served."""
        self.stopped = True
        ends = list(self.ends)
        self.ends.clear()
        for end in ends:
            end.state = ENDED
            end.owner = None
            if vanish:
                end.vanish()
            end.close()
        return ends

    def _tick(self) -> None:
        if self.stopped:
            return
        now = self.tl.now()
        for p in self.tick(now):
            self._end(p.link, p.close_reason, False)
        self.tl.at(now + self.config.tick, self._tick)

    # ------------------------------------------------------------------ links

    def serve(self, end: LinkEnd) -> None:
        """``serve_link``: refuse ``end`` or start its handshake."""
        why = self._refusal(end, None)
        end.owner = self
        self.ends[end] = None
        if why:
            log.info("refusing a link from %s: %s", end.peer_id, why)
            self._close(end, why)
            return
        end.hs = self._admit(end, None)
        end.peer = SimPeer(end, self.tl.now())  # type: ignore[arg-type]
        try:
            for msg in self._greeting():
                end.send(msg)
        except LinkClosed as e:
            self._handshake_failed(end, e)
            return
        self.tl.at(self.tl.now() + self.config.handshake_timeout, self._handshake_timeout, end)
        if end.inbox and not end.scheduled:
            end.scheduled = True
            self.tl.soon(_read, end)

    def lost(self, end: LinkEnd) -> None:
        """``end`` was closed from outside (its reader sees the link closed)."""
        end.close()
        if end.owner is not self:
            return
        if end.state == TRADING:
            self._end(end, "closed by peer", False)
        else:
            self._close(end, None)

    def _handshake_timeout(self, end: LinkEnd) -> None:
        if end.state < TRADING and end.owner is self:
            self._handshake_failed(end, "")

    def _handshake_failed(self, end: LinkEnd, e: Any) -> None:
        log.info("handshake with %s failed: %s", end.peer_id, e)
        self._close(end, f"handshake: {e}")

    def _close(self, end: LinkEnd, reason: str | None) -> None:
        """Close a link that is not trading (``_close_link``), first telling the peer ``reason``."""
        if end.hs is not None:
            self._handshake_over(end.hs)
            end.hs = None
        end.state = ENDED
        if reason:
            try:
                end.send(wire.Error(reason[: wire.MAX_REASON_BYTES]))
            except LinkClosed:
                pass
        end.close()
        self._over(end)

    def _over(self, end: LinkEnd) -> None:
        end.owner = None
        if self.ends.pop(end, 0) is None:
            self.on_link_over(end)

    def _handshake_message(self, end: LinkEnd, msg: wire.Message) -> None:
        peer = end.peer
        assert peer is not None
        try:
            if end.state == HELLO:
                self._check_hello(msg)
                peer.serves = msg.serves  # type: ignore[attr-defined]
                end.state = BITFIELD
                return
            self._check_bitfield(peer, msg)
            peer.have = PieceSet(peer.have)  # type: ignore[assignment]
        except (wire.ProtocolError, Drop) as e:
            self._handshake_failed(end, e)
            return
        if peer.id in self.peers:  # both sides opened a link at once: keep exactly one
            if not self._replaces(end):  # type: ignore[arg-type]
                self._close(end, "duplicate link")
                return
            old = self.peers[peer.id]
            self._forget(old)
            self._end(old.link, "", False)  # type: ignore[arg-type]
        end.state = TRADING
        peer.wake = end
        hs, end.hs = end.hs, None
        self._register(peer, hs)

    def _message(self, end: LinkEnd, msg: wire.Message) -> None:
        if end.state < TRADING:
            self._handshake_message(end, msg)
            return
        if end.state != TRADING:
            return
        peer = end.peer
        assert peer is not None
        try:
            if type(msg) is _PieceData:
                i = self._accept_piece(peer, msg)
                if i is None:
                    return
                if len(end.writing) >= max(1, self.config.writes_per_link):
                    end.held = (i, msg)
                    end.paused = True
                    return
                self._write(end, i, msg)
            else:
                self._on_control(peer, msg)
        except Exception as e:
            self._fault(end, e)

    def _fault(self, end: LinkEnd, e: Exception) -> None:
        """``_guard``: a peer's fault ends the link with a reason; anything else is our bug."""
        peer = end.peer
        assert peer is not None
        if isinstance(e, Drop):
            self._end(end, str(e), True)
        elif isinstance(e, wire.ProtocolError):
            self._faulted(peer)
            self._end(end, f"protocol error: {e}", True)
        elif isinstance(e, LinkClosed):
            self._end(end, f"link lost: {e!r}", False)
        else:
            self.internal_errors += 1
            log.error("engine error on link to %s", peer.id, exc_info=e)
            self._end(end, "internal error", False)

    def _eof(self, end: LinkEnd) -> None:
        if end.state < TRADING:
            self._handshake_failed(end, "peer closed")
        elif end.state == TRADING:
            self._end(end, "closed by peer", False)

    # ------------------------------------------------------------------ writes

    def _write(self, end: LinkEnd, i: int, msg: wire.PieceData) -> None:
        if end.writing is _NO_WRITES:
            end.writing = [i]
        else:
            end.writing.append(i)
        if self.hash_rate:
            self.tl.at(self.tl.now() + len(msg.data) / self.hash_rate, self._written, end, i, msg)
        else:
            self._written(end, i, msg)

    def _written(self, end: LinkEnd, i: int, msg: wire.PieceData) -> None:
        if end.state != TRADING or i not in end.writing:
            return  # the link ended meanwhile (its writes were abandoned)
        end.writing.remove(i)
        peer = end.peer
        assert peer is not None
        error: Exception | None = None
        try:
            self.store.write_piece(i, msg.data)
        except (PieceHashMismatch, StoreError) as e:
            error = e
        try:
            self._piece_written(peer, i, len(msg.data), error)
        except Exception as e:
            self._fault(end, e)
            return
        if end.held is not None and end.state == TRADING:
            (j, held), end.held = end.held, None
            end.paused = False
            self._write(end, j, held)
            if end.state == TRADING and not end.paused and end.inbox and not end.scheduled:
                end.scheduled = True
                self.tl.soon(_read, end)

    # ------------------------------------------------------------------ the writer

    def _flush(self, end: LinkEnd) -> None:
        if end.state != TRADING or end.sending is not None:
            return
        peer = end.peer
        assert peer is not None
        try:
            while True:
                if peer.control:
                    msgs, peer.control = peer.control, []
                    for msg in msgs:
                        end.send(msg)
                i = self._next_upload(peer)
                if i is None:
                    if peer.control:  # Rejects for what a choked peer had queued
                        continue
                    return
                self._upload_started(i)
                self._upload_copy(i)
                try:
                    data = self.store.read_piece(i)
                except StoreError as e:
                    self._upload_ended(peer, i, None, e)
                    continue
                end.sending = i
                end.put_piece(wire.PieceData(i, data))
                return
        except LinkClosed as e:
            if end.sending is not None:
                self._upload_ended(peer, end.sending, None)
                end.sending = None
            self._end(end, f"link lost: {e!r}", False)

    def _sent(self, end: LinkEnd, error: LinkClosed | None) -> None:
        """The piece on the wire has left (or the link broke under it)."""
        i, end.sending = end.sending, None
        if i is None or end.state != TRADING:
            return
        peer = end.peer
        assert peer is not None
        self._upload_ended(peer, i, None if error else len(end.held_msg.data))
        end.held_msg = None
        if error is not None:
            self._end(end, f"link lost: {error!r}", False)
        else:
            self._flush(end)

    # ------------------------------------------------------------------ teardown

    def _cancel_link(self, peer: PeerState) -> None:
        self.tl.soon(self._end, peer.link, peer.close_reason, True)

    def _end(self, end: LinkEnd, reason: str, tell: bool) -> None:
        """The link is over (``_serve_link``'s end): forget the peer, close the link, first
        telling the peer why if it is at fault."""
        if end.state != TRADING or end.owner is not self:
            return
        end.state = ENDED
        peer = end.peer
        assert peer is not None
        peer.close_reason = peer.close_reason or reason
        peer.tell = peer.tell or tell
        peer.closed = True
        for i in end.writing:
            self._write_abandoned(i)
        end.writing = _NO_WRITES
        if end.held is not None:
            self._write_abandoned(end.held[0])
            end.held = None
        if end.sending is not None:
            self._upload_ended(peer, end.sending, None)
            end.sending = None
        self._forget(peer)
        if peer.tell and peer.close_reason:
            try:
                end.send(wire.Error(peer.close_reason[: wire.MAX_REASON_BYTES]))
            except LinkClosed:
                pass
        end.close()
        self._over(end)
