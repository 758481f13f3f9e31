"""Tools of the adversarial suite: hostile libp2p peers, honest nodes in one trio process, a watcher
of final paths, and the ledger of measured outcomes behind docs/reliability.md.

Hostile peers are real peers: a ``SwarmHost`` (noise, yamux, the DHT) that announces itself under
the model and manifest keys and answers ``/swarm/manifest/1.0.0`` and ``/swarm/pieces/1.0.0``
with whatever lie the test asks for. Honest peers are unmodified ``swarm.node.Node``s.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import blake3
import trio

from swarm import wire
from swarm.engine import EngineConfig
from swarm.manifest import Manifest
from swarm.net.host import SwarmHost, manifest_key, model_key
from swarm.net.identity import load_or_create_identity
from swarm.node import Node, NodeConfig
from swarm.store import SnapshotReader

MiB = 1 << 20
MODEL = "acme/adversarial"

ENGINE = EngineConfig(
    tick=0.05, rechoke_interval=0.25, request_timeout=1.0, min_rate=8 * MiB, handshake_timeout=5.0
)
"""Fast timers: a request for a 4 MiB piece times out after 1.5 s instead of 9 s."""

# --------------------------------------------------------------------------- the ledger

LEDGER: list[dict[str, Any]] = []
"""One row per scenario run: what was injected and what came out (printed at the end of the
session; written as JSON to $SWARM_RELIABILITY_JSON if set)."""


def record(scenario: str, **measured: Any) -> None:
    LEDGER.append({"scenario": scenario, **measured})


# --------------------------------------------------------------------------- pieces of a model


def read_pieces(manifest: Manifest, root: Path) -> dict[int, bytes]:
    """Every piece of ``manifest`` read from the directory it was built from."""
    with SnapshotReader(root, manifest) as reader:
        return {p.index: reader.read_piece(p.index) for p in manifest.pieces}


def weight_pieces(manifest: Manifest) -> list[int]:
    configs = manifest.config_piece_indices()
    return [p.index for p in manifest.pieces if p.index not in configs]


# --------------------------------------------------------------------------- honest nodes


async def start_node(stack: AsyncExitStack, tmp: Path, name: str, **kw: Any) -> Node:
    kw.setdefault("engine", ENGINE)
    kw.setdefault("lookup_timeout", 3.0)
    kw.setdefault("cache_dir", tmp / name / "cache")
    node = Node(NodeConfig(home=tmp / name / "home", serve_hf_cache=False, **kw))
    await stack.enter_async_context(node.running())
    return node


def assert_honest_alive(nodes: Iterable[Node]) -> None:
    """The node is still running, answers status, and none of its transfers hit an internal error."""
    for n in nodes:
        assert n.host.running, f"{n.peer_id} stopped"
        st = n.status()
        assert st["peer_id"] == n.peer_id
        for h, sh in n.shared.items():
            assert sh.transfer.internal_errors == 0, (n.peer_id, h.hex()[:12])


# --------------------------------------------------------------------------- hostile peers


def flip(data: bytes, at: int = 0) -> bytes:
    b = bytearray(data)
    b[at % len(b)] ^= 0xFF
    return bytes(b)


class HostilePeer:
    """A libp2p peer that claims to hold ``manifest`` and misbehaves as ``pieces_mode`` says.

    pieces modes (answers to a Request for piece i, after an honest-looking handshake that claims
    every piece and unchokes at once):

    ``corrupt``       the piece with one byte flipped
    ``truncate``      the first half of the piece
    ``mislabel``      the bytes of another piece, labelled i
    ``out-of-range``  the right bytes, labelled with an index past the last piece
    ``unrequested``   a piece nobody asked for (right bytes, wrong index) instead of piece i
    ``oversized``     a PIECE frame header announcing more than MAX_PIECE_FRAME bytes
    ``silent``        nothing (keeps reading, never answers)
    ``mute``          handshake, then never reads or writes again
    ``vanish``        the header and half the bytes of the first requested piece, then the
                      connection is dropped (TCP gone mid-piece)
    ``slow``          the right piece at ~``slow_rate`` bytes/s
    ``honest``        the right piece (a control)

    ``manifest_replies`` (manifest bytes, signature) are what its manifest handler answers to any
    request (None: the honest manifest, unsigned). ``announce`` lists the DHT keys it provides.
    """

    def __init__(
        self,
        tmp: Path,
        name: str,
        *,
        manifest: Manifest | None = None,
        pieces: dict[int, bytes] | None = None,
        pieces_mode: str = "honest",
        manifest_replies: list[tuple[bytes, bytes]] | None = None,
        announce: Iterable[bytes] | None = None,
        bootstrap: Iterable[str] = (),
        psk: str | None = None,
        slow_rate: int = 64 << 10,
    ):
        self.name = name
        self.manifest = manifest
        self.pieces = pieces or {}
        self.mode = pieces_mode
        self.slow_rate = slow_rate
        self.keypair = load_or_create_identity(tmp / f"{name}.key")
        self.host = SwarmHost(
            self.keypair, listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=list(bootstrap), psk=psk
        )
        self.peer_id = self.host.peer_id
        if manifest_replies is None and manifest is not None:
            manifest_replies = [(manifest.encode(), b"")]
        self.manifest_replies = manifest_replies or []
        if announce is None:
            announce = []
            if manifest is not None:
                announce = [model_key(manifest.model), manifest_key(manifest.manifest_hash)]
        self.announce = list(announce)
        self.stats: Counter[str] = Counter()

    @asynccontextmanager
    async def running(self):
        async with self.host.run():
            self.host.set_manifest_handler(self._on_manifest)
            self.host.set_pieces_handler(self._on_pieces)
            for key in self.announce:
                await self.host.provide(key)
            yield self

    def _on_manifest(self, req: wire.ManifestRequest) -> list[tuple[bytes, bytes]]:
        self.stats["manifest_requests"] += 1
        self.stats["manifests_sent"] += len(self.manifest_replies)
        return list(self.manifest_replies)

    async def _on_pieces(self, link: Any, hello: wire.Hello) -> None:
        m = self.manifest
        self.stats["links"] += 1
        if m is None:  # a manifest liar with no pieces to lie about
            await link.send(wire.Error("unknown manifest"))
            return
        n = m.num_pieces
        await link.send(wire.Hello(m.manifest_hash, n))
        await link.send(wire.Bitfield(wire.pack_bitfield(range(n), n)))
        await link.send(wire.Unchoke())
        if self.mode == "mute":
            await trio.sleep_forever()
        while True:
            msg = await link.receive()
            if isinstance(msg, wire.Request):
                self.stats["requests"] += 1
                await self._answer(link, msg.index)

    async def _answer(self, link: Any, i: int) -> None:
        m = self.manifest
        assert m is not None
        n = m.num_pieces
        data = self.pieces[i]
        mode = self.mode
        if mode == "silent":
            return
        self.stats["bad_answers" if mode != "honest" else "good_answers"] += 1
        if mode == "honest":
            await link.send(wire.PieceData(i, data))
        elif mode == "corrupt":
            await link.send(wire.PieceData(i, flip(data, len(data) // 2)))
        elif mode == "truncate":
            await link.send(wire.PieceData(i, data[: len(data) // 2]))
        elif mode == "mislabel":
            # Another piece's bytes of no greater length (a longer one is refused from its header
            # as oversized, before its bytes are read: that is the "oversized" case).
            other = next(
                (
                    j
                    for j in range(1, n + 1)
                    if self.pieces[(i + j) % n] != data and len(self.pieces[(i + j) % n]) <= len(data)
                ),
                None,
            )
            lie = self.pieces[(i + other) % n] if other is not None else flip(data, 0)
            await link.send(wire.PieceData(i, lie))
        elif mode == "out-of-range":
            await link.send(wire.PieceData(n + 7, data))
        elif mode == "unrequested":
            j = (i + 1) % n
            await link.send(wire.PieceData(j, self.pieces[j]))
        elif mode == "oversized":
            await link.send_frame(struct.pack(">IBI", wire.MAX_PIECE_FRAME + 1, 10, i) + data[:1024])
        elif mode == "vanish":
            await link.send_frame(wire.piece_header(i, len(data)) + data[: len(data) // 2])
            await trio.sleep(0.05)
            await self.drop_connections()
            await trio.sleep_forever()
        elif mode == "slow":
            await link.send_frame(wire.piece_header(i, len(data)))
            step = 16 << 10
            for off in range(0, len(data), step):
                await link.send_frame(data[off : off + step])
                self.stats["slow_bytes"] += min(step, len(data) - off)
                await trio.sleep(step / self.slow_rate)
        else:
            raise AssertionError(f"unknown mode {mode}")

    async def drop_connections(self) -> None:
        """Close every connection of this host at once (the peer vanishes)."""
        net = self.host._host.get_network()
        for pid in list(net.connections):
            with contextlib.suppress(Exception):
                await net.close_peer(pid)
        self.stats["vanished"] += 1


class LyingStore:
    """Wraps the store a real Node serves from: ``corrupt`` flips a byte of every piece it reads,
    ``truncate`` returns half of it. The node then lies through its normal engine, over the data
    lane as well as over libp2p streams (no ``manifest`` attribute: the lane sends what
    ``read_piece`` returns)."""

    def __init__(self, inner: Any, mode: str):
        self.inner = inner
        self.mode = mode
        self.served = 0

    @property
    def have(self) -> frozenset[int]:
        return self.inner.have

    def read_piece(self, index: int) -> bytes:
        data = bytes(self.inner.read_piece(index))
        self.served += 1
        if self.mode == "corrupt":
            return flip(data, len(data) // 3)
        if self.mode == "truncate":
            return data[: len(data) // 2]
        raise AssertionError(self.mode)

    def write_piece(self, index: int, data: Any) -> bool:
        return self.inner.write_piece(index, data)


def make_liar(node: Node, mode: str) -> LyingStore:
    """Turn a serving Node into a liar for every manifest it trades."""
    out = None
    for sh in node.shared.values():
        out = sh.transfer.store = LyingStore(sh.transfer.store, mode)
    assert out is not None, "the node serves nothing"
    return out


# --------------------------------------------------------------------------- final paths


_HEX64 = re.compile(r"[0-9a-f]{64}")


class FinalPathWatcher:
    """Watches a cache directory from a thread while a test runs: every file that appears at a
    final path (``blobs/<blake3 hex>``, ``snapshots/<rev>/<path>``) is hashed once and must match
    its name, and its manifest entry when ``manifests`` are given. Files that are not final
    (``*.incomplete``, ``.swarm/``) are ignored."""

    def __init__(self, cache: Path, manifests: Iterable[Manifest] = (), every: float = 0.02):
        self.cache = Path(cache)
        self.expected: dict[tuple[str, str], str] = {}  # (revision, path) -> hex
        for m in manifests:
            for f in m.files:
                self.expected[(m.revision, f.path)] = f.digest.hex()
        self.every = every
        self.seen: dict[tuple[str, int, int], str] = {}
        self.violations: list[str] = []
        self.checked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> FinalPathWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.scan()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception as e:  # a race with a rename: look again next time
                if not isinstance(e, OSError):
                    self.violations.append(f"watcher error: {e!r}")
            self._stop.wait(self.every)

    def _digest(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_ino, st.st_mtime_ns)
        if key not in self.seen:
            h = blake3.blake3()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.seen[key] = h.hexdigest()
            self.checked += 1
        return self.seen[key]

    def scan(self) -> None:
        for repo in self.cache.glob("models--*"):
            for blob in (repo / "blobs").glob("*"):
                if not _HEX64.fullmatch(blob.name):
                    continue
                got = self._digest(blob)
                if got is not None and got != blob.name:
                    self.violations.append(f"{blob}: blake3 {got}")
            snaps = repo / "snapshots"
            for rev_dir in snaps.glob("*"):
                for p in rev_dir.rglob("*"):
                    if p.is_dir():
                        continue
                    rel = p.relative_to(rev_dir).as_posix()
                    got = self._digest(p)
                    if got is None:
                        continue
                    want = self.expected.get((rev_dir.name, rel))
                    target = os.path.basename(os.readlink(p)) if p.is_symlink() else None
                    if target is not None and got != target:
                        self.violations.append(f"{p} -> {target}: blake3 {got}")
                    if want is not None and got != want:
                        self.violations.append(f"{p}: blake3 {got}, manifest says {want}")

    def assert_clean(self) -> None:
        assert not self.violations, self.violations[:5]


def final_files(cache: Path) -> list[Path]:
    """Everything at a final path under ``cache`` (blobs and snapshot entries)."""
    out = []
    for repo in Path(cache).glob("models--*"):
        out += [b for b in (repo / "blobs").glob("*") if _HEX64.fullmatch(b.name)]
        out += [p for p in (repo / "snapshots").rglob("*") if not p.is_dir()]
    return out


# --------------------------------------------------------------------------- a trio loop in a thread


class TrioThread:
    """Runs ``main(task_status)`` under trio in a thread until ``stop()``; ``call(fn, *args)`` runs
    an async function on that loop from the calling (sync) thread. For hypothesis tests, whose
    examples are sync, against live nodes that outlive one example."""

    def __init__(self, main: Callable[..., Any]):
        self._main = main
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.value: Any = None
        self._token: Any = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def root() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as n:
                    self.value = await n.start(self._main)
                    self._ready.set()

        try:
            trio.run(root)
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> Any:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("trio thread did not start")
        if self._error is not None:
            raise self._error
        return self.value

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._error is not None:
            raise AssertionError(f"trio thread died: {self._error!r}")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 30.0) -> None:
        if self._scope is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout)
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise self._error


def wait_until(fn: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        r = fn()
        if r or time.monotonic() > end:
            return r
        time.sleep(every)
