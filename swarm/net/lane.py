"""The data lane: piece bytes over a direct TCP connection, set up over an authenticated libp2p
stream; an ``engine.PeerLink`` (``LaneLink``) the engine drives like any other link.

Why: a py-libp2p stream (noise + yamux) moves ~90 MB/s here with the receiver pinned at one core;
the per-frame Python work, not the cipher, is the limit. The lane moves whole pieces with a few
syscalls each, from plain threads with blocking sockets (recv, AES-GCM, blake3 and pwrite all
release the GIL), while the trio engine still decides what to fetch from whom.

Setup (``/swarm/lane/1.0.0``, one stream per link; see docs/protocol.md)::

    dialer  -> acceptor   OFFER   "SWL1" | u8 mode wanted | 32 random bytes
    acceptor -> dialer    ACCEPT  "SWL1" | u8 status | u8 mode | u16 TCP port | 32 random bytes
    dialer connects to the acceptor's IP (the libp2p connection's) at that port:
    dialer  -> acceptor   lane id (16) | HMAC proof (32)   acceptor checks it (constant time)
    acceptor -> dialer    HMAC proof (32)                  dialer checks it
    then both sides exchange lane records (``lane_crypto``), starting with the engine's Hello.

Both random contributions travel only inside the Noise channel; keys, lane id and proofs come from
them through HKDF bound to both peer ids, the mode and the port (``lane_crypto.derive_keys``).
The listener reads exactly 48 bytes from an unauthenticated connection, within PROOF_TIMEOUT, and
closes it on an unknown lane id or a wrong proof: no other byte is ever read from it. A lane id
is good for one attempt. Connections arriving while no offer is pending are closed unread, and a
flood of idle ones evicts the oldest rather than locking honest dialers out (MAX_HANDSHAKES).
Plaintext is used only when *both* sides are configured for it.

A setup is counted from its accepted offer to its Hello, per peer (MAX_SETUPS_PER_PEER) and in all
(``max_setups``, the engine's ``max_peers`` in a Node); then the link goes to a transfer, which
counts it in ``max_peers``. Until the peer's Hello a link reads its records on the event loop, one
FRAME at a time (a PIECE record before the Hello is a protocol error): no thread and no piece
buffer is spent on a lane before it names its manifest, and the receiver thread starts only when
the engine asks for the message after the Hello (so a link the engine refuses never has one).

Once up, the link is a ``lane_link.LaneLink`` (every pieces-protocol message then travels on the
TCP connection; the libp2p stream is closed); its records are ``lane_codec``'s, its piece buffers
``lane_pool``'s, its keys and sealing ``lane_crypto``'s. This module: setup and the listener.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import compat
from swarm.net import lane_crypto as lc
from swarm.net.lane_codec import decode_frame as _decode_frame  # noqa: F401 (tests import it here)
from swarm.net.lane_link import POOL_BUFFERS, STALL_TIMEOUT, LaneLink, blocking_socket  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

__all__ = ["LANE_MODES", "LaneLink", "LaneService", "LaneUnavailable", "bind_host_of"]

LANE_MODES = ("encrypted", "plaintext", "off")

MAGIC = b"SWL1"
OFFER = struct.Struct(">4sB32s")
ACCEPT = struct.Struct(">4sBBH32s")
STATUS_OK = 0
STATUS_REFUSED = 1

SETUP_TIMEOUT = 5.0
"""Seconds the dialer spends on setup (offer, answer, TCP connect, proofs) before falling back."""
OFFER_TIMEOUT = 5.0
"""Seconds an inbound lane stream has to send its offer."""
PROOF_TIMEOUT = 5.0
"""Seconds the listener waits for the TCP connection of an accepted offer, and for its proof."""
HELLO_TIMEOUT = 10.0
"""Seconds an inbound lane has to deliver the engine's Hello."""
MAX_SETUPS = 64
"""Lane setups in progress in all, unless ``LaneService(max_setups=...)`` says otherwise (a Node
passes its engine's ``max_peers``): accepted offers waiting for their TCP connection (keys, for up
to PROOF_TIMEOUT) and proven lanes waiting for their Hello (a descriptor, for up to
HELLO_TIMEOUT). No transfer counts them yet: a lane names its manifest in its Hello, and only then
goes to the transfer that counts it in ``max_peers``. At the limit a new offer evicts the oldest
setup of the peer holding the most: an honest dialer connects within a round trip of our answer
and sends its Hello at once, so an old setup is the least likely to be honest, and peers
flooding setups evict their own first."""
MAX_SETUPS_PER_PEER = 4
"""Lane setups in progress per peer (the libp2p peer id the lane stream authenticated): an honest
peer sets up one lane per link, a few at most at once; further offers are refused (that peer
falls back to a libp2p stream), so one peer cannot take the whole MAX_SETUPS. Without it one peer
held 600 proven lanes that never sent a Hello (601 threads, 615 descriptors) within 2.8 s."""
MAX_HANDSHAKES = 32
"""Unauthenticated TCP connections held at once (each is an fd and a task for up to
PROOF_TIMEOUT). At the limit a new connection evicts the oldest one from the source address
holding the most: an honest dialer sends its 48 proof bytes as soon as it is connected, so a
connection still silent while this many newer ones arrived is the likeliest to be hostile. Idle
connections therefore cannot lock honest dialers out (refusing new connections at the limit let
32 idle ones push every peer onto libp2p streams), and a host flooding from one address evicts
its own connections before anyone else's. Connections arriving while no offer is pending are
closed at once: nobody can hold a valid lane id then."""


