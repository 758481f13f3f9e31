"""The node: one libp2p host, one store, and a Transfer per manifest it trades.

A node serves what it holds (private directories, complete snapshots of the local HF cache, and
whatever it fetched) and fetches through the swarm: a DHT lookup by model name (or by manifest hash
when one is pinned), manifests from the providers, then pieces from many peers at once. It announces
itself under the manifest key as soon as it holds a verified piece (partial seeding) and under the
model key once complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import blake3
import trio

from swarm import cache_admin, wire
from swarm.config import format_rate
from swarm.confine import OutsideTree, confinement_for, stat_file
from swarm.discovery import (  # the limits stay importable from here
    LOOKUP_RETRY,
    MANIFEST_ASK_FANOUT,  # noqa: F401
    MANIFEST_STRAGGLER_GRACE,
    MANIFEST_VOTE_GRACE,
    MAX_LINKS_PER_FETCH,  # noqa: F401
    PROVIDER_FAILURE_MEMORY,  # noqa: F401
    ConnectPolicy,
    LinkState,
    ManifestAsk,
    ProviderScores,
)
from swarm.dynamo.card import manifest_mismatches
from swarm.engine import EngineConfig, Transfer
from swarm.hubpull import pull_snapshot
from swarm.manifest import Manifest, ManifestError, build_manifest, validate_model_name
from swarm.metrics import Metrics
from swarm.net.host import NetError, PeerAddr, SwarmHost, manifest_key, model_key
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import LANE_MODES, LaneService, LaneUnavailable, bind_host_of
from swarm.origin import OriginCoordinator
from swarm.ratelimit import Bandwidth, Limits
from swarm.sources import (
    FetchError,
    FetchRequest,
    FetchResult,
    ModelNotFound,
    SourceEnv,
    VerificationFailed,
    fetch_chain,
    hub_error,
)
from swarm.store import Download, SnapshotReader, Store, touch_access
from swarm.trust import (
    RELEASE_LIFETIME,
    Release,
    TrustError,
    TrustPolicy,
    next_seq,
    refuse_stale,
    sign_release,
    verify_release,
)

log = logging.getLogger(__name__)

MANIFEST_ASK_TIMEOUT = 5.0
"""Seconds one provider has to answer a manifest request (dial included)."""
DRAIN_POLL = 0.05
"""Seconds between checks of a draining node's pending uploads (a 4 MiB piece takes ~40 ms at
100 MB/s: finer polling would only burn the event loop)."""
REPROVIDE_INTERVAL = 3600.0
"""Provider records live 48 h in py-libp2p's DHT; re-announcing hourly keeps churned nodes found."""


@attrs.frozen
class NodeConfig:
    home: Path
    cache_dir: Path
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    serve: tuple[tuple[str, Path], ...] = ()
    serve_hf_cache: bool | None = None
    """Serve the complete snapshots of the local HF cache, and seed what comes from the Hub or
    ModelExpress (gated or private repos pulled with HF_TOKEN among them). None: only with a
    private swarm key (``psk``); without one anyone who reaches the port could fetch them by
    name. ``serve`` directories and what was fetched through the swarm are always served."""
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
    max_cache_size: int | None = None
    """Bytes the HF cache may hold: after each fetch and every ``cache_admin.GC_INTERVAL`` s,
    fetched snapshots neither served nor in use go, least recently used first (swarm/cache_admin.py).
    None: unbounded."""
    # Bandwidth limits in bytes/s (None: unlimited), shared by all transfers and both transports
    # (swarm/ratelimit.py); ``Node.set_limits`` changes them at run time.
    max_upload_rate: float | None = None
    max_download_rate: float | None = None
    max_peer_upload_rate: float | None = None


