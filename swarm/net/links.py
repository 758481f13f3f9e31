"""``StreamLink``: an ``engine.PeerLink`` over one libp2p stream (yamux over noise).

Frames are ``wire`` frames. Reads always pass an explicit size (py-libp2p's unsized read means
"until EOF"); sends are serialized with a lock (the engine's writer task and its close path may both
send); a PIECE goes out as its 9-byte header then a view of the payload, so the piece is never
concatenated into a second multi-MiB buffer.

Receiving: the first frame must be the Hello (a PIECE before it is a protocol error, refused from
its header), and once the engine has named the manifest (``expect_pieces``) a PIECE longer than
its piece is refused from its first 9 bytes; a link buffers at most one piece of that manifest
plus one read (READ_MAX), not MAX_PIECE_FRAME.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from swarm import wire
from swarm.engine import LinkClosed
from swarm.net import compat

log = logging.getLogger(__name__)

READ_MIN = 64 << 10
"""Smallest read asked of the stream (one yamux frame carries at most 64 KiB)."""
READ_MAX = 1 << 20
"""Largest single read: bounds what one read can make us buffer beyond the current frame."""
CLOSE_TIMEOUT = 1.0
"""Seconds ``aclose`` waits for a graceful close before resetting the stream."""


def _payload_view(data: object) -> object:
    """A zero-copy view of a piece payload where possible (yamux slices it into 64 KiB frames;
    slicing a memoryview copies nothing, slicing bytes copies each frame once more)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    return bytes(data)  # anything else with the buffer protocol, or a bytes-like stand-in


class StreamLink:
    """One bidirectional message channel to one peer over one libp2p stream."""

    def __init__(
        self, stream, allowed_types: frozenset[int] | None = wire.PIECES_TYPES, *, outbound: bool = False
    ):
        self._stream = stream
        self.peer_id: str = compat.stream_peer_id(stream)
        self.outbound = outbound
        """True if we opened the stream (a tie-break for two simultaneous links between two
        peers: both sides can agree to keep the one opened by the smaller peer id)."""
        self._decoder = wire.FrameDecoder(allowed_types, hello_first=True)
        self._send_lock = trio.Lock()
        self._closed = False
        self._broken = False  # a send was interrupted mid-frame: the byte stream is unusable

    @property
    def protocol(self) -> str | None:
        """The negotiated protocol id of the stream."""
        try:
            p = self._stream.get_protocol()
        except Exception:
            return None
        return str(p) if p is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<StreamLink {self.peer_id[:16]} {self.protocol}{' closed' if self._closed else ''}>"

    def expect_pieces(self, lengths: Sequence[int]) -> None:
        """The manifest's piece lengths (the engine calls this once the Hello checked out): a
        PIECE frame naming another index or longer than its piece is refused from its header."""
        self._decoder.expect_pieces(lengths)

    async def send(self, msg: wire.Message) -> None:
        """Send one message. Raises LinkClosed if the stream is gone (ValueError from
        ``wire.encode`` for a message no peer would accept is a bug of the caller and passes)."""
        if isinstance(msg, wire.PieceData):
            parts: tuple = (wire.piece_header(msg.index, len(msg.data)), _payload_view(msg.data))
        else:
            parts = (wire.encode(msg),)
        await self._write(parts)

    async def send_frame(self, frame: bytes) -> None:
        """Send one already encoded frame (``wire.encode``'s output)."""
        await self._write((frame,))

    async def _write(self, parts: tuple) -> None:
        async with self._send_lock:
            if self._closed or self._broken:
                raise LinkClosed("link closed")
            try:
                for p in parts:
                    await self._stream.write(p)
            except BaseException as e:
                # Failed or cancelled after part of a frame may have gone out (yamux writes 64 KiB
                # at a time): whatever we sent next would be parsed as the rest of this frame.
                self._broken = True
                if isinstance(e, Exception):
                    raise LinkClosed(f"send to {self.peer_id[:16]} failed: {e!r}") from e
                raise

    async def receive(self) -> wire.Message:
        """The next message. LinkClosed at end of stream or on reset, wire.ProtocolError for a
        frame that breaks the protocol (the caller drops the peer)."""
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                return msg
            if self._closed:
                raise LinkClosed("link closed")
            n = min(max(self._decoder.needed(), READ_MIN), READ_MAX)
            try:
                data = await self._stream.read(n)
            except Exception as e:
                raise LinkClosed(self._eof_reason(e)) from e
            if not data:
                raise LinkClosed(self._eof_reason(None))
            self._decoder.feed(data)

    def _eof_reason(self, e: BaseException | None) -> str:
        what = "stream ended" if e is None else f"stream ended ({type(e).__name__}: {e})"
        if self._decoder.buffered:
            what += f" inside a frame ({self._decoder.buffered} bytes buffered)"
        return f"{self.peer_id[:16]}: {what}"

    async def aclose(self) -> None:
        """Close our side of the stream (the peer reads everything sent, then end of stream);
        reset it instead if it is broken or a graceful close fails or takes longer than
        CLOSE_TIMEOUT. Idempotent; never raises; finishes even when cancelled."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            graceful = False
            if not self._broken:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        await self._stream.close()
                        graceful = True
                    except Exception as e:
                        log.debug("closing stream to %s: %r", self.peer_id[:16], e)
            if not graceful:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        await self._stream.reset()
                    except Exception as e:
                        log.debug("resetting stream to %s: %r", self.peer_id[:16], e)