class LaneUnavailable(Exception):
    """The lane could not be set up with this peer: use a plain libp2p stream."""


def _source_of(addr: Any) -> str:
    """Whose connection it is, for MAX_HANDSHAKES eviction: the IPv4 address, or the /64 of an
    IPv6 one (a single host commonly holds a whole /64)."""
    ip = str(addr[0] if isinstance(addr, tuple) and addr else addr)
    if ":" in ip:
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv6Network(f"{ip.split('%')[0]}/64", strict=False))
    return ip


class _Handshake:
    """An unauthenticated lane connection (see MAX_HANDSHAKES): closed by cancelling ``scope``."""

    __slots__ = ("scope", "source")

    def __init__(self, source: str):
        self.source = source
        self.scope = trio.CancelScope()


def _busiest_oldest(items: Any, source: Callable[[Any], str]) -> Any:
    """The first (oldest) of ``items`` (in insertion order) whose source holds the most items."""
    counts: dict[str, int] = {}
    for it in items:
        counts[source(it)] = counts.get(source(it), 0) + 1
    most = max(counts.values())
    return next(it for it in items if counts[source(it)] == most)


# --------------------------------------------------------------------------- helpers


def bind_host_of(listen: list[str] | tuple[str, ...]) -> str:
    """The IP of the first ``/ip4/...`` or ``/ip6/...`` listen multiaddr (the lane listener binds
    there, next to libp2p); 127.0.0.1 if there is none."""
    for a in listen:
        parts = str(a).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return "127.0.0.1"


