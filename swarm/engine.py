"""The transfer engine: trades the pieces of one manifest with many peers at once.

It decides (with ``picker`` and ``choker``) and drives transfers over ``PeerLink`` objects, which
the libp2p layer, the fast data lane and the simulator each implement. It never imports libp2p and
never reads the wall clock directly (only ``trio.current_time()``), so the simulator can run it under
a virtual clock.

Per link there are two tasks: a reader that handles each message as it arrives (so a yamux stream is
always drained) and a writer that sends control messages first and piece payloads when the peer
holds an upload slot. Disk reads, writes and hashing run through ``run_blocking`` (worker threads in
production), never on the event loop.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs
import trio

from swarm import wire
from swarm.choker import Choker, PeerSlot
from swarm.manifest import Manifest
from swarm.picker import Picker
from swarm.store import PieceHashMismatch, StoreError

log = logging.getLogger(__name__)


class LinkClosed(Exception):
    """The other side of a link went away."""


class PeerLink(Protocol):
    """One bidirectional message channel to one peer about one manifest."""

    peer_id: str

    async def send(self, msg: wire.Message) -> None: ...

    async def receive(self) -> wire.Message:
        """The next message; raises LinkClosed when the peer is gone, wire.ProtocolError when
        it sent garbage."""
        ...

    async def aclose(self) -> None: ...

    # optional: def expect_pieces(lengths) -> None   (called once the peer's Hello checked out:
    # the link refuses a piece longer than the manifest's before taking memory for it)


class PieceStore(Protocol):
    """Where verified pieces live. ``write_piece`` verifies and raises PieceHashMismatch."""

    @property
    def have(self) -> frozenset[int]: ...

    def read_piece(self, index: int) -> Any: ...

    def write_piece(self, index: int, data: Any) -> bool: ...

    # optional: take_dropped() -> frozenset[int]: held pieces the store has dropped since the last
    # call (they failed re-verification on disk); the transfer fetches them again.


@attrs.frozen
class EngineConfig:
    pipeline_depth: int = 4
    """Requests outstanding per peer: enough to keep a fast link busy across one round trip."""
    upload_slots: int = 4
    """Peers served at once (see choker)."""
    slot_hold: float = 2.0
    """Seconds a peer keeps an upload slot before fair rotation may take it."""
    rechoke_interval: float = 1.0
    """How often upload slots are re-dealt and rates sampled."""
    tick: float = 0.25
    """How often request deadlines are checked."""
    request_timeout: float = 5.0
    """Base seconds a request may take before we ask someone else ..."""
    min_rate: float = 256 << 10
    """... plus its length at this rate (bytes/s): a 4 MiB piece gets 21 s, a config piece ~5 s.
    256 KiB/s = 2 Mbit/s per piece flow: a 20 Mbit/s host receiving from seven peers at once
    gets ~350 KiB/s on each; at 1 MiB/s (9 s for 4 MiB) such pieces timed out, were asked again
    elsewhere and still arrived: on ``tb_flash_crowd`` the worker uploaded 4.1x the model and the
    last frontend finished at 4.4x T_min instead of 2.4x / 2.6x (simulator, 5 seeds).
    The clock of a request starts when the peer can start serving it: when it was sent or when
    the peer last answered one of ours, whichever is later (a peer serves our requests in turn;
    see ``Transfer._queue_deadline``). Counted from sending, the fourth of four pipelined 4 MiB
    requests at a peer sending 2.5 MB/s to four peers waited ~27 s, timed out and was asked again
    elsewhere while the peer still sent it: the worker uploaded 4.4x the model in the simulator's
    ``tb_flash_crowd`` (ENGINE_REQUESTS.md A5)."""
    handshake_timeout: float = 10.0
    """Seconds for a new link to exchange Hello and Bitfield."""
    max_queued_requests: int = 64
    """Requests a peer may queue with us; more is a protocol violation (memory bound)."""
    max_wasted_bytes: int = 64 << 20
    """Unrequested piece bytes tolerated from one peer (late endgame copies) before dropping it."""
    max_timeouts: int = 3
    """Consecutive timed-out requests after which a peer counts as snubbed (one request at a time)."""
    max_peers: int = 64
    """Links per transfer, handshakes included."""
    handshakes_per_peer: int = 2
    """Links of one peer id in their handshake (not yet past the Bitfield exchange) at once. Two:
    two peers that dial each other at the same moment each hold an inbound and an outbound link
    of the pair until one wins (``_replaces``). Unbounded, one peer filled ``max_peers`` with 64
    pieces streams that sent Hello and never a Bitfield, and an honest fetch took 8.5 s instead
    of 0.1 s (security review, finding 8)."""
    handshakes_per_address: int = 8
    """Inbound links from one IP address in their handshake at once (peer ids cost nothing to
    make, addresses do). An honest handshake lasts one round trip, so eight leave room for a few
    nodes behind one NAT dialing us at the same moment; only links that tell their address count
    (``serve_link(address=...)``)."""
    reserved_outbound: int = 16
    """Of ``max_peers``, links kept for those we open ourselves (providers we chose) while we
    still fetch: inbound links take at most ``max_peers - reserved_outbound``, so strangers
    dialing us cannot fill the budget and keep a fetch from its providers. 16 = the outbound
    links a node's fetch opens (``node.MAX_LINKS_PER_FETCH``). A complete transfer dials nobody
    and gives every slot to inbound links. Links that cannot tell who opened them (memory links,
    the simulator's) are not counted as inbound."""
    choked_timeout: float = 60.0
    """Seconds a peer holding pieces we want may keep us choked while we are interested (counted
    from its last answer to a request of ours, see ``starved_for``) before it no longer counts as
    a source (the fetch dials others, the stall watchdog may fire); its link is
    closed unless the peer is interested in us (we may serve it; it may unchoke us in return), and
    it may be dialed again later. A seeder's choker (swarm/choker.py) rotates its
    ``DEFAULT_SLOTS`` = 4 slots every ``DEFAULT_HOLD`` = 2 s among interested peers, so with a
    full ``max_peers`` = 64 of them our turn comes within 64 / 4 x 2 s = 32 s, plus up to one hold
    of jitter and one ``rechoke_interval``: about 35 s. 60 s leaves that worst case a margin of
    ~1.7x; a peer that is choking us that long does not serve us. Without it a provider that never
    unchoked stalled a fetch forever (security review, finding 9)."""
    fault_cooldown: float = 60.0
    """Seconds a peer whose link we dropped for breaking the protocol (a bad frame, an index out of
    range, a piece longer than the manifest's) may not link to this transfer again. Not a ban: in
    encrypted lane mode a piece header is checked before it is authenticated, so an on-path
    attacker could make an honest peer look faulty; a minute keeps a broken peer from being
    re-dialed over and over while costing an honest one little."""
    first_copy_window: float = 3.0
    """A seeder serving several peers sends each piece once before it sends any piece twice, unless
    the first copy is older than this (seconds): peers get the rest from each other."""
    reject_backoff: float = 1.0
    """Seconds we do not re-ask a peer for a piece it rejected."""
    idle_close: float = 10.0
    """Seconds a link of a complete transfer may carry nothing either way before we close it."""
    writes_per_link: int = 2
    """Received pieces of one link being verified and written at once: with two, piece k+1 is
    hashed while piece k is on its way to disk (one at a time left the data lane's receiver
    waiting for the disk; the lane lends at most three buffers per link, so memory stays bounded)."""


@attrs.define
class PeerStats:
    bytes_up: int = 0
    bytes_down: int = 0
    pieces_up: int = 0
    pieces_down: int = 0
    bad_pieces: int = 0
    banned: bool = False


class _Peer:
    def __init__(self, link: PeerLink, now: float):
        self.link = link
        self.id = link.peer_id
        self.have: set[int] = set()
        self.am_interested = False
        self.peer_choking = True
        self.interested_since = now  # when we last became interested in them
        self.answered_at = now  # when they last answered a request of ours (piece or Reject)
        # Whether they opened the link (``reserved_outbound``); None: the link cannot tell.
        self.inbound = getattr(link, "outbound", None) is False
        self.scope: trio.CancelScope | None = None  # the link's tasks (``_drop_link`` cancels it)
        self.slot = PeerSlot(self.id, since=now, order=now)
        # Our outstanding requests in the order sent (the order the peer serves them): index ->
        # when sent. ``moved_at``: when the peer last answered one (a piece or a Reject) or we
        # gave up on its queue; the request at the head has its timeout from then on.
        self.requests: dict[int, float] = {}
        self.moved_at = now
        self.cancelled: set[int] = set()  # requests we cancelled whose piece may still come
        self.uploads: deque[int] = deque()
        self.refused: dict[int, float] = {}  # piece -> until when we don't re-ask this peer
        self.idle_since: float | None = None  # both sides uninterested since (we complete)
        self.held_back: set[int] = set()  # pieces we refused them once by the seeding policy
        self.serves = True  # from their Hello: they upload to peers
        self.control: deque[wire.Message] = deque()
        self.wake = trio.Event()
        self.timeouts = 0
        self.wasted = 0
        self.window_bytes = 0
        self.closed = False
        self.close_reason = ""
        # Optional fast path of a link (the data lane): send piece ``index`` straight from the
        # store, returning the bytes sent; raises StoreError if the piece cannot be read.
        self.send_piece = getattr(link, "send_piece", None)
        self.tell = False  # send the reason in an Error frame (we are dropping them for cause)

    def post(self, msg: wire.Message) -> None:
        self.control.append(msg)
        self.wake.set()


@attrs.define
class _Handshake:
    """A link admitted by ``serve_link`` and not yet registered (past the Bitfield exchange)."""

    peer_id: str
    address: str | None
    inbound: bool
    open: bool = True


class _Drop(Exception):
    """Close this link (reason in args)."""


def _release(data: Any) -> None:
    """Hand a pooled receive buffer back to its link (a link may lend one per PieceData)."""
    release = getattr(data, "release", None)
    if release is not None:
        release()


async def _run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


class Transfer:
    """Everything about trading one manifest: our pieces, our peers, our slots.

    Use ``async with trio.open_nursery() as n: n.start_soon(t.run)`` and hand each link to
    ``serve_link``; ``completed`` fires once every wanted piece is verified, ``configs_ready`` once
    every wanted config piece is. After completion the transfer keeps serving (seeding) until
    cancelled.
    """

    def __init__(
        self,
        manifest: Manifest,
        store: PieceStore,
        *,
        wanted_files: Iterable[int] | None = None,
        config: EngineConfig | None = None,
        rng: random.Random | None = None,
        run_blocking: Callable[..., Awaitable[Any]] | None = None,
        may_upload: bool = True,
        local_id: str = "",
        on_piece: Callable[[int, int], None] | None = None,
        bandwidth: Any = None,
    ):
        self.manifest = manifest
        self.hash = manifest.manifest_hash
        self.num_pieces = manifest.num_pieces
        self.store = store
        self.config = config or EngineConfig()
        self.rng = rng or random.Random()
        self.run_blocking = run_blocking or _run_in_thread
        self.may_upload = may_upload
        self.local_id = local_id
        self.on_piece = on_piece
        # The node's ``swarm.ratelimit.Bandwidth`` (shared by its transfers), or None: unlimited.
        self.bandwidth = bandwidth
        files = range(len(manifest.files)) if wanted_files is None else wanted_files
        wanted: set[int] = set()
        for f in files:
            wanted.update(manifest.file_piece_range(f))
        config_pieces = manifest.config_piece_indices() & wanted
        self.picker = Picker(self.num_pieces, wanted, config_pieces, rng=self.rng)
        self.have: set[int] = set(store.have)
        for i in self.have:
            self.picker.got(i)
        self._lengths = [p.length for p in manifest.pieces]
        self.wanted_bytes = sum(self._lengths[i] for i in wanted)
        self.choker = Choker(self.config.upload_slots, self.config.slot_hold, rng=self.rng)
        self.peers: dict[str, _Peer] = {}
        self.stats: dict[str, PeerStats] = {}
        self.banned: set[str] = set()
        self._writing: set[int] = set()
        self._sending = 0  # pieces being sent right now (a drain waits for them)
        # Links still in their handshake: they count against max_peers, and per peer id, per
        # address and inbound against the limits of EngineConfig (see _refusal).
        self._handshakes = 0
        self._hs_peers: Counter[str] = Counter()
        self._hs_addresses: Counter[str] = Counter()
        self._hs_inbound = 0
        # Peers whose link we closed because they kept us choked (``choked_timeout``): peer id ->
        # when. Linked again, such a peer counts as a source only once it unchokes us.
        self.choked_out: dict[str, float] = {}
        # Peers whose link broke the protocol: peer id -> when (see EngineConfig.fault_cooldown).
        self.faulted: dict[str, float] = {}
        # Seeding policy (see _hold_back): when we last sent each piece, how many copies we sent,
        # and how many pieces have each copy count (so the least-sent count is O(1) to find).
        self._sent_at: dict[int, float] = {}
        self._sending_since: dict[int, float] = {}
        self._copies = [0] * self.num_pieces
        self._copies_hist: Counter[int] = Counter({0: self.num_pieces})
        self.bytes_up = 0
        self.bytes_down = 0
        self.internal_errors = 0
        self.wasted_bytes = 0  # piece bytes received that we no longer needed (late or duplicate)
        self.timeouts = 0  # requests that timed out
        self.completed = trio.Event()
        self.failed = trio.Event()  # set with ``error`` when the local store cannot go on
        self.error: Exception | None = None
        self.configs_ready = trio.Event()
        self._check_done()

    # ------------------------------------------------------------------ public

    @property
    def done(self) -> bool:
        return self.picker.done

    @property
    def have_bytes(self) -> int:
        return sum(self._lengths[i] for i in self.have if i in self.picker.wanted)

    @property
    def useful_links(self) -> int:
        """Links to peers that can still send us something we want (``can_send``)."""
        return len(self.able_peers())

    def able_peers(self) -> list[_Peer]:
        now = trio.current_time()
        return [p for p in self.peers.values() if self.can_send(p, now)]

    def can_send(self, peer: _Peer, now: float) -> bool:
        """Can ``peer`` still send us a piece we want: it holds one, has not let ``max_timeouts``
        requests in a row time out, and has not kept us choked for ``choked_timeout`` (nor, on
        an earlier link, long enough that we closed it, unless it unchoked us since)."""
        if not self.picker.interesting(peer.have) or peer.timeouts >= self.config.max_timeouts:
            return False
        if peer.peer_choking and peer.id in self.choked_out:
            return False
        return self.starved_for(peer, now) < self.config.choked_timeout

    @staticmethod
    def starved_for(peer: _Peer, now: float) -> float:
        """Seconds we have wanted ``peer``'s pieces without an answer to a request (a piece or a
        Reject), if it is choking us now (else 0). Counted from its last answer, not from its last
        Choke: a peer that unchokes us and chokes us again before answering anything would
        otherwise never count as choking. (A busy seeder answers during each of our turns, with
        pieces or with Rejects of its seeding policy.)"""
        if not (peer.peer_choking and peer.am_interested):
            return 0.0
        return now - max(peer.answered_at, peer.interested_since)

    @property
    def uploads_pending(self) -> int:
        """Pieces peers asked of us that are queued or being sent."""
        return self._sending + sum(len(p.uploads) for p in self.peers.values())

    def stop_uploading(self) -> None:
        """Take no new requests (they are rejected) and unchoke no one; requests already queued
        are still served (a draining node finishes what it promised)."""
        self.may_upload = False

    def peer_stats(self, peer_id: str) -> PeerStats:
        return self.stats.setdefault(peer_id, PeerStats())

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Timers: request deadlines every ``tick``, slot re-dealing every ``rechoke_interval``."""
        task_status.started()
        next_rechoke = trio.current_time() + self.config.rechoke_interval
        while True:
            await trio.sleep(self.config.tick)
            now = trio.current_time()
            self._expire_requests(now)
            if self._paced_downloads():  # download credit came back: request again
                self._fill_all()
            if now >= next_rechoke:
                self._rechoke(now)
                next_rechoke = now + self.config.rechoke_interval
                self._drop_choking_links(now)
                for p in self._idle_links(now):
                    p.close_reason = p.close_reason or "idle: nothing to trade"
                    with trio.move_on_after(2):
                        try:
                            await p.link.aclose()
                        except Exception:
                            log.debug("closing idle link to %s failed", p.id, exc_info=True)

    def _idle_links(self, now: float) -> list[_Peer]:
        """Links that carried nothing either way for ``idle_close`` seconds while we are complete:
        a finished pair keeps nothing to trade, and the link budget (``max_peers``) is better
        spent on peers still fetching."""
        out = []
        for p in self.peers.values():
            if self.picker.done and not p.slot.interested and not p.am_interested:
                if p.idle_since is None:
                    p.idle_since = now
                elif now - p.idle_since >= self.config.idle_close:
                    out.append(p)
            else:
                p.idle_since = None
        return out

    def _drop_choking_links(self, now: float) -> None:
        """Close the links of peers that kept us choked for ``choked_timeout`` while we wanted
        their pieces and want nothing from us: they take a link the fetch could give to a peer
        that serves. (A peer interested in us keeps its link: in a large flash crowd a fellow
        fetcher may leave us choked for minutes and still take our pieces and pass them on; it
        just does not count as a source, ``can_send``.)"""
        for p in list(self.peers.values()):
            waited = self.starved_for(p, now)
            if waited >= self.config.choked_timeout and not p.slot.interested and not p.closed:
                self.choked_out[p.id] = now
                log.info("closing link to %s: kept us choked for %.0f s", p.id, waited)
                self._drop_link(p, f"kept us choked for {waited:.0f} s while we were interested")

    def _drop_link(self, peer: _Peer, reason: str) -> None:
        """End ``peer``'s link from outside its tasks, telling it ``reason``."""
        peer.close_reason, peer.tell = peer.close_reason or reason, True
        peer.closed = True
        if peer.scope is not None:
            peer.scope.cancel()

    async def close_links(self) -> None:
        """Close every link of this transfer (their ``serve_link`` calls then return)."""
        for p in list(self.peers.values()):
            with trio.move_on_after(2):
                try:
                    await p.link.aclose()
                except Exception:
                    log.debug("closing link to %s failed", p.id, exc_info=True)

    async def serve_link(
        self, link: PeerLink, hello: wire.Hello | None = None, *, address: str | None = None
    ) -> None:
        """Trade over ``link`` until either side closes it. Never raises for a peer's fault: the
        link is closed and the peer scored. ``hello`` is the peer's Hello if the caller already
        read it (to route the stream to this transfer); ``address`` the IP address an inbound
        link comes from, if known (``handshakes_per_address``)."""
        why = self._refusal(link, address)
        if why:
            log.info("refusing a link from %s: %s", link.peer_id, why)
            await self._close_link(link, why)
            return
        hs = self._admit(link, address)
        try:
            await self._serve_link(link, hello, hs)
        finally:
            self._handshake_over(hs)

    def _refusal(self, link: PeerLink, address: str | None) -> str:
        """Why a new link may not start its handshake ("" if it may)."""
        pid = link.peer_id
        cfg = self.config
        inbound = getattr(link, "outbound", None) is False
        if pid in self.banned:
            return "banned"
        since = self.faulted.get(pid)
        if since is not None:
            if trio.current_time() - since < cfg.fault_cooldown:
                return "broke the protocol recently"
            del self.faulted[pid]
        if pid in self.peers and not self._replaces(link):
            return "duplicate link"
        if self._hs_peers[pid] >= cfg.handshakes_per_peer:
            return "too many handshakes from this peer"
        if inbound and address is not None and self._hs_addresses[address] >= cfg.handshakes_per_address:
            return "too many handshakes from this address"
        if len(self.peers) + self._handshakes >= cfg.max_peers:
            return "too many peers"
        if inbound and not self.picker.done:
            links_in = self._hs_inbound + sum(1 for p in self.peers.values() if p.inbound)
            if links_in >= cfg.max_peers - cfg.reserved_outbound:
                return "too many peers"
        return ""

    def _admit(self, link: PeerLink, address: str | None) -> _Handshake:
        inbound = getattr(link, "outbound", None) is False
        hs = _Handshake(link.peer_id, address if inbound else None, inbound)
        self._handshakes += 1
        self._hs_peers[hs.peer_id] += 1
        if hs.address is not None:
            self._hs_addresses[hs.address] += 1
        self._hs_inbound += hs.inbound
        return hs

    def _handshake_over(self, hs: _Handshake) -> None:
        """The link of ``hs`` is registered or gone: it no longer counts as a handshake."""
        if not hs.open:
            return
        hs.open = False
        self._handshakes -= 1
        self._hs_peers[hs.peer_id] -= 1
        if not self._hs_peers[hs.peer_id]:
            del self._hs_peers[hs.peer_id]
        if hs.address is not None:
            self._hs_addresses[hs.address] -= 1
            if not self._hs_addresses[hs.address]:
                del self._hs_addresses[hs.address]
        self._hs_inbound -= hs.inbound

    async def _serve_link(self, link: PeerLink, hello: wire.Hello | None, hs: _Handshake) -> None:
        pid = link.peer_id
        peer = _Peer(link, trio.current_time())
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await link.send(wire.Hello(self.hash, self.num_pieces, self.may_upload))
                await link.send(wire.Bitfield(wire.pack_bitfield(self.have, self.num_pieces)))
                if hello is None:
                    hello = await link.receive()
                self._check_hello(hello)
                expect = getattr(link, "expect_pieces", None)  # optional: refuse oversized pieces
                if expect is not None:  # from their header, before memory is taken for them
                    expect(self._lengths)
                peer.serves = hello.serves
                bf = await link.receive()
                if not isinstance(bf, wire.Bitfield):
                    raise wire.ProtocolError(f"expected Bitfield, got {type(bf).__name__}")
                peer.have = wire.unpack_bitfield(bf.bits, self.num_pieces)
        except (trio.TooSlowError, LinkClosed, wire.ProtocolError, _Drop, OSError) as e:
            log.info("handshake with %s failed: %s", pid, e)
            await self._close_link(link, f"handshake: {e}")
            return
        if pid in self.peers:  # both sides opened a link at once: keep exactly one
            if not self._replaces(link):
                await self._close_link(link, "duplicate link")
                return
            old = self.peers[pid]
            self._forget(old)
            await self._close_link(old.link, None)
        self.peers[pid] = peer
        self._handshake_over(hs)
        self.stats.setdefault(pid, PeerStats())
        self.picker.peer_has(peer.have)
        try:
            self._update_interest(peer)
            self._fill_slots()
            async with trio.open_nursery() as nursery:
                peer.scope = nursery.cancel_scope
                nursery.start_soon(self._guard, peer, self._writer, nursery.cancel_scope)
                await self._guard(peer, self._reader, nursery.cancel_scope)
        except Exception:  # a bug of ours: log it loudly, but one link never takes the node down
            self.internal_errors += 1
            log.exception("engine error on link to %s", pid)
            peer.close_reason = peer.close_reason or "internal error"
        finally:
            self._forget(peer)
            with trio.CancelScope(shield=True):
                await self._close_link(link, peer.close_reason if peer.tell else None)
        log.debug("link to %s ended: %s", pid, peer.close_reason)

    async def _guard(
        self, peer: _Peer, task: Callable[[_Peer], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        """Run a link task; a peer's fault ends the link (both tasks) with a reason, not an error."""
        try:
            await task(peer)
        except _Drop as e:
            peer.close_reason, peer.tell = peer.close_reason or str(e), True
        except wire.ProtocolError as e:
            peer.close_reason, peer.tell = peer.close_reason or f"protocol error: {e}", True
            self.faulted[peer.id] = trio.current_time()
        except (LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            peer.close_reason = peer.close_reason or f"link lost: {e!r}"
        finally:
            peer.closed = True
            scope.cancel()

    def _replaces(self, link: PeerLink) -> bool:
        """When two links to one peer race, both sides keep the one opened by the smaller peer id
        (links that cannot tell who opened them: the first one stays)."""
        new_out = getattr(link, "outbound", None)
        old = self.peers.get(link.peer_id)
        if new_out is None or old is None or not self.local_id:
            return False
        canonical_out = self.local_id < link.peer_id  # we open the canonical link
        return new_out == canonical_out and getattr(old.link, "outbound", None) != canonical_out

    # ------------------------------------------------------------------ link tasks

    async def _reader(self, peer: _Peer) -> None:
        """Messages in arrival order; a piece's bookkeeping happens here, in order, and its
        verify + write runs as a child task (at most ``writes_per_link`` at once). A peer's fault
        found by a write ends the link like one found here."""
        slots = trio.Semaphore(max(1, self.config.writes_per_link))
        fault: list[BaseException] = []
        async with trio.open_nursery() as writes:

            async def store(i: int, msg: wire.PieceData) -> None:
                try:
                    await self._store_piece(peer, i, msg)
                except (_Drop, wire.ProtocolError) as e:
                    fault.append(e)
                    writes.cancel_scope.cancel()
                finally:
                    _release(msg.data)
                    slots.release()

            try:
                while not fault:
                    try:
                        msg = await peer.link.receive()
                    except LinkClosed:
                        peer.close_reason = peer.close_reason or "closed by peer"
                        break
                    if isinstance(msg, wire.PieceData):
                        try:
                            i = self._accept_piece(peer, msg)
                        except BaseException:
                            _release(msg.data)
                            raise
                        if i is None:
                            _release(msg.data)
                            continue
                        try:
                            await slots.acquire()
                        except BaseException:
                            self._writing.discard(i)
                            self.picker.request_ended(i)
                            _release(msg.data)
                            raise
                        writes.start_soon(store, i, msg)
                    else:
                        self._on_control(peer, msg)
            except Exception as e:  # re-raised below, outside the nursery (no ExceptionGroup)
                fault.append(e)
                writes.cancel_scope.cancel()
        if fault:
            raise fault[0]

    async def _writer(self, peer: _Peer) -> None:
        while True:
            while peer.control:
                await peer.link.send(peer.control.popleft())
            if peer.uploads and not peer.slot.unchoked:
                # Choked since they asked: Reject everything queued (they will ask others).
                while peer.uploads:
                    peer.control.append(wire.Reject(peer.uploads.popleft()))
                continue
            if peer.uploads:
                index = peer.uploads.popleft()
                self._sending += 1
                try:
                    if not await self._upload_credit(peer, index):
                        peer.uploads.appendleft(index)  # choked meanwhile: Rejected above
                        continue
                    self._count_copy(index)
                    if peer.send_piece is not None:
                        n = await peer.send_piece(index, self.store)
                    else:
                        data = await self.run_blocking(self.store.read_piece, index)
                        await peer.link.send(wire.PieceData(index, data))
                        n = len(data)
                except StoreError as e:  # damaged on disk or gone: they must ask elsewhere
                    log.warning("cannot serve piece %d of %s: %s", index, self.manifest.model, e)
                    peer.control.append(wire.Reject(index))
                    self._take_back_dropped()
                    continue
                finally:
                    self._sending -= 1
                    self._sent_at[index] = trio.current_time()  # the copy is out (see _hold_back)
                st = self.stats[peer.id]
                st.bytes_up += n
                st.pieces_up += 1
                self.bytes_up += n
                continue
            peer.wake = trio.Event()
            await peer.wake.wait()

    async def _upload_credit(self, peer: _Peer, index: int) -> bool:
        """Wait for upload credit for piece ``index`` (``swarm.ratelimit``), sending control
        messages meanwhile. False if the peer was choked while we waited (credit given back)."""
        bw = self.bandwidth
        if bw is None or not bw.limits_upload:
            return True
        n = self._lengths[index]
        await bw.before_upload(peer.id, n, meanwhile=lambda until: self._send_control(peer, until))
        if peer.slot.unchoked:
            return True
        if bw.limits.peer_upload:
            bw.peer(peer.id).give_back(n)
        if bw.limits.upload:
            bw.upload.give_back(n)
        return False

    async def _send_control(self, peer: _Peer, until: float) -> None:
        """Send control messages as they come until ``until`` (a piece waits for credit: Have,
        Request and Choke must not wait with it)."""
        while True:
            while peer.control:
                await peer.link.send(peer.control.popleft())
            if trio.current_time() >= until:
                return
            peer.wake = trio.Event()
            with trio.move_on_at(until):
                await peer.wake.wait()

    # ------------------------------------------------------------------ message handling

    def _check_hello(self, hello: wire.Message) -> None:
        if not isinstance(hello, wire.Hello):
            raise wire.ProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.manifest_hash != self.hash:
            raise wire.ProtocolError("Hello for a different manifest")
        if hello.num_pieces != self.num_pieces:
            raise wire.ProtocolError(f"Hello.num_pieces {hello.num_pieces} != {self.num_pieces}")

    def _index(self, i: int) -> int:
        if not 0 <= i < self.num_pieces:
            raise wire.ProtocolError(f"piece index {i} out of range 0..{self.num_pieces - 1}")
        return i

    def _on_control(self, peer: _Peer, msg: wire.Message) -> None:
        now = trio.current_time()
        if isinstance(msg, wire.Have):
            i = self._index(msg.index)
            if i not in peer.have:
                peer.have.add(i)
                self.picker.peer_has((i,))
                if not peer.am_interested:
                    self._update_interest(peer)
                self._fill_requests(peer)
        elif isinstance(msg, wire.Request):
            i = self._index(msg.index)
            if (
                not peer.slot.unchoked
                or i not in self.have
                or not self.may_upload
                or self._hold_back(peer, i, now)
            ):
                peer.post(wire.Reject(i))
            elif len(peer.uploads) >= self.config.max_queued_requests:
                raise wire.ProtocolError("too many queued requests")
            elif i not in peer.uploads:
                peer.uploads.append(i)
                peer.wake.set()
        elif isinstance(msg, wire.Cancel):
            i = self._index(msg.index)
            try:
                peer.uploads.remove(i)
            except ValueError:
                pass
        elif isinstance(msg, wire.Interested):
            if not peer.slot.interested:
                peer.slot.interested = True
                peer.slot.since = now
                peer.slot.order = self.choker.wait_key(now)
                self._fill_slots()
        elif isinstance(msg, wire.NotInterested):
            peer.slot.interested = False
            if peer.slot.unchoked:
                self._set_choked(peer, True, now)
                self._fill_slots()
        elif isinstance(msg, wire.Choke):
            peer.peer_choking = True
            for i in list(peer.requests):
                self._end_request(peer, i)
            self._fill_all()
        elif isinstance(msg, wire.Unchoke):
            peer.peer_choking = False
            self.choked_out.pop(peer.id, None)
            self._fill_requests(peer)
        elif isinstance(msg, wire.Reject):
            i = self._index(msg.index)
            peer.answered_at = now
            if i in peer.requests:
                peer.moved_at = now
            peer.refused[i] = now + self.config.reject_backoff
            self.picker.contended = True  # others compete for these pieces: random ties
            if i in peer.requests:
                self._end_request(peer, i)
                if self.bandwidth is not None:
                    self.bandwidth.refund_download(self._lengths[i])
                self._fill_all(skip=peer)
        elif isinstance(msg, wire.Error):
            raise _Drop(f"peer said: {msg.reason}")
        else:
            raise wire.ProtocolError(f"unexpected {type(msg).__name__} after handshake")

    def _accept_piece(self, peer: _Peer, msg: wire.PieceData) -> int | None:
        """A piece arrived (called by the reader, in arrival order): the index to verify and
        write, or None if it is not wanted any more (counted as waste). Raises on a fault."""
        i = self._index(msg.index)
        n = len(msg.data)
        if i not in peer.requests:
            if i in peer.cancelled:  # a late copy after endgame cancel or timeout: harmless
                peer.cancelled.discard(i)
            peer.wasted += n
            self.wasted_bytes += n
            if peer.wasted > self.config.max_wasted_bytes:
                raise wire.ProtocolError("too many unrequested piece bytes")
            return None
        # No longer outstanding on this peer, but still in flight for the picker until it is
        # written: verifying and writing take a while (a file's last piece may re-read part of
        # the file), and re-requesting it meanwhile wasted a third of a model per frontend
        # (measured).
        del peer.requests[i]
        peer.timeouts = 0
        peer.answered_at = peer.moved_at = trio.current_time()
        if n != self._lengths[i]:
            self.picker.request_ended(i)
            self._ban(peer, f"piece {i} has {n} bytes, manifest says {self._lengths[i]}")
        if i in self.have or i in self._writing:
            self.picker.request_ended(i)
            peer.wasted += n
            self.wasted_bytes += n
            self._fill_requests(peer)
            return None
        self._writing.add(i)
        return i

    async def _store_piece(self, peer: _Peer, i: int, msg: wire.PieceData) -> None:
        """Verify and write an accepted piece (``_accept_piece``), then announce it."""
        n = len(msg.data)
        try:
            try:
                await self.run_blocking(self.store.write_piece, i, msg.data)
            except PieceHashMismatch:
                self._ban(peer, f"piece {i} failed blake3")
            except StoreError as e:  # disk full, permissions: this transfer cannot go on
                self._fail(e)
                raise _Drop(f"local store error: {e}") from e
            finally:
                self._writing.discard(i)
        finally:
            self.picker.request_ended(i)
        self._take_back_dropped()
        st = self.stats[peer.id]
        st.bytes_down += n
        st.pieces_down += 1
        peer.window_bytes += n
        self.bytes_down += n
        self._got(i)
        if not peer.closed:
            self._fill_requests(peer)

    def _ban(self, peer: _Peer, why: str) -> None:
        st = self.stats[peer.id]
        st.bad_pieces += 1
        st.banned = True
        self.banned.add(peer.id)
        log.warning(
            "banning %s for manifest %s: %s",
            peer.id,
            self.manifest.hash_str[:20],
            why,
            extra={"event": "ban", "model": self.manifest.model, "peer": peer.id, "reason": why},
        )
        raise _Drop(f"banned: {why}")

    def _got(self, i: int) -> None:
        self.have.add(i)
        self.picker.got(i)
        for p in self.peers.values():
            if i in p.requests:  # endgame duplicate: cancel it
                if next(iter(p.requests)) == i:
                    p.moved_at = trio.current_time()  # it moves on to our next request
                del p.requests[i]
                self.picker.request_ended(i)
                p.cancelled.add(i)
                p.post(wire.Cancel(i))
            if i not in p.have:
                p.post(wire.Have(i))
        if self.on_piece is not None:
            self.on_piece(i, self._lengths[i])
        self._check_done()
        if self.picker.done:
            for p in self.peers.values():
                self._update_interest(p)
        else:
            self._fill_all()

    def _take_back_dropped(self) -> None:
        """Pieces the store dropped after we counted them (a file's whole-file check at completion
        found them rotten on disk, or a restored piece failed re-verification on a read) are
        missing again: fetch them again. Without this the transfer counted them as held,
        ``completed`` fired and ``Download.finalize`` failed ("must be fetched again")."""
        take = getattr(self.store, "take_dropped", None)
        if take is None:
            return
        lost = take() & self.have
        if not lost:
            return
        log.warning(
            "%s: the store dropped %d piece(s) that failed re-verification; fetching them again",
            self.manifest.model,
            len(lost),
        )
        for i in lost:
            self.have.discard(i)
            self.picker.lost(i)
        for p in self.peers.values():
            self._update_interest(p)
        self._fill_all()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
            log.error("transfer of %s failed: %s", self.manifest.model, error)
            self.failed.set()

    def _check_done(self) -> None:
        if self.picker.priority_done and not self.configs_ready.is_set():
            self.configs_ready.set()
        if self.picker.done and not self.completed.is_set():
            self.completed.set()

    # ------------------------------------------------------------------ decisions

    def _update_interest(self, peer: _Peer) -> None:
        want = not self.picker.done and self.picker.interesting(peer.have)
        if want != peer.am_interested:
            peer.am_interested = want
            if want:
                peer.interested_since = trio.current_time()
            peer.post(wire.Interested() if want else wire.NotInterested())
        if want:
            self._fill_requests(peer)

    def _count_copy(self, i: int) -> None:
        self._sent_at[i] = math.inf  # being sent: its window starts when it is out ...
        self._sending_since[i] = trio.current_time()  # ... unless it is stuck (see _hold_back)
        c = self._copies[i]
        self._copies[i] = c + 1
        self._copies_hist[c] -= 1
        if not self._copies_hist[c]:
            del self._copies_hist[c]
        self._copies_hist[c + 1] += 1

    def _hold_back(self, peer: _Peer, i: int, now: float) -> bool:
        """Least-copied-first seeding: a seeder with several interested peers sends a piece again
        only once every piece has been sent as often (or the last copy has been out for
        ``first_copy_window``), so its upload goes to pieces the swarm lacks and the peers trade
        the copies among themselves (BitTorrent's super-seeding, in spirit). Measured with four
        frontends on one worker: worker upload 4.2x the model without it. The window counts from
        when the copy is out, not from when it started: a 4 MiB piece to one of four peers at
        20 Mbit/s takes ~7 s, longer than the window.

        Only while at least two interested peers serve others (their Hello says so), and a peer is
        refused a piece at most once: if it asks again (after its back-off), nobody else could give
        it to them (a sparse mesh), so we send it. Without these two rules a client-server swarm
        (frontends that never serve) stalled in the simulator."""
        if not self.picker.done or self._copies[i] <= min(self._copies_hist):
            return False
        if now - self._sent_at[i] >= self.config.first_copy_window or i in peer.held_back:
            return False
        if self._sent_at[i] == math.inf and now - self._sending_since[i] >= self._timeout_for(i):
            return False  # a copy not out within its own request timeout is stuck (a peer that
            #               never reads), not slow: holding the piece back would starve the rest
        if sum(1 for p in self.peers.values() if p.slot.interested and p.serves) < 2:
            return False
        peer.held_back.add(i)
        return True

    def _timeout_for(self, i: int) -> float:
        return self.config.request_timeout + self._lengths[i] / self.config.min_rate

    def _queue_deadline(self, peer: _Peer) -> float | None:
        """When the peer's queue of our requests counts as stuck: the oldest request's timeout,
        counted from when the peer could start on it (sent, or the peer's last answer: the
        requests before it were being served until then). None if nothing is outstanding."""
        if not peer.requests:
            return None
        head, sent = next(iter(peer.requests.items()))
        return max(sent, peer.moved_at) + self._timeout_for(head)

    def _fill_requests(self, peer: _Peer) -> None:
        if peer.peer_choking or not peer.am_interested or peer.closed:
            return
        depth = 1 if peer.timeouts >= self.config.max_timeouts else self.config.pipeline_depth
        room = depth - len(peer.requests)
        if room <= 0:
            return
        now = trio.current_time()
        if peer.refused:
            for i in [i for i, until in peer.refused.items() if until <= now]:
                del peer.refused[i]
        # Never a piece being verified and written (it may still fail, then it is asked again).
        avoid = peer.refused.keys() | self._writing if self._writing else peer.refused
        paced = self._paced_downloads()
        for i in self.picker.pick(peer.have, peer.requests.keys(), room, avoid):
            if paced and not self.bandwidth.may_request(self._lengths[i]):
                break  # over the download limit: ``run`` asks again at the next tick
            if not peer.requests:
                peer.moved_at = now  # an idle peer's clock starts with this request
            peer.requests[i] = now
            peer.cancelled.discard(i)
            self.picker.requested(i)
            peer.post(wire.Request(i))

    def _paced_downloads(self) -> bool:
        """Whether requests wait for download credit (``swarm.ratelimit``). Requests, not
        received bytes, are paced: a piece asked for is sent at once, so nothing waits in socket
        buffers and request deadlines stay true."""
        return self.bandwidth is not None and self.bandwidth.limits_download and not self.picker.done

    def _fill_all(self, skip: _Peer | None = None) -> None:
        for p in self.peers.values():
            if p is not skip:
                self._fill_requests(p)

    def _end_request(self, peer: _Peer, i: int) -> None:
        if peer.requests.pop(i, None) is not None:
            self.picker.request_ended(i)

    def _expire_requests(self, now: float) -> None:
        expired = False
        for p in self.peers.values():
            deadline = self._queue_deadline(p)
            if deadline is None or deadline > now:
                continue
            # The queue did not move for the head's whole timeout: everything behind it is stuck
            # too; the Cancels take the queued ones off the peer's upload queue.
            p.moved_at = now
            for i in list(p.requests):
                self._end_request(p, i)
                p.cancelled.add(i)
                p.post(wire.Cancel(i))
                p.timeouts += 1
                self.timeouts += 1
                expired = True
        if expired:
            self._fill_all()
        for p in self.peers.values():  # it Rejected all we asked: ask again once the backoff is over
            if p.refused and not p.requests and not p.peer_choking and min(p.refused.values()) <= now:
                self._fill_requests(p)

    def _set_choked(self, peer: _Peer, choked: bool, now: float) -> None:
        peer.slot.unchoked = not choked
        peer.slot.since = now
        peer.slot.order = self.choker.wait_key(now)
        peer.post(wire.Choke() if choked else wire.Unchoke())

    def _fill_slots(self) -> None:
        if not self.may_upload:
            return
        now = trio.current_time()
        for s in self.choker.fill([p.slot for p in self.peers.values()], now):
            self._set_choked(self.peers[s.peer_id], False, now)

    def _rechoke(self, now: float) -> None:
        interval = self.config.rechoke_interval
        for p in self.peers.values():
            p.slot.down_rate = p.window_bytes / interval
            p.window_bytes = 0
        if not self.may_upload:
            return
        slots = [p.slot for p in self.peers.values()]
        pieces_up = sum(s.pieces_up for s in self.stats.values())
        self.choker.size_slots(slots, now, self.bytes_up, pieces_up, seeding=self.picker.done)
        unchoke, choke = self.choker.rechoke(
            [p.slot for p in self.peers.values()], now, seeding=self.picker.done
        )
        for s in choke:
            self._set_choked(self.peers[s.peer_id], True, now)
        for s in unchoke:
            self._set_choked(self.peers[s.peer_id], False, now)

    # ------------------------------------------------------------------ teardown

    def _forget(self, peer: _Peer) -> None:
        peer.closed = True
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        self.picker.peer_gone(peer.have)
        for i in list(peer.requests):
            self._end_request(peer, i)
        if peer.slot.unchoked:
            peer.slot.unchoked = False
            self._fill_slots()
        self._fill_all()

    async def _close_link(self, link: PeerLink, reason: str | None) -> None:
        """Close ``link``, first telling the peer ``reason`` if there is one."""
        with trio.move_on_after(2):
            try:
                if reason:
                    await link.send(wire.Error(reason[: wire.MAX_REASON_BYTES]))
            except Exception:  # the link may already be gone; nothing more to tell it
                pass
            try:
                await link.aclose()
            except Exception:
                log.debug("closing link to %s failed", link.peer_id, exc_info=True)
