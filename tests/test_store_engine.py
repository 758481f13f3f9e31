"""The engine over the real store: ``swarm.engine.Transfer`` over in-process links
(``swarm.memlink``) with real :class:`swarm.store.Store` downloads and snapshot readers on every side.

A store that loses a piece (it failed re-verification on disk) tells the transfer
(``Download.take_dropped``), which fetches it again; the fetch then completes and the snapshot is
byte-identical (issue #13)."""

import random

import pytest
import trio

from swarm.engine import EngineConfig, Transfer
from swarm.manifest import build_manifest
from swarm.memlink import link_pair
from swarm.store import SnapshotReader, Store

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
WEIGHTS = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    rng = random.Random(13)
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (root / WEIGHTS).write_bytes(rng.randbytes(20 * MiB + 4321))
    m = build_manifest(root, "org/store-engine", "main")
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


def weights_piece(m, k):
    """Global index of piece ``k`` of the weights file."""
    f = next(i for i, fe in enumerate(m.files) if fe.path == WEIGHTS)
    return list(m.file_piece_range(f))[k]


def blob_part(cache, m, index):
    fe = m.files[m.pieces[index].file_index]
    return cache / "models--org--store-engine" / "blobs" / (fe.blake3.split(":", 1)[1] + ".incomplete")


def rot(path, offset):
    """Flip one byte of ``path`` at ``offset`` (bytes that were verified and written go bad)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def partial_cache(cache, m, pieces, indices):
    """A cache whose download of ``m`` holds ``indices`` (written, then closed: resume state)."""
    with Store(cache).open_download(m) as dl:
        for i in sorted(indices):
            dl.write_piece(i, pieces[i])
    return cache


def seeded_snapshot(cache, m, pieces):
    """A complete, finalized snapshot of ``m`` in ``cache`` (what a seeding node serves)."""
    with Store(cache).open_download(m) as dl:
        for i in range(m.num_pieces):
            dl.write_piece(i, pieces[i])
        return dl.finalize("main")


def check_snapshot(path, m, pieces):
    for k, fe in enumerate(m.files):
        want = b"".join(pieces[i] for i in m.file_piece_range(k))
        assert (path / fe.path).read_bytes() == want, fe.path


async def test_a_piece_lost_at_file_completion_is_fetched_again(model, tmp_path):
    """The fetcher's piece rots on disk after it was verified and written: the whole-file check at
    the file's completion drops it (``Download._drop``); the engine takes it back and fetches it
    again from a seeder serving a real snapshot, and ``finalize`` succeeds."""
    m, pieces = model
    target = weights_piece(m, 2)  # a middle piece: it arrives out of file order (read back at the end)
    first_cache = partial_cache(tmp_path / "first", m, pieces, m.config_piece_indices() | {target})
    seed_snap = seeded_snapshot(tmp_path / "seed", m, pieces)
    cache = tmp_path / "leech"
    with (
        Store(first_cache).open_download(m) as first_dl,
        SnapshotReader(seed_snap, m) as seed_reader,
        Store(cache).open_download(m) as dl,
    ):
        leech = Transfer(m, dl, config=cfg())  # worker threads, as in a node
        async with trio.open_nursery() as n:
            net = Net(n)
            net.add("leech", leech)
            net.add("first", Transfer(m, first_dl, config=cfg()))
            net.connect("first", "leech")
            with trio.fail_after(30):
                while target not in dl.have:
                    await trio.sleep(0.01)
            rot(blob_part(cache, m, target), m.pieces[target].offset + 100)
            net.add("seed", Transfer(m, seed_reader, config=cfg()))
            net.connect("seed", "leech")
            with trio.fail_after(30):
                await leech.completed.wait()
            n.cancel_scope.cancel()
        assert dl.complete, f"the store lacks {sorted(dl.missing)}; the engine thought it done"
        path = await trio.to_thread.run_sync(dl.finalize, "main")
    check_snapshot(path, m, pieces)
    assert leech.peer_stats("seed").pieces_down >= 1  # the lost piece came again


async def test_a_holder_that_loses_the_last_piece_fetches_it_again_and_serves_it(model, tmp_path):
    """The holder of a fetcher's last piece finds it rotten when it reads it to serve it (a piece
    restored from its resume state is re-hashed on first read): it refuses it, drops it and
    fetches it again from a seeder only it is linked to. The fetcher's refusal of that piece must
    expire although nothing else happens on its links: before the fix it was only expired when a
    request was made, so a fetcher whose last piece every holder had refused waited forever (here:
    until ``fail_after``)."""
    m, pieces = model
    last = weights_piece(m, 3)
    other = weights_piece(m, 1)
    # The holder: every piece but ``other`` (its weights file stays incomplete, so ``last`` is a
    # restored piece on reopen), ``last`` rotten on disk.
    holder_cache = partial_cache(tmp_path / "holder", m, pieces, set(range(m.num_pieces)) - {other})
    rot(blob_part(holder_cache, m, last), m.pieces[last].offset + 7)
    # The fetcher: every piece but ``last``.
    cache = partial_cache(tmp_path / "leech", m, pieces, set(range(m.num_pieces)) - {last})
    seed_snap = seeded_snapshot(tmp_path / "seed", m, pieces)
    with (
        Store(holder_cache).open_download(m) as holder_dl,
        Store(cache).open_download(m) as dl,
        SnapshotReader(seed_snap, m) as seed_reader,
    ):
        assert last in holder_dl.have and dl.missing == {last}
        leech = Transfer(m, dl, config=cfg())
        holder = Transfer(m, holder_dl, config=cfg())
        async with trio.open_nursery() as n:
            net = Net(n)
            net.add("leech", leech)
            net.add("holder", holder)
            net.add("seed", Transfer(m, seed_reader, config=cfg()))
            net.connect("holder", "leech")
            with trio.fail_after(30):
                while last in holder_dl.have:  # the holder read it for the leech and dropped it
                    await trio.sleep(0.01)
            net.connect("seed", "holder")
            with trio.fail_after(30):
                await holder.completed.wait()
                await leech.completed.wait()
            n.cancel_scope.cancel()
        assert dl.complete and holder_dl.complete
        path = await trio.to_thread.run_sync(dl.finalize, "main")
        holder_path = await trio.to_thread.run_sync(holder_dl.finalize, "main")
    check_snapshot(path, m, pieces)
    check_snapshot(holder_path, m, pieces)
    assert leech.peer_stats("holder").pieces_down == 1
    assert holder.peer_stats("seed").pieces_down >= 1  # the lost ``last`` (only the seed has it)