@attrs.define
class Shared:
    """One manifest this node trades."""

    manifest: Manifest
    transfer: Transfer
    source: Any  # Download while fetching, SnapshotReader once complete
    path: Path | None = None  # snapshot / served directory once complete
    signature: bytes = b""  # the release record we serve it with (b"": unsigned)
    origin: str = "fetched"  # "built" (we hashed it ourselves and sign it), "fetched", "unknown"
    announced_manifest: bool = False
    announced_model: bool = False
    ready: trio.Event = attrs.Factory(trio.Event)  # finalized (path set) or failed
    error: str = ""
    _encoded: bytes = b""

    @property
    def complete(self) -> bool:
        return self.path is not None

    @property
    def encoded_manifest(self) -> bytes:
        """The manifest's bytes, encoded once: every manifest reply shares them (a reply used to
        hold its own copy for as long as a slow reader took)."""
        if not self._encoded:
            self._encoded = self.manifest.encode()
        return self._encoded


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.home = Path(config.home)
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(config.cache_dir, direct_io=config.direct_io)
        self.keypair = key = load_or_create_identity(self.home / "identity.key")
        self.host = SwarmHost(
            key, listen=list(config.listen), bootstrap=list(config.bootstrap), psk=config.psk
        )
        self.shared: dict[bytes, Shared] = {}
        self.rng = random.Random()
        self._nursery: trio.Nursery | None = None
        self._manifest_cache = _ManifestCache(self.home / "manifests")
        self.metrics = Metrics(self)
        self._transfer_scopes: dict[int, trio.CancelScope] = {}  # see _run_transfer
        self._cache_lock = trio.Lock()  # one removal / eviction pass at a time
        self.bandwidth = Bandwidth(
            Limits(config.max_upload_rate, config.max_download_rate, config.max_peer_upload_rate)
        )
        self.draining = False  # set by drain(): no announcing, no new links or manifests
        self._provenance = _Provenance(self.home)
        self._fetch_locks: dict[bytes, trio.Lock] = {}
        self._scores = ProviderScores()  # providers that failed us lately (swarm.discovery)
        self.origin = OriginCoordinator(self.host, self.peer_id)
        self.lane: LaneService | None = None
        if config.lane != "off":
            self.lane = LaneService(
                config.lane,
                self.host.peer_id,
                bind_host=bind_host_of(config.listen),
                on_link=self._on_pieces_link,
                max_setups=config.engine.max_peers,
            )

    # ------------------------------------------------------------------ lifetime

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def serves_hf_cache(self) -> bool:
        """The HF cache (and Hub / ModelExpress downloads) is served: as configured, else only
        inside a private swarm."""
        on = self.config.serve_hf_cache
        return self.config.psk is not None if on is None else on

    def _exposure(self) -> dict:
        """What this node serves and to whom (the ``serving`` field of ``status``)."""
        private = self.config.psk is not None
        return {
            "private_swarm": private,
            "hf_cache": self.serves_hf_cache,
            "directories": [model for model, _ in self.config.serve],
            "to": "peers holding the swarm key" if private else "anyone who can connect",
        }

    def _log_exposure(self) -> None:
        addrs = ", ".join(self.host.addrs) or ", ".join(self.config.listen)
        e = self._exposure()
        if e["private_swarm"]:
            log.info(
                "private swarm (swarm key): serving %s to peers holding the key",
                "the HF cache, --serve directories and fetched models"
                if e["hf_cache"]
                else "--serve directories and models fetched through the swarm",
            )
        elif e["hf_cache"]:
            log.warning(
                "no swarm key and --serve-hf-cache: every complete snapshot of %s (gated "
                "or private ones too) is served to anyone who can reach %s",
                self.config.cache_dir,
                addrs,
            )
        else:
            log.info(
                "no swarm key: serving only --serve directories (%d) and models fetched "
                "through the swarm, to anyone who can reach %s; the HF cache and Hub "
                "downloads are not served (--serve-hf-cache, or a --psk, to change that)",
                len(e["directories"]),
                addrs,
            )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        async with self.host.run(), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.host.set_manifest_handler(self._answer_manifests)
            self.host.set_pieces_handler(self._on_pieces_link)
            self.origin.install()
            if self.lane is not None:
                await nursery.start(self.lane.run)
                self.host.set_lane_handler(self.lane.accept_stream)
            for model, path in self.config.serve:
                await self.serve_directory(model, Path(path))
            if self.serves_hf_cache:
                await self.serve_cache()
            self._log_exposure()
            nursery.start_soon(self._reprovide_loop)
            nursery.start_soon(self._cache_loop)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                for sh in self.shared.values():
                    _close_quietly(sh.source)

    # ------------------------------------------------------------------ serving

    async def serve_directory(
        self, model: str, path: Path, revision: str | None = None, *, keep: frozenset[str] = frozenset()
    ) -> Manifest:
        """Serve a private directory as ``model`` (a revision derived from its content unless
        given). Re-hashes only when a file's size or mtime changed since last time. ``keep``:
        files to carry that manifests skip by default (see ``build_manifest``)."""
        validate_model_name(model)
        path = Path(path).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"--serve {model}={path}: not a directory")
        manifest = await trio.to_thread.run_sync(
            self._manifest_cache.get_or_build, model, path, revision, frozenset(keep)
        )
        await self._share_complete(manifest, path, origin="built")
        return manifest

    async def serve_cache(self) -> list[Manifest]:
        """Serve every complete snapshot in the local HF cache (see ``_origin_of_snapshot`` for
        which ones we sign). Revisions that refs/main names come last, so when we first sign several
        revisions of a model, the one refs/main names gets the highest release seq."""
        out = []
        root = Path(self.config.cache_dir)
        if not root.is_dir():
            return out
        for repo in sorted(root.glob("models--*")):  # models--org--name and models--name
            model = repo.name[len("models--") :].replace("--", "/", 1)
            try:
                validate_model_name(model)
            except ManifestError:
                continue
            try:
                main = self.store.read_ref(model)
            except Exception:
                main = None
            for snap in sorted((repo / "snapshots").glob("*"), key=lambda p: (p.name == main, p)):
                try:
                    m = self.store.load_manifest(model, snap.name)
                    if m is None:
                        if self.store.find_complete(model, snap.name) is None:
                            continue
                        m = await trio.to_thread.run_sync(
                            self._manifest_cache.get_or_build, model, snap, snap.name
                        )
                    elif self.store.find_complete(model, snap.name) is None:
                        continue
                    await self._share_complete(m, snap, origin=self._origin_of_snapshot(m))
                    out.append(m)
                except Exception as e:  # one broken snapshot must not stop the node
                    log.warning("not serving %s: %s", snap, e)
        return out

    def _origin_of_snapshot(self, manifest: Manifest) -> str:
        """ "built" for an HF cache snapshot swarm did not make (the Hub client's, or one the chain
        got from the Hub or ModelExpress): this node hashed it itself from a source it was set up
        to trust, so it publishes it under its own key. "unknown" for a snapshot directory a swarm
        download created (``Store.snapshot_owner``) that this node has no provenance record of
        (another node sharing the cache fetched it, or the record was lost): served unsigned,
        never signed by us, whatever its content."""
        owner = self.store.snapshot_owner(manifest.model, manifest.revision)
        return "built" if owner is None else "unknown"

    def _release_for(self, manifest: Manifest, origin: str) -> tuple[str, bytes]:
        """(origin, release record) to serve ``manifest`` with. Only a manifest this node built
        itself is signed with our key (a new release seq the first time, re-signed with the same
        seq once half its lifetime is gone). A fetched manifest keeps the provenance recorded when
        it was fetched -- the publisher's record, or none -- for good: we never sign it, even
        after a restart. A manifest of unknown origin is served unsigned."""
        h = manifest.manifest_hash
        kept = self._provenance.get(h)
        if kept is not None and kept[0] != "built":
            return kept
        if kept is None and origin != "built":
            return origin, b""
        now = time.time()
        try:
            mine: Release | None = verify_release(kept[1], h) if kept else None
        except TrustError:
            mine = None
        if mine is not None and mine.publisher == self.peer_id:
            if mine.expires - now > RELEASE_LIFETIME / 2:
                return "built", mine.blob
            seq = mine.seq
        else:
            seq = self._provenance.next_seq(manifest.model)
        blob = sign_release(self.keypair, h, seq, int(now) + RELEASE_LIFETIME)
        self._provenance.put(h, "built", blob)
        return "built", blob

    def _note_release(self, manifest: Manifest, blob: bytes) -> None:
        """Keep the newest valid record of a fetched manifest (a publisher re-signs before its
        records expire; relays pick the fresh one up when they see it)."""
        h = manifest.manifest_hash
        kept = self._provenance.get(h)
        if kept is None or kept[0] != "fetched" or not blob:
            return
        try:
            new = verify_release(blob, h)
            if kept[1] and verify_release(kept[1], h).rank() >= new.rank():
                return
        except TrustError:
            return
        self._provenance.put(h, "fetched", blob)
        sh = self.shared.get(h)
        if sh is not None:
            sh.signature = blob

    async def _share_complete(
        self, manifest: Manifest, path: Path, *, origin: str, announce_later: bool = False
    ) -> Shared:
        h = manifest.manifest_hash
        if h in self.shared:
            return self.shared[h]
        origin, signature = await trio.to_thread.run_sync(self._release_for, manifest, origin)
        reader = SnapshotReader(path, manifest)
        t = self._new_transfer(manifest, reader)
        sh = Shared(manifest, t, reader, path=path, signature=signature, origin=origin)
        sh.ready.set()
        self.shared[h] = sh
        self._start(t)
        if announce_later:  # ADD_PROVIDER to a dead DHT peer can hold a provide for seconds
            assert self._nursery is not None
            self._nursery.start_soon(partial(self._announce, sh, model=True))
        else:
            await self._announce(sh, model=True)
        return sh

    def _new_transfer(self, manifest: Manifest, store: Any, wanted_files=None) -> Transfer:
        return Transfer(
            manifest,
            store,
            wanted_files=wanted_files,
            config=self.config.engine,
            rng=random.Random(self.rng.getrandbits(64)),
            local_id=self.peer_id,
            bandwidth=self.bandwidth,
        )

    def _start(self, t: Transfer) -> None:
        assert self._nursery is not None, "node is not running"
        self._nursery.start_soon(self._run_transfer, t)

    async def _run_transfer(self, t: Transfer) -> None:
        """``t``'s timers, until the node stops or the snapshot is removed (``_stop_sharing``)."""
        with trio.CancelScope() as scope:
            self._transfer_scopes[id(t)] = scope
            try:
                await t.run()
            finally:
                self._transfer_scopes.pop(id(t), None)

    async def _announce(self, sh: Shared, *, model: bool) -> None:
        if self.draining:
            return
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
                if sh.origin == "built":  # re-sign our releases before they expire
                    _o, sh.signature = await trio.to_thread.run_sync(self._release_for, sh.manifest, "built")
                sh.announced_manifest = False
                sh.announced_model = False
                await self._announce(sh, model=sh.complete)

    async def drain(self, timeout: float) -> None:
        """Get ready to stop (SIGTERM): stop announcing first (our own provider records go, so
        our DHT node no longer names us; records other nodes hold expire on their own), refuse
        new links and manifest requests, reject new piece requests, then give the pieces peers
        already asked of us up to ``timeout`` seconds to go out."""
        self.draining = True
        for sh in list(self.shared.values()):
            for key in (manifest_key(sh.manifest.manifest_hash), model_key(sh.manifest.model)):
                with contextlib.suppress(Exception):
                    self.host.stop_providing(key)
            sh.transfer.stop_uploading()
        pending = sum(sh.transfer.uploads_pending for sh in self.shared.values())
        started = trio.current_time()
        with trio.move_on_after(timeout):
            while any(sh.transfer.uploads_pending for sh in list(self.shared.values())):
                await trio.sleep(DRAIN_POLL)
        left = sum(sh.transfer.uploads_pending for sh in self.shared.values())
        log.info(
            "drained in %.2f s: %d piece(s) were pending, %d left unsent",
            trio.current_time() - started,
            pending,
            left,
        )

    # ------------------------------------------------------------------ protocol handlers

    def _answer_manifests(self, req: wire.ManifestRequest) -> list[tuple[bytes, bytes]]:
        if self.draining:  # about to stop: fetchers should pick providers that stay
            return []
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
            out.append((sh.encoded_manifest, sh.signature))
        return out[: wire.MAX_MANIFESTS_PER_REPLY]

    async def _on_pieces_link(self, link: Any, hello: wire.Hello) -> None:
        sh = self.shared.get(hello.manifest_hash)
        if sh is None or self.draining:
            try:
                await link.send(wire.Error("shutting down" if self.draining else "unknown manifest"))
            finally:
                await link.aclose()
            return
        await sh.transfer.serve_link(link, hello, address=_remote_host(link))

    # ------------------------------------------------------------------ fetching

    async def fetch(
        self,
        req: FetchRequest,
        *,
        manifest_hash: bytes | None = None,
        on_event: Callable[[dict], None] | None = None,
        hint: tuple[str, ...] = (),
    ) -> Path:
        """Fetch through the swarm into the store; returns the snapshot directory. ``hint``:
        peer ids known to hold it (an origin puller that just seeded it), asked along with the
        providers the DHT names, so a record still on its way does not fail the fetch.

        Raises ModelNotFound when no provider or no acceptable manifest is found,
        VerificationFailed when the download cannot be finished from honest peers."""
        emit = on_event or (lambda e: None)
        manifest, signature, providers = await self._resolve(req, manifest_hash, hint)
        await trio.to_thread.run_sync(self._note_release, manifest, signature)
        emit(
            {
                "event": "manifest",
                "model": manifest.model,
                "revision": manifest.revision,
                "manifest": manifest.hash_str,
                "files": len(manifest.files),
                "bytes": manifest.total_size,
                "providers": len(providers),
            }
        )
        files = manifest.select(
            configs_only=req.configs_only,
            allow_patterns=req.allow_patterns,
            ignore_patterns=req.ignore_patterns,
        )
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
            return await self._download(
                manifest, signature, frozenset(files), providers, ref=self._ref_for(req), emit=emit
            )

    @staticmethod
    def _ref_for(req: FetchRequest) -> str | None:
        rev = req.revision
        if rev is None:
            return "main"
        if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
            return None  # a commit: no ref to move
        return rev

    async def _find_providers(self, key: bytes, kind: str, *, timeout: float) -> list[PeerAddr]:
        """``host.find_providers``, timed into the DHT lookup histogram (``kind``: the key's)."""
        started = trio.current_time()
        try:
            return await self.host.find_providers(key, timeout=timeout)
        finally:
            self.metrics.dht_lookup.labels(kind).observe(trio.current_time() - started)

    async def _resolve(
        self, req: FetchRequest, manifest_hash: bytes | None, hint: tuple[str, ...] = ()
    ) -> tuple[Manifest, bytes, list[PeerAddr]]:
        """Find providers and agree on one manifest."""
        key = manifest_key(manifest_hash) if manifest_hash else model_key(req.repo_id)
        deadline = trio.current_time() + self.config.lookup_timeout
        providers: list[PeerAddr] = []
        while True:
            try:
                providers = await self._find_providers(
                    key,
                    "manifest" if manifest_hash else "model",
                    timeout=max(0.5, deadline - trio.current_time()),
                )
            except NetError as e:
                log.info("DHT lookup failed: %s", e)
            providers += [PeerAddr(pid) for pid in hint if pid not in {p.peer_id for p in providers}]
            if providers or trio.current_time() >= deadline:
                break
            await trio.sleep(min(LOOKUP_RETRY, max(0.0, deadline - trio.current_time())))
        if not providers:
            what = f"manifest {manifest_hash.hex()[:16]}" if manifest_hash else req.repo_id
            raise ModelNotFound(
                f"no providers for {what} in the DHT (looked for {self.config.lookup_timeout:.0f} s)", ()
            )
        request = wire.ManifestRequest(req.repo_id, req.revision or "", manifest_hash or b"")
        votes: Counter[bytes] = Counter()
        manifests: dict[bytes, Manifest] = {}
        holders: dict[bytes, list[PeerAddr]] = {}
        releases: dict[bytes, Release] = {}  # the newest valid record offered for each manifest
        reasons: list[str] = []

        async def ask(p: PeerAddr) -> None:
            try:
                replies = await self._fetch_manifests_from(p, request)
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
                    release = self.config.trust.check(h, r.signature, fresh=manifest_hash is None)
                except TrustError as e:
                    reasons.append(f"{p.peer_id[:12]}: manifest {m.hash_str[:20]} refused: {e}")
                    continue
                if release is not None and (h not in releases or release.rank() > releases[h].rank()):
                    releases[h] = release
                manifests[h] = m
                votes[h] += 1
                holders.setdefault(h, []).append(p)

        providers = self._order_providers(providers)
        # A manifest pinned by hash is as good from one provider as from eight; by name, the
        # answers of the others count (votes; under trusted-publishers, the newest release).
        asked = await self._ask_in_turn(
            providers,
            ask,
            settled=lambda: bool(votes),
            grace=MANIFEST_STRAGGLER_GRACE if manifest_hash is not None else MANIFEST_VOTE_GRACE,
        )
        if not votes:
            raise ModelNotFound(
                f"{len(providers)} providers of {req.repo_id} found, none gave a "
                f"usable manifest: {'; '.join(reasons[:4])}",
                (),
            )
        # (in a thread: the rollback floors are read and durably raised on disk)
        best = await trio.to_thread.run_sync(self._choose, req, manifest_hash, votes, manifests, releases)
        count = votes[best]
        log_ = log.warning if len(votes) > 1 else log.info
        log_(
            "%s: taking manifest %s (revision %s), announced by %d of %d providers asked; "
            "%d distinct manifests offered",
            req.repo_id,
            manifests[best].hash_str[:20],
            manifests[best].revision,
            count,
            asked,
            len(votes),
        )
        return (
            manifests[best],
            releases[best].blob if best in releases else b"",
            holders[best] + [p for p in providers if p not in holders[best]],
        )

    # ------------------------------------------------------------------ provider order and scores

    def _order_providers(self, providers: list[PeerAddr]) -> list[PeerAddr]:
        """The order to try providers in (``ProviderScores.order``): those that failed us lately
        last, peers we are connected to first, otherwise the lookup's order shuffled in groups."""
        return self._scores.order(
            providers, time.monotonic(), connected=set(self.host.connected_peers()), rng=self.rng
        )

    def _failed_recently(self, peer_id: str) -> bool:
        return self._scores.failed_recently(peer_id, time.monotonic())

    def _note_failed(self, peer_id: str) -> None:
        self._scores.note_failed(peer_id, time.monotonic())

    async def _fetch_manifests_from(
        self, p: PeerAddr, request: wire.ManifestRequest
    ) -> list[wire.ManifestReply]:
        """``host.fetch_manifests``, remembering whether the provider answered."""
        try:
            replies = await self.host.fetch_manifests(p, request, timeout=MANIFEST_ASK_TIMEOUT)
        except Exception:
            self._note_failed(p.peer_id)
            raise
        self._scores.note_answered(p.peer_id)
        return replies

    async def _ask_in_turn(
        self,
        providers: list[PeerAddr],
        ask: Callable[[PeerAddr], Any],
        *,
        settled: Callable[[], bool],
        grace: float,
    ) -> int:
        """Run ``ask`` on providers as ``ManifestAsk`` decides (MANIFEST_ASK_FANOUT at a time,
        each end making room for the next until a usable manifest is in (``settled()``), those
        that failed us lately last, stragglers cut ``grace`` seconds after); returns how many
        were asked. Stragglers cut off are remembered as failed."""
        plan = ManifestAsk(providers, stale=self._failed_recently, grace=grace)
        finished_send, finished = trio.open_memory_channel[str](math.inf)

        async def one(p: PeerAddr) -> None:
            try:
                await ask(p)
            finally:
                finished_send.send_nowait(p.peer_id)

        async with trio.open_nursery() as n:
            for p in plan.start(settled()):
                n.start_soon(one, p)
            while not plan.over(trio.current_time()):
                with trio.move_on_at(plan.cutoff):
                    pid = await finished.receive()
                    for p in plan.finished(pid, trio.current_time(), settled()):
                        n.start_soon(one, p)
            for pid in plan.out:
                log.info("manifest request to %s cut off after the grace period", pid[:12])
                self._note_failed(pid)
            n.cancel_scope.cancel()
        return plan.asked

    def _choose(
        self,
        req: FetchRequest,
        pinned: bytes | None,
        votes: Counter[bytes],
        manifests: dict[bytes, Manifest],
        releases: dict[bytes, Release],
    ) -> bytes:
        """The manifest to fetch among those offered (all acceptable under the policy).

        ``trusted-publishers``, fetch by name: the release with the highest seq; with no revision
        asked (the latest), never one older than the highest seq this node has seen from its
        publisher for the model (persisted), so an old signed release relayed later cannot roll
        the node back. Then the most votes; a tie goes to the manifest we already hold complete,
        else to the only signed one; otherwise no manifest is taken: ModelNotFound naming them,
        so the chain goes on to the Hub. (The tie went to the larger hash, which a liar grinds
        in a few tries to win one-against-one.)"""
        cands = list(votes)
        if pinned is not None or (len(cands) == 1 and self.config.trust.mode == "open"):
            return cands[0]
        model = req.repo_id
        if self.config.trust.mode == "trusted-publishers":
            if not req.revision:
                fresh, stale = [], []
                for h in cands:
                    r = releases[h]
                    try:
                        refuse_stale(r, self._provenance.floor(r.publisher, model))
                    except TrustError as e:
                        stale.append(f"manifest {manifests[h].hash_str[:20]}: {e}")
                        continue
                    fresh.append(h)
                if not fresh:
                    raise ModelNotFound(
                        f"{req.repo_id}: every release offered is older than one "
                        f"seen before: {'; '.join(stale[:4])}",
                        (),
                    )
                self._provenance.raise_floors(model, releases.values())
                cands = fresh
            top = max(releases[h].seq for h in cands)
            cands = [h for h in cands if releases[h].seq == top]
        most = max(votes[h] for h in cands)
        cands = [h for h in cands if votes[h] == most]
        for prefer in (lambda h: self._holds_complete(manifests[h]), lambda h: h in releases):
            if len(cands) > 1:
                cands = [h for h in cands if prefer(h)] or cands
        if len(cands) > 1:
            offered = ", ".join(
                f"{manifests[h].hash_str[:20]} (revision {manifests[h].revision})" for h in sorted(cands)
            )
            raise ModelNotFound(
                f"{req.repo_id}: no majority among the manifests offered: "
                f"{offered}, each announced by {most} provider(s); taking none",
                (),
            )
        return cands[0]

    def _holds_complete(self, m: Manifest) -> bool:
        """Whether ``m`` is complete here: shared, or a finished snapshot of it in the store."""
        sh = self.shared.get(m.manifest_hash)
        if sh is not None:
            return sh.complete
        try:
            stored = self.store.load_manifest(m.model, m.revision)
            return (
                stored is not None
                and stored.manifest_hash == m.manifest_hash
                and self.store.find_complete(m.model, m.revision) is not None
            )
        except Exception as e:  # a tie-break only: an unreadable store just does not count
            log.debug("cannot check the store for %s: %s", m.hash_str[:20], e)
            return False

    @staticmethod
    def _acceptable(m: Manifest, req: FetchRequest, manifest_hash: bytes | None) -> bool:
        if req.expect and manifest_mismatches(m, req.expect):
            return False  # e.g. another version than the Dynamo card asks for (a rolling update)
        if manifest_hash is not None:
            return m.manifest_hash == manifest_hash
        if m.model != req.repo_id:
            return False
        return not req.revision or m.revision == req.revision

    async def _download(
        self,
        manifest: Manifest,
        signature: bytes,
        files: frozenset[int],
        providers: list[PeerAddr],
        *,
        ref: str | None,
        emit: Callable[[dict], None],
    ) -> Path:
        dl: Download = await trio.to_thread.run_sync(lambda: self.store.open_download(manifest, files))
        h = manifest.manifest_hash
        # Provenance first, durably: whatever lands in the store for this manifest came from
        # peers, and a restart must serve it with this record (or unsigned), never sign it.
        kept = await trio.to_thread.run_sync(self._provenance.get, h)
        if kept is None:
            await trio.to_thread.run_sync(self._provenance.put, h, "fetched", signature)
        else:
            signature = kept[1]
        t = self._new_transfer(manifest, dl, wanted_files=files)
        sh = Shared(manifest, t, dl, signature=signature, origin=kept[0] if kept else "fetched")
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
                started = trio.current_time()
                await t.configs_ready.wait()
                self.metrics.configs_time.observe(trio.current_time() - started)
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
                self.metrics.retire(t)
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
            # A peer that keeps us choked for ``choked_timeout`` is no source (finding 9 of the
            # security review: counted as one, a provider that never unchoked stalled forever).
            able = t.able_peers()
            if len(t.have) != have or able or t._handshakes:
                have, since = len(t.have), now
                continue
            if now - since < limit:
                continue
            what = (
                f"{t.manifest.model}: no verified piece for {now - since:.0f} s and no peer "
                f"left that can send one"
            )
            if t.banned:
                ids = ", ".join(sorted(pid[:16] for pid in t.banned))
                raise VerificationFailed(
                    f"{what}; {len(t.banned)} peer(s) banned for sending bad data: {ids}", ()
                )
            silent = sum(1 for p in t.peers.values() if t.picker.interesting(p.have) and not p.peer_choking)
            choking = len(t.choked_out) + sum(
                1
                for p in t.peers.values()
                if p.peer_choking and p.id not in t.choked_out and t.picker.interesting(p.have)
            )
            why = []
            if silent:
                why.append(f"{silent} linked peer(s) with missing pieces stopped answering")
            if choking:
                why.append(
                    f"{choking} peer(s) with missing pieces kept us choked "
                    f"(over {t.config.choked_timeout:.0f} s)"
                )
            raise FetchError(
                f"{what} ({'; '.join(why)}; the others are gone)"
                if why
                else f"{what} (every provider of the missing pieces is gone)"
            )

    async def _connect_loop(self, sh: Shared, providers: list[PeerAddr]) -> None:
        """Open links to providers until the transfer is complete, looking up more as needed
        (whom to dial and when to look up: ``ConnectPolicy``)."""
        t = sh.transfer
        policy: ConnectPolicy[PeerAddr] = ConnectPolicy(self.peer_id)
        key = manifest_key(sh.manifest.manifest_hash)
        pending = list(providers)
        while not t.completed.is_set():
            step = policy.step(trio.current_time(), self._order_providers(pending), LinkState.of(t))
            for p in step.dials:
                # Links outlive the fetch (we seed over them), so they belong to the node.
                assert self._nursery is not None
                self._nursery.start_soon(self._link_to, t, p)
            with trio.move_on_at(step.next_lookup_at):
                await t.completed.wait()
            if t.completed.is_set():
                break
            try:
                pending = await self._find_providers(key, "manifest", timeout=2.0)
            except Exception as e:
                log.debug("re-lookup failed: %s", e)
                pending = []

    async def _link_to(self, t: Transfer, p: PeerAddr) -> None:
        link: Any = None
        if self.lane is not None:  # the data lane first; a libp2p pieces stream if it fails
            try:
                link = await self.lane.dial(lambda: self.host.open_lane_stream(p))
            except LaneUnavailable as e:
                self.metrics.lane_fallbacks.inc()
                log.info(
                    "no data lane to %s (%s): using a libp2p stream",
                    p.peer_id[:12],
                    e,
                    extra={"event": "lane_fallback", "peer": p.peer_id, "reason": str(e)},
                )
        if link is None:
            try:
                link = await self.host.open_pieces_link(p)
            except Exception as e:
                log.info("cannot open pieces link to %s: %s", p.peer_id[:12], e)
                self._note_failed(p.peer_id)
                return
        await t.serve_link(link)

    async def serve_snapshot(self, model: str, snapshot: Path, *, announce_later: bool = False) -> Manifest:
        """Seed a snapshot that arrived by another route (ModelExpress, the Hub). With
        ``announce_later`` it returns once peers can ask for it, before the DHT has the record."""
        snapshot = Path(snapshot)
        m = self.store.load_manifest(model, snapshot.name)
        if m is None:
            m = await trio.to_thread.run_sync(
                self._manifest_cache.get_or_build, model, snapshot, snapshot.name
            )
            self.store.save_manifest(m)
        await self._share_complete(
            m, snapshot, origin=self._origin_of_snapshot(m), announce_later=announce_later
        )
        return m

    async def fetch_with_fallback(
        self,
        req: FetchRequest,
        *,
        on_event: Callable[[dict], None] | None = None,
        modelexpress_url: str | None = None,
    ) -> FetchResult:
        """The whole chain: local cache -> ModelExpress -> swarm -> Hub; seeds what it got."""
        kwargs = {} if modelexpress_url is None else {"modelexpress_url": modelexpress_url}
        started = trio.current_time()
        log.info(
            "fetch of %s@%s started",
            req.repo_id,
            req.ref,
            extra={"event": "fetch_start", "model": req.repo_id, "revision": req.ref},
        )

        async def via_swarm(r: FetchRequest) -> Path:
            if not self._origin_once(r):
                return await self.fetch(r, on_event=on_event)
            return await self.origin.fetch(
                r.repo_id,
                r.ref,
                r.repo_dir / "blobs",
                swarm_fetch=lambda hint=(): self.fetch(r, on_event=on_event, hint=hint),
                pull=lambda downloaded: self._pull_from_hub(r, downloaded, on_event),
            )

        try:
            result = await fetch_chain(req, swarm=via_swarm, on_event=on_event, **kwargs)
        except BaseException as e:
            self._fetch_ended(req, started, "none", e)
            raise
        self._fetch_ended(req, started, result.source, None)
        if Path(result.path).parent.parent.parent == Path(self.config.cache_dir):
            await trio.to_thread.run_sync(touch_access, result.path)  # in use now; for LRU
        if result.source in ("modelexpress", "hub"):
            self.metrics.origin_bytes.labels(result.source).inc(
                await trio.to_thread.run_sync(_snapshot_bytes, result.path)
            )
        # What came from the Hub or ModelExpress may be gated or private: seeded only where the
        # HF cache is served (a private swarm, or --serve-hf-cache).
        if result.source in ("modelexpress", "hub") and self.serves_hf_cache:
            try:
                await self.serve_snapshot(req.repo_id, result.path)
            except Exception as e:  # the caller has its files; seeding is a bonus
                log.warning("cannot seed %s from %s: %s", req.repo_id, result.path, e)
        if self.config.max_cache_size is not None and self._nursery is not None:
            # In the background: the caller has its files (touched above: in use, never evicted).
            self._nursery.start_soon(self._enforce_quietly)
        return result

    # ------------------------------------------------------------------ cache management

    def served_snapshots(self) -> frozenset[tuple[str, str]]:
        """(model, revision) of the snapshots this node serves as its own (origin "built": its
        ``--serve`` directories and the HF-cache snapshots it hashed and signs); see
        swarm/cache_admin.py for why seeded, fetched ones are not among them."""
        return frozenset(
            (sh.manifest.model, sh.path.name)
            for sh in self.shared.values()
            if sh.origin == "built" and sh.path is not None
        )

    def seeded_snapshots(self) -> frozenset[tuple[str, str]]:
        """(model, revision) of every cache snapshot this node trades."""
        return frozenset(
            (sh.manifest.model, sh.path.name)
            for sh in list(self.shared.values())
            if sh.path is not None and self._in_cache(sh)
        )

    def _in_cache(self, sh: Shared) -> bool:
        try:
            return sh.path is not None and sh.path.parent.parent == self.store.repo_dir(sh.manifest.model)
        except Exception:
            return False

    async def _stop_sharing(self, model: str, revision: str) -> None:
        """Stop trading the cache snapshot ``model@revision`` (it was removed): its links close,
        its reader and timers stop, and we no longer announce it."""
        for h, sh in list(self.shared.items()):
            if (
                sh.manifest.model != model
                or sh.path is None
                or sh.path.name != revision
                or not self._in_cache(sh)
            ):
                continue
            self.shared.pop(h, None)
            self.metrics.retire(sh.transfer)
            scope = self._transfer_scopes.pop(id(sh.transfer), None)
            if scope is not None:
                scope.cancel()
            with trio.CancelScope(shield=True):
                await sh.transfer.close_links()
            _close_quietly(sh.source)
            with contextlib.suppress(Exception):
                self.host.stop_providing(manifest_key(h))
            if not any(o.manifest.model == model and o.complete for o in self.shared.values()):
                with contextlib.suppress(Exception):
                    self.host.stop_providing(model_key(model))

    async def remove_cached(
        self, model: str, revision: str | None = None, *, force: bool = False
    ) -> list[cache_admin.Removal]:
        """``swarm-node rm``: see ``cache_admin.remove`` (NotCached, Refused)."""
        async with self._cache_lock:
            done = await trio.to_thread.run_sync(
                partial(cache_admin.remove, self.store, model, revision, force=force)
            )
            for r in done:
                self.metrics.cache_removals.inc()
                await self._stop_sharing(r.model, r.revision)
            return done

    async def enforce_cache_limit(self) -> list[cache_admin.Removal]:
        """Evict down to ``max_cache_size`` (nothing without one)."""
        limit = self.config.max_cache_size
        if limit is None:
            return []
        async with self._cache_lock:
            done = await trio.to_thread.run_sync(
                partial(cache_admin.evict, self.store, limit, served=self.served_snapshots())
            )
            for r in done:
                self.metrics.cache_evictions.inc()
                self.metrics.cache_evicted_bytes.inc(r.bytes)
                await self._stop_sharing(r.model, r.revision)
            return done

    async def _enforce_quietly(self) -> None:
        try:
            await self.enforce_cache_limit()
        except Exception:
            log.exception("eviction failed")

    async def collect_incomplete(self) -> None:
        """Abandoned ``.incomplete`` files and unlinked blobs (see swarm/cache_admin.py)."""
        got = await trio.to_thread.run_sync(cache_admin.collect_incomplete, self.store)
        got += await trio.to_thread.run_sync(cache_admin.collect_orphans, self.store)
        self.metrics.incomplete_collected_bytes.inc(sum(n for _p, n in got))

    async def _cache_loop(self) -> None:
        """Abandoned ``.incomplete`` files at start and every ``GC_INTERVAL`` s, and eviction when
        a limit is set (a failure is logged; the next pass tries again)."""
        while True:
            try:
                await self.collect_incomplete()
                await self.enforce_cache_limit()
            except Exception:
                log.exception("cache maintenance failed")
            await trio.sleep(cache_admin.GC_INTERVAL)

    async def cache_report(self) -> dict:
        """``swarm-node models``: every snapshot of the cache with its size, last access, and
        whether it is served, seeded, in use (and why), or evictable."""
        served, seeded = self.served_snapshots(), self.seeded_snapshots()
        return await trio.to_thread.run_sync(
            partial(
                cache_admin.report, self.store, served=served, seeded=seeded, limit=self.config.max_cache_size
            )
        )

    def _origin_once(self, req: FetchRequest) -> bool:
        """Whether fetchers of ``req`` coordinate so that one pulls from the Hub for all (see
        swarm/origin.py): only where what comes from the Hub is seeded, and the Hub may be used."""
        return (
            self.serves_hf_cache
            and not self.draining
            and not req.env.over(SourceEnv.from_environ()).hub_offline
        )

    async def _pull_from_hub(
        self, req: FetchRequest, downloaded: Callable[[], None], on_event: Callable[[dict], None] | None
    ) -> Path:
        """The elected puller's download: from the Hub, resuming partial files (swarm/hubpull.py:
        each file checked against the Hub's listing before it is linked), then seeded under the
        model key so the others fetch it from us."""
        if on_event is not None:
            on_event({"event": "origin_pull", "model": req.repo_id, "revision": req.ref})
        env = req.env.over(SourceEnv.from_environ())
        stop = threading.Event()
        try:
            path = await trio.to_thread.run_sync(
                pull_snapshot, req, env.endpoint, env.hf_token, stop, abandon_on_cancel=True
            )
        except FetchError:
            raise
        except Exception as exc:
            raise hub_error(exc, req, env.endpoint) from None
        finally:
            stop.set()  # an abandoned thread stops at its next chunk
        downloaded()
        self.metrics.origin_bytes.labels("hub").inc(await trio.to_thread.run_sync(_snapshot_bytes, path))
        # Followers learn "seeded" from us and then look us up: our own provider record is stored
        # at once, the copies sent to the DHT follow.
        await self.serve_snapshot(req.repo_id, path, announce_later=True)
        return path

    def _fetch_ended(
        self, req: FetchRequest, started: float, source: str, error: BaseException | None
    ) -> None:
        seconds = trio.current_time() - started
        if isinstance(error, trio.Cancelled):
            result = "cancelled"
        elif error is None:
            result = "ok"
        else:
            result = {ModelNotFound: "not_found", VerificationFailed: "verification_failed"}.get(
                type(error), "error"
            )
        self.metrics.fetch_duration.labels(source, result).observe(seconds)
        extra = {
            "event": "fetch_end",
            "model": req.repo_id,
            "source": source,
            "result": result,
            "duration_s": round(seconds, 3),
        }
        if error is not None:
            extra["error"] = str(error).splitlines()[0][:300] if str(error) else repr(error)
        log.info("fetch of %s ended: %s from %s in %.2f s", req.repo_id, result, source, seconds, extra=extra)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        up = sum(sh.transfer.bytes_up for sh in self.shared.values())
        down = sum(sh.transfer.bytes_down for sh in self.shared.values())
        models = []
        for sh in self.shared.values():
            t = sh.transfer
            models.append(
                {
                    "model": sh.manifest.model,
                    "revision": sh.manifest.revision,
                    "manifest": sh.manifest.hash_str,
                    "complete": sh.complete,
                    "path": str(sh.path) if sh.path else None,
                    "bytes": t.wanted_bytes,
                    "have_bytes": t.have_bytes,
                    "bytes_up": t.bytes_up,
                    "bytes_down": t.bytes_down,
                    "wasted_bytes": t.wasted_bytes,
                    "timeouts": t.timeouts,
                    "peers": sorted(t.peers),
                    "banned": sorted(t.banned),
                }
            )
        return {
            "peer_id": self.peer_id,
            "addrs": self.host.addrs,
            "peers": self.host.connected_peers(),
            "models": models,
            "serving": self._exposure(),
            "bytes_up": up,
            "bytes_down": down,
            "limits": self.bandwidth.limits.as_dict(),
        }

    def set_limits(self, limits: Limits) -> None:
        """New bandwidth limits, from now on (not saved: a restart takes the configured ones)."""
        self.bandwidth.set_limits(limits)
        log.info(
            "bandwidth limits: upload %s, download %s, per-peer upload %s",
            *(format_rate(r) for r in (limits.upload, limits.download, limits.peer_upload)),
            extra={"event": "limits", **limits.as_dict()},
        )


