"""The engine's interfaces and settings: ``PeerLink`` and ``PieceStore`` (what a transfer talks
through and stores into), ``EngineConfig`` and the per-peer counters ``PeerStats``."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from swarm import wire


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
    """Requests outstanding per peer: enough to keep a fast link busy across one round trip.
    With serial first copies a sender serves its peers' requests one at a time, so a deep queue
    at a busy sender delays pieces the picker cannot ask elsewhere meanwhile: the simulator's
    scale_1000 and flash_crowd use 2 (scale_1000 with the start-up options, seeds 1-2: last
    1.269 x the start-up bound at 3, 1.224 at 2, 1.199 at 1; 1 costs a round trip per piece on
    a link with one sender)."""
    upload_slots: int = 4
    """Peers served at once (see choker)."""
    size_slots: bool = False
    """Let a seed open up to 8 x ``upload_slots`` while each added slot adds upload
    (``choker.SlotSizer``). Off by default: in the simulator it brings heterogeneous caps from
    2.03 to 1.45 x T_min, but the flash crowd does not gain (1.145 -> 1.173, within seed spread),
    a scale_1000 worker uploads 15.8 x the model instead of 8.2 x, and simulations cost ~45% more
    CPU; not yet measured on real nodes (docs/simulation.md, "Efficiency against the bounds")."""
    serial_uploads: float = 0.0
    """Serial first copies: a piece held by fewer than this fraction of our linked peers is sent
    alone (no other piece of this transfer starts while it is on the wire, and it waits for the
    pieces on the wire to finish), at the full upload instead of a share of it, and when a send
    ends the next one goes to the waiting request whose piece the fewest of our peers hold (then
    the fewest copies we sent, then the peer we served longest ago). A piece then reaches a node
    that can pass it on after P / u instead of slots x P / u: in a large flash crowd the first
    copies spread in a binary tree rather than four times slower. Pieces held more widely are
    sent as before (each unchoked peer's next piece at once, sharing the upload). 0: off; above
    1.0: every piece is sent alone. Off by default; on in the simulator's scale_1000 and
    flash_crowd scenarios (last completion 2.08 -> 1.39 x the start-up bound and 1.19 -> 1.08 x
    T_min with ``needy_first``), but worse where receivers are slower than the sender
    (heterogeneous: 1.57 -> 3.70 x T_min): docs/simulation.md, "Efficiency against the bounds".
    On real links one TCP connection then carries a piece at a time; the next piece's first bytes
    go out while the last one's tail drains from the kernel's send buffer, so the upload does not
    idle between pieces, but a connection idle for longer than its RTO restarts in slow start
    (not measured on the testbed yet)."""
    needy_first: bool = False
    """While downloading, the optimistic upload slot (and slots no sender has earned) goes to the
    interested peer holding the fewest pieces, not the longest waiter: in a large flash crowd a
    node with no piece has all its upload idle, and with ~60 interested peers per node and one
    optimistic slot each, the longest-waiter rotation left some nodes without a first piece for
    10 s (docs/simulation.md, "Efficiency against the bounds")."""
    needy_turns: bool = False
    """With ``serial_uploads``: when a send ends, the next turn goes to the waiting request of the
    peer holding the fewest pieces (then the rarest piece, as without it), so first copies go to
    peers that cannot upload yet and the last pieces to the peers furthest behind. Alone (with
    ``serial_uploads`` and ``needy_first``) on scale_1000: last 1.393 -> 1.360 x the start-up
    bound, median 1.443 -> 1.416 x T_min; with ``feed_empty`` and ``swap_idle`` on it is within
    the seed spread (without it: median 1.324, last 1.224 against 1.314, 1.237). Off by
    default; on where ``feed_empty`` is (docs/simulation.md, "Efficiency against the bounds")."""
    feed_empty: bool = False
    """Peers holding no weight piece come first for our upload slots: their upload is idle until
    they get one. At a rechoke (downloading) they take slots before the peers that send to us
    (the optimistic slot stays), a free slot goes to the interested peer holding the fewest
    pieces, and a peer that just got a piece from us (seeding too) gives its slot to the
    longest-waiting empty peer. In a large flash crowd the nodes that can upload then grow
    faster: on scale_1000 (seed 1) 241 nodes held a weight piece at 2 s instead of 119, all of
    them at 3.5 s instead of 6.3 s. With ``swap_idle`` and two requests per peer: median 1.443
    -> 1.314 x T_min, last 1.393 -> 1.237 x the start-up bound (seeds 1-2; without it 1.399,
    1.283); 10,000 nodes (seed 1): median 1.756 -> 1.467 x T_min. Off by default; on in the
    simulator's scale_1000 and flash_crowd scenarios, not measured on real nodes yet."""
    swap_idle: bool = False
    """When our upload is idle at a tick, unchoked peers that asked nothing for a tick give their
    slot to interested peers waiting for one (``needy_first``: the fewest pieces first). In a
    large crowd a peer we unchoke often has nothing left to ask of us (what we hold that it lacks
    is already in flight from others): with ``feed_empty`` alone 15-18% of the nodes of
    scale_1000 had an idle upload from 3.5 s to 5 s (4 slots taken by peers that asked nothing,
    others waiting), 1.5-3% with it; median 1.371 -> 1.314 x T_min, last 1.296 -> 1.237 x the
    start-up bound (seeds 1-2, two requests per peer). Off by default; on where ``feed_empty``
    is."""
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
    see ``TransferCore._queue_deadline``). Counted from sending, the fourth of four pipelined 4 MiB
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
