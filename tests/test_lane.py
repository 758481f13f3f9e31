"""The data lane (swarm/net/lane.py) over real py-libp2p hosts and loopback TCP, in one process.

Key schedule and record sealing; the handshake (right secret works, a wrong proof or an unknown
lane id is closed before any record is read); pieces in encrypted and plaintext mode that verify;
a tampered record drops the link with nothing written; Transfers over LaneLinks end with identical
files (O_DIRECT for whole aligned pieces, buffered for the unaligned tails); nodes fall back to
libp2p streams when the lane cannot be opened. Every test runs under trio.fail_after.
"""

from __future__ import annotations

import filecmp
import socket
import struct
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import blake3
import pytest
import trio
from modelgen import make_model_dir

from swarm import wire
from swarm.engine import EngineConfig, LinkClosed, Transfer
from swarm.manifest import build_manifest
from swarm.net import lane as lane_mod
from swarm.net import lane_crypto as lc
from swarm.net import quiet_libp2p_logs
from swarm.net.host import SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import LaneLink, LaneService, LaneUnavailable
from swarm.node import Node, NodeConfig
from swarm.sources import FetchRequest
from swarm.store import SnapshotReader, Store

MiB = 1 << 20
ENGINE = EngineConfig(tick=0.05, rechoke_interval=0.25)


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    quiet_libp2p_logs()


@pytest.fixture(scope="module")
def lane_model(tmp_path_factory):
    """Two 6 MiB-ish weight shards (4 MiB pieces: one aligned, one unaligned tail each) + configs."""
    root = make_model_dir(
        tmp_path_factory.mktemp("lane-src"), weights_bytes=12 << 20, n_weight_files=2, seed=5
    )
    return root, build_manifest(root, "org/lane", "0" * 40)


# --------------------------------------------------------------------------- crypto


def test_keys_proofs_and_records():
    nd, na = b"d" * 32, b"a" * 32
    k = lc.derive_keys(nd, na, "dialer", "acceptor", lc.MODE_ENCRYPTED, 4000)
    assert k == lc.derive_keys(nd, na, "dialer", "acceptor", lc.MODE_ENCRYPTED, 4000)
    # Every input is bound: ids, mode, port, either contribution.
    for other in (
        lc.derive_keys(nd, na, "acceptor", "dialer", lc.MODE_ENCRYPTED, 4000),
        lc.derive_keys(nd, na, "dialer", "acceptor", lc.MODE_PLAINTEXT, 4000),
        lc.derive_keys(nd, na, "dialer", "acceptor", lc.MODE_ENCRYPTED, 4001),
        lc.derive_keys(nd, b"b" * 32, "dialer", "acceptor", lc.MODE_ENCRYPTED, 4000),
    ):
        assert other.lane_id != k.lane_id and other.dialer_to_acceptor != k.dialer_to_acceptor
    assert len({k.dialer_proof, k.acceptor_proof, k.dialer_to_acceptor, k.acceptor_to_dialer}) == 4
    assert lc.check_proof(k, True, lc.make_proof(k, True))
    assert not lc.check_proof(k, True, lc.make_proof(k, False))  # roles are not interchangeable
    assert "key" not in repr(k).lower().replace("lanekeys", "")

    s, o = lc.Sealer(k.dialer_to_acceptor), lc.Opener(k.dialer_to_acceptor)
    r1, r2 = s.seal_frame(b"first"), s.seal_frame(b"second")
    hs = lc.HEADER.size
    assert o.open_frame(r1[:hs], r1[hs:]) == b"first"
    assert o.open_frame(r2[:hs], r2[hs:]) == b"second"
    # Replays and reordering fail: the receiver counts nonces itself.
    with pytest.raises(lc.InvalidTag):
        o.open_frame(r2[:hs], r2[hs:])
    # In-place piece sealing with the header as associated data.
    buf = memoryview(bytearray(4096 + 100 + lc.TAG))
    buf[4096:4196] = bytes(range(100))
    s2, o2 = lc.Sealer(k.acceptor_to_dialer), lc.Opener(k.acceptor_to_dialer)
    rec = bytes(s2.seal_piece_into(7, buf, 4096, 100))
    assert lc.HEADER.unpack(rec[:hs]) == (lc.KIND_PIECE, 7, 100)
    assert rec[hs : hs + 100] != bytes(range(100))
    bad_header = lc.HEADER.pack(lc.KIND_PIECE, 8, 100)  # same bytes claimed for another piece
    with pytest.raises(lc.InvalidTag):
        lc.Opener(k.acceptor_to_dialer).open_piece_into(bad_header, memoryview(bytearray(rec[hs:])), 100)
    out = memoryview(bytearray(rec[hs:]))
    o2.open_piece_into(rec[:hs], out, 100)
    assert bytes(out[:100]) == bytes(range(100))
    # Plaintext-mode prefix: the header is authenticated, the payload is not encrypted.
    p = s2.piece_prefix(3, 1 << 20)
    o2.check_piece_prefix(p[:hs], p[hs:])
    with pytest.raises(lc.InvalidTag):
        lc.Opener(k.acceptor_to_dialer).check_piece_prefix(lc.HEADER.pack(2, 4, 1 << 20), p[hs:])


