"""The engine over in-process links: several peers at once, bad peers, vanishing peers.

These drive the real ``Transfer`` over ``MemoryLink`` pairs (real wire encoding) with a dict-backed
piece store that verifies blake3 like the disk store does. Disk and network are tested elsewhere.
Every test but the one over the real store (worker threads: virtual time would jump while they
work) runs on trio's MockClock (``autojump_clock``): timeouts are virtual, a slow machine cannot
make them fire."""

import random

import blake3
import pytest
import trio

from swarm import wire
from swarm.engine import EngineConfig, Transfer
from swarm.manifest import build_manifest
from swarm.memlink import link_pair
from swarm.store import PieceHashMismatch, Store

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


async def test_one_seeder_one_leecher(model, autojump_clock):
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


async def test_configs_complete_before_any_weight_piece(model, autojump_clock):
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


async def test_four_leechers_trade_and_seeder_uploads_less_than_four_copies(model, autojump_clock):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        seed = net.add(
            "seed", Transfer(m, DictStore(m, pieces), run_blocking=direct, config=cfg(upload_slots=2))
        )
        leeches = [
            net.add(
                f"l{k}",
                Transfer(
                    m, DictStore(m), config=cfg(upload_slots=2), run_blocking=direct, rng=random.Random(k)
                ),
            )
            for k in range(4)
        ]
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


async def test_corrupt_peer_is_banned_and_download_completes(model, autojump_clock):
    m, pieces = model
    async with trio.open_nursery() as n:
        net = Net(n)
        net.add("liar", Transfer(m, DictStore(m, pieces, corrupt=True), config=cfg(), run_blocking=direct))
        net.add("honest", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        store = DictStore(m)
        leech = net.add("leech", Transfer(m, store, config=cfg(), run_blocking=direct, rng=random.Random(3)))
        net.connect("liar", "leech")
        net.connect("honest", "leech")
        with trio.fail_after(30):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert "liar" in leech.banned
    assert leech.peer_stats("liar").bad_pieces >= 1
    assert "honest" not in leech.banned


async def test_peer_vanishing_mid_transfer(model, autojump_clock):
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
    """Handshakes, unchokes, then ignores every request (``on_message``: what a subclass does)."""

    def __init__(self, m, link):
        self.m, self.link = m, link

    async def on_message(self, msg):
        pass

    async def run(self):
        await self.link.send(wire.Hello(self.m.manifest_hash, self.m.num_pieces))
        await self.link.send(wire.Bitfield(wire.pack_bitfield(range(self.m.num_pieces), self.m.num_pieces)))
        await self.link.send(wire.Unchoke())
        try:
            while True:
                await self.on_message(await self.link.receive())
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


class SlowSeeder:
    """Serves requests one at a time, in the order asked, at ``rate`` bytes/s (a busy seeder's
    upload shared by several peers); honours Cancel for requests still queued."""

    def __init__(self, m, pieces, link, rate):
        self.m, self.pieces, self.link, self.rate = m, pieces, link, rate
        self.queue = []
        self.sent = []
        self.cancelled = 0

    async def run(self):
        await self.link.send(wire.Hello(self.m.manifest_hash, self.m.num_pieces))
        await self.link.send(wire.Bitfield(wire.pack_bitfield(range(self.m.num_pieces), self.m.num_pieces)))
        await self.link.send(wire.Unchoke())
        wake = trio.Event()

        async def serve():
            nonlocal wake
            while True:
                while not self.queue:
                    wake = trio.Event()
                    await wake.wait()
                i = self.queue[0]
                await trio.sleep(len(self.pieces[i]) / self.rate)
                if self.queue and self.queue[0] == i:
                    self.queue.pop(0)
                    self.sent.append(i)
                    await self.link.send(wire.PieceData(i, self.pieces[i]))

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            try:
                while True:
                    msg = await self.link.receive()
                    if isinstance(msg, wire.Request):
                        self.queue.append(msg.index)
                        wake.set()
                    elif isinstance(msg, wire.Cancel) and msg.index in self.queue:
                        self.queue.remove(msg.index)
                        self.cancelled += 1
            except Exception:
                n.cancel_scope.cancel()


async def test_requests_queued_at_a_slow_seeder_do_not_time_out(model, autojump_clock):
    """A seeder sending 1.25 MiB/s, four requests pipelined: a 4 MiB piece takes 3.2 s once the
    seeder starts on it, within the 5 s a request may take (request_timeout 1 s + 4 MiB at
    1 MiB/s), but the fourth waits 12.8 s after it was sent. Counted from sending, requests timed
    out while merely queued, were cancelled and asked again (ENGINE_REQUESTS.md A5); counted from
    the seeder's last answer, none does."""
    m, pieces = model
    config = cfg(request_timeout=1.0, min_rate=1 << 20, pipeline_depth=4)
    assert max(p.length for p in m.pieces) <= 4 * MiB
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=config, run_blocking=direct, rng=random.Random(1))
        n.start_soon(leech.run)
        la, lb = link_pair("slow", "leech")
        slow = SlowSeeder(m, pieces, la, rate=1.25 * MiB)
        n.start_soon(slow.run)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(4.0 * m.num_pieces + 10):  # 3.2 s per 4 MiB, plus margin
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert leech.timeouts == 0 and slow.cancelled == 0
    assert sorted(slow.sent) == list(range(m.num_pieces))  # each piece sent once


