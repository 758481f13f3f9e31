"""Every py-libp2p workaround and private-API use of swarm, in one place, pinned to py-libp2p 0.8.1.

Each helper says what it works around and why. When py-libp2p is upgraded, this is the module to
re-check, item by item (``check_libp2p_version`` warns when the installed release is not the one
these were written and measured against):

1. ``make_noise_writes_atomic``: patches ``BaseNoiseMsgReadWriter.write_msg`` (a cancelled write
   desynchronised Noise and killed the whole connection).
2. ``close_network``: closes every connection and listener ourselves (0.8.1 left them open when
   its host stopped).
3. ``forget_provider``: reaches into the DHT's ``ProviderStore`` dicts (0.8.1 has no call to stop
   providing a key).
4. ``open_dht_stream`` / ``get_providers_on``: our own GET_PROVIDERS client, on the DHT's wire
   format and private helpers (0.8.1's turns every address of a 4 MiB answer into a Multiaddr),
   and ``consume_signed_record`` (its private record check).
5. ``connections`` / ``allow_redial``: the swarm's connection dict and its dial back-off (0.8.1
   dials the first stored address only and refuses for 60 s a peer whose last dial failed).
6. ``stream_peer_id``: the remote peer of a raw stream (``muxed_conn.peer_id``: no public getter).
7. ``is_stream_eof``: 0.8.1 signals a stream's end with StreamEOF or StreamClosed rather than b"".
8. ``leaves``: an exception from the body of ``SwarmHost.run`` comes out of five nested nurseries
   (ours and py-libp2p's), wrapped once by each.
9. ``keep_tcp_alive``: wraps ``TrioTCPStream.__init__`` to set TCP keepalive and
   TCP_USER_TIMEOUT on every libp2p TCP connection, dialed or accepted (0.8.1 sets none, so a
   connection to a host that vanished stayed "connected" for the kernel's ~15 min of
   retransmissions, and every stream opened on it waited for its own timeout).

Log handling (py-libp2p logs routine events as WARNING/ERROR, and detaches its logger) stays in
``swarm.net.__init__`` (``quiet_libp2p_logs``): it must be importable without importing libp2p.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import socket
import warnings
from typing import Any

import trio
import varint
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

log = logging.getLogger(__name__)

__all__ = [
    "LIBP2P_VERSION",
    "NOISE_WRITE_TIMEOUT",
    "KadMessage",
    "allow_redial",
    "check_libp2p_version",
    "close_network",
    "connections",
    "consume_signed_record",
    "forget_provider",
    "get_providers_on",
    "is_stream_eof",
    "keep_tcp_alive",
    "leaves",
    "make_noise_writes_atomic",
    "open_dht_stream",
    "stream_peer_id",
]

LIBP2P_VERSION = "0.8.1"
"""The py-libp2p release every workaround here was written and measured against."""


class Libp2pVersionWarning(RuntimeWarning):
    """The installed py-libp2p is not LIBP2P_VERSION: this module's workarounds are unchecked."""


def installed_libp2p_version() -> str | None:
    try:
        return importlib.metadata.version("libp2p")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_libp2p_version(installed: str | None = None) -> bool:
    """True if py-libp2p ``installed`` (default: the installed one) is LIBP2P_VERSION; otherwise
    warn (``Libp2pVersionWarning``, once per process and version) and return False. Not an error:
    pyproject.toml admits any 0.8.x, and each workaround below degrades to doing nothing
    harmful or fails loudly where the private API it uses is gone."""
    version = installed_libp2p_version() if installed is None else installed
    if version == LIBP2P_VERSION:
        return True
    warnings.warn(
        f"swarm.net is pinned to py-libp2p {LIBP2P_VERSION}, but {version or 'no version'} is "
        f"installed: the workarounds and private-API uses in swarm/net/compat.py are unchecked "
        f"against it (install libp2p=={LIBP2P_VERSION}, or re-check each item listed there)",
        Libp2pVersionWarning,
        stacklevel=2,
    )
    return False


check_libp2p_version()


# --------------------------------------------------------------------------- 1. noise writes

