"""The node: one libp2p host, one store, and a Transfer per manifest it trades.

A node serves what it holds (private directories, complete snapshots of the local HF cache, and
whatever it fetched) and fetches through the swarm: a DHT lookup by model name (or by manifest hash
when one is pinned), manifests from the providers, then pieces from many peers at once. It announces
itself under the manifest key as soon as it holds a verified piece (partial seeding) and under the
model key once complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import blake3
import trio

from swarm import wire
from swarm.engine import EngineConfig, Transfer
from swarm.manifest import Manifest, ManifestError, build_manifest, validate_model_name
from swarm.net.host import NetError, PeerAddr, SwarmHost, manifest_key, model_key
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import LANE_MODES, LaneService, LaneUnavailable, bind_host_of
from swarm.sources import (
    FetchError,
    FetchRequest,
    FetchResult,
    ModelNotFound,
    VerificationFailed,
    fetch_chain,
)
from swarm.store import Download, SnapshotReader, Store
from swarm.trust import TrustError, TrustPolicy, sign_manifest

log = logging.getLogger(__name__)

MANIFEST_ASK_FANOUT = 8
"""Providers asked for manifests at once; more adds load without changing the vote much."""
LOOKUP_FIRST = 0.3
"""Seconds between the first DHT lookups of a fetch, while fellow fetchers are announcing."""
LOOKUP_RETRY = 1.0
"""Seconds between DHT lookups while a fetch has too few peers."""
MAX_LINKS_PER_FETCH = 16
"""Outbound links a fetch opens; inbound ones from other fetchers come on top."""
REPROVIDE_INTERVAL = 3600.0
"""Provider records live 48 h in py-libp2p's DHT; re-announcing hourly keeps churned nodes found."""


@attrs.frozen
class NodeConfig:
    home: Path
    cache_dir: Path
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    serve: tuple[tuple[str, Path], ...] = ()
    serve_hf_cache: bool = True
    psk: str | None = None
    engine: EngineConfig = attrs.Factory(EngineConfig)
    lookup_timeout: float = 5.0
    lane: str = attrs.field(default="encrypted", validator=attrs.validators.in_(LANE_MODES))
    """Piece bytes over a direct TCP data lane (swarm/net/lane.py): "encrypted" (AES-256-GCM),
    "plaintext" (trusted networks only: used with peers also set to plaintext; blake3 still
    verifies every piece) or "off" (libp2p streams only). Links fall back to libp2p streams
    whenever a lane cannot be opened."""
    direct_io: bool = True
    """Write whole aligned pieces received over the lane with O_DIRECT (see swarm/store.py)."""
    trust: TrustPolicy = attrs.Factory(TrustPolicy)
    stall_timeout: float | None = 60.0
    """Seconds a download may go without a verified piece while no linked peer can still send one
    (none holds a missing piece, or each that does let ``max_timeouts`` requests in a row time
    out) before the fetch fails: VerificationFailed if peers were banned for bad data, FetchError
    otherwise. None waits for new providers forever."""