async def test_a_stuck_peer_queue_times_out_as_a_whole(model, autojump_clock):
    """A peer that stops answering: once its oldest request has waited its whole timeout since
    the peer's last answer, every request queued behind it is cancelled too and asked elsewhere."""
    m, _ = model
    config = cfg(request_timeout=1.0, min_rate=1 << 20, pipeline_depth=4)
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=config, run_blocking=direct, rng=random.Random(1))
        n.start_soon(leech.run)
        la, lb = link_pair("silent", "leech")
        n.start_soon(SilentPeer(m, la).run)
        n.start_soon(leech.serve_link, lb)
        await trio.sleep(0.5)
        peer = leech.peers["silent"]
        asked = set(peer.requests)
        assert len(asked) >= 2  # the config pieces (a class is opened once the one before is in)
        deadline = leech._queue_deadline(peer)
        await trio.sleep(deadline - trio.current_time() - config.tick)
        assert leech.timeouts == 0
        await trio.sleep(2 * config.tick)
        assert leech.timeouts == len(asked)  # all at once (then asked again: nobody else has them)
        n.cancel_scope.cancel()


async def test_protocol_violation_drops_only_that_link(model, autojump_clock):
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


async def test_a_peer_that_broke_the_protocol_is_not_linked_again_for_a_while(model, autojump_clock):
    """A peer whose link was dropped for a protocol violation is refused for ``fault_cooldown``
    (inbound or re-dialed alike), then taken again: a broken peer is not re-dialed over and over
    during one fetch (seen: a liar sending out-of-range pieces was linked again before the end)."""
    m, _ = model
    config = cfg(fault_cooldown=30.0)
    async with trio.open_nursery() as n:
        leech = Transfer(m, DictStore(m), config=config, run_blocking=direct)
        n.start_soon(leech.run)

        async def rude_link():
            la, lb = link_pair("rude", "leech")
            n.start_soon(leech.serve_link, lb)
            await la.send(wire.Hello(m.manifest_hash, m.num_pieces))
            await la.send(wire.Bitfield(wire.pack_bitfield([], m.num_pieces)))
            await la.send(wire.Have(m.num_pieces + 5))  # out of range
            return await _refusals(la)

        first = await rude_link()
        assert any("protocol error" in r for r in first), first
        assert "rude" in leech.faulted and "rude" not in leech.peers
        await trio.sleep(10)
        again = await rude_link()
        assert any("broke the protocol recently" in r for r in again), again
        await trio.sleep(25)  # past the cooldown: taken again (and dropped again for its fault)
        later = await rude_link()
        assert any("protocol error" in r for r in later), later
        n.cancel_scope.cancel()