NOISE_WRITE_TIMEOUT = 10.0
"""Seconds one noise message write (one yamux frame, at most 256 KiB) may block on a peer that does
not read before its connection is closed (see make_noise_writes_atomic)."""


def make_noise_writes_atomic() -> None:
    """Make each noise message write of py-libp2p 0.8.1 atomic with respect to cancellation.

    Its noise transport encrypts a message (advancing the nonce) and then awaits the socket write.
    A task cancelled in between (at the TCP write lock, or inside a ``send_all`` blocked on a full
    socket buffer) leaves the nonces out of step or half a message on the wire; the peer then fails
    to authenticate everything after it and drops the whole connection, with every stream on it
    (the DHT's included). The engine cancels a link's writer whenever the link ends, often in the
    middle of a piece: measured with 2,080 fuzzed pieces streams, a connection died this way in
    one run of two. So each write runs shielded, bounded by NOISE_WRITE_TIMEOUT (after which the
    connection is unusable and is closed); a cancellation that arrived meanwhile is delivered once
    the message is out. Idempotent."""
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


# --------------------------------------------------------------------------- 2. closing


async def close_network(host: Any) -> None:
    """Close every connection and listener of ``host`` (a py-libp2p host) before it stops.
    py-libp2p 0.8.1 closes them only on its swarm service's cancelled shutdown path, where the
    first ``await`` raises Cancelled: the sockets stayed open (listening ones too), and peers kept
    seeing a stopped host as connected (an embedded node per ``swarm.fetch`` leaked them into the
    caller). Connections close concurrently (each takes ~0.2 s in py-libp2p), then the rest.
    Shielded, at most 5 s; never raises."""
    net = host.get_network()

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


# --------------------------------------------------------------------------- 3. providing


def forget_provider(dht: Any, key: bytes, provider: ID) -> None:
    """Stop announcing ``key`` as ``provider`` (no more republishing, the local record dropped).
    py-libp2p 0.8.1's ProviderStore has no call for it: its ``providing_keys`` set and
    ``providers`` dict (key -> {peer id string: record}) are edited directly."""
    ps = dht.provider_store
    ps.providing_keys.discard(key)
    recs = ps.providers.get(key)
    if recs is not None:
        recs.pop(str(provider), None)
        if not recs:
            ps.providers.pop(key, None)


# --------------------------------------------------------------------------- 4. GET_PROVIDERS


DHT_STREAM_CLOSE_WAIT = 0.5
"""Seconds a GET_PROVIDERS stream's close may take, shielded from the caller's cancellation, before
it is reset: bounded so a cancelled lookup ends promptly even when the peer has vanished."""


async def open_dht_stream(host: Any, peer: ID) -> Any:
    """A new DHT (Kademlia) stream to ``peer``, for ``get_providers_on``."""
    return await host.new_stream(peer, [KAD_PROTOCOL_ID])


async def get_providers_on(host: Any, stream: Any, key: bytes) -> KadMessage:
    """One GET_PROVIDERS for ``key`` on ``stream`` (closed after, within 1 s): the parsed answer
    (exceptions pass: a reset, a malformed answer). Our own client rather than py-libp2p 0.8.1's
    (a private helper of its ProviderStore, which turns every address of the answer into a
    Multiaddr: a 4 MiB answer may hold ~400,000): the answer is parsed by protobuf's C parser
    (~11 ms for 4 MiB) and the caller looks at a bounded part of it (``providers``). Uses the
    DHT's wire format and two private helpers: ``env_to_send_in_RPC`` (our signed peer record)
    and ``read_varint_prefixed_bytes_limited``."""
    try:
        req = KadMessage()
        req.type = KadMessage.MessageType.GET_PROVIDERS
        req.key = key
        req.senderRecord, _ = env_to_send_in_RPC(host)
        data = req.SerializeToString()
        await stream.write(varint.encode(len(data)) + data)
        raw = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
    finally:
        # Shielded: a lookup that ends early (its grace is over, the fetch was cancelled) cancels
        # us mid-read, and an unshielded close was then cancelled too. The stream stayed open on
        # the peer, holding one of its inbound DHT streams until the connection closed; a worker
        # asked by a flash crowd ran out of them and answered later lookups with resets ("no
        # providers" on the namespace testbed after a vanish). Reset if the FIN cannot go out.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + DHT_STREAM_CLOSE_WAIT
            try:
                await stream.close()
            except Exception:
                scope.cancel()
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.reset()
    resp = KadMessage()
    resp.ParseFromString(raw)
    return resp


