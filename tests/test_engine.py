"""The engine over in-process links: several peers at once, bad peers, vanishing peers.

These drive the real ``Transfer`` over ``MemoryLink`` pairs (real wire encoding) with a dict-backed
piece store that verifies blake3 like the disk store does. Disk and network are tested elsewhere."""

import random

import blake3
import pytest
import trio

from swarm import wire
from swarm.engine import EngineConfig, Transfer
from swarm.manifest import build_manifest
from swarm.memlink import link_pair
from swarm.store import PieceHashMismatch

MiB = 1 << 20


class DictStore:
    """Pieces in memory, verified against the manifest on write (like swarm.store.Download)."""

    def __init__(self, manifest, pieces=None, corrupt=False):
        self.manifest = manifest
        self.pieces = dict(pieces or {})
        self.corrupt = corrupt
        self.writes = []

    @property
    def have(self):
        return frozenset(self.pieces)

    def read_piece(self, i):
        data = self.pieces[i]
        if self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data

    def write_piece(self, i, data):
        if blake3.blake3(bytes(data)).digest() != self.manifest.pieces[i].digest:
            raise PieceHashMismatch(i, f"piece {i} failed blake3")
        if i in self.pieces:
            return False
        self.pieces[i] = bytes(data)
        self.writes.append(i)
        return True


async def direct(fn, *args):
    return fn(*args)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    rng = random.Random(7)
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (root / "tokenizer.json").write_bytes(rng.randbytes(300_000))
    (root / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(24 * MiB + 1234))
    (root / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(20 * MiB))
    m = build_manifest(root, "org/tiny", "main")
    pieces = {}
    for p in m.pieces:
        with open(root / m.files[p.file_index].path, "rb") as f:
            f.seek(p.offset)
            pieces[p.index] = f.read(p.length)
    return m, pieces


def cfg(**kw):
    base = dict(tick=0.05, rechoke_interval=0.2, request_timeout=1.0)
    base.update(kw)
    return EngineConfig(**base)


class Net:
    """Transfers by name, connected pairwise with memory links inside one nursery."""

    def __init__(self, nursery):
        self.nursery = nursery
        self.t = {}

    def add(self, name, transfer):
        self.t[name] = transfer
        self.nursery.start_soon(transfer.run)
        return transfer

    def connect(self, a, b):
        la, lb = link_pair(a, b)
        self.nursery.start_soon(self.t[a].serve_link, la)
        self.nursery.start_soon(self.t[b].serve_link, lb)