async def test_wrong_manifest_hello_is_refused(model, autojump_clock):
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


# ---------------------------------------------------------------- link budget (review finding 8)


async def _hello_only(m, link):
    """A link that sends Hello and never a Bitfield, reading what it is sent until closed."""
    await link.send(wire.Hello(m.manifest_hash, m.num_pieces))
    try:
        while True:
            await link.receive()
    except Exception:
        pass


async def _refusals(link):
    """The Error reasons a refused link was told before it was closed."""
    out = []
    try:
        while True:
            msg = await link.receive()
            if isinstance(msg, wire.Error):
                out.append(msg.reason)
    except Exception:
        pass
    return out


async def test_one_peer_cannot_fill_the_link_budget_with_handshakes(model, autojump_clock):
    """64 links of one peer that send Hello and never a Bitfield held all of ``max_peers`` for
    ``handshake_timeout``: an honest seeder linking meanwhile was refused ("too many peers")."""
    m, pieces = model
    config = cfg()
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=config, run_blocking=direct)
        n.start_soon(leech.run)
        for _ in range(config.max_peers):
            la, lb = link_pair("flooder", "leech")
            n.start_soon(_hello_only, m, la)
            n.start_soon(leech.serve_link, lb)
        await trio.sleep(0.1)
        seed = Transfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
        n.start_soon(seed.run)
        la, lb = link_pair("seed", "leech")
        n.start_soon(seed.serve_link, la)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(config.handshake_timeout / 2):  # virtual time: exact
            while "seed" not in leech.peers:
                await trio.sleep(0.01)
            await leech.completed.wait()
        assert leech._handshakes == config.handshakes_per_peer == 2  # the flooder's
        n.cancel_scope.cancel()
    assert store.pieces == pieces


async def test_inbound_strangers_leave_room_for_links_we_open(model, autojump_clock):
    """64 strangers (distinct peer ids) dial a fetching transfer and never finish the handshake:
    they take at most ``max_peers - reserved_outbound`` links, and the provider we dial gets in."""
    m, pieces = model
    config = cfg()
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=config, run_blocking=direct)
        n.start_soon(leech.run)
        told = []

        async def stranger(k):
            la, lb = link_pair(f"stranger{k}", "leech")
            lb.outbound = False  # they dialed us
            n.start_soon(leech.serve_link, lb)
            await la.send(wire.Hello(m.manifest_hash, m.num_pieces))
            told.extend(await _refusals(la))

        for k in range(config.max_peers):
            n.start_soon(stranger, k)
        await trio.sleep(0.1)
        held = leech._handshakes
        seed = Transfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
        n.start_soon(seed.run)
        la, lb = link_pair("seed", "leech")
        la.outbound, lb.outbound = False, True  # we dial the provider
        n.start_soon(seed.serve_link, la)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(config.handshake_timeout / 2):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    assert held == config.max_peers - config.reserved_outbound == 48
    assert told.count("too many peers") == config.reserved_outbound


async def test_handshakes_per_address_are_limited(model, autojump_clock):
    m, pieces = model
    config = cfg()
    async with trio.open_nursery() as n:
        seed = Transfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
        n.start_soon(seed.run)
        told = []

        async def stranger(k, address):
            la, lb = link_pair(f"stranger{k}", "seed")
            lb.outbound = False
            n.start_soon(partial_serve(seed, lb, address))
            await la.send(wire.Hello(m.manifest_hash, m.num_pieces))
            told.extend(await _refusals(la))

        for k in range(20):
            n.start_soon(stranger, k, "192.0.2.66")
        await trio.sleep(0.1)
        assert seed._handshakes == config.handshakes_per_address
        assert told.count("too many handshakes from this address") == 20 - 8
        # A seeder (complete) gives inbound links every slot, reserved ones included.
        for k in range(config.max_peers):
            n.start_soon(stranger, 100 + k, f"198.51.100.{k}")
        await trio.sleep(0.1)
        assert seed._handshakes == config.max_peers
        n.cancel_scope.cancel()