def test_counter_never_wraps(monkeypatch):
    monkeypatch.setattr(lc, "MAX_RECORDS", 2)
    s = lc.Sealer(b"k" * 32)
    s.seal_frame(b"a")
    s.seal_frame(b"b")
    with pytest.raises(lc.LaneExhausted):
        s.seal_frame(b"c")


# --------------------------------------------------------------------------- hosts with lanes


@asynccontextmanager
async def lane_pair(tmp_path, mode_a="encrypted", mode_b="encrypted"):
    """Hosts a (dialer) and b (acceptor) connected, each with a running LaneService; b's accepted
    links land in ``inbound`` (a trio channel of (link, hello)) and stay open until consumed."""
    send, inbound = trio.open_memory_channel(8)
    hosts, lanes = [], []
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for i in range(2):
            h = SwarmHost(load_or_create_identity(tmp_path / f"k{i}"))
            await stack.enter_async_context(h.run())
            hosts.append(h)

        async def on_link(link, hello):
            done = trio.Event()
            link.done = done
            await send.send((link, hello))
            await done.wait()

        for h, mode in zip(hosts, (mode_a, mode_b), strict=True):
            svc = LaneService(mode, h.peer_id, on_link=on_link)
            await nursery.start(svc.run)
            h.set_lane_handler(svc.accept_stream)
            lanes.append(svc)
        await hosts[0].connect(hosts[1].addrs[0])
        yield hosts, lanes, inbound


async def open_lane(hosts, lanes, inbound, manifest_hash=b"h" * 32, num_pieces=4):
    """a dials b; both sides past the Hello. Returns (a's link, b's link)."""
    a = await lanes[0].dial(lambda: hosts[0].open_lane_stream(hosts[1].peer_id))
    await a.send(wire.Hello(manifest_hash, num_pieces))
    b, hello = await inbound.receive()
    assert hello == wire.Hello(manifest_hash, num_pieces)
    await b.send(wire.Hello(manifest_hash, num_pieces))  # both sides greet first, as the engine
    assert await a.receive() == wire.Hello(manifest_hash, num_pieces)
    return a, b


