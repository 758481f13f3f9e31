"""A GET_PROVIDERS cut short (the lookup's grace is over, the fetch is cancelled) still closes its
stream on the peer it asked. Unclosed, each one held an inbound DHT stream on that peer until the
connection closed: a worker asked by a flash crowd ran out of them and reset later lookups, and
fetchers after a vanish found "no providers" on the namespace testbed (issue #12)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.custom_types import TProtocol

from swarm.net import compat
from swarm.net.host import SwarmHost, model_key
from swarm.net.identity import load_or_create_identity

pytestmark = pytest.mark.timeout(60)


async def test_cancelled_get_providers_closes_its_stream_on_the_peer(tmp_path):
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            a, b = (SwarmHost(load_or_create_identity(tmp_path / f"{n}.key")) for n in ("a", "b"))
            for h in (a, b):
                await stack.enter_async_context(h.run())
            await a.connect(b.addrs[0])

            # b is a slow DHT peer: it reads the request and never answers; it notes when the
            # asker's side of the stream ends (EOF or reset).
            got_request, ended = trio.Event(), trio.Event()

            async def slow(stream) -> None:
                try:
                    await stream.read(64 * 1024)
                    got_request.set()
                    while await stream.read(64 * 1024):
                        pass
                except Exception:
                    pass
                ended.set()

            b._host.set_stream_handler(TProtocol(str(compat.KAD_PROTOCOL_ID)), slow)
            stream = await compat.open_dht_stream(a._host, b._id)
            with trio.move_on_after(0.5) as cut:
                await compat.get_providers_on(a._host, stream, model_key("org/model"))
            assert cut.cancelled_caught and got_request.is_set()
            # The connection stays up: only the stream's close can tell b it is over.
            with trio.move_on_after(5) as waited:
                await ended.wait()
            assert not waited.cancelled_caught, "the cancelled GET_PROVIDERS left its stream open"