def partial_serve(t, link, address):
    async def go():
        await t.serve_link(link, address=address)

    return go


# ---------------------------------------------------------------- choking providers (finding 9)


class ChokingPeer:
    """Handshakes claiming every piece, then never unchokes (reads and ignores everything)."""

    def __init__(self, m, link):
        self.m, self.link = m, link
        self.told = []

    async def run(self):
        await self.link.send(wire.Hello(self.m.manifest_hash, self.m.num_pieces))
        await self.link.send(wire.Bitfield(wire.pack_bitfield(range(self.m.num_pieces), self.m.num_pieces)))
        try:
            while True:
                msg = await self.link.receive()
                if isinstance(msg, wire.Error):
                    self.told.append(msg.reason)
        except Exception:
            pass


async def test_a_peer_that_keeps_us_choked_stops_counting_and_is_closed(model, autojump_clock):
    """A provider that never unchokes counted as a source forever: ``useful_links`` stayed 1 (the
    node dialed nobody else) and the stall watchdog never fired."""
    m, _ = model
    config = cfg()
    async with trio.open_nursery() as n:
        leech = Transfer(m, DictStore(m), config=config, run_blocking=direct)
        n.start_soon(leech.run)
        la, lb = link_pair("choker", "leech")
        choker = ChokingPeer(m, la)
        n.start_soon(choker.run)
        n.start_soon(leech.serve_link, lb)
        await trio.sleep(1)
        assert leech.useful_links == 1  # a peer gets time to give us a slot ...
        await trio.sleep(57)
        assert leech.useful_links == 1
        await trio.sleep(3)  # ... up to choked_timeout = 60 s
        assert leech.useful_links == 0
        assert config.choked_timeout == 60
        assert "choker" not in leech.peers and "choker" in leech.choked_out
        assert any("kept us choked" in r for r in choker.told), choker.told
        # Linked again, it counts as a source only once it unchokes us.
        la, lb = link_pair("choker", "leech")
        n.start_soon(ChokingPeer(m, la).run)
        n.start_soon(leech.serve_link, lb)
        await trio.sleep(1)
        assert "choker" in leech.peers and leech.useful_links == 0
        await la.send(wire.Unchoke())
        await trio.sleep(0.1)
        assert leech.useful_links == 1 and "choker" not in leech.choked_out
        n.cancel_scope.cancel()


async def test_a_peer_that_unchokes_and_chokes_again_without_sending_counts_as_choking(model, autojump_clock):
    """Unchoke, then Choke again before any piece, every 30 s: the wait is counted from the last
    piece received, not from the last Choke, so this peer too stops counting as a source."""
    m, _ = model
    config = cfg()
    async with trio.open_nursery() as n:
        leech = Transfer(m, DictStore(m), config=config, run_blocking=direct)
        n.start_soon(leech.run)
        la, lb = link_pair("flapper", "leech")
        flapper = ChokingPeer(m, la)
        n.start_soon(flapper.run)
        n.start_soon(leech.serve_link, lb)

        async def flap():
            while True:
                await trio.sleep(30)
                await la.send(wire.Unchoke())
                await la.send(wire.Choke())

        n.start_soon(flap)
        await trio.sleep(57)
        assert leech.useful_links == 1
        await trio.sleep(5)
        assert leech.useful_links == 0 and "flapper" in leech.choked_out
        n.cancel_scope.cancel()