async def test_one_seeder_one_leecher(model):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        seed = net.add("seed", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        store = DictStore(m)
        leech = net.add("leech", Transfer(m, store, config=cfg(), run_blocking=direct))
        assert seed.done and not leech.done
        net.connect("seed", "leech")
        with trio.fail_after(20):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert leech.bytes_down == m.total_size
    assert seed.bytes_up == m.total_size


async def test_configs_complete_before_any_weight_piece(model):
    m, pieces = model
    configs = m.config_piece_indices()
    assert configs and len(configs) < m.num_pieces
    async with trio.open_nursery() as n:
        net = Net(n)
        net.add("seed", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        store = DictStore(m)
        leech = net.add("leech", Transfer(m, store, config=cfg(), run_blocking=direct))
        net.connect("seed", "leech")
        with trio.fail_after(20):
            await leech.configs_ready.wait()
            assert set(store.pieces) == configs
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert set(store.writes[: len(configs)]) == configs


async def test_four_leechers_trade_and_seeder_uploads_less_than_four_copies(model):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        seed = net.add("seed", Transfer(m, DictStore(m, pieces), run_blocking=direct,
                                        config=cfg(upload_slots=2)))
        leeches = [net.add(f"l{k}", Transfer(m, DictStore(m), config=cfg(upload_slots=2),
                                              run_blocking=direct, rng=random.Random(k)))
                   for k in range(4)]
        names = list(net.t)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                net.connect(names[a], names[b])
        with trio.fail_after(30):
            for t in leeches:
                await t.completed.wait()
        n.cancel_scope.cancel()
    print("seed uploaded", seed.bytes_up / m.total_size, "copies")
    assert seed.bytes_up < 3.5 * m.total_size
    assert sum(t.bytes_up for t in leeches) > 0
    assert all(t.internal_errors == 0 for t in [seed, *leeches])
    assert all(t.store.pieces == pieces for t in leeches)


async def test_corrupt_peer_is_banned_and_download_completes(model):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        net.add("liar", Transfer(m, DictStore(m, pieces, corrupt=True), config=cfg(),
                                 run_blocking=direct))
        net.add("honest", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        store = DictStore(m)
        leech = net.add("leech", Transfer(m, store, config=cfg(), run_blocking=direct,
                                          rng=random.Random(3)))
        net.connect("liar", "leech")
        net.connect("honest", "leech")
        with trio.fail_after(30):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert "liar" in leech.banned
    assert leech.peer_stats("liar").bad_pieces >= 1
    assert "honest" not in leech.banned


async def test_peer_vanishing_mid_transfer(model):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        store = DictStore(m)
        leech = net.add("leech", Transfer(m, store, config=cfg(), run_blocking=direct))
        net.add("other", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        doomed_scope = trio.CancelScope()

        async def doomed():
            with doomed_scope:
                t = Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct)
                la, lb = link_pair("doomed", "leech")
                async with trio.open_nursery() as inner:
                    inner.start_soon(t.run)
                    inner.start_soon(t.serve_link, la)
                    inner.start_soon(leech.serve_link, lb)
                    await trio.sleep_forever()

        n.start_soon(doomed)
        # Let the doomed seeder send a few pieces, then kill it; only then does "other" join.
        while len(store.pieces) < 3:
            await trio.sleep(0.001)
        doomed_scope.cancel()
        net.connect("other", "leech")
        with trio.fail_after(30):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces


class SilentPeer:
    """Handshakes, unchokes, then ignores every request."""

    def __init__(self, m, link):
        self.m, self.link = m, link

    async def run(self):
        await self.link.send(wire.Hello(self.m.manifest_hash, self.m.num_pieces))
        await self.link.send(wire.Bitfield(wire.pack_bitfield(range(self.m.num_pieces),
                                                              self.m.num_pieces)))
        await self.link.send(wire.Unchoke())
        try:
            while True:
                await self.link.receive()
        except Exception:
            pass


async def test_requests_to_a_silent_peer_time_out_and_go_elsewhere(model, autojump_clock):
    m, pieces = model
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=cfg(), run_blocking=direct, rng=random.Random(1))
        n.start_soon(leech.run)
        la, lb = link_pair("silent", "leech")
        n.start_soon(SilentPeer(m, la).run)
        n.start_soon(leech.serve_link, lb)
        await trio.sleep(0.5)
        assert not store.pieces
        seed = Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct)
        n.start_soon(seed.run)
        la, lb = link_pair("seed", "leech")
        n.start_soon(seed.serve_link, la)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(120):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces


async def test_protocol_violation_drops_only_that_link(model):
    m, pieces = model
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=cfg(), run_blocking=direct)
        n.start_soon(leech.run)
        la, lb = link_pair("rude", "leech")

        async def rude():
            await la.send(wire.Hello(m.manifest_hash, m.num_pieces))
            await la.send(wire.Bitfield(wire.pack_bitfield([], m.num_pieces)))
            await la.send(wire.Have(m.num_pieces + 5))  # out of range
            with trio.move_on_after(5):
                while True:
                    msg = await la.receive()
                    if isinstance(msg, wire.Error):
                        return msg

        async with trio.open_nursery() as inner:
            inner.start_soon(leech.serve_link, lb)
            await rude()
        assert "rude" not in leech.peers
        seed = Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct)
        n.start_soon(seed.run)
        la, lb = link_pair("seed", "leech")
        n.start_soon(seed.serve_link, la)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(20):
            await leech.completed.wait()
        n.cancel_scope.cancel()


async def test_wrong_manifest_hello_is_refused(model):
    m, _ = model
    leech = Transfer(m, DictStore(m), config=cfg(), run_blocking=direct)
    la, lb = link_pair("other", "leech")
    async with trio.open_nursery() as n:
        n.start_soon(leech.serve_link, lb)
        await la.send(wire.Hello(b"\1" * 32, m.num_pieces))
        with trio.fail_after(5):
            msgs = []
            try:
                while True:
                    msgs.append(await la.receive())
            except Exception:
                pass
    assert any(isinstance(x, wire.Error) and "different manifest" in x.reason for x in msgs)
    assert not leech.peers