@pytest.mark.parametrize(
    ("mode_a", "mode_b", "expect"),
    [
        ("encrypted", "encrypted", lc.MODE_ENCRYPTED),
        ("plaintext", "plaintext", lc.MODE_PLAINTEXT),
        # Plaintext only if both sides are configured for it: an encrypted node neither offers it
        # nor accepts it.
        ("plaintext", "encrypted", lc.MODE_ENCRYPTED),
        ("encrypted", "plaintext", lc.MODE_ENCRYPTED),
    ],
)
async def test_lane_moves_pieces_that_verify(tmp_path, lane_model, mode_a, mode_b, expect):
    root, m = lane_model
    with trio.fail_after(20):
        async with lane_pair(tmp_path, mode_a, mode_b) as (hosts, lanes, inbound):
            a, b = await open_lane(hosts, lanes, inbound, m.manifest_hash, m.num_pieces)
            assert isinstance(a, LaneLink) and a.mode == b.mode == expect
            assert a.outbound and not b.outbound
            assert a.peer_id == hosts[1].peer_id and b.peer_id == hosts[0].peer_id
            reader = SnapshotReader(root, m)
            sent = 0

            async def send_all() -> None:
                # Both directions at once: pieces a -> b (send_piece: sendfile in plaintext mode,
                # in-place AES-GCM otherwise), control frames b -> a. A send returns once at
                # most SEND_LOWAT of it waits unsent, so the receiver reads meanwhile.
                nonlocal sent
                for p in m.pieces:
                    sent += await a.send_piece(p.index, reader)
                    await b.send(wire.Have(p.index))
                await a.send(wire.Interested())

            got = {}
            async with trio.open_nursery() as n:
                n.start_soon(send_all)
                for _ in range(m.num_pieces):
                    msg = await b.receive()
                    assert isinstance(msg, wire.PieceData)
                    assert len(msg.data) == m.pieces[msg.index].length
                    got[msg.index] = blake3.blake3(memoryview(msg.data).cast("B")).digest()
                    msg.data.release()
                    msg.data.release()  # idempotent
            assert got == {p.index: p.digest for p in m.pieces}
            assert await b.receive() == wire.Interested()
            for p in m.pieces:
                assert await a.receive() == wire.Have(p.index)
            assert sent == m.total_size
            assert b.pieces_received == a.pieces_sent == m.num_pieces
            assert b.bytes_received >= m.total_size
            # A plain PieceData through send() works too (a link without the fast path).
            await b.send(wire.PieceData(0, b"x" * 1000))
            back = await a.receive()
            assert back.index == 0 and bytes(back.data) == b"x" * 1000
            back.data.release()
            # Closing one side ends the other with LinkClosed.
            await a.aclose()
            with pytest.raises(LinkClosed):
                await b.receive()
            with pytest.raises(LinkClosed):
                await a.send(wire.Have(0))
            await b.aclose()
            b.done.set()
            reader.close()