async def test_a_choking_peer_interested_in_us_keeps_its_link(model, autojump_clock):
    """A peer that wants our pieces keeps its link however long it chokes us (we serve it; a
    fellow fetcher of a large crowd may take minutes to unchoke us), but stops counting as a
    source after ``choked_timeout``."""
    m, pieces = model
    config = cfg()
    half = {i: pieces[i] for i in range(0, m.num_pieces, 2)}
    async with trio.open_nursery() as n:
        leech = Transfer(m, DictStore(m, half), config=config, run_blocking=direct)
        n.start_soon(leech.run)
        la, lb = link_pair("choker", "leech")
        n.start_soon(ChokingPeer(m, la).run)
        n.start_soon(leech.serve_link, lb)
        await trio.sleep(0.1)
        await la.send(wire.Interested())
        await trio.sleep(config.choked_timeout + 5)
        assert "choker" in leech.peers and leech.useful_links == 0
        assert not leech.choked_out
        n.cancel_scope.cancel()


async def test_waiting_our_turn_at_a_busy_seeder_is_not_choking(model, autojump_clock):
    """A seeder with one upload slot, reading a piece in 0.25 s, and 16 leechers: each waits its
    turn (fair rotation every ``slot_hold``, about 30 s of waiting) and is not closed for being
    kept choked (``choked_timeout``); all complete."""
    m, pieces = model
    config = cfg(upload_slots=1, slot_hold=2.0, rechoke_interval=1.0)

    async def slow_disk(fn, *args):
        await trio.sleep(0.25)
        return fn(*args)

    async with trio.open_nursery() as n:
        net = Net(n)
        net.add("seed", Transfer(m, DictStore(m, pieces), config=config, run_blocking=slow_disk))
        leeches = [
            net.add(
                f"l{k}", Transfer(m, DictStore(m), config=config, run_blocking=direct, rng=random.Random(k))
            )
            for k in range(16)
        ]
        for k in range(16):
            net.connect("seed", f"l{k}")
        with trio.fail_after(600):
            for t in leeches:
                await t.completed.wait()
        n.cancel_scope.cancel()
    assert all(not t.choked_out for t in leeches)


# ---------------------------------------------------------------- the engine over the real store