@attrs.define
class Shared:
    """One manifest this node trades."""

    manifest: Manifest
    transfer: Transfer
    source: Any  # Download while fetching, SnapshotReader once complete
    path: Path | None = None  # snapshot / served directory once complete
    signature: bytes = b""
    announced_manifest: bool = False
    announced_model: bool = False
    ready: trio.Event = attrs.Factory(trio.Event)  # finalized (path set) or failed
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.path is not None


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.home = Path(config.home)
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(config.cache_dir, direct_io=config.direct_io)
        self.keypair = key = load_or_create_identity(self.home / "identity.key")
        self.host = SwarmHost(key, listen=list(config.listen), bootstrap=list(config.bootstrap),
                              psk=config.psk)
        self.shared: dict[bytes, Shared] = {}
        self.rng = random.Random()
        self._nursery: trio.Nursery | None = None
        self._manifest_cache = _ManifestCache(self.home / "manifests")
        self._signatures = self.home / "signatures"
        self._fetch_locks: dict[bytes, trio.Lock] = {}
        self.lane: LaneService | None = None
        if config.lane != "off":
            self.lane = LaneService(config.lane, self.host.peer_id,
                                    bind_host=bind_host_of(config.listen),
                                    on_link=self._on_pieces_link)

    # ------------------------------------------------------------------ lifetime

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        async with self.host.run(), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_manifest_handler(self._answer_manifests)
            self.host.set_pieces_handler(self._on_pieces_link)
            if self.lane is not None:
                await nursery.start(self.lane.run)
                self.host.set_lane_handler(self.lane.accept_stream)
            for model, path in self.config.serve:
                await self.serve_directory(model, Path(path))
            if self.config.serve_hf_cache:
                await self.serve_cache()
            nursery.start_soon(self._reprovide_loop)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                for sh in self.shared.values():
                    _close_quietly(sh.source)

    # ------------------------------------------------------------------ serving

    async def serve_directory(self, model: str, path: Path, revision: str | None = None) -> Manifest:
        """Serve a private directory as ``model`` (a revision derived from its content unless
        given). Re-hashes only when a file's size or mtime changed since last time."""
        validate_model_name(model)
        path = Path(path).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"--serve {model}={path}: not a directory")
        manifest = await trio.to_thread.run_sync(self._manifest_cache.get_or_build, model, path,
                                                 revision)
        await self._share_complete(manifest, path)
        return manifest

    async def serve_cache(self) -> list[Manifest]:
        """Serve every complete snapshot in the local HF cache."""
        out = []
        root = Path(self.config.cache_dir)
        if not root.is_dir():
            return out
        for repo in sorted(root.glob("models--*--*")):
            model = repo.name[len("models--"):].replace("--", "/", 1)
            try:
                validate_model_name(model)
            except ManifestError:
                continue
            for snap in sorted((repo / "snapshots").glob("*")):
                try:
                    m = self.store.load_manifest(model, snap.name)
                    if m is None:
                        if self.store.find_complete(model, snap.name) is None:
                            continue
                        m = await trio.to_thread.run_sync(
                            self._manifest_cache.get_or_build, model, snap, snap.name)
                    elif self.store.find_complete(model, snap.name) is None:
                        continue
                    await self._share_complete(m, snap)
                    out.append(m)
                except Exception as e:  # one broken snapshot must not stop the node
                    log.warning("not serving %s: %s", snap, e)
        return out

    def _signature_for(self, manifest_hash: bytes) -> bytes:
        """The publisher's signature we accepted when we fetched this manifest, else our own (we
        are the publisher of what we built)."""
        try:
            return (self._signatures / f"{manifest_hash.hex()}.sig").read_bytes()
        except OSError:
            return sign_manifest(self.keypair, manifest_hash)

    def _keep_signature(self, manifest_hash: bytes, signature: bytes) -> None:
        if not signature:
            return
        self._signatures.mkdir(parents=True, exist_ok=True)
        tmp = self._signatures / f"{manifest_hash.hex()}.tmp"
        tmp.write_bytes(signature)
        os.replace(tmp, self._signatures / f"{manifest_hash.hex()}.sig")

    async def _share_complete(self, manifest: Manifest, path: Path) -> Shared:
        h = manifest.manifest_hash
        if h in self.shared:
            return self.shared[h]
        reader = SnapshotReader(path, manifest)
        t = self._new_transfer(manifest, reader)
        sh = Shared(manifest, t, reader, path=path, signature=self._signature_for(h))
        sh.ready.set()
        self.shared[h] = sh
        self._start(t)
        await self._announce(sh, model=True)
        return sh

    def _new_transfer(self, manifest: Manifest, store: Any, wanted_files=None) -> Transfer:
        return Transfer(manifest, store, wanted_files=wanted_files, config=self.config.engine,
                        rng=random.Random(self.rng.getrandbits(64)), local_id=self.peer_id)

    def _start(self, t: Transfer) -> None:
        assert self._nursery is not None, "node is not running"
        self._nursery.start_soon(t.run)

    async def _announce(self, sh: Shared, *, model: bool) -> None:
        try:
            if not sh.announced_manifest:
                await self.host.provide(manifest_key(sh.manifest.manifest_hash))
                sh.announced_manifest = True
            if model and not sh.announced_model:
                await self.host.provide(model_key(sh.manifest.model))
                sh.announced_model = True
        except Exception as e:  # no DHT peers yet: the reprovide loop tries again
            log.info("announce of %s failed: %s", sh.manifest.model, e)

    async def _reprovide_loop(self) -> None:
        while True:
            await trio.sleep(REPROVIDE_INTERVAL)
            for sh in list(self.shared.values()):
                sh.announced_manifest = False
                sh.announced_model = False
                await self._announce(sh, model=sh.complete)

    # ------------------------------------------------------------------ protocol handlers

    def _answer_manifests(self, req: wire.ManifestRequest) -> list[tuple[bytes, bytes]]:
        out = []
        for h, sh in self.shared.items():
            m = sh.manifest
            if m.model != req.model:
                continue
            if req.manifest_hash and req.manifest_hash != h:
                continue
            if req.revision and req.revision != m.revision:
                continue
            if not (sh.complete or req.manifest_hash):
                continue  # partial copies are found by hash, not by name
            out.append((m.encode(), sh.signature))
        return out[: wire.MAX_MANIFESTS_PER_REPLY]

    async def _on_pieces_link(self, link: Any, hello: wire.Hello) -> None:
        sh = self.shared.get(hello.manifest_hash)
        if sh is None:
            try:
                await link.send(wire.Error("unknown manifest"))
            finally:
                await link.aclose()
            return
        await sh.transfer.serve_link(link, hello)

    # ------------------------------------------------------------------ fetching

    async def fetch(self, req: FetchRequest, *, manifest_hash: bytes | None = None,
                    on_event: Callable[[dict], None] | None = None) -> Path:
        """Fetch through the swarm into the store; returns the snapshot directory.

        Raises ModelNotFound when no provider or no acceptable manifest is found,
        VerificationFailed when the download cannot be finished from honest peers."""
        emit = on_event or (lambda e: None)
        manifest, signature, providers = await self._resolve(req, manifest_hash)
        emit({"event": "manifest", "model": manifest.model, "revision": manifest.revision,
              "manifest": manifest.hash_str, "files": len(manifest.files),
              "bytes": manifest.total_size, "providers": len(providers)})
        files = manifest.select(configs_only=req.configs_only,
                                allow_patterns=req.allow_patterns,
                                ignore_patterns=req.ignore_patterns)
        if not files:
            raise ModelNotFound(f"{req.repo_id}: no files match the requested patterns", ())
        h = manifest.manifest_hash
        # One fetch per manifest at a time: a concurrent fetch of the same manifest waits here and
        # then finds the files complete (one download), or fetches only what is still missing.
        lock = self._fetch_locks.setdefault(h, trio.Lock())
        async with lock:
            existing = self.shared.get(h)
            if existing is not None:
                await existing.ready.wait()
                if existing.error:
                    raise VerificationFailed(existing.error, ())
                assert existing.path is not None
                if all((existing.path / manifest.files[i].path).exists() for i in files):
                    return existing.path
                # More files of a manifest we already trade (configs first, then weights): the new
                # transfer replaces this one, whose links must close first or our peers refuse the
                # new links as duplicates.
                await existing.transfer.close_links()
            return await self._download(manifest, signature, frozenset(files), providers,
                                        ref=self._ref_for(req), emit=emit)

    @staticmethod
    def _ref_for(req: FetchRequest) -> str | None:
        rev = req.revision
        if rev is None:
            return "main"
        if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
            return None  # a commit: no ref to move
        return rev

    async def _resolve(self, req: FetchRequest, manifest_hash: bytes | None
                       ) -> tuple[Manifest, bytes, list[PeerAddr]]:
        """Find providers and agree on one manifest."""
        key = manifest_key(manifest_hash) if manifest_hash else model_key(req.repo_id)
        deadline = trio.current_time() + self.config.lookup_timeout
        providers: list[PeerAddr] = []
        while True:
            try:
                providers = await self.host.find_providers(
                    key, timeout=max(0.5, deadline - trio.current_time()))
            except NetError as e:
                log.info("DHT lookup failed: %s", e)
            if providers or trio.current_time() >= deadline:
                break
            await trio.sleep(min(LOOKUP_RETRY, max(0.0, deadline - trio.current_time())))
        if not providers:
            what = f"manifest {manifest_hash.hex()[:16]}" if manifest_hash else req.repo_id
            raise ModelNotFound(f"no providers for {what} in the DHT "
                                f"(looked for {self.config.lookup_timeout:.0f} s)", ())
        request = wire.ManifestRequest(req.repo_id, req.revision or "", manifest_hash or b"")
        votes: Counter[bytes] = Counter()
        manifests: dict[bytes, Manifest] = {}
        holders: dict[bytes, list[PeerAddr]] = {}
        signatures: dict[bytes, bytes] = {}
        reasons: list[str] = []

        async def ask(p: PeerAddr) -> None:
            try:
                replies = await self.host.fetch_manifests(p, request, timeout=5.0)
            except Exception as e:
                reasons.append(f"{p.peer_id[:12]}: {e}")
                return
            for r in replies:
                try:
                    m = Manifest.decode(r.manifest)
                except ManifestError as e:
                    reasons.append(f"{p.peer_id[:12]} sent a bad manifest: {e}")
                    continue
                if not self._acceptable(m, req, manifest_hash):
                    reasons.append(f"{p.peer_id[:12]} sent a manifest for {m.model}@{m.revision}")
                    continue
                h = m.manifest_hash
                try:
                    publisher = self.config.trust.check(h, r.signature)
                except TrustError as e:
                    reasons.append(f"{p.peer_id[:12]}: manifest {m.hash_str[:20]} refused: {e}")
                    continue
                if publisher is not None or h not in signatures:
                    signatures[h] = r.signature if publisher is not None else b""
                manifests[h] = m
                votes[h] += 1
                holders.setdefault(h, []).append(p)

        self.rng.shuffle(providers)
        async with trio.open_nursery() as n:
            for p in providers[:MANIFEST_ASK_FANOUT]:
                n.start_soon(ask, p)
        if not votes:
            raise ModelNotFound(f"{len(providers)} providers of {req.repo_id} found, none gave a "
                                f"usable manifest: {'; '.join(reasons[:4])}", ())
        best, count = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
        log_ = log.warning if len(votes) > 1 else log.info
        log_("%s: taking manifest %s (revision %s), announced by %d of %d providers asked; "
             "%d distinct manifests offered", req.repo_id, manifests[best].hash_str[:20],
             manifests[best].revision, count, min(len(providers), MANIFEST_ASK_FANOUT), len(votes))
        return (manifests[best], signatures.get(best, b""),
                holders[best] + [p for p in providers if p not in holders[best]])

    @staticmethod
    def _acceptable(m: Manifest, req: FetchRequest, manifest_hash: bytes | None) -> bool:
        if manifest_hash is not None:
            return m.manifest_hash == manifest_hash
        if m.model != req.repo_id:
            return False
        return not req.revision or m.revision == req.revision

    async def _download(self, manifest: Manifest, signature: bytes, files: frozenset[int],
                        providers: list[PeerAddr], *, ref: str | None,
                        emit: Callable[[dict], None]) -> Path:
        dl: Download = await trio.to_thread.run_sync(
            lambda: self.store.open_download(manifest, files))
        h = manifest.manifest_hash
        t = self._new_transfer(manifest, dl, wanted_files=files)
        sh = Shared(manifest, t, dl, signature=signature)
        self.shared[h] = sh
        total = t.wanted_bytes
        progress = {"have": t.have_bytes}

        def on_piece(index: int, length: int) -> None:
            progress["have"] += length
            emit({"event": "progress", "have": progress["have"], "total": total})

        t.on_piece = on_piece
        path: Path | None = None
        try:
            async with trio.open_nursery() as n:
                n.start_soon(t.run)
                n.start_soon(self._connect_loop, sh, providers)
                # Announce under the manifest key at once, before holding anything: fetchers of a
                # flash crowd find each other while the first pieces are still in flight, so they
                # trade from the start instead of all pulling from the workers (measured: announcing
                # after the first piece left the worker uploading 4x the model to 4 frontends).
                n.start_soon(partial(self._announce, sh, model=False))
                n.start_soon(_raise_on_failure, t)
                n.start_soon(self._watch_stall, t)
                await t.configs_ready.wait()
                emit({"event": "configs_ready"})
                await t.completed.wait()
                path = await trio.to_thread.run_sync(dl.finalize, ref)
                n.cancel_scope.cancel()
        except BaseException as e:
            e = _single(e)
            # Not finalized: the transfer failed or was cancelled, or every piece is in but
            # finalize failed (disk full while linking the snapshot or writing the ref). Checking
            # ``t.completed`` here left that last case holding the download lock with ``ready``
            # never set, so every later fetch of the manifest waited forever.
            if path is None:
                self.shared.pop(h, None)
                sh.error = f"{manifest.model}: download did not finish: {e!r}"
                sh.ready.set()
                with trio.CancelScope(shield=True):
                    await t.close_links()
                    await trio.to_thread.run_sync(dl.close)
            raise e from None
        # Complete: serve from the snapshot, release the download lock, keep seeding.
        reader = SnapshotReader(path, manifest)
        t.store = reader
        sh.source = reader
        sh.path = path
        await trio.to_thread.run_sync(self._keep_signature, h, signature)
        await trio.to_thread.run_sync(dl.close)
        sh.ready.set()
        self._start(t)  # timers of the seeding transfer now live with the node
        # In the background: ADD_PROVIDER waits for every closest peer, up to PROVIDE_TIMEOUT (30 s)
        # when one has vanished, and the caller has its files now (namespace testbed: 20-35 s).
        assert self._nursery is not None
        self._nursery.start_soon(partial(self._announce, sh, model=True))
        emit({"event": "done", "path": str(path)})
        return path

    async def _watch_stall(self, t: Transfer) -> None:
        """Fail a download that cannot go on (see ``NodeConfig.stall_timeout``). Without this, a
        fetch whose providers all sent bad pieces (and were banned), all vanished or all stopped
        answering waited forever, and the fallback chain never got to try the Hub."""
        limit = self.config.stall_timeout
        if limit is None:
            return
        have, since = len(t.have), trio.current_time()
        while True:
            await trio.sleep(min(1.0, limit / 4))
            now = trio.current_time()
            able = [p for p in t.peers.values()
                    if p.timeouts < t.config.max_timeouts and t.picker.interesting(p.have)]
            if len(t.have) != have or able or t._handshakes:
                have, since = len(t.have), now
                continue
            if now - since < limit:
                continue
            what = (f"{t.manifest.model}: no verified piece for {now - since:.0f} s and no peer "
                    f"left that can send one")
            if t.banned:
                ids = ", ".join(sorted(pid[:16] for pid in t.banned))
                raise VerificationFailed(f"{what}; {len(t.banned)} peer(s) banned for sending bad "
                                         f"data: {ids}", ())
            silent = sum(1 for p in t.peers.values() if t.picker.interesting(p.have))
            raise FetchError(f"{what} ({silent} linked peer(s) with missing pieces stopped "
                             f"answering; the others are gone)" if silent else
                             f"{what} (every provider of the missing pieces is gone)")

    async def _connect_loop(self, sh: Shared, providers: list[PeerAddr]) -> None:
        """Open links to providers until the transfer is complete, looking up more as needed."""
        t = sh.transfer
        tried: set[str] = set()
        key = manifest_key(sh.manifest.manifest_hash)
        pending = list(providers)
        lookups = 0
        while not t.completed.is_set():
            for p in pending:
                if p.peer_id in tried or p.peer_id == self.peer_id or p.peer_id in t.banned:
                    continue
                # Links to peers with nothing we lack (finished or empty) don't count, so a late
                # fetcher keeps looking for the fetchers it can trade with.
                if t.useful_links >= MAX_LINKS_PER_FETCH or len(t.peers) >= t.config.max_peers:
                    break
                tried.add(p.peer_id)
                # Links outlive the fetch (we seed over them), so they belong to the node.
                assert self._nursery is not None
                self._nursery.start_soon(self._link_to, t, p)
            # Look again soon at the start (fellow fetchers announce as they begin), then less often.
            lookups += 1
            delay = (LOOKUP_FIRST if lookups <= 4 else LOOKUP_RETRY if len(t.peers) < 4
                     else 5 * LOOKUP_RETRY)
            with trio.move_on_after(delay):
                await t.completed.wait()
            if t.completed.is_set():
                break
            try:
                pending = await self.host.find_providers(key, timeout=2.0)
            except Exception as e:
                log.debug("re-lookup failed: %s", e)
                pending = []
            # A peer we lost may be back (or was only busy): retry once the list has none new.
            if all(p.peer_id in tried for p in pending):
                tried -= {pid for pid in tried if pid not in t.peers}

    async def _link_to(self, t: Transfer, p: PeerAddr) -> None:
        link: Any = None
        if self.lane is not None:  # the data lane first; a libp2p pieces stream if it fails
            try:
                link = await self.lane.dial(lambda: self.host.open_lane_stream(p))
            except LaneUnavailable as e:
                log.info("no data lane to %s (%s): using a libp2p stream", p.peer_id[:12], e)
        if link is None:
            try:
                link = await self.host.open_pieces_link(p)
            except Exception as e:
                log.info("cannot open pieces link to %s: %s", p.peer_id[:12], e)
                return
        await t.serve_link(link)

    async def serve_snapshot(self, model: str, snapshot: Path) -> Manifest:
        """Seed a snapshot that arrived by another route (ModelExpress, the Hub)."""
        snapshot = Path(snapshot)
        m = self.store.load_manifest(model, snapshot.name)
        if m is None:
            m = await trio.to_thread.run_sync(self._manifest_cache.get_or_build, model, snapshot,
                                              snapshot.name)
            self.store.save_manifest(m)
        await self._share_complete(m, snapshot)
        return m

    async def fetch_with_fallback(self, req: FetchRequest, *,
                                  on_event: Callable[[dict], None] | None = None,
                                  modelexpress_url: str | None = None) -> FetchResult:
        """The whole chain: local cache -> ModelExpress -> swarm -> Hub; seeds what it got."""
        kwargs = {} if modelexpress_url is None else {"modelexpress_url": modelexpress_url}
        result = await fetch_chain(
            req, swarm=lambda r: self.fetch(r, on_event=on_event), on_event=on_event, **kwargs)
        if result.source in ("modelexpress", "hub"):
            try:
                await self.serve_snapshot(req.repo_id, result.path)
            except Exception as e:  # the caller has its files; seeding is a bonus
                log.warning("cannot seed %s from %s: %s", req.repo_id, result.path, e)
        return result

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        up = sum(sh.transfer.bytes_up for sh in self.shared.values())
        down = sum(sh.transfer.bytes_down for sh in self.shared.values())
        models = []
        for sh in self.shared.values():
            t = sh.transfer
            models.append({
                "model": sh.manifest.model, "revision": sh.manifest.revision,
                "manifest": sh.manifest.hash_str, "complete": sh.complete,
                "path": str(sh.path) if sh.path else None,
                "bytes": t.wanted_bytes, "have_bytes": t.have_bytes,
                "bytes_up": t.bytes_up, "bytes_down": t.bytes_down,
                "wasted_bytes": t.wasted_bytes, "timeouts": t.timeouts,
                "peers": sorted(t.peers),
                "banned": sorted(t.banned),
            })
        return {"peer_id": self.peer_id, "addrs": self.host.addrs,
                "peers": self.host.connected_peers(), "models": models,
                "bytes_up": up, "bytes_down": down}


