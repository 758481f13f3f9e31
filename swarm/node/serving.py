"""Serving: directories and HF-cache snapshots shared as complete, release records, transfers,
announcing, draining, and the manifest and pieces protocol handlers."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from swarm import wire
from swarm.engine import Transfer
from swarm.manifest import Manifest, validate_model_name
from swarm.net.host import manifest_key, model_key
from swarm.node.state import Shared
from swarm.node.util import _remote_host
from swarm.store import SnapshotReader, layout
from swarm.trust import (
    RELEASE_LIFETIME,
    Release,
    TrustError,
    sign_release,
    verify_release,
)

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split

DRAIN_POLL = 0.05
"""Seconds between checks of a draining node's pending uploads (a 4 MiB piece takes ~40 ms at
100 MB/s: finer polling would only burn the event loop)."""
REPROVIDE_INTERVAL = 3600.0
"""Provider records live 48 h in py-libp2p's DHT; re-announcing hourly keeps churned nodes found."""


class Serving:
    """Part of ``Node`` (swarm/node/core.py): see the module docstring."""

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
        for model in layout.models(root):  # models--org--name and models--name
            try:
                main = self.store.read_ref(model)
            except Exception:
                main = None
            snaps = [self.store.snapshot_dir(model, rev) for rev in self.store.revisions(model)]
            for snap in sorted(snaps, key=lambda p: (p.name == main, p)):
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
            self._spawn(partial(self._announce, sh, model=True))
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
        self._spawn(self._run_transfer, t)

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