async def test_wrong_proof_is_closed_before_any_record(tmp_path):
    with trio.fail_after(15):
        async with lane_pair(tmp_path) as (hosts, lanes, inbound):
            acceptor = lanes[1]

            async def offer():
                stream = await hosts[0].open_lane_stream(hosts[1].peer_id)
                nonce = b"n" * 32
                await stream.write(lane_mod.OFFER.pack(lane_mod.MAGIC, lc.MODE_ENCRYPTED, nonce))
                raw = await lane_mod._read_exactly(stream, lane_mod.ACCEPT.size)
                _m, status, mode, port, nonce_a = lane_mod.ACCEPT.unpack(raw)
                assert status == lane_mod.STATUS_OK
                keys = lc.derive_keys(nonce, nonce_a, hosts[0].peer_id, hosts[1].peer_id, mode, port)
                return stream, keys, port

            async def attempt(first_bytes):
                s = trio.socket.socket()
                await s.connect(("127.0.0.1", acceptor.port))
                # The proof, then a whole fake record: the listener must not read past the proof.
                record = lc.HEADER.pack(lc.KIND_FRAME, 0, 5) + b"\0" * 21
                try:
                    await lane_mod._send_all(s, first_bytes + record)
                except (ConnectionResetError, BrokenPipeError):  # closed before we sent
                    s.close()
                    return b""
                data = b""
                with trio.fail_after(5):
                    while True:
                        try:
                            chunk = await s.recv(1024)
                        except ConnectionResetError:
                            break
                        if not chunk:
                            break
                        data += chunk
                s.close()
                return data

            # Right lane id, wrong proof (signed with the acceptor's role key).
            stream, keys, _port = await offer()
            assert await attempt(keys.lane_id + lc.make_proof(keys, False)) == b""
            assert acceptor.proofs_rejected == 1
            # The lane id is spent: even the right proof is now refused (another offer is
            # pending meanwhile, so the listener reads the connection's 48 bytes).
            stream2, keys2, _port = await offer()
            assert await attempt(keys.lane_id + lc.make_proof(keys, True)) == b""
            # An unknown lane id.
            assert await attempt(b"\0" * 48) == b""
            assert acceptor.proofs_rejected == 3
            # The second offer voided by a wrong proof: no offer pending any more, so a new
            # connection is closed before a byte of it is read.
            assert await attempt(keys2.lane_id + lc.make_proof(keys2, False)) == b""
            assert acceptor.proofs_rejected == 4 and not acceptor._pending
            assert await attempt(keys2.lane_id + lc.make_proof(keys2, True)) == b""
            assert acceptor.proofs_rejected == 4 and acceptor.connections_refused == 1
            await stream.close()
            await stream2.close()
            assert inbound.statistics().current_buffer_used == 0
            assert acceptor.lanes_accepted == 0
            # The right secret still works afterwards.
            a, b = await open_lane(hosts, lanes, inbound)
            assert acceptor.lanes_accepted == 1
            await a.aclose()
            await b.aclose()
            b.done.set()


async def test_idle_connection_flood_evicts_oldest_and_honest_lane_opens(tmp_path, monkeypatch):
    """Idle TCP connections to the lane port: closed at once while no offer is pending; beyond
    MAX_HANDSHAKES the oldest is evicted, so an honest dialer still gets its lane. Offers: at most
    MAX_SETUPS_PER_PEER per peer, and a full table voids the oldest of the busiest peer."""
    with trio.fail_after(20):
        async with lane_pair(tmp_path) as (hosts, lanes, inbound):
            acceptor = lanes[1]
            idle = []
            for _ in range(8):  # nothing pending: closed before anything is read
                s = trio.socket.socket()
                await s.connect(("127.0.0.1", acceptor.port))
                idle.append(s)
            await trio.sleep(0.1)
            assert acceptor.connections_refused == 8 and acceptor._handshakes == 0

            async def offer():
                stream = await hosts[0].open_lane_stream(hosts[1].peer_id)
                await stream.write(lane_mod.OFFER.pack(lane_mod.MAGIC, lc.MODE_ENCRYPTED, b"n" * 32))
                raw = await lane_mod._read_exactly(stream, lane_mod.ACCEPT.size)
                return stream, lane_mod.ACCEPT.unpack(raw)[1]

            # An offer kept pending (never connected), then 2 x MAX_HANDSHAKES idle connections.
            held, status = await offer()
            assert status == lane_mod.STATUS_OK
            for _ in range(2 * lane_mod.MAX_HANDSHAKES):
                s = trio.socket.socket()
                await s.connect(("127.0.0.1", acceptor.port))
                idle.append(s)
            with trio.fail_after(5):
                while acceptor.connections_evicted < lane_mod.MAX_HANDSHAKES:
                    await trio.sleep(0.02)
            assert acceptor._handshakes == lane_mod.MAX_HANDSHAKES
            # The honest dial (a new offer, its connection, its proof) evicts an idle one.
            a, b = await open_lane(hosts, lanes, inbound)
            assert acceptor.lanes_accepted == 1 and lanes[0].lanes_opened == 1
            assert acceptor.connections_evicted == lane_mod.MAX_HANDSHAKES + 1
            await a.aclose()
            await b.aclose()
            b.done.set()
            # Offers: the first one is still pending; 3 more are taken, a 5th is refused.
            extra = [await offer() for _ in range(lane_mod.MAX_SETUPS_PER_PEER)]
            assert [st for _, st in extra] == [lane_mod.STATUS_OK] * 3 + [lane_mod.STATUS_REFUSED]
            # A full table (max_setups = 4 here) voids the oldest offer to admit a new one.
            monkeypatch.setattr(lane_mod, "MAX_SETUPS_PER_PEER", 8)
            acceptor.max_setups = 4
            extra.append(await offer())
            assert extra[-1][1] == lane_mod.STATUS_OK and acceptor.setups_evicted == 1
            assert len(acceptor._pending) == 4 and acceptor.setups == 4
            for stream, _st in [(held, 0), *extra]:
                await stream.close()
            for s in idle:
                s.close()
            with trio.fail_after(5):
                while acceptor._handshakes:
                    await trio.sleep(0.02)