def _snapshot_bytes(path: Path) -> int:
    """Bytes of the files a snapshot directory links to (what a source delivered)."""
    total = 0
    for f in Path(path).rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


def _remote_host(link: Any) -> str | None:
    """The IP address an inbound link comes from (the engine limits handshakes per address), or
    None if the link cannot tell. The links do not expose it yet, so look inside: the libp2p
    stream of a ``StreamLink``, the socket of a ``LaneLink``."""
    host = getattr(link, "remote_host", None)
    if isinstance(host, str):
        return host
    try:
        stream = getattr(link, "_stream", None)
        if stream is not None:
            addr = stream.get_remote_address()
            return str(addr[0]) if addr else None
        sock = getattr(link, "_sock", None)
        if sock is not None:
            return str(sock.getpeername()[0])
    except Exception:  # a closed socket or stream: no address, no per-address limit
        log.debug("no remote address for %r", link, exc_info=True)
    return None


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
        """Size, mtime and inode of every file, each reached the way the reader will reach it
        (beneath the tree: a link leading out is recorded as refused, and the build refuses it)."""
        c = confinement_for(path)
        out = []
        for dirpath, dirs, names in os.walk(path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # never carried (.git/)
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/")
                try:
                    st = stat_file(c, rel)
                except OutsideTree:
                    out.append([rel, "refused"])
                    continue
                except OSError:
                    continue
                out.append([rel, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino])
        return out

    def get_or_build(
        self, model: str, path: Path, revision: str | None, keep: frozenset[str] = frozenset()
    ) -> Manifest:
        entry = self._entry(model, path)
        fp = self._fingerprint(path)
        try:
            cached = json.loads(entry.read_text())
            if (
                cached["fingerprint"] == fp
                and cached["revision_arg"] == revision
                and sorted(cached.get("keep", [])) == sorted(keep)
            ):
                return Manifest.decode(bytes.fromhex(cached["manifest"]))
        except (OSError, ValueError, KeyError, ManifestError):
            pass
        m = build_manifest(path, model, revision or "local", keep=keep)
        if revision is None:
            # Private content: the revision is derived from the content, so the same files give
            # the same snapshot name on every machine.
            m = attrs.evolve(m, revision=blake3.blake3(m.encode()).hexdigest()[:40])
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "fingerprint": fp,
                    "revision_arg": revision,
                    "keep": sorted(keep),
                    "manifest": m.encode().hex(),
                }
            )
        )
        os.replace(tmp, entry)
        return m


