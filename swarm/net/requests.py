"""``SwarmHost``'s request/response protocol handlers (``RequestsMixin``): the manifest protocol
(served and asked, on ``manifest_exchange``'s rules), the pieces protocol's inbound streams, the
data lane's setup streams, and small queries.

py-libp2p hazard handled here: an exception escaping a stream handler tears down the whole host,
so every handler contains all errors and closes its stream.

- ``/swarm/manifest/1.0.0``: one ManifestRequest in, ManifestReply frames and a ManifestEnd out.
- ``/swarm/pieces/1.0.0``: the first message must be a Hello; the stream is then handed to the
  pieces handler (the engine) as a ``StreamLink`` for its lifetime.
- ``/swarm/lane/1.0.0``: handed raw to ``lane.LaneService.accept_stream``.
- small queries: the asker's bytes in, one reply out, each bounded.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import compat
from swarm.net import manifest_exchange as mx
from swarm.net.addrs import NetError, PeerAddr
from swarm.net.links import StreamLink

log = logging.getLogger(__name__)

__all__ = ["HELLO_TIMEOUT", "MAX_QUERY_BYTES", "QUERY_TIMEOUT", "RequestsMixin"]

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
QUERY_TIMEOUT = 5.0
"""Seconds one small query (``SwarmHost.query``) may take end to end, either side."""
MAX_QUERY_BYTES = 4096
"""Largest request or reply of a small query: status records of a few hundred bytes."""


class RequestsMixin:
    """``SwarmHost``'s protocol handlers. Uses the host's ``_host`` (py-libp2p host),
    ``_open_stream``, ``connect_timeout``, and the handler slots set in its ``__init__``."""

    _host: Any
    connect_timeout: float
    _manifest_handler: Callable[[wire.ManifestRequest], Any] | None
    _pieces_handler: Callable[[StreamLink, wire.Hello], Awaitable[None]] | None
    _lane_handler: Callable[[Any], Awaitable[None]] | None
    _manifest_streams: dict[str, int]
    _open_stream: Callable[..., Awaitable[Any]]

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
            link = StreamLink(stream, mx.REQUEST_TYPES)
            if not admitted:
                log.info("manifest request from %s refused: busy", peer[:16])
                with trio.move_on_after(1):
                    await link.send(wire.Error(mx.BUSY))
                return
            with trio.fail_after(MANIFEST_REQUEST_TIMEOUT):
                req = mx.check_request(await link.receive())
            fn = self._manifest_handler
            if fn is None:  # unset while this stream was being negotiated
                with trio.move_on_after(1):
                    await link.send(wire.Error(mx.NOT_SERVING))
                return
            try:
                items = fn(req)
                if inspect.isawaitable(items):
                    items = await items
                # Check all first: a bad item (ValueError) fails before anything is sent.
                replies = mx.reply_budget(items)
            except Exception:
                log.exception("manifest handler failed for %r from %s", req, peer[:16])
                with trio.move_on_after(2):
                    await link.send(wire.Error(mx.INTERNAL_ERROR))
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
                link = StreamLink(stream, mx.ANSWER_TYPES)
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
        collector = mx.ReplyCollector()
        while True:
            try:
                replies = collector.feed(await link.receive())
            except mx.Refused as e:
                raise NetError(f"{link.peer_id[:16]} refused the manifest request: {e.reason}") from None
            if replies is not None:
                return replies

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
        except Exception as e:  # the end of the stream, in py-libp2p 0.8.1 (compat)
            if compat.is_stream_eof(e):
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
        return compat.stream_peer_id(stream)
    except Exception:
        return ""


def _stream_peer(stream, *, full: bool = False) -> str:
    try:
        pid = compat.stream_peer_id(stream)
    except Exception:
        return "?"
    return pid if full else pid[:16]


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