def _single(e: BaseException) -> BaseException:
    """The one real error inside nested trio exception groups (callers want the cause)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


async def _raise_on_failure(t: Transfer) -> None:
    await t.failed.wait()
    assert t.error is not None
    raise t.error


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:
        log.debug("close failed", exc_info=True)


class _ManifestCache:
    """Manifests of served directories, keyed by path and the (size, mtime) of every file, so a
    restarted node serves again without re-hashing unchanged files."""

    def __init__(self, root: Path):
        self.root = root

    def _entry(self, model: str, path: Path) -> Path:
        key = blake3.blake3(f"{model}\0{path}".encode()).hexdigest()[:32]
        return self.root / f"{key}.json"

    @staticmethod
    def _fingerprint(path: Path) -> list:
        out = []
        for dirpath, dirs, names in os.walk(path, followlinks=False):
            dirs.sort()
            for name in sorted(names):
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out.append([os.path.relpath(p, path), st.st_size, st.st_mtime_ns])
        return out

    def get_or_build(self, model: str, path: Path, revision: str | None) -> Manifest:
        entry = self._entry(model, path)
        fp = self._fingerprint(path)
        try:
            cached = json.loads(entry.read_text())
            if cached["fingerprint"] == fp and cached["revision_arg"] == revision:
                return Manifest.decode(bytes.fromhex(cached["manifest"]))
        except (OSError, ValueError, KeyError, ManifestError):
            pass
        m = build_manifest(path, model, revision or "local")
        if revision is None:
            # Private content: the revision is derived from the content, so the same files give
            # the same snapshot name on every machine.
            m = attrs.evolve(m, revision=blake3.blake3(m.encode()).hexdigest()[:40])
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "revision_arg": revision,
                                   "manifest": m.encode().hex()}))
        os.replace(tmp, entry)
        return m