async def test_dial_refused_or_unreachable_raises_lane_unavailable(tmp_path):
    with trio.fail_after(15):
        async with lane_pair(tmp_path, "encrypted", "off") as (hosts, lanes, _inbound):
            with pytest.raises(LaneUnavailable, match="refused"):
                await lanes[0].dial(lambda: hosts[0].open_lane_stream(hosts[1].peer_id))
            hosts[1].set_lane_handler(None)  # the peer does not speak the lane protocol at all
            with pytest.raises(LaneUnavailable, match="no lane stream"):
                await lanes[0].dial(lambda: hosts[0].open_lane_stream(hosts[1].peer_id))


async def test_tampered_record_drops_link_and_nothing_is_written(tmp_path, lane_model):
    root, m = lane_model
    with trio.fail_after(20):
        async with lane_pair(tmp_path) as (hosts, lanes, inbound):
            store = Store(tmp_path / "cache", direct_io=True)
            dl = store.open_download(m)
            leech = Transfer(m, dl, config=ENGINE)
            seed = Transfer(m, SnapshotReader(root, m), config=ENGINE)

            a = await lanes[0].dial(lambda: hosts[0].open_lane_stream(hosts[1].peer_id))
            seal = a._sealer.seal_piece_into

            def tampered(index, buf, at, length):
                rec = seal(index, buf, at, length)
                rec[lc.HEADER.size + length // 2] ^= 0x01  # one bit of the ciphertext
                return rec

            a._sealer.seal_piece_into = tampered
            async with trio.open_nursery() as n:
                n.start_soon(seed.run)
                n.start_soon(leech.run)
                n.start_soon(seed.serve_link, a)
                b, hello = await inbound.receive()
                with trio.fail_after(10):
                    await leech.serve_link(b, hello)  # returns when the link is dropped
                b.done.set()
                n.cancel_scope.cancel()
            assert dl.have == frozenset()
            assert leech.bytes_down == 0 and not leech.banned  # on-path tampering: not the peer
            assert b.closed
            dl.close()


async def test_transfer_over_lane_links_identical_files(tmp_path, lane_model):
    root, m = lane_model
    for mode in ("encrypted", "plaintext"):
        with trio.fail_after(20):
            async with lane_pair(tmp_path / mode, mode, mode) as (hosts, lanes, inbound):
                store = Store(tmp_path / mode / "cache", direct_io=True)
                dl = store.open_download(m)
                leech = Transfer(m, dl, config=ENGINE)
                seed = Transfer(m, SnapshotReader(root, m), config=ENGINE)
                async with trio.open_nursery() as n:
                    n.start_soon(seed.run)
                    n.start_soon(leech.run)
                    a = await lanes[0].dial(lambda: hosts[0].open_lane_stream(hosts[1].peer_id))
                    n.start_soon(leech.serve_link, a)  # the dialer downloads here

                    async def serve_inbound(seed=seed):
                        b, hello = await inbound.receive()
                        await seed.serve_link(b, hello)
                        b.done.set()

                    n.start_soon(serve_inbound)
                    await leech.completed.wait()
                    n.cancel_scope.cancel()
                # Whole aligned pieces went around the page cache (the tails through it).
                assert any(f.dfd is not None for f in dl._files)
                snap = dl.finalize("main")
                dl.close()
                assert a.mode == (lc.MODE_PLAINTEXT if mode == "plaintext" else lc.MODE_ENCRYPTED)
                for fe in m.files:
                    assert filecmp.cmp(root / fe.path, snap / fe.path, shallow=False), fe.path
                assert leech.bytes_down == m.total_size


# --------------------------------------------------------------------------- nodes


@asynccontextmanager
async def two_nodes(tmp_path, model_root, worker_lane="encrypted", front_lane="encrypted"):
    async with AsyncExitStack() as stack:
        worker = Node(
            NodeConfig(
                home=tmp_path / "w" / "home",
                cache_dir=tmp_path / "w" / "cache",
                serve_hf_cache=False,
                engine=ENGINE,
                lookup_timeout=3.0,
                serve=(("org/lane", model_root),),
                lane=worker_lane,
            )
        )
        await stack.enter_async_context(worker.running())
        front = Node(
            NodeConfig(
                home=tmp_path / "f" / "home",
                cache_dir=tmp_path / "f" / "cache",
                serve_hf_cache=False,
                engine=ENGINE,
                lookup_timeout=3.0,
                bootstrap=tuple(worker.host.addrs[:1]),
                lane=front_lane,
            )
        )
        await stack.enter_async_context(front.running())
        yield worker, front


def same_files(src: Path, snap: Path, manifest) -> None:
    for fe in manifest.files:
        assert filecmp.cmp(src / fe.path, snap / fe.path, shallow=False), fe.path


@pytest.mark.parametrize("mode", ["encrypted", "plaintext"])
async def test_node_fetch_uses_the_lane(tmp_path, lane_model, mode):
    root, _m = lane_model
    with trio.fail_after(30):
        async with two_nodes(tmp_path, root, mode, mode) as (worker, front):
            snap = await front.fetch(FetchRequest("org/lane", cache_dir=front.config.cache_dir))
            m = worker.shared[next(iter(worker.shared))].manifest
            same_files(root, snap, m)
            assert front.lane.lanes_opened == 1 and worker.lane.lanes_accepted == 1
            t = front.shared[m.manifest_hash].transfer
            links = [p.link for p in t.peers.values()]
            assert links and all(isinstance(x, LaneLink) for x in links)
            assert t.bytes_down == m.total_size


@pytest.mark.parametrize("how", ["unreachable", "off"])
async def test_node_falls_back_to_libp2p_streams(tmp_path, lane_model, how):
    root, _m = lane_model
    with trio.fail_after(30):
        async with two_nodes(tmp_path, root, "off" if how == "off" else "encrypted") as (worker, front):
            if how == "unreachable":
                # The worker offers a port where nothing listens: the TCP connect is refused.
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                dead = s.getsockname()[1]
                s.close()
                worker.lane.port = dead
            snap = await front.fetch(FetchRequest("org/lane", cache_dir=front.config.cache_dir))
            m = worker.shared[next(iter(worker.shared))].manifest
            same_files(root, snap, m)
            assert front.lane.lanes_opened == 0
            t = front.shared[m.manifest_hash].transfer
            assert t.peers and not any(isinstance(p.link, LaneLink) for p in t.peers.values())


def test_bind_host_of():
    assert lane_mod.bind_host_of(["/ip4/10.1.2.3/tcp/4001"]) == "10.1.2.3"
    assert lane_mod.bind_host_of(["/dns4/x/tcp/1", "/ip6/::1/tcp/0"]) == "::1"
    assert lane_mod.bind_host_of([]) == "127.0.0.1"
    assert struct.calcsize(">BII") == lc.HEADER.size == 9
