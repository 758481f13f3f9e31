"""The transfer's decisions, without I/O: ``TransferCore``.

It takes what happens on links (a peer's message, a piece verified and written, a piece sent)
and the passing of time (``tick``), updates the state of the transfer (our pieces, our peers,
the picker and the choker) and queues what is to be done on each peer (``PeerState.control``:
messages to send; ``PeerState.uploads``: pieces to send). It never imports trio or libp2p and
never reads a clock: time is ``self.clock()`` (the runner passes ``trio.current_time``).

What a runner must do is in ``swarm/engine/runner.py`` (``Transfer``, the trio runner the node
and the simulator use): hand it each link's messages in order, write the accepted pieces, send
what is queued, call ``tick`` every ``tick`` seconds and close the links it names. The hooks a
runner overrides: ``_cancel_link`` (end a link from outside its tasks) and ``_on_completed`` /
``_on_configs_ready`` / ``_on_failed``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

from swarm import wire
from swarm.choker import Choker
from swarm.engine.admission import HandshakeGate
from swarm.engine.config import EngineConfig, PeerLink, PeerStats, PieceStore
from swarm.engine.peer import Drop, Handshake, PeerState
from swarm.engine.requests import RequestBook
from swarm.engine.seeding import SeedPolicy
from swarm.manifest import Manifest
from swarm.picker import Picker
from swarm.store import PieceHashMismatch, StoreError

log = logging.getLogger("swarm.engine")

SERIAL_PATIENCE = 1.0
"""Seconds a send alone (``EngineConfig.serial_uploads``) holds back the others before any such
send has finished (then: twice as long as the recent ones took, at least one tick)."""
ALONE_RATE_DECAY = 0.9
"""Each finished send alone keeps this share of the best rate seen before it (a decaying maximum:
a few slow receivers do not make every send look slow)."""


class TransferCore(RequestBook):
    """Everything about trading one manifest: our pieces, our peers, our slots (see the module
    docstring; requests and their deadlines are in ``RequestBook``)."""

    def __init__(
        self,
        manifest: Manifest,
        store: PieceStore,
        *,
        clock: Callable[[], float],
        wanted_files: Iterable[int] | None = None,
        config: EngineConfig | None = None,
        rng: random.Random | None = None,
        may_upload: bool = True,
        local_id: str = "",
        on_piece: Callable[[int, int], None] | None = None,
        bandwidth: Any = None,
    ):
        self.clock = clock
        self.manifest = manifest
        self.hash = manifest.manifest_hash
        self.num_pieces = manifest.num_pieces
        self.store = store
        self.config = config or EngineConfig()
        self.rng = rng or random.Random()
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
        self._config_pieces = tuple(sorted(manifest.config_piece_indices()))
        self.picker = Picker(self.num_pieces, wanted, config_pieces, rng=self.rng)
        self.have: set[int] = set(store.have)
        for i in self.have:
            self.picker.got(i)
        self._lengths = [p.length for p in manifest.pieces]
        self.wanted_bytes = sum(self._lengths[i] for i in wanted)
        self.choker = Choker(
            self.config.upload_slots,
            self.config.slot_hold,
            rng=self.rng,
            needy_first=self.config.needy_first,
            feed_empty=self.config.feed_empty,
        )
        self.peers: dict[str, PeerState] = {}
        self.stats: dict[str, PeerStats] = {}
        self.banned: set[str] = set()
        self._writing: set[int] = set()
        self._sending = 0  # pieces being sent right now (a drain waits for them)
        # Serial first copies (EngineConfig.serial_uploads): sends going alone now, and the peer
        # whose queued request starts next (the others wait for it).
        self._alone = 0
        self._turn: PeerState | None = None
        self._turn_at = 0.0
        self._alone_rate = 0.0  # bytes/s of recent sends alone (a decaying maximum)
        # Links still in their handshake: they count against max_peers, and per peer id, per
        # address and inbound against the limits of EngineConfig (see _refusal).
        self._gate = HandshakeGate(self.config)
        # Peers whose link we closed because they kept us choked (``choked_timeout``): peer id ->
        # when. Linked again, such a peer counts as a source only once it unchokes us.
        self.choked_out: dict[str, float] = {}
        # Peers whose link broke the protocol: peer id -> when (see EngineConfig.fault_cooldown).
        self.faulted: dict[str, float] = {}
        self._seed = SeedPolicy(
            self.num_pieces, self.config.first_copy_window, manifest.config_piece_indices()
        )
        self.bytes_up = 0
        self.bytes_down = 0
        self.internal_errors = 0
        self.wasted_bytes = 0  # piece bytes received that we no longer needed (late or duplicate)
        self.timeouts = 0  # requests that timed out
        self.error: Exception | None = None  # set (with ``_on_failed``) when the store cannot go on
        self.is_complete = False
        self.is_configs_ready = False
        self._next_rechoke = clock() + self.config.rechoke_interval
        self._check_done()

    # ------------------------------------------------------------------ hooks (a runner's)

    def _cancel_link(self, peer: PeerState) -> None:
        """End ``peer``'s link from outside its tasks (``_drop_link`` set its reason)."""

    def _on_completed(self) -> None:
        """Every wanted piece is verified (once)."""

    def _on_configs_ready(self) -> None:
        """Every wanted config piece is verified (once)."""

    def _on_failed(self) -> None:
        """The local store cannot go on (``error``; once)."""

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

    def able_peers(self) -> list[PeerState]:
        now = self.clock()
        return [p for p in self.peers.values() if self.can_send(p, now)]

    def can_send(self, peer: PeerState, now: float) -> bool:
        """Can ``peer`` still send us a piece we want: it holds one, has not let ``max_timeouts``
        requests in a row time out, and has not kept us choked for ``choked_timeout`` (nor, on
        an earlier link, long enough that we closed it, unless it unchoked us since)."""
        if not self.picker.interesting(peer.have) or peer.timeouts >= self.config.max_timeouts:
            return False
        if peer.peer_choking and peer.id in self.choked_out:
            return False
        return self.starved_for(peer, now) < self.config.choked_timeout

    @staticmethod
    def starved_for(peer: PeerState, now: float) -> float:
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

    @property
    def _handshakes(self) -> int:
        """Links in their handshake now."""
        return self._gate.open

    @property
    def _hs_addresses(self) -> dict[str, int]:
        return self._gate.addresses

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[PeerState]:
        """Request deadlines (every ``tick``), slot re-dealing (every ``rechoke_interval``).
        Returns the links to close as idle (their reason set)."""
        self._expire_requests(now)
        self._expire_refusals(now)
        if self.config.serial_uploads and (self._alone or self._turn is not None):
            self._serial_tick(now)
        if self.config.swap_idle and self.may_upload and not self._sending:
            self._swap_idle(now)
        if self._paced_downloads() or self.picker.in_endgame():
            self._fill_all()  # download credit came back, or a head went late (_moving_heads)
        if now < self._next_rechoke:
            return []
        self._rechoke(now)
        self._next_rechoke = now + self.config.rechoke_interval
        self._drop_choking_links(now)
        idle = self._idle_links(now)
        for p in idle:
            p.close_reason = p.close_reason or "idle: nothing to trade"
        return idle

    def _idle_links(self, now: float) -> list[PeerState]:
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

    def _drop_link(self, peer: PeerState, reason: str) -> None:
        """End ``peer``'s link from outside its tasks, telling it ``reason``."""
        peer.close_reason, peer.tell = peer.close_reason or reason, True
        peer.closed = True
        self._cancel_link(peer)

    # ------------------------------------------------------------------ links

    def _refusal(self, link: PeerLink, address: str | None) -> str:
        """Why a new link may not start its handshake ("" if it may)."""
        pid = link.peer_id
        if pid in self.banned:
            return "banned"
        since = self.faulted.get(pid)
        if since is not None:
            if self.clock() - since < self.config.fault_cooldown:
                return "broke the protocol recently"
            del self.faulted[pid]
        if pid in self.peers and not self._replaces(link):
            return "duplicate link"
        inbound = getattr(link, "outbound", None) is False
        links_in = sum(1 for p in self.peers.values() if p.inbound) if inbound else 0
        return self._gate.refusal(pid, inbound, address, len(self.peers), links_in, self.picker.done)

    def _admit(self, link: PeerLink, address: str | None) -> Handshake:
        return self._gate.admit(link.peer_id, getattr(link, "outbound", None) is False, address)

    def _handshake_over(self, hs: Handshake) -> None:
        self._gate.over(hs)

    def _replaces(self, link: PeerLink) -> bool:
        """When two links to one peer race, both sides keep the one opened by the smaller peer id
        (links that cannot tell who opened them: the first one stays)."""
        new_out = getattr(link, "outbound", None)
        old = self.peers.get(link.peer_id)
        if new_out is None or old is None or not self.local_id:
            return False
        canonical_out = self.local_id < link.peer_id  # we open the canonical link
        return new_out == canonical_out and getattr(old.link, "outbound", None) != canonical_out

    def _greeting(self) -> tuple[wire.Hello, wire.Bitfield]:
        """What we send first on every link."""
        return (
            wire.Hello(self.hash, self.num_pieces, self.may_upload),
            wire.Bitfield(wire.pack_bitfield(self.have, self.num_pieces)),
        )

    def _check_hello(self, hello: wire.Message) -> None:
        if not isinstance(hello, wire.Hello):
            raise wire.ProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.manifest_hash != self.hash:
            raise wire.ProtocolError("Hello for a different manifest")
        if hello.num_pieces != self.num_pieces:
            raise wire.ProtocolError(f"Hello.num_pieces {hello.num_pieces} != {self.num_pieces}")

    def _check_bitfield(self, peer: PeerState, bf: wire.Message) -> None:
        if not isinstance(bf, wire.Bitfield):
            raise wire.ProtocolError(f"expected Bitfield, got {type(bf).__name__}")
        peer.have = wire.unpack_bitfield(bf.bits, self.num_pieces)

    def _register(self, peer: PeerState, hs: Handshake) -> None:
        """``peer`` is past its handshake (any older link of its id forgotten): start trading."""
        self.peers[peer.id] = peer
        self._handshake_over(hs)
        self.stats.setdefault(peer.id, PeerStats())
        self.picker.peer_has(peer.have)
        self._update_interest(peer)
        self._fill_slots()

    def _faulted(self, peer: PeerState) -> None:
        """``peer`` broke the protocol (its link is being closed)."""
        self.faulted[peer.id] = self.clock()

    def _forget(self, peer: PeerState) -> None:
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
        if self._turn is peer:
            self._turn = None
            self._pass_turn()
        self._fill_all()

    # ------------------------------------------------------------------ messages in

    def _index(self, i: int) -> int:
        if not 0 <= i < self.num_pieces:
            raise wire.ProtocolError(f"piece index {i} out of range 0..{self.num_pieces - 1}")
        return i

    def _on_control(self, peer: PeerState, msg: wire.Message) -> None:
        """A message other than a piece, in arrival order. Raises on a peer's fault."""
        now = self.clock()
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
                or (
                    self.picker.done
                    and self._seed.hold_back(peer, i, now, self._timeout_for(i), self.peers.values())
                )
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
            # Our requests stay outstanding: the peer answers each with its piece or a Reject
            # (it Rejects what it queued when it chokes us, and what it gets while we are
            # choked). Dropped here, those we sent after it had choked us and before its Choke
            # came were queued behind an Unchoke of its next rechoke and still sent, as copies
            # nobody asked for any more (simulator: 1 worker + 6 frontends received a tenth of
            # their bytes twice).
            peer.peer_choking = True
        elif isinstance(msg, wire.Unchoke):
            peer.peer_choking = False
            self.choked_out.pop(peer.id, None)
            self._fill_requests(peer)
        elif isinstance(msg, wire.Reject):
            self._on_reject(peer, self._index(msg.index), now)
        elif isinstance(msg, wire.Error):
            raise Drop(f"peer said: {msg.reason}")
        else:
            raise wire.ProtocolError(f"unexpected {type(msg).__name__} after handshake")

    def _accept_piece(self, peer: PeerState, msg: wire.PieceData) -> int | None:
        """A piece arrived (in arrival order): the index to verify and write, or None if it is
        not wanted any more (counted as waste). Raises on a fault."""
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
        peer.answered_at = peer.moved_at = self.clock()
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

    def _write_abandoned(self, i: int) -> None:
        """An accepted piece will not be written (its link ended first)."""
        self._writing.discard(i)
        self.picker.request_ended(i)

    def _piece_written(self, peer: PeerState, i: int, n: int, error: Exception | None = None) -> None:
        """The write of accepted piece ``i`` (``n`` bytes) ended, with ``error`` if it failed
        (PieceHashMismatch: the peer's fault; StoreError: ours). Raises Drop to end the link."""
        self._write_abandoned(i)
        if isinstance(error, PieceHashMismatch):
            self._ban(peer, f"piece {i} failed blake3")
        elif isinstance(error, StoreError):  # disk full, permissions: this transfer cannot go on
            self._fail(error)
            raise Drop(f"local store error: {error}") from error
        self._take_back_dropped()
        st = self.stats[peer.id]
        st.bytes_down += n
        st.pieces_down += 1
        peer.window_bytes += n
        self.bytes_down += n
        self._got(i)
        if not peer.closed:
            self._fill_requests(peer)

    def _ban(self, peer: PeerState, why: str) -> None:
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
        raise Drop(f"banned: {why}")

    def _got(self, i: int) -> None:
        self.have.add(i)
        self.picker.got(i)
        for p in self.peers.values():
            if i in p.requests:  # endgame duplicate: cancel it
                if next(iter(p.requests)) == i:
                    p.moved_at = self.clock()  # it moves on to our next request
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
            self._on_failed()

    def _check_done(self) -> None:
        if self.picker.priority_done and not self.is_configs_ready:
            self.is_configs_ready = True
            self._on_configs_ready()
        if self.picker.done and not self.is_complete:
            self.is_complete = True
            self._on_completed()

    # ------------------------------------------------------------------ uploads

    def _next_upload(self, peer: PeerState) -> int | None:
        """The piece to send ``peer`` next, if any: if it was choked since it asked, everything
        it queued is Rejected instead (it will ask others)."""
        if peer.uploads and not peer.slot.unchoked:
            peer.control.extend(wire.Reject(i) for i in peer.uploads)
            peer.uploads.clear()
            if self._turn is peer:
                self._pass_turn()
            return None
        if not self.config.serial_uploads:
            return peer.uploads.pop(0) if peer.uploads else None
        if not peer.uploads:
            if self._turn is peer:  # its request was cancelled meanwhile
                self._pass_turn()
            return None
        turn = self._turn
        if turn is not None and turn is not peer and self.clock() - self._turn_at < self.config.tick:
            return None  # another peer's request goes first (``_pass_turn`` woke it; a writer
            #              that does not take its turn within a tick, stuck on a full socket, loses it)
        i = peer.uploads[0]
        alone = self._sends_alone(i)
        if self._sending and (alone or self._alone):
            return None  # ``_pass_turn`` wakes us when the piece(s) on the wire are out
        self._turn = None
        del peer.uploads[0]
        peer.upload_piece = i
        peer.send_alone = alone
        peer.served_at = self.clock()
        if alone:
            self._alone += 1
        return i

    def _sends_alone(self, i: int) -> bool:
        """Whether piece ``i`` is rare enough to be sent alone (``EngineConfig.serial_uploads``)."""
        return self.picker.availability[i] < self.config.serial_uploads * len(self.peers)

    def _pass_turn(self) -> None:
        """Serial first copies: give the next send to the waiting request whose piece the fewest
        of our peers hold (then: the fewest copies sent by us, the peer served longest ago), if
        it may start now, and wake its writer. Each waiting peer's queue is served in order (the
        order the peer's request timeouts assume, ``RequestBook``)."""
        self._turn = None
        if self._sending and self._alone:
            return
        avail, copies = self.picker.availability, self._seed.copies
        needy = self.config.needy_turns
        best: PeerState | None = None
        best_key: tuple[int, int, int, float] | None = None
        for p in self.peers.values():
            if not p.uploads or p.upload_piece >= 0 or p.closed or not p.slot.unchoked:
                continue
            i = p.uploads[0]
            key = (len(p.have) if needy else 0, avail[i], copies[i], p.served_at)
            if best_key is None or key < best_key:
                best, best_key = p, key
        if best is None or (self._sending and self._sends_alone(best.uploads[0])):
            return  # nobody waits, or the rarest waits for the wire to clear
        self._turn, self._turn_at = best, self.clock()
        best.wake.set()

    def _serial_tick(self, now: float) -> None:
        """A send alone that takes more than twice as long as recent ones did (a slow or vanished
        receiver) stops holding back the others, and a turn not taken within a tick lapses: the
        upload must not wait on one peer."""
        rate = self._alone_rate
        freed = False
        for p in self.peers.values():
            if p.send_alone:
                expect = 2 * self._lengths[p.upload_piece] / rate if rate else SERIAL_PATIENCE
                if now - p.served_at >= max(expect, self.config.tick):
                    p.send_alone = False
                    self._alone -= 1
                    freed = True
        if self._turn is not None and now - self._turn_at >= self.config.tick:
            self._turn = None  # its writer did not take it (stuck on a full socket?): anyone may
            for p in self.peers.values():
                if p.uploads and p.upload_piece < 0:
                    p.wake.set()
        elif freed:
            self._pass_turn()

    def _upload_started(self, i: int) -> None:
        """Piece ``i`` was taken off a peer's queue to be sent (it may wait for upload credit)."""
        self._sending += 1
        if self.config.serial_uploads and not self._alone:
            self._pass_turn()  # a piece not sent alone: the next waiting one may start with it

    def _upload_copy(self, i: int) -> None:
        """A copy of piece ``i`` starts out (the seeding policy counts it)."""
        self._seed.sending(i, self.clock())

    def _upload_ended(self, peer: PeerState, i: int, n: int | None, error: StoreError | None = None) -> None:
        """The send of piece ``i`` (``_upload_started``) ended: ``n`` bytes sent (None: nothing,
        it was cut short), or ``error`` if the piece could not be read (damaged on disk or gone:
        they must ask elsewhere)."""
        self._sending -= 1
        self._seed.sent(i, self.clock())  # the copy is out (see SeedPolicy.hold_back)
        if peer.upload_piece >= 0:
            peer.upload_piece = -1
            if peer.send_alone:
                peer.send_alone = False
                self._alone -= 1
                if n:
                    took = self.clock() - peer.served_at
                    rate = n / took if took > 0 else math.inf
                    self._alone_rate = max(rate, ALONE_RATE_DECAY * self._alone_rate)
            if self.config.serial_uploads:
                self._pass_turn()
        if self.config.feed_empty and n and peer.slot.unchoked and not peer.closed:
            self._feed_empty(peer, i)
        if error is not None:
            log.warning("cannot serve piece %d of %s: %s", i, self.manifest.model, error)
            peer.control.append(wire.Reject(i))
            self._take_back_dropped()
            return
        if n is None:
            return
        st = self.stats[peer.id]
        st.bytes_up += n
        st.pieces_up += 1
        self.bytes_up += n

    # ------------------------------------------------------------------ interest and slots

    def _update_interest(self, peer: PeerState) -> None:
        want = not self.picker.done and self.picker.interesting(peer.have)
        if want != peer.am_interested:
            peer.am_interested = want
            if want:
                peer.interested_since = self.clock()
            peer.post(wire.Interested() if want else wire.NotInterested())
        if want:
            self._fill_requests(peer)

    def _set_choked(self, peer: PeerState, choked: bool, now: float) -> None:
        peer.slot.unchoked = not choked
        peer.slot.since = now
        peer.slot.order = self.choker.wait_key(now)
        peer.post(wire.Choke() if choked else wire.Unchoke())
        if choked and peer.uploads:
            # The peer drops its requests on our Choke, so what it queued is Rejected now, behind
            # the Choke: Rejected later by the writer, an Unchoke sent meanwhile (slots re-dealt
            # while a piece was on the wire) let those pieces go out to a peer that no longer
            # asked for them and had asked others (simulator, 1 worker + 6 frontends: a sixth
            # of the pieces received).
            peer.control.extend(wire.Reject(i) for i in peer.uploads)
            peer.uploads.clear()
            if self._turn is peer:
                self._pass_turn()

    def _fill_slots(self) -> None:
        if not self.may_upload:
            return
        now = self.clock()
        if self.config.feed_empty:
            self._count_pieces()
        for s in self.choker.fill([p.slot for p in self.peers.values()], now):
            self._set_choked(self.peers[s.peer_id], False, now)

    def _empty(self, peer: PeerState) -> bool:
        """``peer`` holds no weight piece (config pieces aside): it has nothing to upload."""
        cfg = self._config_pieces
        return all(j in cfg for j in peer.have)

    def _feed_empty(self, peer: PeerState, i: int) -> None:
        """``EngineConfig.feed_empty``: ``peer`` got piece ``i`` from us; an interested peer
        holding nothing that waits for a slot (the longest waiter) takes ``peer``'s slot."""
        if i in self._config_pieces and self._empty(peer):
            return  # (a config piece does not make it a peer that can upload)
        best: PeerState | None = None
        for p in self.peers.values():
            s = p.slot
            if (
                s.interested
                and not s.unchoked
                and not p.closed
                and (best is None or (s.order, p.id) < (best.slot.order, best.id))
                and self._empty(p)
            ):
                best = p
        if best is not None:
            now = self.clock()
            self._set_choked(peer, True, now)
            self._set_choked(best, False, now)

    def _swap_idle(self, now: float) -> None:
        """``EngineConfig.swap_idle``: our upload is idle; unchoked peers that asked nothing for
        a tick give their slot to interested peers waiting for one."""
        tick = self.config.tick
        idle, waiting = [], []
        for p in self.peers.values():
            s = p.slot
            if p.closed or not s.interested:
                continue
            if not s.unchoked:
                waiting.append(p)
            elif p.uploads or p.upload_piece >= 0:
                return  # something to send after all
            elif now - s.since >= tick and now - p.served_at >= tick:
                idle.append(p)
        if not idle or not waiting:
            return
        if self.config.needy_first:
            self._count_pieces()
            waiting.sort(key=lambda p: (p.slot.pieces, p.slot.order, p.id))
        else:
            waiting.sort(key=lambda p: (p.slot.order, p.id))
        for a, b in zip(idle, waiting[: len(idle)], strict=False):
            self._set_choked(a, True, now)
            self._set_choked(b, False, now)

    def _count_pieces(self) -> None:
        """``PeerSlot.pieces`` for the choker (``feed_empty``: config pieces not counted)."""
        cfg = self._config_pieces if self.config.feed_empty else ()
        for p in self.peers.values():
            h = p.have
            p.slot.pieces = len(h) - sum(1 for i in cfg if i in h)

    def _rechoke(self, now: float) -> None:
        interval = self.config.rechoke_interval
        for p in self.peers.values():
            p.slot.down_rate = p.window_bytes / interval
            p.window_bytes = 0
        if not self.may_upload:
            return
        if self.config.size_slots:
            slots = [p.slot for p in self.peers.values()]
            pieces_up = sum(s.pieces_up for s in self.stats.values())
            self.choker.size_slots(slots, now, self.bytes_up, pieces_up, seeding=self.picker.done)
        if self.config.needy_first or self.config.feed_empty:
            self._count_pieces()
        unchoke, choke = self.choker.rechoke(
            [p.slot for p in self.peers.values()], now, seeding=self.picker.done
        )
        for s in choke:
            self._set_choked(self.peers[s.peer_id], True, now)
        for s in unchoke:
            self._set_choked(self.peers[s.peer_id], False, now)