class _Provenance:
    """Where each manifest this node serves came from, and the release seqs it signed and saw, kept
    in the node's home so that a restart never turns a fetched manifest into one of ours::

        <home>/provenance/<hash hex>    u8 origin (b"b" built, b"f" fetched) + the release record
                                        (empty: fetched unsigned)
        <home>/releases.json            {"signed": {model: last seq we signed},
                                         "seen": {publisher: {model: highest seq seen}}}

    Every write is atomic and durable (tmp + fsync + rename): losing a record would sign a fetched
    manifest, or forget a seq and let an old release back in. Calls come from worker threads; one
    lock serializes the read-modify-writes (a node home belongs to one node process)."""

    _ORIGINS = {b"b": "built", b"f": "fetched"}

    def __init__(self, home: Path):
        self.root = home / "provenance"
        self.releases = home / "releases.json"
        self._lock = threading.Lock()

    def get(self, h: bytes) -> tuple[str, bytes] | None:
        try:
            raw = (self.root / h.hex()).read_bytes()
        except FileNotFoundError:
            return None
        origin = self._ORIGINS.get(raw[:1])
        if origin is None:  # damaged: trust nothing in it, never sign
            log.warning("unreadable provenance record of %s; serving it unsigned", h.hex()[:16])
            return "fetched", b""
        return origin, raw[1:]

    def put(self, h: bytes, origin: str, release: bytes) -> None:
        code = next(k for k, v in self._ORIGINS.items() if v == origin)
        with self._lock:
            _write_durably(self.root / h.hex(), code + release)

    def _load(self) -> dict:
        try:
            d = json.loads(self.releases.read_text())
            if isinstance(d, dict):
                return d
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Refusing to start would be worse: we lose rollback floors, not safety of content.
            log.warning("unreadable %s (%s): starting it afresh", self.releases, e)
        return {}

    def next_seq(self, model: str) -> int:
        with self._lock:
            d = self._load()
            signed = d.setdefault("signed", {})
            seq = next_seq(int(signed.get(model, 0)))
            signed[model] = seq
            _write_durably(self.releases, json.dumps(d).encode())
            return seq

    def floor(self, publisher: str, model: str) -> int:
        with self._lock:
            return int(self._load().get("seen", {}).get(publisher, {}).get(model, 0))

    def raise_floors(self, model: str, releases: Any) -> None:
        with self._lock:
            d = self._load()
            seen = d.setdefault("seen", {})
            changed = False
            for r in releases:
                per = seen.setdefault(r.publisher, {})
                if r.seq > int(per.get(model, 0)):
                    per[model] = r.seq
                    changed = True
            if changed:
                _write_durably(self.releases, json.dumps(d).encode())


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