def consume_signed_record(msg: Any, host: Any, peer: ID | None = None) -> bool:
    """py-libp2p 0.8.1's private check of the signed peer record in a DHT message (``msg`` or one
    of its peer entries): verifies it and stores its addresses in the peerstore; False if invalid.
    ``peer``: the record must be that peer's (the sender's own record)."""
    return maybe_consume_signed_record(msg, host, peer)


# --------------------------------------------------------------------------- 5. connections


def connections(host: Any) -> dict[ID, list[Any]]:
    """The swarm's live connections by peer (py-libp2p 0.8.1: ``network.connections``, a dict of
    lists; no public getter for a peer's connection objects)."""
    return host.get_network().connections


def allow_redial(host: Any, pid: ID) -> None:
    """Lift py-libp2p 0.8.1's dial back-off for ``pid``: it refuses for 60 s to dial a peer whose
    last dial failed, so a peer restarted on a new port stayed unreachable behind its stale
    address. ``SwarmHost`` calls this when it dials addresses other than the ones that failed."""
    host.get_network().unblock_peer(pid)


# --------------------------------------------------------------------------- 6.-8. streams, errors


def stream_peer_id(stream: Any) -> str:
    """The base58 peer id of a raw py-libp2p stream's remote peer (AttributeError if the stream
    has no connection)."""
    return stream.muxed_conn.peer_id.to_base58()


def is_stream_eof(e: BaseException) -> bool:
    """Whether ``e``, raised by a raw stream's read, is only its end (py-libp2p 0.8.1 raises
    StreamEOF, or StreamClosed, instead of returning b"")."""
    return type(e).__name__ in ("StreamEOF", "StreamClosed")


def leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in ``eg``, nested groups flattened (an exception from ``SwarmHost.run``'s
    body comes out of py-libp2p's nested nurseries wrapped once by each)."""
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


# --------------------------------------------------------------------------- 9. TCP liveness

LIBP2P_LIVENESS_TIMEOUT = 10.0
"""TCP_USER_TIMEOUT of libp2p's TCP connections (seconds): a peer that leaves our data (a stream
open, a DHT query, a yamux window update) unacknowledged this long, or stops answering keepalive
probes (idle after ``lane_link.KEEPALIVE_IDLE``), is dropped by the kernel: py-libp2p then closes
the connection and its streams, and a dial makes a new one. Longer than the lane's
``LIVENESS_TIMEOUT``: the lane's links carry the pieces (and are dropped first); this connection
carries the DHT and the lane's setup, and costs a new Noise handshake to replace."""


def keep_tcp_alive(timeout: float = LIBP2P_LIVENESS_TIMEOUT) -> None:
    """Set keepalive and TCP_USER_TIMEOUT (``swarm.net.lane_link.set_liveness``) on the socket of
    every ``TrioTCPStream`` py-libp2p 0.8.1 makes from now on (its TCP transport wraps both dialed
    and accepted connections in one). Idempotent; the newest ``timeout`` applies."""
    from libp2p.io.trio import TrioTCPStream

    from swarm.net.lane_link import set_liveness

    init = TrioTCPStream.__init__
    if getattr(init, "_swarm_liveness", None) is not None:
        init._swarm_liveness[0] = timeout  # type: ignore[attr-defined]
        return
    setting = [timeout]

    def __init__(self: Any, stream: Any) -> None:
        init(self, stream)
        sock = getattr(stream, "socket", None)
        if sock is not None and getattr(sock, "type", None) == socket.SOCK_STREAM:
            try:
                set_liveness(sock, setting[0])
            except Exception as e:  # a socket that cannot take them still works
                log.debug("TCP liveness options: %r", e)

    __init__._swarm_liveness = setting  # type: ignore[attr-defined]
    TrioTCPStream.__init__ = __init__  # type: ignore[method-assign]
