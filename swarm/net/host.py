"""``SwarmHost``: the node's libp2p host, its Kademlia DHT and swarm's protocols.

- Security is Noise only (py-libp2p's default host also offers TLS, SECIO and *plaintext*, and
  accepts an inbound plaintext session); the muxer is yamux; one connection per peer
  (``max_connections_per_peer=1`` also removes a ~250 ms wait from every dial).
- The DHT runs in server mode, is created before any connection (it registers its protocol
  handler and sees the identify results), and every peer we connect to goes into its routing table.

This module: the host's lifetime and its connections (dialling, the bootstrap peers). The rest of
``SwarmHost`` comes from ``providers.ProvidersMixin`` (DHT provider records) and
``requests.RequestsMixin`` (the manifest, pieces, lane and query protocol handlers); keys and
addresses are ``addrs``'s, the manifest exchange's rules ``manifest_exchange``'s, and every
py-libp2p workaround or private-API use is in ``compat``. The names other modules import from here
(NetError, PeerAddr, StreamLink, model_key, manifest_key, parse_psk, QUERY_TIMEOUT, ...) are
re-exported.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from swarm import wire
from swarm.net import _requiet, compat, quiet_libp2p_logs
from swarm.net.addrs import (
    NetError,
    PeerAddr,
    expand_wildcards,
    manifest_key,
    model_key,
    parse_id,
    parse_psk,
    parse_target,
    strip_p2p,
)
from swarm.net.identity import peer_id_of
from swarm.net.links import StreamLink
from swarm.net.providers import MAX_ADDRS_PER_PROVIDER, PROVIDE_TIMEOUT, ProvidersMixin
from swarm.net.requests import MAX_QUERY_BYTES, QUERY_TIMEOUT, RequestsMixin

log = logging.getLogger(__name__)

__all__ = [
    "MAX_ADDRS_PER_PROVIDER",
    "MAX_QUERY_BYTES",
    "PROVIDE_TIMEOUT",
    "QUERY_TIMEOUT",
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
ADDR_TTL = 24 * 3600
"""Seconds the peerstore keeps the addresses of a peer we dialled (py-libp2p's connect: 120 s)."""
BOOTSTRAP_RETRY = 30.0
"""Seconds between attempts to reach the bootstrap peers while we have no connection at all."""
SELF_LOOKUP_TIMEOUT = 30.0

# --------------------------------------------------------------------------- the host


class SwarmHost(ProvidersMixin, RequestsMixin):
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
        compat.make_noise_writes_atomic()
        compat.keep_tcp_alive()
        self._listen = [multiaddr.Multiaddr(a) for a in (listen or DEFAULT_LISTEN)]
        self._bootstrap = list(bootstrap or ())
        for a in self._bootstrap:
            _pid, addrs = parse_target(a)  # validate now: NetError for a malformed entry
            if not addrs:
                raise NetError(f"bootstrap entry {a!r} is not a /.../p2p/<id> multiaddr")
        self._psk = parse_psk(psk) if psk else None
        announce_addrs = [multiaddr.Multiaddr(a) for a in announce] if announce else None
        # Advertised addresses travel in provider records: never advertise 0.0.0.0 / ::.
        addrs_factory = None if announce_addrs else expand_wildcards
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
            leaves = compat.leaves(eg)
            if len(leaves) != 1:
                raise
            single = leaves[0]
        if single is not None:
            raise single

    async def _close_network(self) -> None:
        """Close every connection and listener before the host stops (``compat.close_network``:
        py-libp2p 0.8.1 left them open)."""
        await compat.close_network(self._host)

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
        pid, addrs = parse_target(addr)
        await self._ensure_connected(pid, addrs)
        if not self._dht.routing_table.peer_in_table(pid):  # e.g. connected inbound earlier
            await self._add_to_routing_table(pid)
        return pid.to_base58()

    def connected_peers(self) -> list[str]:
        conns = compat.connections(self._host)
        return [p.to_base58() for p, c in list(conns.items()) if c]

    def security_protocol(self, peer_id: str) -> str | None:
        """The security protocol negotiated on our connection to ``peer_id`` (None if none)."""
        conns = compat.connections(self._host).get(parse_id(peer_id)) or []
        for c in conns:
            getter = getattr(c, "get_negotiated_security_protocol", None)
            if getter is not None:
                return getter()
        return None

    def muxer_protocol(self, peer_id: str) -> str | None:
        conns = compat.connections(self._host).get(parse_id(peer_id)) or []
        for c in conns:
            getter = getattr(c, "get_negotiated_muxer_protocol", None)
            if getter is not None:
                return getter()
        return None

    def _is_connected(self, pid: ID) -> bool:
        return bool(compat.connections(self._host).get(pid))

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
                            compat.allow_redial(self._host, pid)
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
                return [strip_p2p(a) for a in info.addrs]
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
        pid, addrs = parse_target(peer)
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
