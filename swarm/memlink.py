"""An in-process ``PeerLink`` pair over trio memory channels.

Used to drive the engine without a network: unit tests, and two transfers in one process. Messages
go through ``wire.encode`` and a ``FrameDecoder`` so the codec is exercised exactly as on a socket.
"""

from __future__ import annotations

import trio

from swarm import wire
from swarm.engine import LinkClosed

LINK_BUFFER = 64
"""Frames in flight one way before ``send`` blocks, like a socket's buffer."""


class MemoryLink:
    def __init__(self, peer_id: str, send: trio.MemorySendChannel, recv: trio.MemoryReceiveChannel):
        self.peer_id = peer_id
        self._send = send
        self._recv = recv
        self._decoder = wire.FrameDecoder(wire.PIECES_TYPES)

    async def send(self, msg: wire.Message) -> None:
        try:
            await self._send.send(wire.encode(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise LinkClosed(str(e)) from e

    async def receive(self) -> wire.Message:
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError) as e:
                raise LinkClosed("peer closed") from e
            self._decoder.feed(data)

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._recv.aclose()


def link_pair(a_id: str, b_id: str) -> tuple[MemoryLink, MemoryLink]:
    """Two connected ends: the first is held by ``a_id`` (and names ``b_id`` as its peer)."""
    a_to_b_send, a_to_b_recv = trio.open_memory_channel(LINK_BUFFER)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel(LINK_BUFFER)
    return (MemoryLink(b_id, a_to_b_send, b_to_a_recv), MemoryLink(a_id, b_to_a_send, a_to_b_recv))