async def test_pieces_the_store_drops_are_fetched_again(model, tmp_path):  # wall clock: threads
    """A piece rots on disk after it was verified and written, before its file completes: the
    store's whole-file check at completion finds it and drops it (``Download._drop``). The engine
    did not learn it: it counted the file as complete, ``completed`` fired, and ``finalize``
    raised "pieces failed re-verification and must be fetched again" instead of the piece being
    fetched again (issue #13)."""
    m, pieces = model
    f = next(k for k, fe in enumerate(m.files) if fe.path.startswith("model-00001"))
    target = list(m.file_piece_range(f))[3]  # a middle piece: it arrives out of file order
    first = {i: pieces[i] for i in m.config_piece_indices() | {target}}
    dl = Store(tmp_path / "cache").open_download(m)
    try:
        leech = Transfer(m, dl, config=cfg())  # worker threads, like a node
        async with trio.open_nursery() as n:
            net = Net(n)
            net.add("leech", leech)
            net.add("first", Transfer(m, DictStore(m, first), config=cfg(), run_blocking=direct))
            net.connect("first", "leech")
            with trio.fail_after(20):
                while target not in dl.have:
                    await trio.sleep(0.01)
            part = (
                tmp_path
                / "cache"
                / "models--org--tiny"
                / "blobs"
                / (m.files[f].blake3.split(":", 1)[1] + ".incomplete")
            )
            with open(part, "r+b") as fh:  # one byte of the piece rots on disk
                fh.seek(m.pieces[target].offset + 100)
                b = fh.read(1)
                fh.seek(m.pieces[target].offset + 100)
                fh.write(bytes([b[0] ^ 0xFF]))
            net.add("seed", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
            net.connect("seed", "leech")
            with trio.fail_after(30):
                await leech.completed.wait()
            n.cancel_scope.cancel()
        assert dl.complete, f"the store lacks {sorted(dl.missing)}; the engine thought it done"
        path = await trio.to_thread.run_sync(dl.finalize, "main")
    finally:
        dl.close()
    for k, fe in enumerate(m.files):
        want = b"".join(pieces[i] for i in m.file_piece_range(k))
        assert (path / fe.path).read_bytes() == want, fe.path
    assert leech.peer_stats("seed").pieces_down >= 1


class PacedLink:
    """A memory link whose piece sends take ``len / rate`` seconds (virtual): a peer's upload."""

    def __init__(self, link, rate):
        self.link, self.rate, self.peer_id = link, rate, link.peer_id

    async def send(self, msg):
        if isinstance(msg, wire.PieceData):
            await trio.sleep(len(msg.data) / self.rate)
        await self.link.send(msg)

    async def receive(self):
        return await self.link.receive()

    async def aclose(self):
        await self.link.aclose()


class CountingTransfer(Transfer):
    """Records how many pieces it sends at once and to whom, in order."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.now_sending = 0
        self.most_at_once = 0
        self.sent_to = []

    def _next_upload(self, peer):
        i = super()._next_upload(peer)
        if i is not None:
            self.sent_to.append(peer.id)
        return i

    def _upload_started(self, i):
        super()._upload_started(i)
        self.now_sending += 1
        self.most_at_once = max(self.most_at_once, self.now_sending)

    def _upload_ended(self, peer, i, n, error=None):
        self.now_sending -= 1
        super()._upload_ended(peer, i, n, error)


@pytest.mark.timeout(60)
async def test_serial_first_copies_send_one_piece_at_a_time_to_different_peers(model, autojump_clock):
    """``serial_uploads``: a seeder serving four unchoked leechers (four requests pipelined each)
    sends one piece at a time, each to the peer whose next piece is rarest (then the one served
    longest ago), so the first pieces go round the four peers; everyone completes. Without
    it the same seeder sends to all four at once."""
    m, pieces = model
    for serial, most in ((2.0, 1), (0.0, 4)):
        config = cfg(serial_uploads=serial, upload_slots=4, request_timeout=5.0)
        async with trio.open_nursery() as n:
            seed = CountingTransfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
            n.start_soon(seed.run)
            leeches = []
            for k in range(4):
                t = Transfer(m, DictStore(m), config=config, run_blocking=direct, rng=random.Random(k))
                n.start_soon(t.run)
                leeches.append(t)
                la, lb = link_pair("seed", f"l{k}")
                n.start_soon(seed.serve_link, PacedLink(la, 20 * MiB))  # the seed's end: paced
                n.start_soon(t.serve_link, lb)
            with trio.fail_after(60):
                for t in leeches:
                    await t.completed.wait()
            n.cancel_scope.cancel()
        assert all(t.store.pieces == pieces for t in leeches)
        assert seed.most_at_once == most, (serial, seed.most_at_once)
        if serial:  # turns go round the peers (one may ask before another has linked)
            assert set(seed.sent_to[:6]) == {"l0", "l1", "l2", "l3"}, seed.sent_to[:12]


@pytest.mark.timeout(60)
async def test_start_up_options_complete_a_small_mesh(model, autojump_clock):
    """``needy_turns``, ``feed_empty`` and ``swap_idle`` (with serial first copies, the neediest
    peer first and two requests per peer, as scale_1000.toml ships them) move slots around while
    pieces are in flight: a seed and six leechers, every pair linked over paced links, all
    complete with every piece and no internal error."""
    m, pieces = model
    config = cfg(
        serial_uploads=2.0,
        needy_first=True,
        needy_turns=True,
        feed_empty=True,
        swap_idle=True,
        pipeline_depth=2,
        upload_slots=2,
        request_timeout=5.0,
    )
    async with trio.open_nursery() as n:
        seed = CountingTransfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
        nodes = {"seed": seed}
        n.start_soon(seed.run)
        for k in range(6):
            t = Transfer(m, DictStore(m), config=config, run_blocking=direct, rng=random.Random(k))
            nodes[f"l{k}"] = t
            n.start_soon(t.run)
        names = list(nodes)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                la, lb = link_pair(names[a], names[b])
                n.start_soon(nodes[names[a]].serve_link, PacedLink(la, 20 * MiB))
                n.start_soon(nodes[names[b]].serve_link, PacedLink(lb, 20 * MiB))
        with trio.fail_after(60):
            for name in names[1:]:
                await nodes[name].completed.wait()
        n.cancel_scope.cancel()
    assert all(nodes[k].store.pieces == pieces for k in names[1:])
    assert all(t.internal_errors == 0 for t in nodes.values())


class FlappingSeeder(SilentPeer):
    """Serves every piece, but before each piece it sends ``Choke`` and ``Unchoke`` (slots
    re-dealt while the previous piece was on the wire): a Choke must not end the requests the
    peer still answers."""

    def __init__(self, m, pieces, link):
        super().__init__(m, link)
        self.pieces = pieces

    async def on_message(self, msg):
        if isinstance(msg, wire.Request):
            await self.link.send(wire.Choke())
            await self.link.send(wire.Unchoke())
            await self.link.send(wire.PieceData(msg.index, self.pieces[msg.index]))


async def test_a_choke_and_unchoke_do_not_turn_answered_requests_into_waste(model, autojump_clock):
    m, pieces = model
    async with trio.open_nursery() as n:
        store = DictStore(m)
        leech = Transfer(m, store, config=cfg(request_timeout=30.0), run_blocking=direct)
        n.start_soon(leech.run)
        la, lb = link_pair("flapping", "leech")
        n.start_soon(FlappingSeeder(m, pieces, la).run)
        n.start_soon(leech.serve_link, lb)
        with trio.fail_after(60):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert store.pieces == pieces
    # Before: each Choke ended the requests behind the one being answered; their pieces came
    # anyway and counted as waste, and were asked again.
    assert leech.wasted_bytes == 0
    assert sorted(store.writes) == sorted(pieces)


async def test_a_seeder_rejects_what_a_peer_queued_when_it_chokes_it(model, autojump_clock):
    # A seeder's Choke is followed at once by a Reject for each request still queued, so the
    # peer's outstanding requests (kept over the Choke) are answered and go elsewhere.
    m, pieces = model
    async with trio.open_nursery() as n:
        config = cfg(upload_slots=1, slot_hold=0.1)
        seed = Transfer(m, DictStore(m, pieces), config=config, run_blocking=direct)
        n.start_soon(seed.run)
        got: list = []
        links = []
        for name in ("a", "b"):
            la, lb = link_pair("seed", name)
            n.start_soon(seed.serve_link, la)
            links.append(lb)
            await lb.send(wire.Hello(m.manifest_hash, m.num_pieces))
            await lb.send(wire.Bitfield(wire.pack_bitfield((), m.num_pieces)))
            await lb.send(wire.Interested())

        async def reader(lb, tag):
            try:
                while True:
                    msg = await lb.receive()
                    got.append((tag, msg))
                    if isinstance(msg, wire.Unchoke):
                        for i in range(m.num_pieces):  # more than one piece queued
                            await lb.send(wire.Request(i))
            except Exception:
                pass

        for tag, lb in zip("ab", links, strict=True):
            n.start_soon(reader, lb, tag)
        with trio.fail_after(30):
            while not any(isinstance(msg, wire.Choke) for _, msg in got):
                await trio.sleep(0.05)
            await trio.sleep(1)
        n.cancel_scope.cancel()
    for tag in "ab":
        msgs = [msg for t, msg in got if t == tag]
        for k, msg in enumerate(msgs):
            if isinstance(msg, wire.Choke):
                asked = set(range(m.num_pieces))
                sent = {x.index for x in msgs[:k] if isinstance(x, wire.PieceData)}
                after = msgs[k + 1 : k + 1 + len(asked - sent)]
                rejected = {x.index for x in after if isinstance(x, wire.Reject)}
                assert rejected == asked - sent, (tag, msgs[: k + 8])
                break