def _stream_peer(stream: Any) -> str:
    return compat.stream_peer_id(stream)


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise LaneUnavailable(f"lane stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise LaneUnavailable(f"lane connection ended after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


async def _close_stream(stream: Any) -> None:
    """Close a libp2p stream gracefully, reset it if that fails; bounded, never raises."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(1.0):
            try:
                await stream.close()
                return
            except Exception:
                pass
        with trio.move_on_after(1.0):
            with contextlib.suppress(Exception):
                await stream.reset()


# --------------------------------------------------------------------------- setup


class _Pending:
    """An accepted offer waiting for its proven TCP connection (``sock``, then ``ready``)."""

    __slots__ = ("abandoned", "keys", "mode", "peer_id", "ready", "sock")

    def __init__(self, keys: lc.LaneKeys, peer_id: str, mode: int):
        self.keys = keys
        self.peer_id = peer_id
        self.mode = mode
        self.ready = trio.Event()
        self.sock: socket.socket | None = None
        self.abandoned = False  # the acceptor gave up: a connection proven now is closed


class _Setup:
    """One inbound lane from its accepted offer to its Hello (see MAX_SETUPS); evicted by
    cancelling ``scope``."""

    __slots__ = ("lane_id", "peer_id", "scope")

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.lane_id = b""
        self.scope = trio.CancelScope()


class LaneService:
    """A node's lane listener and both ends of lane setup.

    ``mode`` is "encrypted", "plaintext" (used only with peers also set to plaintext; encrypted
    otherwise) or "off". Run ``await nursery.start(service.run)``; serve ``LANE_PROTOCOL`` with
    ``accept_stream`` (each accepted lane ends in ``await on_link(link, hello)``, like the pieces
    handler); open lanes with ``dial``. ``max_setups``: inbound lanes between offer and Hello
    held at once (MAX_SETUPS).
    """

    def __init__(
        self,
        mode: str,
        local_id: str,
        *,
        bind_host: str = "127.0.0.1",
        on_link: Callable[[LaneLink, wire.Hello], Awaitable[None]] | None = None,
        pool_buffers: int = POOL_BUFFERS,
        max_setups: int = MAX_SETUPS,
    ):
        if mode not in LANE_MODES:
            raise ValueError(f"lane mode must be one of {LANE_MODES}, got {mode!r}")
        self.mode = mode
        self.local_id = local_id
        self.bind_host = bind_host
        self.on_link = on_link
        self.pool_buffers = pool_buffers
        self.max_setups = max(1, max_setups)
        self.port: int | None = None
        self.lanes_opened = 0
        self.lanes_accepted = 0
        self.proofs_rejected = 0
        self.connections_refused = 0  # closed unread: no offer was pending
        self.connections_evicted = 0  # closed unread to admit a newer one (MAX_HANDSHAKES)
        self.setups_refused = 0  # offers refused: the peer holds MAX_SETUPS_PER_PEER
        self.setups_evicted = 0  # offers voided or lanes closed before Hello (max_setups)
        self.hellos_missing = 0  # proven lanes closed without a Hello (timeout, bad record)
        self._listener: trio.socket.SocketType | None = None
        self._pending: dict[bytes, _Pending] = {}  # by lane id, oldest first
        self._setups: dict[_Setup, None] = {}  # offer accepted, no Hello yet; oldest first
        self._unproven: dict[_Handshake, None] = {}  # unauthenticated connections, oldest first

    @property
    def _handshakes(self) -> int:
        """Unauthenticated connections held now."""
        return len(self._unproven)

    @property
    def setups(self) -> int:
        """Inbound lanes between their accepted offer and their Hello now."""
        return len(self._setups)

    def setups_of(self, peer_id: str) -> int:
        return sum(s.peer_id == peer_id for s in self._setups)

    @property
    def _wanted_mode(self) -> int:
        return lc.MODE_PLAINTEXT if self.mode == "plaintext" else lc.MODE_ENCRYPTED

    # -- the listener --

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for lane connections until cancelled (or ``close_listener``)."""
        if self.mode == "off":
            task_status.started()
            return
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind((self.bind_host, 0))
            listener.listen(128)
            self._listener = listener
            self.port = listener.getsockname()[1]
            log.debug("lane listener on %s:%d (%s)", self.bind_host, self.port, self.mode)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, addr = await listener.accept()
                    except (OSError, trio.ClosedResourceError) as e:
                        if self._listener is None:  # close_listener()
                            return
                        log.warning("lane listener: %r", e)
                        await trio.sleep(0.1)
                        continue
                    if not self._pending:  # nobody can hold a valid lane id now
                        self.connections_refused += 1
                        conn.close()
                        continue
                    if len(self._unproven) >= MAX_HANDSHAKES:
                        old = _busiest_oldest(self._unproven, lambda h: h.source)
                        del self._unproven[old]
                        old.scope.cancel()  # its task closes the connection
                        self.connections_evicted += 1
                    hs = _Handshake(_source_of(addr))
                    self._unproven[hs] = None
                    nursery.start_soon(self._check_proof, conn, hs)
        finally:
            self._listener = None
            self.port = None
            listener.close()

    def close_listener(self) -> None:
        """Stop accepting lane connections (offers are then refused; peers fall back)."""
        listener, self._listener = self._listener, None
        self.port = None
        if listener is not None:
            listener.close()

    async def _check_proof(self, conn: trio.socket.SocketType, hs: _Handshake) -> None:
        """An unauthenticated TCP connection: exactly 48 bytes (lane id + proof) or closed; also
        closed, unread, when evicted (``hs.scope`` cancelled, see MAX_HANDSHAKES)."""
        handed = False
        try:
            with hs.scope, trio.move_on_after(PROOF_TIMEOUT):
                raw = await _recv_exactly(conn, lc.LANE_ID_BYTES + lc.PROOF_BYTES)
                self._unproven.pop(hs, None)  # no longer idle: never evicted from here on
                slot = self._pending.pop(raw[: lc.LANE_ID_BYTES], None)  # one attempt per id
                if slot is None or slot.ready.is_set():
                    self.proofs_rejected += 1
                    log.info("lane connection with an unknown lane id: closed")
                    return
                if not lc.check_proof(slot.keys, True, raw[lc.LANE_ID_BYTES :]):
                    self.proofs_rejected += 1
                    log.warning("lane connection from %s: wrong proof, closed", slot.peer_id[:16])
                    slot.ready.set()  # the offer is void
                    return
                await _send_all(conn, lc.make_proof(slot.keys, False))
                if slot.abandoned:  # the acceptor gave up (timeout, evicted) meanwhile
                    return
                slot.sock = blocking_socket(conn)
                handed = True
                slot.ready.set()
        except (OSError, LaneUnavailable) as e:
            log.debug("lane connection failed during proof: %r", e)
        finally:
            self._unproven.pop(hs, None)
            if not handed:
                conn.close()

    # -- acceptor side of setup --

    async def accept_stream(self, stream: Any) -> None:
        """Handle one inbound LANE_PROTOCOL stream: answer the offer, wait for the proven TCP
        connection and the Hello (a setup, counted per peer and in all), then run the link
        through ``on_link`` until it ends."""
        peer = _stream_peer(stream)
        setup = _Setup(peer)
        link: LaneLink | None = None
        hello: wire.Hello | None = None
        try:
            with setup.scope:  # cancelled when evicted (max_setups)
                link = await self._set_up(stream, peer, setup)
                if link is not None:
                    hello = await self._first_hello(link, peer)
        finally:
            try:
                if hello is None and link is not None:
                    self.hellos_missing += 1
                    await link.aclose()
            finally:
                self._setups.pop(setup, None)
        if link is None or hello is None:
            return
        try:
            assert self.on_link is not None
            await self.on_link(link, hello)  # the transfer counts it in max_peers from here
        except LinkClosed as e:
            log.debug("lane from %s: %s", peer[:16], e)
        finally:
            await link.aclose()

    async def _set_up(self, stream: Any, peer: str, setup: _Setup) -> LaneLink | None:
        """Answer the offer on ``stream`` and wait for its proven TCP connection: the link (no
        thread yet), or None (refused, failed; logged)."""
        slot: _Pending | None = None
        taken = False
        try:
            try:
                with trio.fail_after(OFFER_TIMEOUT):
                    magic, wanted, nonce_d = OFFER.unpack(await _read_exactly(stream, OFFER.size))
                port = self.port
                refuse = (
                    magic != MAGIC
                    or wanted not in lc.MODE_NAMES
                    or self.mode == "off"
                    or port is None
                    or self.on_link is None
                )
                if not refuse and self.setups_of(peer) >= MAX_SETUPS_PER_PEER:
                    self.setups_refused += 1
                    refuse = True
                if refuse:
                    await stream.write(ACCEPT.pack(MAGIC, STATUS_REFUSED, 0, 0, bytes(32)))
                    return None
                if len(self._setups) >= self.max_setups:
                    self._evict_setup()
                mode = (
                    lc.MODE_PLAINTEXT
                    if wanted == lc.MODE_PLAINTEXT and self.mode == "plaintext"
                    else lc.MODE_ENCRYPTED
                )
                nonce_a = secrets.token_bytes(lc.NONCE_BYTES)
                keys = lc.derive_keys(nonce_d, nonce_a, peer, self.local_id, mode, port)
                slot = _Pending(keys, peer, mode)
                setup.lane_id = keys.lane_id
                self._setups[setup] = None
                self._pending[keys.lane_id] = slot
                await stream.write(ACCEPT.pack(MAGIC, STATUS_OK, mode, port, nonce_a))
                with trio.move_on_after(PROOF_TIMEOUT):
                    await slot.ready.wait()
            except (trio.TooSlowError, LaneUnavailable, struct.error) as e:
                log.info("lane offer from %s failed: %r", peer[:16], e)
                return None
            except Exception as e:  # the stream broke (reset, closed)
                log.debug("lane offer from %s: %r", peer[:16], e)
                return None
            finally:
                if slot is not None:
                    self._pending.pop(slot.keys.lane_id, None)
                    slot.abandoned = True  # from here on _check_proof keeps what it proves
                await _close_stream(stream)
            if slot.sock is None:
                log.info("lane from %s: no proven connection within %g s", peer[:16], PROOF_TIMEOUT)
                return None
            link = LaneLink(
                slot.sock,
                slot.keys,
                dialer=False,
                peer_id=peer,
                mode=slot.mode,
                pool_buffers=self.pool_buffers,
            )
            taken = True
            self.lanes_accepted += 1
            return link
        finally:
            if not taken and slot is not None and slot.sock is not None:
                slot.sock.close()  # proven, then cancelled (evicted, node closing)

    def _evict_setup(self) -> None:
        """Make room for a new setup (max_setups): void the oldest of the peer holding most."""
        old = _busiest_oldest(self._setups, lambda s: s.peer_id)
        del self._setups[old]
        self._pending.pop(old.lane_id, None)  # an offer: nobody may use its lane id now
        old.scope.cancel()  # its task closes its stream or its connection
        self.setups_evicted += 1

    async def _first_hello(self, link: LaneLink, peer: str) -> wire.Hello | None:
        """The peer's Hello within HELLO_TIMEOUT (read on the event loop: FRAME records only),
        or None after telling the peer why (logged)."""
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello = await link.receive()
            if not isinstance(hello, wire.Hello):
                raise wire.ProtocolError(f"expected Hello, got {type(hello).__name__}")
            return hello
        except (trio.TooSlowError, wire.ProtocolError) as e:
            log.info("lane from %s: %r", peer[:16], e)
            with trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await link.send(wire.Error(f"protocol error: {e}"))
        except LinkClosed as e:
            log.debug("lane from %s before its Hello: %s", peer[:16], e)
        return None

    # -- dialer side of setup --

    async def dial(
        self, open_stream: Callable[[], Awaitable[Any]], *, timeout: float = SETUP_TIMEOUT
    ) -> LaneLink:
        """Open a lane: ``open_stream()`` gives a LANE_PROTOCOL libp2p stream to the peer (for
        instance ``lambda: host.open_lane_stream(peer)``). LaneUnavailable on any failure: the
        caller falls back to a plain pieces stream."""
        if self.mode == "off":
            raise LaneUnavailable("lane is off")
        stream = None
        tsock = None
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await open_stream()
                except Exception as e:  # NetError: unreachable, or the peer has no lane
                    raise LaneUnavailable(f"no lane stream: {e}") from e
                peer = _stream_peer(stream)
                nonce_d = secrets.token_bytes(lc.NONCE_BYTES)
                await stream.write(OFFER.pack(MAGIC, self._wanted_mode, nonce_d))
                magic, status, mode, port, nonce_a = ACCEPT.unpack(await _read_exactly(stream, ACCEPT.size))
                if magic != MAGIC:
                    raise LaneUnavailable("not a lane answer")
                if status != STATUS_OK:
                    raise LaneUnavailable("peer refused the lane")
                if mode not in (lc.MODE_ENCRYPTED, self._wanted_mode):
                    raise LaneUnavailable(f"peer chose lane mode {mode}")
                remote = stream.get_remote_address()
                if not remote:
                    raise LaneUnavailable("no remote address for the lane")
                ip = remote[0]
                keys = lc.derive_keys(nonce_d, nonce_a, self.local_id, peer, mode, port)
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                tsock = trio.socket.socket(family, socket.SOCK_STREAM)
                await tsock.connect((ip, port))
                await _send_all(tsock, keys.lane_id + lc.make_proof(keys, True))
                proof = await _recv_exactly(tsock, lc.PROOF_BYTES)
                if not lc.check_proof(keys, False, proof):
                    raise LaneUnavailable("the acceptor's proof is wrong")
                sock = blocking_socket(tsock)
                tsock = None
        except LaneUnavailable:
            raise
        except trio.TooSlowError:
            raise LaneUnavailable(f"lane setup took more than {timeout:g} s") from None
        except Exception as e:  # OSError (refused, reset), a broken stream, a bad answer
            raise LaneUnavailable(f"lane setup failed: {e!r}") from e
        finally:
            if tsock is not None:
                tsock.close()
            if stream is not None:
                await _close_stream(stream)
        self.lanes_opened += 1
        return LaneLink(sock, keys, dialer=True, peer_id=peer, mode=mode, pool_buffers=self.pool_buffers)
