"""``SwarmHost``: the node's libp2p host, its Kademlia DHT and swarm's two protocols.

- Security is Noise only (py-libp2p's default host also offers TLS, SECIO and *plaintext*, and
  accepts an inbound plaintext session); the muxer is yamux; one connection per peer
  (``max_connections_per_peer=1`` also removes a ~250 ms wait from every dial).
- The DHT runs in server mode, is created before any connection (it registers its protocol
  handler and sees the identify results), and every peer we connect to goes into its routing table.
- ``/swarm/manifest/1.0.0``: one ManifestRequest in, ManifestReply frames and a ManifestEnd out.
- ``/swarm/pieces/1.0.0``: the first message must be a Hello; the stream is then handed to the
  pieces handler (the engine) as a ``StreamLink`` for its lifetime.

py-libp2p hazards handled here: an exception escaping a stream handler tears down the whole host,
so every handler contains all errors and closes its stream; ``find_providers`` answers from the
local provider cache whenever it has any entry, so lookups here always ask the network too; DHT
nodes reject non-multihash keys over 50 bytes, so keys are multihashes (34 bytes).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import multiaddr
import trio
import varint
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import ALPHA, MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.utils import maybe_consume_signed_record as _consume_record
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import _requiet, quiet_libp2p_logs
from swarm.net.identity import peer_id_of
from swarm.net.links import StreamLink

log = logging.getLogger(__name__)

__all__ = [
    "NetError",
    "PeerAddr",
    "StreamLink",
    "SwarmHost",
    "manifest_key",
    "model_key",
    "parse_psk",
    "quiet_libp2p_logs",
]

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
CONNECT_TIMEOUT = 10.0
"""Seconds for one dial (TCP + noise + yamux). A peer with another PSK never answers: py-libp2p
would retry for ~30 s."""
HELLO_TIMEOUT = 10.0
"""Seconds an inbound pieces stream has to send its Hello."""
MANIFEST_REQUEST_TIMEOUT = 10.0
"""Seconds an inbound manifest stream has to send its request."""
MANIFEST_REPLY_TIMEOUT = 60.0
"""Seconds we spend sending one manifest reply (at most MAX_MANIFEST_REPLY_BYTES)."""
MAX_MANIFEST_STREAMS_PER_PEER = 4
"""Inbound manifest requests served at once per peer; more are answered "busy". A fetch by name
asks each provider once, so a node fetching four models at once still fits. Each stream being
served holds at most one encoded frame (frames are encoded while sending) for a reader that may
take MANIFEST_REPLY_TIMEOUT: before these bounds, 30-byte requests that were never read made us
build and hold a whole reply each (up to 16 x 16 MiB)."""
MAX_MANIFEST_STREAMS = 64
"""Inbound manifest requests served at once in all (many peers, or one with many identities); a
refused asker tries its other providers."""
PROVIDE_TIMEOUT = 30.0
QUERY_TIMEOUT = 5.0
"""Seconds one small query (``SwarmHost.query``) may take end to end, either side."""
MAX_QUERY_BYTES = 4096
"""Largest request or reply of a small query: status records of a few hundred bytes."""
ADDR_TTL = 24 * 3600
"""Seconds the peerstore keeps the addresses of a peer we dialled (py-libp2p's connect: 120 s)."""
BOOTSTRAP_RETRY = 30.0
"""Seconds between attempts to reach the bootstrap peers while we have no connection at all."""
SELF_LOOKUP_TIMEOUT = 30.0
GET_PROVIDERS_ATTEMPTS = 4
"""Tries of a GET_PROVIDERS that comes back empty (a busy DHT peer resets requests beyond 12 at
once; measured: 16 frontends looking up one worker together, 3-5 of them got nothing for 5 s)."""
MAX_PROVIDERS_PER_ANSWER = 20
"""Providers taken from one GET_PROVIDERS answer (Kademlia's k). py-libp2p caps a message at
4 MiB, room for ~400,000 addresses: one answer could otherwise make us parse and keep them all."""
MAX_ADDRS_PER_PROVIDER = 16
"""Addresses kept per provider (a peer listens on a few: ip4/ip6 x interfaces). Measured before this
bound: one provider record with 30,000 addresses blocked the event loop 5.4 s (a quadratic
de-duplication)."""
MAX_CLOSER_PER_ANSWER = 20
"""Closer peers taken from one answer (k)."""
MAX_PROVIDERS_FOUND = 200
"""Distinct providers one lookup keeps; it stops there."""
MAX_SIGNED_RECORD_BYTES = 4096
"""A signed peer record (an envelope with a key, a signature and a few addresses) is a few hundred
bytes; a bigger one is not verified (its addresses would all be parsed into the peerstore)."""

_SHA2_256 = 0x12
_BLAKE3 = 0x1E
_MODEL_KEY_PREFIX = b"swarm/model/"


class NetError(Exception):
    """A network operation failed: unreachable peer, refused or timed-out request, bad reply."""


NOISE_WRITE_TIMEOUT = 10.0
"""Seconds one noise message write (one yamux frame, at most 256 KiB) may block on a peer that does
not read before its connection is closed (see _make_noise_writes_atomic)."""


def _make_noise_writes_atomic() -> None:
    """Make each noise message write of py-libp2p 0.8.1 atomic with respect to cancellation.

    Its noise transport encrypts a message (advancing the nonce) and then awaits the socket write.
    A task cancelled in between (at the TCP write lock, or inside a ``send_all`` blocked on a full
    socket buffer) leaves the nonces out of step or half a message on the wire; the peer then fails
    to authenticate everything after it and drops the whole connection, with every stream on it
    (the DHT's included). The engine cancels a link's writer whenever the link ends, often in the
    middle of a piece: measured with 2,080 fuzzed pieces streams, a connection died this way in
    one run of two. So each write runs shielded, bounded by NOISE_WRITE_TIMEOUT (after which the
    connection is unusable and is closed); a cancellation that arrived meanwhile is delivered once
    the message is out."""
    from libp2p.io.exceptions import IOException
    from libp2p.security.noise.io import BaseNoiseMsgReadWriter

    write_msg = BaseNoiseMsgReadWriter.write_msg
    if getattr(write_msg, "_swarm_atomic", False):
        return

    async def atomic_write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(NOISE_WRITE_TIMEOUT) as scope:
                await write_msg(self, msg, prefix_encoded)
            if scope.cancelled_caught:
                with trio.move_on_after(1):
                    try:
                        await self.close()
                    except Exception as e:
                        log.debug("closing a stalled noise session: %r", e)
                raise IOException(f"noise write stalled for {NOISE_WRITE_TIMEOUT:g} s: connection closed")
        await trio.lowlevel.checkpoint_if_cancelled()

    atomic_write_msg._swarm_atomic = True  # type: ignore[attr-defined]
    BaseNoiseMsgReadWriter.write_msg = atomic_write_msg  # type: ignore[method-assign]


# --------------------------------------------------------------------------- keys and addresses


def model_key(model: str) -> bytes:
    """DHT key of a model name: the sha2-256 multihash (34 bytes) of ``b"swarm/model/" + name``.

    Raw bytes are what the DHT stores and sends; py-libp2p's ``KadDHT.provide(key: str)`` would
    take a CID string or the hex of these bytes (raw bytes also happen to pass its CID parser), but
    SwarmHost hands the bytes to the provider store directly."""
    return bytes([_SHA2_256, 32]) + hashlib.sha256(_MODEL_KEY_PREFIX + model.encode("utf-8")).digest()


def manifest_key(manifest_hash: bytes) -> bytes:
    """DHT key of a manifest: its 32-byte blake3 as a blake3 multihash (code 0x1e, length 32).

    The DHT accepts any multihash (remote FIND_NODE validates with ``multihash.decode``, which
    knows blake3; ADD_PROVIDER / GET_PROVIDERS only bound the length); XOR distances are taken over
    sha256 of the key either way."""
    if len(manifest_hash) != 32:
        raise ValueError(f"manifest hash must be 32 bytes, got {len(manifest_hash)}")
    return bytes([_BLAKE3, 32]) + bytes(manifest_hash)


@attrs.frozen
class PeerAddr:
    """A peer and the multiaddrs it can be dialled at (without the ``/p2p/<id>`` suffix)."""

    peer_id: str
    addrs: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def p2p_addrs(self) -> list[str]:
        """The addresses with the ``/p2p/<id>`` suffix, as ``SwarmHost.connect`` takes them."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    if value:
        return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}"))
    return addr


def _expand_wildcards(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Our listen addresses as peers can dial them: a wildcard IP (0.0.0.0, ::) becomes the
    machine's interface addresses (py-libp2p advertises the wildcard itself otherwise)."""
    out: list[multiaddr.Multiaddr] = []
    for a in candidates:
        ip = None
        for proto in ("ip4", "ip6"):
            try:
                ip = a.value_for_protocol(proto)
            except Exception:
                continue
            if ip:
                break
        expanded = [a]
        if ip in ("0.0.0.0", "::"):
            try:
                expanded = expand_wildcard_address(a) or [a]
            except Exception as e:
                log.debug("cannot expand %s: %r", a, e)
        for x in expanded:
            if x not in out:
                out.append(x)
    return out


def _parse_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as e:
        raise NetError(f"not a peer id: {peer_id!r}") from e


def _parse_target(peer: str | PeerAddr) -> tuple[ID, list[multiaddr.Multiaddr]]:
    """(peer id, addrs without /p2p) from a PeerAddr, a multiaddr ending in /p2p/<id>, or a bare
    peer id."""
    if isinstance(peer, PeerAddr):
        pid = _parse_id(peer.peer_id)
        addrs = []
        for a in peer.addrs:
            try:
                addrs.append(_strip_p2p(multiaddr.Multiaddr(a)))
            except Exception as e:
                log.debug("ignoring bad address %r of %s: %s", a, peer.peer_id, e)
        return pid, addrs
    if not isinstance(peer, str):
        raise TypeError(f"expected a peer id, a multiaddr or a PeerAddr, got {type(peer).__name__}")
    if not peer.startswith("/"):
        return _parse_id(peer), []
    try:
        ma = multiaddr.Multiaddr(peer)
        value = ma.value_for_protocol("p2p")
    except Exception as e:
        raise NetError(f"bad multiaddr {peer!r}: {e}") from e
    if not value:
        raise NetError(f"multiaddr {peer!r} does not end in /p2p/<peer id>")
    return _parse_id(value), [_strip_p2p(ma)]


_SWARM_KEY_RE = re.compile(r"/key/swarm/psk/1\.0\.0/\s*/base16/\s*([0-9a-fA-F]{64})\s*$")


def parse_psk(psk: str) -> str:
    """The 64-hex-digit form py-libp2p takes, from 64 hex digits or the text of a go-style
    ``swarm.key`` file (``/key/swarm/psk/1.0.0/``, ``/base16/``, the key). ValueError otherwise."""
    s = psk.strip()
    m = _SWARM_KEY_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if len(s) != 64 or not all(c in "0123456789abcdefABCDEF" for c in s):
        raise ValueError("psk must be 32 bytes as 64 hex digits (or a swarm.key file's text)")
    return s.lower()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not 2 <= len(key) <= 80:
        raise ValueError("DHT key must be 2..80 bytes (use model_key / manifest_key)")
    return bytes(key)


class _ProviderBook:
    """The providers one lookup found, first-hand apart from hearsay, with bounded work per record.

    First-hand: a record whose provider is the peer that gave it (``source`` is its id) or one
    from our own provider store (``source`` None: ADD_PROVIDERs, which py-libp2p accepts only from
    the provider itself). Hearsay: what a peer says about others, kept per answering peer so the
    result can take it in turn from each (one hostile peer's twenty made-up providers do not push
    out an honest peer's one). Every record adds at most MAX_ADDRS_PER_PROVIDER addresses, with
    set membership (dict keys), so no record costs more than a few microseconds."""

    def __init__(self, own_id: str):
        self.own_id = own_id
        self.first_hand: dict[str, dict[str, None]] = {}
        self.hearsay: dict[str, dict[str, dict[str, None]]] = {}
        self._seen: set[str] = set()

    @property
    def first_hand_count(self) -> int:
        return len(self.first_hand)

    @property
    def full(self) -> bool:
        return len(self._seen) >= MAX_PROVIDERS_FOUND

    def add(self, infos: Iterable[PeerInfo], *, source: str | None) -> None:
        for info in itertools.islice(infos, MAX_PROVIDERS_FOUND):
            try:
                pid = info.peer_id.to_base58()
            except Exception:
                continue
            if pid == self.own_id or (pid not in self._seen and self.full):
                continue
            if source is None or source == pid:
                addrs = self.first_hand.setdefault(pid, {})
            else:
                told = self.hearsay.setdefault(source, {})
                if pid not in told and len(told) >= MAX_PROVIDERS_PER_ANSWER:
                    continue
                addrs = told.setdefault(pid, {})
            self._seen.add(pid)
            for a in itertools.islice(info.addrs, MAX_ADDRS_PER_PROVIDER):
                if len(addrs) >= MAX_ADDRS_PER_PROVIDER:
                    break
                try:
                    addrs[str(_strip_p2p(a))] = None
                except Exception:
                    continue

    def result(self, limit: int, *, connected_at: Callable[[str], list[str] | None]) -> list[PeerAddr]:
        """First-hand providers in the order found, then hearsay in turn from each source; at
        most ``limit``. ``connected_at(pid)``: the addresses of a peer we are connected to (which
        hearsay does not replace), None for others."""
        out = [PeerAddr(pid, tuple(addrs)) for pid, addrs in itertools.islice(self.first_hand.items(), limit)]
        taken = set(self.first_hand)
        rounds = itertools.zip_longest(*(list(told) for told in self.hearsay.values()))
        for pid in itertools.chain.from_iterable(rounds):
            if len(out) >= limit:
                break
            if pid is None or pid in taken:
                continue
            taken.add(pid)
            lists = [list(told[pid]) for told in self.hearsay.values() if pid in told]
            addrs = dict.fromkeys(
                a
                for a in itertools.chain.from_iterable(  # each source in turn
                    itertools.zip_longest(*lists)
                )
                if a is not None
            )
            known = connected_at(pid)
            out.append(
                PeerAddr(
                    pid,
                    known if known is not None else tuple(itertools.islice(addrs, MAX_ADDRS_PER_PROVIDER)),
                )
            )
        return out


# --------------------------------------------------------------------------- the host


class SwarmHost:
    """One libp2p host: noise + yamux over TCP, a server-mode Kademlia DHT, swarm's protocols.

    Create it, register handlers (any time), then ``async with host.run(): ...``. A SwarmHost runs
    once."""

    NetError = NetError

    def __init__(
        self,
        keypair: KeyPair,
        *,
        listen: Iterable[str] | None = None,
        bootstrap: Iterable[str] | None = None,
        psk: str | None = None,
        announce: Iterable[str] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ):
        self.keypair = keypair
        self.peer_id: str = peer_id_of(keypair)
        self._id = ID.from_base58(self.peer_id)
        _make_noise_writes_atomic()
        self._listen = [multiaddr.Multiaddr(a) for a in (listen or DEFAULT_LISTEN)]
        self._bootstrap = list(bootstrap or ())
        for a in self._bootstrap:
            _pid, addrs = _parse_target(a)  # validate now: NetError for a malformed entry
            if not addrs:
                raise NetError(f"bootstrap entry {a!r} is not a /.../p2p/<id> multiaddr")
        self._psk = parse_psk(psk) if psk else None
        announce_addrs = [multiaddr.Multiaddr(a) for a in announce] if announce else None
        # Advertised addresses travel in provider records: never advertise 0.0.0.0 / ::.
        addrs_factory = None if announce_addrs else _expand_wildcards
        self.connect_timeout = connect_timeout
        self.security_options = {
            TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                keypair, noise_privkey=create_x25519_key_pair().private_key
            ),
        }
        self._host = new_host(
            key_pair=keypair,
            sec_opt=self.security_options,
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            listen_addrs=self._listen,
            psk=self._psk,
            announce_addrs=announce_addrs,
            addrs_factory=addrs_factory,
        )
        # Before any connection: it registers /ipfs/kad/1.0.0 and must see every peer we meet.
        self._dht = KadDHT(self._host, DHTMode.SERVER)
        self._manifest_handler: Callable[[wire.ManifestRequest], Any] | None = None
        self._pieces_handler: Callable[[StreamLink, wire.Hello], Awaitable[None]] | None = None
        self._lane_handler: Callable[[Any], Awaitable[None]] | None = None
        self._dial_locks: dict[ID, trio.Lock] = {}
        self._manifest_streams: dict[str, int] = {}  # peer id -> manifest requests being served
        self._running = False
        self._ran = False

    # ------------------------------------------------------------------ lifetime

    @property
    def running(self) -> bool:
        return self._running

    @property
    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in ``/p2p/<our id>`` (empty until ``run``)."""
        return [str(a) for a in self._host.get_addrs()]

    @asynccontextmanager
    async def run(self) -> AsyncIterator[SwarmHost]:
        """Listen, start the DHT, connect to the bootstrap peers (concurrently, each bounded by
        ``connect_timeout``; unreachable ones are logged and retried in the background while we
        have no connection at all). Everything is closed on exit."""
        if self._ran:
            raise RuntimeError("a SwarmHost runs once; create a new one")
        self._ran = True
        _requiet()
        single: BaseException | None = None
        try:
            async with (
                self._host.run(listen_addrs=self._listen),
                background_trio_service(self._dht),
                trio.open_nursery() as nursery,
            ):
                self._running = True
                try:
                    log.info("swarm host %s listening on %s", self.peer_id, ", ".join(self.addrs))
                    if self._bootstrap:
                        if await self._connect_bootstrap():
                            nursery.start_soon(self._self_lookup)
                        nursery.start_soon(self._bootstrap_loop)
                    yield self
                finally:
                    self._running = False
                    nursery.cancel_scope.cancel()
                    await self._close_network()
        except BaseExceptionGroup as eg:
            # An exception from the body comes out of five nested nurseries (ours and
            # py-libp2p's), wrapped once by each; hand a lone exception back as itself.
            leaves = _leaves(eg)
            if len(leaves) != 1:
                raise
            single = leaves[0]
        if single is not None:
            raise single

    async def _close_network(self) -> None:
        """Close every connection and listener before the host stops. py-libp2p 0.8.1 closes them
        only on its swarm service's cancelled shutdown path, where the first ``await`` raises
        Cancelled: the sockets stayed open (listening ones too), and peers kept seeing a stopped
        host as connected (an embedded node per ``swarm.fetch`` leaked them into the caller).
        Connections close concurrently (each takes ~0.2 s in py-libp2p), then the rest."""
        net = self._host.get_network()

        async def close(pid: ID, conn: Any) -> None:
            try:
                await conn.close()
            except Exception as e:
                log.debug("closing the connection to %s: %r", pid, e)

        with trio.CancelScope(shield=True), trio.move_on_after(5):
            async with trio.open_nursery() as n:
                for pid, conns in list(net.connections.items()):
                    for conn in list(conns):
                        n.start_soon(close, pid, conn)
            try:
                await net.close()
            except Exception as e:
                log.debug("closing the network: %r", e)

    async def _connect_bootstrap(self) -> int:
        ok: list[str] = []

        async def one(a: str) -> None:
            try:
                ok.append(await self.connect(a))
            except NetError as e:
                log.warning("bootstrap peer %s unreachable: %s", a, e)

        async with trio.open_nursery() as n:
            for a in self._bootstrap:
                n.start_soon(one, a)
        if not ok:
            log.warning("no bootstrap peer reachable (of %d)", len(self._bootstrap))
        return len(ok)

    async def _bootstrap_loop(self) -> None:
        while True:
            await trio.sleep(BOOTSTRAP_RETRY)
            if not self.connected_peers() and await self._connect_bootstrap():
                await self._self_lookup()

    async def _self_lookup(self) -> None:
        """Fill the routing table with the peers near us (Kademlia's join)."""
        with trio.move_on_after(SELF_LOOKUP_TIMEOUT):
            try:
                await self._dht.peer_routing.find_closest_peers_network(self._id.to_bytes())
            except Exception as e:
                log.debug("self lookup failed: %r", e)

    def _require_running(self) -> None:
        if not self._running:
            raise NetError("host is not running (use `async with host.run():`)")

    # ------------------------------------------------------------------ connections

    async def connect(self, addr: str | PeerAddr) -> str:
        """Dial a peer (no-op if already connected) and add it to the DHT routing table. ``addr`` is
        a multiaddr ending in ``/p2p/<id>``, a PeerAddr, or a bare peer id (dialled at addresses
        we already know or find through the DHT). Returns its peer id; NetError on failure."""
        self._require_running()
        pid, addrs = _parse_target(addr)
        await self._ensure_connected(pid, addrs)
        if not self._dht.routing_table.peer_in_table(pid):  # e.g. connected inbound earlier
            await self._add_to_routing_table(pid)
        return pid.to_base58()

    def connected_peers(self) -> list[str]:
        conns = self._host.get_network().connections
        return [p.to_base58() for p, c in list(conns.items()) if c]

    def security_protocol(self, peer_id: str) -> str | None:
        """The security protocol negotiated on our connection to ``peer_id`` (None if none)."""
        conns = self._host.get_network().connections.get(_parse_id(peer_id)) or []
        for c in conns:
            getter = getattr(c, "get_negotiated_security_protocol", None)
            if getter is not None:
                return getter()
        return None

    def muxer_protocol(self, peer_id: str) -> str | None:
        conns = self._host.get_network().connections.get(_parse_id(peer_id)) or []
        for c in conns:
            getter = getattr(c, "get_negotiated_muxer_protocol", None)
            if getter is not None:
                return getter()
        return None

    def _is_connected(self, pid: ID) -> bool:
        return bool(self._host.get_network().connections.get(pid))

    def _known_addrs(self, pid: ID) -> list[multiaddr.Multiaddr]:
        try:
            return list(self._host.get_peerstore().addrs(pid))
        except Exception:
            return []

    async def _ensure_connected(self, pid: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        if pid == self._id:
            raise NetError("cannot connect to ourselves")
        if self._is_connected(pid):
            return
        lock = self._dial_locks.setdefault(pid, trio.Lock())
        try:
            async with lock:
                if self._is_connected(pid):
                    return
                known = self._known_addrs(pid)
                if addrs:
                    # The addresses given (the caller's, or a provider record's) first; those we
                    # knew (from an earlier dial) after them, not given up for them: a record
                    # may be a third party's junk.
                    tries = [addrs] + ([rest] if (rest := [a for a in known if a not in addrs]) else [])
                else:
                    tries = [known or await self._find_addrs(pid)]
                if not tries[0]:
                    raise NetError(f"no address known for {pid.to_base58()}")
                tried: set[multiaddr.Multiaddr] = set()
                try:
                    for i, attempt in enumerate(tries):
                        # Dial exactly these addresses. py-libp2p dials one TCP address per
                        # peer, the first its peerstore holds, and refuses for 60 s a peer whose
                        # last dial failed: a peer restarted on a new port stayed unreachable
                        # behind its stale address (kept ADDR_TTL).
                        if i or not set(attempt) <= set(known):
                            self._host.get_network().unblock_peer(pid)
                        self._host.get_peerstore().clear_addrs(pid)
                        tried.update(attempt)
                        try:
                            await self._dial(PeerInfo(pid, attempt))
                            return
                        except NetError:
                            if i == len(tries) - 1:
                                raise
                            log.debug("dialling %s at the addresses we knew before", pid)
                finally:
                    if not self._is_connected(pid):
                        # Leave no address that failed (or whose dial was cut off) in the
                        # peerstore: py-libp2p's closest-peer lookup falls back to every peer
                        # there and hung on a silent provider's address (measured: every DHT
                        # lookup after one took its whole timeout).
                        self._host.get_peerstore().clear_addrs(pid)
                        if keep := [a for a in known if a not in tried]:
                            self._host.get_peerstore().add_addrs(pid, keep, ADDR_TTL)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dial_locks.pop(pid, None)

    async def _find_addrs(self, pid: ID) -> list[multiaddr.Multiaddr]:
        with trio.move_on_after(self.connect_timeout):
            try:
                info = await self._dht.find_peer(pid)
            except Exception as e:
                log.debug("DHT find_peer %s: %r", pid, e)
                return []
            if info is not None:
                return [_strip_p2p(a) for a in info.addrs]
        return []

    async def _dial(self, info: PeerInfo) -> None:
        pid = info.peer_id
        t0 = trio.current_time()
        try:
            with trio.fail_after(self.connect_timeout):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise NetError(
                f"connecting to {pid.to_base58()} timed out after "
                f"{self.connect_timeout:g} s (unreachable, or another PSK?)"
            ) from None
        except Exception as e:
            raise NetError(f"connecting to {pid.to_base58()} failed: {e}") from e
        log.debug("connected to %s in %.0f ms", pid, (trio.current_time() - t0) * 1000)
        self._host.get_peerstore().add_addrs(pid, info.addrs, ADDR_TTL)
        await self._add_to_routing_table(pid)

    async def _add_to_routing_table(self, pid: ID) -> None:
        with trio.move_on_after(5):  # a full bucket pings its oldest peer first
            try:
                await self._dht.add_peer(pid)
            except Exception as e:
                log.debug("adding %s to the routing table: %r", pid, e)

    async def _open_stream(self, peer: str | PeerAddr, protocol: str, timeout: float):
        """A raw libp2p stream to ``peer`` speaking ``protocol`` (connecting first if needed)."""
        self._require_running()
        pid, addrs = _parse_target(peer)
        try:
            with trio.fail_after(timeout):
                await self._ensure_connected(pid, addrs)
                return await self._host.new_stream(pid, [TProtocol(protocol)])
        except NetError:
            raise
        except trio.TooSlowError:
            raise NetError(f"opening {protocol} to {pid.to_base58()} timed out") from None
        except Exception as e:
            raise NetError(f"opening {protocol} to {pid.to_base58()} failed: {e}") from e

    # ------------------------------------------------------------------ DHT

    async def provide(self, key: bytes, *, timeout: float = PROVIDE_TIMEOUT) -> None:
        """Announce that we provide ``key``: stored locally at once, then sent (ADD_PROVIDER) to
        the peers closest to the key. Returns once sent; remote peers store it a few ms later.
        py-libp2p republishes every 22 h while the host runs. Never raises for an unreachable
        network (the record is still ours and will be served to peers that ask us)."""
        key = _check_key(key)
        self._require_running()
        with trio.move_on_after(timeout) as scope:
            try:
                ok = await self._dht.provider_store.provide(key)
            except Exception as e:
                log.warning("provide %s failed: %r", key.hex()[:16], e)
                return
        if scope.cancelled_caught:
            log.info("provide %s: timed out after %g s", key.hex()[:16], timeout)
        elif not ok:
            log.info("provide %s: no DHT peer reached (recorded locally)", key.hex()[:16])

    def stop_providing(self, key: bytes) -> None:
        """Stop announcing ``key`` (no more republishing, our local record dropped). Records already
        held by other peers expire on their own (48 h)."""
        key = _check_key(key)
        ps = self._dht.provider_store
        ps.providing_keys.discard(key)
        recs = ps.providers.get(key)
        if recs is not None:
            recs.pop(str(self._id), None)
            if not recs:
                ps.providers.pop(key, None)

    async def find_providers(self, key: bytes, *, timeout: float = 5.0, limit: int = 20) -> list[PeerAddr]:
        """Peers providing ``key``, without us and without duplicates, at most ``limit``.

        Always asks the network (py-libp2p's own find_providers returns its local cache alone as
        soon as that has an entry, so a peer that once learnt of one provider would never learn of
        the next): an iterative Kademlia lookup for the closest peers, then GET_PROVIDERS to them
        (and to closer peers they name). Returns what it found after ``timeout`` seconds.

        What a DHT peer says about *other* peers is hearsay: one hostile peer can answer with any
        number of made-up providers, or with junk addresses for a real one. So the list is
        ordered by how much we know (see ``_ProviderBook``): first-hand records first (the
        ADD_PROVIDERs sent to us, whose provider py-libp2p checks is the sender, then peers
        answering for themselves), then hearsay taken in turn from each answering peer; the
        lookup stops early only once ``limit`` first-hand providers are in, never at a count that
        hearsay fills; hearsay never adds to or replaces a peer's first-hand addresses, nor those of
        a peer we are connected to (nor, at dial time, those we knew). Answers are read with
        bounds (``_get_providers_from``)."""
        key = _check_key(key)
        self._require_running()
        book = _ProviderBook(self.peer_id)
        local = self._dht.provider_store.get_providers(key)
        book.add(itertools.islice(local, MAX_PROVIDERS_FOUND), source=None)
        with trio.move_on_after(timeout):
            await self._lookup_providers(key, limit, book)
        return book.result(limit, connected_at=self._connected_addrs)

    def _connected_addrs(self, peer_id: str) -> list[str] | None:
        pid = ID.from_base58(peer_id)
        if not self._is_connected(pid):
            return None
        return [str(_strip_p2p(a)) for a in self._known_addrs(pid)[:MAX_ADDRS_PER_PROVIDER]]

    async def _lookup_providers(self, key: bytes, limit: int, book: _ProviderBook) -> None:
        """GET_PROVIDERS to the closest peers we already know (one round trip: enough in a small
        swarm) while the iterative closest-peer lookup runs; then to the peers that lookup finds,
        and to closer peers named in the answers. Returns early once ``limit`` first-hand
        providers are found (or MAX_PROVIDERS_FOUND in all)."""
        queried: set[ID] = {self._id}
        sem = trio.Semaphore(ALPHA)
        closer: list[ID] = []

        async with trio.open_nursery() as nursery:

            async def ask(peer: ID) -> None:
                provs: list[PeerInfo] = []
                more: list[ID] = []
                for attempt in range(GET_PROVIDERS_ATTEMPTS):
                    if attempt:
                        await trio.sleep(random.uniform(0.05, 0.25) * attempt)
                    async with sem:
                        answer = await self._get_providers_from(peer, key)
                    if answer is None:  # unreachable: no point in asking again
                        return
                    provs, more = answer
                    if provs or more:
                        break
                    # Neither providers nor closer peers: most likely refused. py-libp2p's DHT
                    # resets every request beyond 12 it is handling (a flash crowd of fetchers
                    # asking one worker at once).
                book.add(provs, source=peer.to_base58())
                closer.extend(more)
                if book.first_hand_count >= limit or book.full:
                    nursery.cancel_scope.cancel()

            async def ask_all(peers: Iterable[ID]) -> None:
                async with trio.open_nursery() as n:
                    for p in peers:
                        if p not in queried:
                            queried.add(p)
                            n.start_soon(ask, p)

            known = self._dht.routing_table.find_local_closest_peers(key, 20)
            known += [p for p in self._host.get_connected_peers() if p not in known]
            nursery.start_soon(ask_all, known)
            try:
                closest = await self._dht.peer_routing.find_closest_peers_network(key)
            except Exception as e:
                log.debug("closest-peer lookup for %s failed: %r", key.hex()[:16], e)
                closest = []
            await ask_all(closest)
            for _ in range(3):  # a few more hops through closer peers we are able to dial
                more = [
                    p
                    for p in dict.fromkeys(closer)
                    if p not in queried and (self._is_connected(p) or self._known_addrs(p))
                ]
                closer.clear()
                if not more:
                    break
                await ask_all(more)

    async def _get_providers_from(self, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]] | None:
        """One GET_PROVIDERS to ``peer``: (providers, closer peers); ([], []) on a failed request,
        None if no connection could be made (py-libp2p's closest-peer lookup also returns peers
        it merely has in its peerstore: asking those four times cost ~1 s per lookup).

        Our own client of the request rather than py-libp2p 0.8.1's (a private helper of its
        ProviderStore), which turns every address of the answer into a Multiaddr: a 4 MiB answer
        may hold ~400,000. Here the answer is parsed by protobuf's C parser (~11 ms for 4 MiB)
        and only the first MAX_PROVIDERS_PER_ANSWER providers, MAX_ADDRS_PER_PROVIDER addresses
        each, and MAX_CLOSER_PER_ANSWER closer peers are looked at; a signed peer record over
        MAX_SIGNED_RECORD_BYTES is not verified (its provider is skipped; the whole answer is
        dropped for the sender's own record, as py-libp2p drops an invalid one)."""
        try:
            stream = await self._host.new_stream(peer, [KAD_PROTOCOL_ID])
        except Exception as e:
            # A busy DHT peer resets the stream during negotiation: that one is asked again.
            log.debug("GET_PROVIDERS to %s: no stream: %r", peer, e)
            return ([], []) if self._is_connected(peer) else None
        try:
            try:
                req = KadMessage()
                req.type = KadMessage.MessageType.GET_PROVIDERS
                req.key = key
                req.senderRecord, _ = env_to_send_in_RPC(self._host)
                data = req.SerializeToString()
                await stream.write(varint.encode(len(data)) + data)
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
            resp = KadMessage()
            resp.ParseFromString(raw)
        except trio.Cancelled:
            raise
        except Exception as e:
            log.debug("GET_PROVIDERS to %s failed: %r", peer, e)
            return [], []
        if resp.type != KadMessage.MessageType.GET_PROVIDERS:
            return [], []
        if len(resp.senderRecord) > MAX_SIGNED_RECORD_BYTES or not _consume_record(resp, self._host, peer):
            log.debug("GET_PROVIDERS from %s: bad sender record, answer dropped", peer)
            return [], []
        providers: list[PeerInfo] = []
        for p in resp.providerPeers[:MAX_PROVIDERS_PER_ANSWER]:
            if len(p.signedRecord) > MAX_SIGNED_RECORD_BYTES or not _consume_record(p, self._host):
                continue
            try:
                pid = ID(p.id)
            except Exception:
                continue
            addrs = []
            for a in p.addrs[:MAX_ADDRS_PER_PROVIDER]:
                try:
                    addrs.append(multiaddr.Multiaddr(a))
                except Exception:
                    continue
            providers.append(PeerInfo(pid, addrs))
        closer: list[ID] = []
        for c in resp.closerPeers[:MAX_CLOSER_PER_ANSWER]:
            try:
                closer.append(ID(c.id))
            except Exception:
                continue
        return providers, [c for c in closer if c != self._id]

    # ------------------------------------------------------------------ manifest protocol

    def set_manifest_handler(
        self, fn: Callable[[wire.ManifestRequest], list[tuple[bytes, bytes]]] | None
    ) -> None:
        """Serve MANIFEST_PROTOCOL with ``fn(request) -> [(manifest bytes, signature), ...]``
        (at most MAX_MANIFESTS_PER_REPLY are sent; ``fn`` may also be async). ``fn`` runs on the
        event loop: keep it quick. An exception in it is logged and answered with an Error frame.
        None stops serving."""
        self._manifest_handler = fn
        if fn is None:
            self._host.remove_stream_handler(TProtocol(wire.MANIFEST_PROTOCOL))
        else:
            self._host.set_stream_handler(TProtocol(wire.MANIFEST_PROTOCOL), self._on_manifest_stream)

    async def _on_manifest_stream(self, stream) -> None:
        peer = _stream_peer(stream, full=True)
        link: StreamLink | None = None
        admitted = self._admit_manifest_stream(peer)
        try:
            link = StreamLink(stream, frozenset({wire.ManifestRequest.TYPE}))
            if not admitted:
                log.info("manifest request from %s refused: busy", peer[:16])
                with trio.move_on_after(1):
                    await link.send(wire.Error("busy: too many manifest requests at once"))
                return
            with trio.fail_after(MANIFEST_REQUEST_TIMEOUT):
                req = await link.receive()
            if not isinstance(req, wire.ManifestRequest):  # the decoder admits nothing else
                raise wire.ProtocolError(f"expected ManifestRequest, got {type(req).__name__}")
            fn = self._manifest_handler
            if fn is None:  # unset while this stream was being negotiated
                with trio.move_on_after(1):
                    await link.send(wire.Error("not serving manifests"))
                return
            try:
                items = fn(req)
                if inspect.isawaitable(items):
                    items = await items
                # Check all first: a bad item (ValueError) fails before anything is sent.
                replies = _reply_budget(items)
            except Exception:
                log.exception("manifest handler failed for %r from %s", req, peer[:16])
                with trio.move_on_after(2):
                    await link.send(wire.Error("internal error"))
                return
            with trio.fail_after(MANIFEST_REPLY_TIMEOUT):
                for r in replies:  # encoded one at a time: a slow reader pins one frame
                    await link.send(r)
                await link.send(wire.ManifestEnd(len(replies)))
        except trio.TooSlowError:
            log.info("manifest stream from %s timed out", peer[:16])
        except (LinkClosed, wire.ProtocolError) as e:
            log.info("manifest stream from %s: %s", peer[:16], e)
        except Exception:
            log.exception("manifest stream from %s failed", peer[:16])
        finally:
            if admitted:
                self._release_manifest_stream(peer)
            await _close(link, stream)

    def _admit_manifest_stream(self, peer: str) -> bool:
        """Count an inbound manifest stream in, unless MAX_MANIFEST_STREAMS_PER_PEER (or
        MAX_MANIFEST_STREAMS in all) are being served already."""
        if (
            self._manifest_streams.get(peer, 0) >= MAX_MANIFEST_STREAMS_PER_PEER
            or sum(self._manifest_streams.values()) >= MAX_MANIFEST_STREAMS
        ):
            return False
        self._manifest_streams[peer] = self._manifest_streams.get(peer, 0) + 1
        return True

    def _release_manifest_stream(self, peer: str) -> None:
        left = self._manifest_streams.get(peer, 1) - 1
        if left > 0:
            self._manifest_streams[peer] = left
        else:
            self._manifest_streams.pop(peer, None)

    async def fetch_manifests(
        self, peer: str | PeerAddr, request: wire.ManifestRequest, *, timeout: float = 10.0
    ) -> list[wire.ManifestReply]:
        """Ask ``peer`` for its manifests matching ``request``. NetError on any failure (cannot
        connect, refused, timed out, broke the protocol, count mismatch)."""
        wire.encode(request)  # ValueError for a request no peer would accept
        who = (peer.peer_id if isinstance(peer, PeerAddr) else str(peer).rsplit("/", 1)[-1])[:16]
        try:
            with trio.fail_after(timeout):
                stream = await self._open_stream(peer, wire.MANIFEST_PROTOCOL, timeout)
                link = StreamLink(
                    stream, frozenset({wire.ManifestReply.TYPE, wire.ManifestEnd.TYPE, wire.Error.TYPE})
                )
                try:
                    return await self._manifest_exchange(link, request)
                finally:
                    await link.aclose()
        except NetError:
            raise
        except trio.TooSlowError:
            raise NetError(f"manifest request to {who} timed out after {timeout:g} s") from None
        except (LinkClosed, wire.ProtocolError) as e:
            raise NetError(f"manifest request to {who}: {e}") from e
        except Exception as e:
            raise NetError(f"manifest request to {who} failed: {e!r}") from e

    @staticmethod
    async def _manifest_exchange(link: StreamLink, request: wire.ManifestRequest) -> list[wire.ManifestReply]:
        await link.send(request)
        replies: list[wire.ManifestReply] = []
        held = 0
        while True:
            msg = await link.receive()
            if isinstance(msg, wire.ManifestReply):
                if len(replies) >= wire.MAX_MANIFESTS_PER_REPLY:
                    raise wire.ProtocolError("too many ManifestReply frames")
                held += len(msg.manifest) + len(msg.signature)
                if held > wire.MAX_MANIFEST_REPLY_BYTES:
                    raise wire.ProtocolError(f"manifest reply over {wire.MAX_MANIFEST_REPLY_BYTES} bytes")
                replies.append(msg)
            elif isinstance(msg, wire.ManifestEnd):
                if msg.count != len(replies):
                    raise wire.ProtocolError(f"ManifestEnd.count {msg.count} but {len(replies)} replies")
                return replies
            elif isinstance(msg, wire.Error):
                raise NetError(f"{link.peer_id[:16]} refused the manifest request: {msg.reason}")
            else:
                raise wire.ProtocolError(f"unexpected {type(msg).__name__}")

    # ------------------------------------------------------------------ pieces protocol

    def set_pieces_handler(self, fn: Callable[[StreamLink, wire.Hello], Awaitable[None]] | None) -> None:
        """Serve PIECES_PROTOCOL: each inbound stream becomes a StreamLink; once its first message
        (a Hello, within HELLO_TIMEOUT) arrived, ``await fn(link, hello)`` runs for the lifetime
        of the link. Errors are contained and logged; the stream is closed when ``fn`` returns.
        None stops serving."""
        self._pieces_handler = fn
        if fn is None:
            self._host.remove_stream_handler(TProtocol(wire.PIECES_PROTOCOL))
        else:
            self._host.set_stream_handler(TProtocol(wire.PIECES_PROTOCOL), self._on_pieces_stream)

    async def _on_pieces_stream(self, stream) -> None:
        link: StreamLink | None = None
        peer = _stream_peer(stream)
        try:
            link = StreamLink(stream)
            try:
                with trio.fail_after(HELLO_TIMEOUT):
                    hello = await link.receive()
                if not isinstance(hello, wire.Hello):
                    raise wire.ProtocolError(f"expected Hello, got {type(hello).__name__}")
            except trio.TooSlowError:
                log.info("pieces stream from %s: no Hello within %g s", peer, HELLO_TIMEOUT)
                return
            except wire.ProtocolError as e:
                log.info("pieces stream from %s: %s", peer, e)
                with trio.move_on_after(1):
                    await link.send(wire.Error(f"protocol error: {e}"))
                return
            fn = self._pieces_handler
            if fn is None:
                with trio.move_on_after(1):
                    await link.send(wire.Error("not serving pieces"))
                return
            await fn(link, hello)
        except LinkClosed as e:
            log.debug("pieces stream from %s: %s", peer, e)
        except wire.ProtocolError as e:
            log.info("pieces stream from %s: protocol error: %s", peer, e)
        except Exception:
            log.exception("pieces handler failed for a stream from %s", peer)
        finally:
            await _close(link, stream)

    # ------------------------------------------------------------------ data lane setup

    def set_lane_handler(self, fn: Callable[[Any], Awaitable[None]] | None) -> None:
        """Serve LANE_PROTOCOL with ``await fn(stream)`` (``swarm.net.lane.LaneService.
        accept_stream``, which owns and closes the raw stream). Errors are contained and logged.
        None stops serving (peers then fall back to pieces streams)."""
        self._lane_handler = fn
        if fn is None:
            self._host.remove_stream_handler(TProtocol(wire.LANE_PROTOCOL))
        else:
            self._host.set_stream_handler(TProtocol(wire.LANE_PROTOCOL), self._on_lane_stream)

    async def _on_lane_stream(self, stream) -> None:
        fn = self._lane_handler
        try:
            if fn is None:
                await _close(None, stream)
                return
            await fn(stream)
        except Exception:
            log.exception("lane handler failed for a stream from %s", _stream_peer(stream))
            await _close(None, stream)

    async def open_lane_stream(self, peer: str | PeerAddr, *, timeout: float | None = None):
        """A raw LANE_PROTOCOL stream to ``peer`` (connecting first if needed), for
        ``LaneService.dial``. NetError if unreachable or the peer does not serve the lane."""
        return await self._open_stream(
            peer, wire.LANE_PROTOCOL, timeout if timeout is not None else self.connect_timeout
        )

    async def open_pieces_link(self, peer: str | PeerAddr, *, timeout: float | None = None) -> StreamLink:
        """A StreamLink on a new PIECES_PROTOCOL stream to ``peer`` (connecting first if needed).
        The caller sends the Hello (``Transfer.serve_link`` does). NetError on failure."""
        stream = await self._open_stream(
            peer, wire.PIECES_PROTOCOL, timeout if timeout is not None else self.connect_timeout
        )
        try:
            return StreamLink(stream, outbound=True)
        except Exception as e:
            await _close(None, stream)
            raise NetError(f"pieces stream: {e!r}") from e

    # ------------------------------------------------------------------ small queries

    def set_query_handler(
        self,
        protocol: str,
        fn: Callable[[str, bytes], Awaitable[bytes]] | None,
        *,
        max_reply: int = MAX_QUERY_BYTES,
    ) -> None:
        """Serve ``protocol`` as one small query: the asker's bytes (up to MAX_QUERY_BYTES, ended
        by its close_write) in, ``await fn(peer_id, request)`` (up to ``max_reply`` bytes) out,
        then the stream closes. An exception in ``fn`` is logged and the stream reset. None stops
        serving."""
        if fn is None:
            self._host.remove_stream_handler(TProtocol(protocol))
            return

        async def handler(stream) -> None:
            try:
                with trio.fail_after(QUERY_TIMEOUT):
                    request = await _read_to_end(stream, MAX_QUERY_BYTES)
                    reply = await fn(_stream_peer_full(stream), request)
                    if len(reply) > max_reply:
                        raise ValueError(f"reply of {len(reply)} bytes")
                    await stream.write(reply)
                    await stream.close()
            except Exception as e:  # never out of a stream handler: it would tear the host down
                log.info("%s query from %s failed: %r", protocol, _stream_peer(stream), e)
                await _close(None, stream)

        self._host.set_stream_handler(TProtocol(protocol), handler)

    async def query(
        self,
        peer: str | PeerAddr,
        protocol: str,
        request: bytes,
        *,
        timeout: float = QUERY_TIMEOUT,
        max_reply: int = MAX_QUERY_BYTES,
    ) -> bytes:
        """Send ``request`` on a new ``protocol`` stream to ``peer`` and return its reply (up to
        ``max_reply`` bytes). NetError on any failure."""
        if len(request) > MAX_QUERY_BYTES:
            raise ValueError(f"query of {len(request)} bytes")
        try:
            with trio.fail_after(timeout):
                stream = await self._open_stream(peer, protocol, timeout)
                try:
                    await stream.write(request)
                    await stream.close_write()
                    return await _read_to_end(stream, max_reply)
                finally:
                    await _close(None, stream)
        except NetError:
            raise
        except trio.TooSlowError:
            raise NetError(f"{protocol} query timed out after {timeout:g} s") from None
        except Exception as e:
            raise NetError(f"{protocol} query failed: {e!r}") from e


async def _read_to_end(stream, limit: int) -> bytes:
    """Everything the other side writes before closing its end; ProtocolError past ``limit``."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.read(limit + 1 - len(data))
        except Exception as e:  # py-libp2p signals EOF with StreamEOF (or a closed stream)
            if type(e).__name__ in ("StreamEOF", "StreamClosed"):
                break
            raise
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise wire.ProtocolError(f"message over {limit} bytes")
    return bytes(data)


def _stream_peer_full(stream) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:
        return ""


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _stream_peer(stream, *, full: bool = False) -> str:
    try:
        pid = stream.muxed_conn.peer_id.to_base58()
    except Exception:
        return "?"
    return pid if full else pid[:16]


def _reply_budget(items: Iterable[tuple[bytes, bytes]]) -> list[wire.ManifestReply]:
    """The replies to send for a manifest handler's answer: at most MAX_MANIFESTS_PER_REPLY, and
    only as many as fit MAX_MANIFEST_REPLY_BYTES together (the asker refuses a bigger reply whole).
    ValueError for an item no peer would accept. Nothing is copied (bytes stay shared)."""
    out: list[wire.ManifestReply] = []
    total = 0
    for m, sig in itertools.islice(items, wire.MAX_MANIFESTS_PER_REPLY):
        m, sig = bytes(m), bytes(sig)
        if len(sig) > wire.MAX_SIGNATURE_BYTES:
            raise ValueError("ManifestReply.signature too long")
        if len(m) + len(sig) + 16 > wire.MAX_MANIFEST_FRAME:
            raise ValueError(f"manifest of {len(m)} bytes over MAX_MANIFEST_FRAME")
        total += len(m) + len(sig)
        if total > wire.MAX_MANIFEST_REPLY_BYTES:
            log.warning("manifest reply cut at %d of its manifests (MAX_MANIFEST_REPLY_BYTES)", len(out))
            break
        out.append(wire.ManifestReply(m, sig))
    return out


async def _close(link: StreamLink | None, stream) -> None:
    """Close a handler's stream whatever happened; never raises."""
    if link is not None:
        await link.aclose()
        return
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass
