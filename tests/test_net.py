"""swarm.net over real py-libp2p hosts on 127.0.0.1, all in one process under trio.

Identity persistence; connecting; noise-only security (checked on the wire: a plaintext offer is
refused); PSK private networks; DHT provide / find_providers under model_key and manifest_key,
including past a stale local provider cache; the manifest protocol (with a failing handler); pieces
streams (4 MiB pieces both ways at once, garbage, missing Hello); and the engine trading a real
manifest between two hosts. Every test runs under trio.fail_after.

This file does not import libp2p: only swarm/net/ may.
"""

from __future__ import annotations

import os
import stat
from contextlib import AsyncExitStack, asynccontextmanager

import blake3
import pytest
import trio

from swarm import wire
from swarm.engine import EngineConfig, LinkClosed, Transfer
from swarm.net import quiet_libp2p_logs
from swarm.net import requests as requests_mod
from swarm.net.host import (
    NetError,
    PeerAddr,
    SwarmHost,
    manifest_key,
    model_key,
    parse_psk,
)
from swarm.net.identity import IdentityError, load_or_create_identity, peer_id_of
from swarm.net.links import StreamLink
from swarm.store import PieceHashMismatch

MiB = 1 << 20
PSK_A = "11" * 32
PSK_B = "22" * 32


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    quiet_libp2p_logs()


_key_counter = 0


def new_key(tmp_path):
    global _key_counter
    _key_counter += 1
    return load_or_create_identity(tmp_path / f"id-{_key_counter}.key")


@asynccontextmanager
async def running(tmp_path, n, **kw):
    """n SwarmHosts, started, not yet connected."""
    hosts = [SwarmHost(new_key(tmp_path), **kw) for _ in range(n)]
    async with AsyncExitStack() as stack:
        for h in hosts:
            await stack.enter_async_context(h.run())
        yield hosts


async def poll(fn, *, every=0.05):
    """Await fn() until it returns something truthy (the caller bounds the time)."""
    while True:
        r = await fn()
        if r:
            return r
        await trio.sleep(every)


# --------------------------------------------------------------------------- identity


def test_identity_persists_across_loads(tmp_path):
    path = tmp_path / "sub" / "identity.key"
    k1 = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = load_or_create_identity(path)
    assert peer_id_of(k1) == peer_id_of(k2)
    assert peer_id_of(k1).startswith("12D3KooW")  # an Ed25519 identity-multihash peer id
    assert k2.private_key.to_bytes() == k1.private_key.to_bytes()
    assert not [p for p in path.parent.iterdir() if p.name != "identity.key"]  # no temp files left
    # libp2p protobuf serialization: key type 1 (Ed25519), 32-byte seed ...
    data = path.read_bytes()
    assert data[:4] == b"\x08\x01\x12\x20" and len(data) == 36
    # ... and go-libp2p's 64-byte seed||public layout is read too.
    go = tmp_path / "go.key"
    go.write_bytes(b"\x08\x01\x12\x40" + data[4:] + k1.public_key.to_bytes())
    assert peer_id_of(load_or_create_identity(go)) == peer_id_of(k1)
    # A damaged file is an error, never silently replaced (the peer id would change).
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\x08\x01\x12\x05abc")
    with pytest.raises(IdentityError):
        load_or_create_identity(bad)
    assert bad.read_bytes() == b"\x08\x01\x12\x05abc"
    other = load_or_create_identity(tmp_path / "other.key")
    assert peer_id_of(other) != peer_id_of(k1)


def test_keys_are_multihashes():
    k = model_key("org/model")
    assert len(k) == 34 and k[:2] == b"\x12\x20"
    assert k != model_key("org/model2")
    h = blake3.blake3(b"manifest").digest()
    mk = manifest_key(h)
    assert mk == b"\x1e\x20" + h
    with pytest.raises(ValueError):
        manifest_key(b"short")


def test_parse_psk():
    assert parse_psk("AB" * 32) == "ab" * 32
    assert parse_psk(f"/key/swarm/psk/1.0.0/\n/base16/\n{'cd' * 32}\n") == "cd" * 32
    for bad in ("", "ab" * 31, "zz" * 32):
        with pytest.raises(ValueError):
            parse_psk(bad)


# --------------------------------------------------------------------------- connecting


async def test_two_and_three_hosts_connect(tmp_path):
    with trio.fail_after(30):
        async with running(tmp_path, 3) as (a, b, c):
            assert all(x.endswith(f"/p2p/{a.peer_id}") for x in a.addrs)
            t0 = trio.current_time()
            assert await b.connect(a.addrs[0]) == a.peer_id
            assert trio.current_time() - t0 < 2
            # idempotent, and by PeerAddr (no /p2p suffix) or bare peer id
            pa = PeerAddr(a.peer_id, tuple(x.rsplit("/p2p/", 1)[0] for x in a.addrs))
            assert await b.connect(pa) == a.peer_id
            assert await b.connect(a.peer_id) == a.peer_id
            assert b.connected_peers() == [a.peer_id]
            assert await c.connect(pa) == a.peer_id
            assert await c.connect(b.addrs[0]) == b.peer_id
            await poll(lambda: _async(len(a.connected_peers()) == 2))
            assert sorted(a.connected_peers()) == sorted([b.peer_id, c.peer_id])
            assert sorted(c.connected_peers()) == sorted([a.peer_id, b.peer_id])
            # one connection per peer, noise + yamux on each
            conns = a._host.get_network().connections
            assert all(len(v) == 1 for v in conns.values())
            for x, y in ((a, b), (b, a), (c, a), (c, b)):
                assert x.security_protocol(y.peer_id) == "/noise"
                assert x.muxer_protocol(y.peer_id) == "/yamux/1.0.0"
            with pytest.raises(NetError):
                await a.connect(a.addrs[0])  # ourselves
            with pytest.raises(NetError):
                await a.connect("/ip4/127.0.0.1/tcp/1")  # no /p2p
            with pytest.raises(NetError):
                await a.connect(new_peer_id(tmp_path))  # nobody knows an address
            # a closed port fails fast
            dead = PeerAddr(new_peer_id(tmp_path), ("/ip4/127.0.0.1/tcp/9",))
            t0 = trio.current_time()
            with pytest.raises(NetError):
                await a.connect(dead)
            assert trio.current_time() - t0 < 5


def new_peer_id(tmp_path):
    return peer_id_of(new_key(tmp_path))


async def _async(v):
    return v


async def test_wildcard_listen_advertises_dialable_addresses(tmp_path):
    with trio.fail_after(30):
        async with running(tmp_path, 1, listen=["/ip4/0.0.0.0/tcp/0"]) as (a,), running(tmp_path, 1) as (b,):
            assert a.addrs and not any("/0.0.0.0/" in x for x in a.addrs)
            assert await b.connect(a.addrs[0]) == a.peer_id
            key = model_key("org/wild")
            await a.provide(key)
            found = await poll(lambda: b.find_providers(key, timeout=2))
            assert not any("/0.0.0.0/" in x for x in found[0].addrs)


async def test_bootstrap_connects_and_fills_routing_table(tmp_path):
    with trio.fail_after(30):
        async with running(tmp_path, 1) as (a,):
            b = SwarmHost(new_key(tmp_path), bootstrap=[a.addrs[0]])
            c = SwarmHost(
                new_key(tmp_path), bootstrap=[a.addrs[0], "/ip4/127.0.0.1/tcp/9/p2p/" + new_peer_id(tmp_path)]
            )
            async with b.run(), c.run():
                assert b.connected_peers() == [a.peer_id]
                assert a.peer_id in c.connected_peers()  # the dead bootstrap entry is only logged
                assert b._dht.get_routing_table_size() >= 1
                # b and c never dialled each other; the DHT finds the provider through a.
                key = model_key("org/bootstrapped")
                await b.provide(key)
                found = await poll(lambda: c.find_providers(key, timeout=2))
                assert [p.peer_id for p in found] == [b.peer_id]
                assert found[0].addrs and all("/p2p/" not in x for x in found[0].addrs)
    with pytest.raises(NetError):
        SwarmHost(new_key(tmp_path), bootstrap=["/ip4/127.0.0.1/tcp/4001"])  # no /p2p


# --------------------------------------------------------------------------- security


async def _multistream_offer(addr: str, protocol: str) -> bytes:
    """Dial ``addr`` over raw TCP, speak multistream-select, offer ``protocol``; the reply line."""
    parts = addr.split("/")
    stream = await trio.open_tcp_stream(parts[2], int(parts[4]))
    async with stream:
        for line in (b"/multistream/1.0.0\n", protocol.encode() + b"\n"):
            await stream.send_all(bytes([len(line)]) + line)
        buf = b""
        lines = []
        while len(lines) < 2:
            chunk = await stream.receive_some(1024)
            if not chunk:
                break
            buf += chunk
            while buf and len(buf) > buf[0]:
                n = buf[0]
                lines.append(buf[1 : 1 + n])
                buf = buf[1 + n :]
        assert lines[0] == b"/multistream/1.0.0\n"
        return lines[1] if len(lines) > 1 else b""


async def test_noise_is_the_only_security_protocol(tmp_path):
    with trio.fail_after(30):
        async with running(tmp_path, 1) as (a,):
            assert list(a.security_options) == ["/noise"]
            addr = a.addrs[0]
            # On the wire: every non-noise security protocol is refused ("na"), noise accepted.
            for proto in ("/plaintext/2.0.0", "/plaintext/1.0.0", "/secio/1.0.0", "/tls/1.0.0"):
                assert await _multistream_offer(addr, proto) == b"na\n"
            assert await _multistream_offer(addr, "/noise") == b"/noise\n"


async def test_private_network_psk(tmp_path):
    with trio.fail_after(40):
        async with (
            running(tmp_path, 2, psk=PSK_A) as (a, b),
            running(tmp_path, 1, psk=PSK_B, connect_timeout=2.0) as (c,),
            running(tmp_path, 1, connect_timeout=2.0) as (d,),
        ):
            assert await b.connect(a.addrs[0]) == a.peer_id
            assert b.security_protocol(a.peer_id) == "/noise"
            with pytest.raises(NetError):  # wrong key: never gets past the handshake
                await c.connect(a.addrs[0])
            with pytest.raises(NetError):  # no key at all
                await d.connect(a.addrs[0])
            assert a.connected_peers() == [b.peer_id]
            # With a PSK even multistream-select is encrypted: a raw offer gets nothing sensible.
            with (
                pytest.raises((AssertionError, trio.BrokenResourceError, trio.TooSlowError, IndexError)),
                trio.fail_after(3),
            ):
                await _multistream_offer(a.addrs[0], "/plaintext/2.0.0")
            # a still works for its own network
            key = manifest_key(bytes(32))
            await a.provide(key)
            found = await poll(lambda: b.find_providers(key, timeout=2))
            assert [p.peer_id for p in found] == [a.peer_id]


# --------------------------------------------------------------------------- DHT


async def test_provide_and_find_providers(tmp_path):
    with trio.fail_after(40):
        async with running(tmp_path, 3) as (a, b, c):
            await b.connect(a.addrs[0])
            await c.connect(a.addrs[0])
            mkey = model_key("org/model")
            hkey = manifest_key(blake3.blake3(b"a manifest").digest())
            assert await c.find_providers(mkey, timeout=1) == []
            await b.provide(mkey)
            await b.provide(hkey)
            for key in (mkey, hkey):
                found = await poll(lambda key=key: c.find_providers(key, timeout=2))
                assert [p.peer_id for p in found] == [b.peer_id]
                assert found[0].addrs == tuple(x.rsplit("/p2p/", 1)[0] for x in b.addrs)
                # the provider itself does not list itself
                assert await b.find_providers(key, timeout=1) == []
            # a second provider: both found, no duplicates, limit honoured
            await c.provide(mkey)
            found = await poll(lambda: _at_least(a.find_providers(mkey, timeout=2), 2))
            assert sorted(p.peer_id for p in found) == sorted([b.peer_id, c.peer_id])
            assert len(await a.find_providers(mkey, limit=1)) == 1
            b.stop_providing(mkey)
            assert mkey not in b._dht.provider_store.providing_keys
            assert b.peer_id not in {i.peer_id.to_base58() for i in b._dht.provider_store.get_providers(mkey)}


async def _at_least(coro, n):
    r = await coro
    return r if len(r) >= n else None


async def test_find_providers_looks_past_a_stale_local_cache(tmp_path):
    """py-libp2p's find_providers caches what it finds and afterwards answers from that local
    cache alone whenever it holds any entry for the key; ours asks the network as well."""
    with trio.fail_after(40):
        async with running(tmp_path, 3) as (a, p1, q):
            await p1.connect(a.addrs[0])
            await q.connect(a.addrs[0])
            key = manifest_key(blake3.blake3(b"stale").digest())
            a_store, q_store = a._dht.provider_store, q._dht.provider_store
            await p1.provide(key)
            await poll(lambda: _async(a_store.get_providers(key)))
            # q looks the key up once through the library, which caches p1 in q's local store
            # (and answers with duplicates: one copy per peer that knew p1).
            assert {i.peer_id.to_base58() for i in await q._dht.find_providers(key.hex())} == {p1.peer_id}
            assert [i.peer_id.to_base58() for i in q_store.get_providers(key)] == [p1.peer_id]
            async with running(tmp_path, 1) as (p2,):
                await p2.connect(a.addrs[0])
                await p2.provide(key)
                await poll(lambda: _async(len(a_store.get_providers(key)) >= 2))
                # Should p2's ADD_PROVIDER have reached q directly, forget it: q's cache is stale.
                q_store.providers[key].pop(p2.peer_id, None)
                assert [i.peer_id.to_base58() for i in await q._dht.find_providers(key.hex())] == [
                    p1.peer_id
                ]  # the library's lookup is stuck on the cache
                found = await q.find_providers(key, timeout=3)
                assert sorted(p.peer_id for p in found) == sorted([p1.peer_id, p2.peer_id])


# --------------------------------------------------------------------------- manifests


async def test_manifest_protocol_round_trip_and_failing_handler(tmp_path):
    calls = []

    def handler(req):
        calls.append(req)
        if req.model == "org/boom":
            raise RuntimeError("handler bug")
        if req.model == "org/many":
            return [(b"m%d" % i, b"") for i in range(40)]
        return [(b"manifest-1", b"sig"), (b"x" * (1 << 20), b"")]

    with trio.fail_after(40):
        async with running(tmp_path, 2) as (a, b):
            with pytest.raises(NetError):  # not serving yet: the protocol is not even offered
                await b.fetch_manifests(a.addrs[0], wire.ManifestRequest("org/m"))
            a.set_manifest_handler(handler)
            req = wire.ManifestRequest("org/m", "main", bytes(range(32)))
            replies = await b.fetch_manifests(PeerAddr(a.peer_id, ()), req)
            assert replies == [
                wire.ManifestReply(b"manifest-1", b"sig"),
                wire.ManifestReply(b"x" * (1 << 20), b""),
            ]
            assert calls[-1] == req
            with pytest.raises(NetError, match="internal error"):
                await b.fetch_manifests(a.peer_id, wire.ManifestRequest("org/boom"))
            # the host survived and answers the next request
            assert len(await b.fetch_manifests(a.peer_id, req)) == 2
            many = await b.fetch_manifests(a.peer_id, wire.ManifestRequest("org/many"))
            assert len(many) == wire.MAX_MANIFESTS_PER_REPLY

            async def async_handler(req):
                await trio.sleep(0)
                return []

            a.set_manifest_handler(async_handler)
            assert await b.fetch_manifests(a.peer_id, req) == []

            async def slow_handler(req):
                await trio.sleep(5)
                return []

            a.set_manifest_handler(slow_handler)
            t0 = trio.current_time()
            with pytest.raises(NetError, match="timed out"):
                await b.fetch_manifests(a.peer_id, req, timeout=0.5)
            assert trio.current_time() - t0 < 2


# --------------------------------------------------------------------------- pieces


async def test_pieces_link_both_directions_at_once(tmp_path):
    h = bytes(range(32))
    pieces_a = [os.urandom(4 * MiB) for _ in range(3)]
    pieces_b = [os.urandom(4 * MiB) for _ in range(3)]
    served = []

    async def exchange(link, hello, mine, theirs_count, got):
        async def send_all():
            if hello is None:
                await link.send(wire.Hello(h, 6))
            await link.send(wire.Bitfield(b"\xe0"))
            for i, p in enumerate(mine):
                await link.send(wire.PieceData(i, p))

        async def recv_all():
            msgs = []
            while len(msgs) < 1 + theirs_count + (0 if hello else 1):
                msgs.append(await link.receive())
            got.extend(msgs)

        async with trio.open_nursery() as n:
            n.start_soon(send_all)
            n.start_soon(recv_all)

    got_a, got_b = [], []

    async def on_link(link, hello):
        served.append((link.peer_id, hello))
        assert not link.outbound
        assert link.protocol == wire.PIECES_PROTOCOL
        await link.send(wire.Hello(h, 6))
        await exchange(link, hello, pieces_a, 3, got_a)
        with pytest.raises(LinkClosed):  # b closes after it got everything
            await link.receive()

    with trio.fail_after(60):
        async with running(tmp_path, 2) as (a, b):
            a.set_pieces_handler(on_link)
            link = await b.open_pieces_link(
                PeerAddr(a.peer_id, tuple(x.rsplit("/p2p/", 1)[0] for x in a.addrs))
            )
            assert isinstance(link, StreamLink) and link.peer_id == a.peer_id and link.outbound
            t0 = trio.current_time()
            await exchange(link, None, pieces_b, 3, got_b)
            elapsed = trio.current_time() - t0
            await link.aclose()
            await link.aclose()  # idempotent
            with pytest.raises(LinkClosed):
                await link.send(wire.Interested())
            await poll(lambda: _async(len(got_a) == 4))
    assert served == [(b.peer_id, wire.Hello(h, 6))]
    assert got_b[0] == wire.Hello(h, 6) and got_b[1] == wire.Bitfield(b"\xe0")
    assert [m.data for m in got_b[2:]] == pieces_a
    assert got_a[0] == wire.Bitfield(b"\xe0")
    assert [m.data for m in got_a[1:]] == pieces_b
    print(f"24 MiB exchanged (12 MiB each way at once) in {elapsed:.2f} s")


async def test_garbage_on_pieces_protocol(tmp_path):
    """Garbage from a peer: our side gets ProtocolError, the host stays up."""
    h = bytes(32)
    reached = []

    async def on_link(link, hello):
        reached.append(hello)
        await link.send(wire.Hello(h, 1))
        await link.receive()

    with trio.fail_after(30):
        async with running(tmp_path, 2) as (a, b):
            a.set_pieces_handler(on_link)
            # 1. b sends garbage to a's handler: a drops the stream, Hello never reaches on_link
            raw = await b._open_stream(a.addrs[0], wire.PIECES_PROTOCOL, 5)
            await raw.write(b"\x00\x00\x00\x05\x63garbage-garbage")
            with pytest.raises(Exception):  # noqa: B017 - an Error frame then EOF, or a reset
                while True:
                    data = await raw.read(1 << 16)
                    if not data:
                        raise EOFError
            assert reached == []
            # 2. a oversize frame header: rejected before its body is buffered
            raw = await b._open_stream(a.peer_id, wire.PIECES_PROTOCOL, 5)
            await raw.write(b"\xff\xff\xff\xff\x0a")
            link = StreamLink(raw)
            with pytest.raises((LinkClosed, wire.ProtocolError)):
                while True:
                    await link.receive()
            await link.aclose()

            # 3. a peer whose pieces handler answers with garbage: ProtocolError on our side
            async def garbage_handler(stream):
                try:
                    await stream.write(b"\x00\x00\x00\x02\x63\x00not a frame")
                    await stream.read(1 << 16)
                except Exception:
                    pass
                finally:
                    await stream.close()

            b._host.set_stream_handler(wire.PIECES_PROTOCOL, garbage_handler)
            link = await a.open_pieces_link(b.peer_id)
            await link.send(wire.Hello(h, 1))
            with pytest.raises(wire.ProtocolError):
                await link.receive()
            await link.aclose()
            # both hosts still serve: a real link to a works end to end
            link = await b.open_pieces_link(a.peer_id)
            await link.send(wire.Hello(h, 1))
            assert await link.receive() == wire.Hello(h, 1)
            await link.aclose()
            assert reached == [wire.Hello(h, 1)]
            assert a.connected_peers() == [b.peer_id]


async def test_pieces_stream_without_hello_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(requests_mod, "HELLO_TIMEOUT", 0.3)
    reached = []

    async def on_link(link, hello):
        reached.append(hello)

    with trio.fail_after(30):
        async with running(tmp_path, 2) as (a, b):
            a.set_pieces_handler(on_link)
            link = await b.open_pieces_link(a.addrs[0])
            t0 = trio.current_time()
            with pytest.raises(LinkClosed):
                await link.receive()  # we never sent Hello: a closes after HELLO_TIMEOUT
            assert 0.2 < trio.current_time() - t0 < 3
            # a Bitfield first is a protocol error: an Error frame, then the end of the stream
            link = await b.open_pieces_link(a.peer_id)
            await link.send(wire.Bitfield(b"\x00"))
            msg = await link.receive()
            assert isinstance(msg, wire.Error) and "expected Hello" in msg.reason
            with pytest.raises(LinkClosed):
                await link.receive()
            assert reached == []


async def test_pieces_handler_exception_is_contained(tmp_path):
    calls = []

    async def on_link(link, hello):
        calls.append(hello)
        if len(calls) == 1:
            raise RuntimeError("engine bug")
        await link.send(hello)

    with trio.fail_after(30):
        async with running(tmp_path, 2) as (a, b):
            a.set_pieces_handler(on_link)
            h = wire.Hello(bytes(32), 3)
            link = await b.open_pieces_link(a.addrs[0])
            await link.send(h)
            with pytest.raises(LinkClosed):
                await link.receive()
            link = await b.open_pieces_link(a.peer_id)
            await link.send(h)
            assert await link.receive() == h
            await link.aclose()
            assert len(calls) == 2


async def test_host_exit_with_live_links_is_prompt(tmp_path):
    async def on_link(link, hello):
        await link.send(hello)
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with running(tmp_path, 1) as (b,):
            async with running(tmp_path, 1) as (a,):
                a.set_pieces_handler(on_link)
                links = [await b.open_pieces_link(a.addrs[0]) for _ in range(3)]
                for link in links:
                    await link.send(wire.Hello(bytes(32), 1))
                    await link.receive()
                t0 = trio.current_time()
            assert trio.current_time() - t0 < 5
            for link in links:
                with pytest.raises(LinkClosed):
                    await link.receive()
                await link.aclose()


# --------------------------------------------------------------------------- the engine over libp2p


class DictStore:
    """Pieces in memory, verified like swarm.store.Download."""

    def __init__(self, manifest, pieces=None):
        self.manifest = manifest
        self.pieces = dict(pieces or {})

    @property
    def have(self):
        return frozenset(self.pieces)

    def read_piece(self, i):
        return self.pieces[i]

    def write_piece(self, i, data):
        if blake3.blake3(bytes(data)).digest() != self.manifest.pieces[i].digest:
            raise PieceHashMismatch(i, f"piece {i} failed blake3")
        if i in self.pieces:
            return False
        self.pieces[i] = bytes(data)
        return True


def read_pieces(root, manifest):
    out = {}
    for p in manifest.pieces:
        with open(root / manifest.files[p.file_index].path, "rb") as f:
            f.seek(p.offset)
            out[p.index] = f.read(p.length)
    return out


async def test_engine_downloads_over_libp2p(tmp_path, model_dir, model_manifest):
    m = model_manifest
    pieces = read_pieces(model_dir, m)
    cfg = EngineConfig(tick=0.05, rechoke_interval=0.2)
    seed = Transfer(m, DictStore(m, pieces), config=cfg)
    store = DictStore(m)
    leech = Transfer(m, store, config=cfg)
    assert seed.done and not leech.done

    with trio.fail_after(60):
        async with running(tmp_path, 2) as (a, b), trio.open_nursery() as n:
            n.start_soon(seed.run)
            n.start_soon(leech.run)

            async def on_link(link, hello):
                assert hello.manifest_hash == m.manifest_hash
                await seed.serve_link(link, hello)

            a.set_pieces_handler(on_link)
            await b.connect(a.addrs[0])
            await a.provide(manifest_key(m.manifest_hash))
            providers = await poll(lambda: b.find_providers(manifest_key(m.manifest_hash), timeout=2))
            assert [p.peer_id for p in providers] == [a.peer_id]
            link = await b.open_pieces_link(providers[0])
            n.start_soon(leech.serve_link, link)
            t0 = trio.current_time()
            await leech.completed.wait()
            elapsed = trio.current_time() - t0
            n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert leech.bytes_down == m.total_size
    print(f"{m.total_size / MiB:.1f} MiB over libp2p in {elapsed:.2f} s")


class _ScriptedLink:
    """Answers a manifest request with the given messages (for the asker's limits)."""

    peer_id = "12D3KooWScripted"

    def __init__(self, answers: list[wire.Message]) -> None:
        self.answers = list(answers)

    async def send(self, msg: wire.Message) -> None:
        pass

    async def receive(self) -> wire.Message:
        return self.answers.pop(0)


async def test_manifest_reply_budget_is_enforced():
    big = wire.ManifestReply(b"x" * (12 << 20))
    request = wire.ManifestRequest("org/model")
    ok = await SwarmHost._manifest_exchange(_ScriptedLink([big, big, wire.ManifestEnd(2)]), request)
    assert len(ok) == 2  # 24 MiB: within MAX_MANIFEST_REPLY_BYTES
    with pytest.raises(wire.ProtocolError, match="manifest reply over"):
        await SwarmHost._manifest_exchange(_ScriptedLink([big, big, big, wire.ManifestEnd(3)]), request)
    with pytest.raises(wire.ProtocolError, match="too many"):
        await SwarmHost._manifest_exchange(
            _ScriptedLink([wire.ManifestReply(b"m")] * (wire.MAX_MANIFESTS_PER_REPLY + 1)), request
        )


def test_manifest_exchange_rules_without_io():
    from swarm.net import manifest_exchange as mx

    c = mx.ReplyCollector()
    assert c.feed(wire.ManifestReply(b"m", b"s")) is None
    with pytest.raises(wire.ProtocolError, match="count 2 but 1"):
        c.feed(wire.ManifestEnd(2))
    with pytest.raises(mx.Refused, match="busy"):
        mx.ReplyCollector().feed(wire.Error(mx.BUSY))
    with pytest.raises(wire.ProtocolError, match="unexpected Have"):
        mx.ReplyCollector().feed(wire.Have(1))
    with pytest.raises(wire.ProtocolError, match="expected ManifestRequest"):
        mx.check_request(wire.Have(1))
    big = (b"x" * (12 << 20), b"")
    assert len(mx.reply_budget([big, big, big])) == 2  # cut to fit MAX_REPLY_BYTES, not refused
    assert len(mx.reply_budget([(b"m", b"")] * (mx.MAX_REPLIES + 5))) == mx.MAX_REPLIES
    with pytest.raises(ValueError, match="signature"):
        mx.reply_budget([(b"m", b"s" * (wire.MAX_SIGNATURE_BYTES + 1))])


def test_libp2p_version_is_checked_and_private_api_stays_in_compat():
    import warnings
    from pathlib import Path

    from swarm.net import compat

    assert compat.check_libp2p_version(compat.LIBP2P_VERSION)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not compat.check_libp2p_version("0.9.0")
    assert any("pinned to py-libp2p 0.8.1" in str(w.message) for w in caught)
    # The private py-libp2p API swarm relies on is named in compat.py only.
    private = (
        "muxed_conn",
        "get_network().connections",
        "unblock_peer",
        "providing_keys",
        "maybe_consume_signed_record",
        "env_to_send_in_RPC",
        "read_varint_prefixed_bytes_limited",
        "BaseNoiseMsgReadWriter",
        "StreamEOF",
    )
    net = Path(compat.__file__).parent
    for path in net.glob("*.py"):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        assert not [p for p in private if p in text], path.name


def test_net_modules_stay_small():
    """Issue #13: no module over ~600 lines in swarm/net (each file does one job)."""
    from pathlib import Path

    import swarm.net

    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(swarm.net.__file__).parent.glob("*.py")}
    assert max(sizes.values()) <= 650, sizes
