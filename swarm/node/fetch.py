"""The fetch path: the download of an agreed manifest from many peers, stall detection, linking to
providers, and the whole fallback chain (cache -> ModelExpress -> swarm -> Hub) around it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from swarm.discovery import (
    ConnectPolicy,
    LinkState,
)
from swarm.engine import Transfer
from swarm.hubpull import pull_snapshot
from swarm.manifest import Manifest
from swarm.net.host import PeerAddr, manifest_key
from swarm.net.lane import LaneUnavailable
from swarm.node.state import Shared
from swarm.node.util import _raise_on_failure, _single, _snapshot_bytes
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
from swarm.sources.chain import modelexpress_url_of
from swarm.sources.modelexpress import pull_from_modelexpress
from swarm.store import Download, RepoLayout, SnapshotReader, touch_access

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split


class Fetching:
    """Part of ``Node`` (swarm/node/core.py): see the module docstring."""

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
        self._spawn(partial(self._announce, sh, model=True))
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
                self._spawn(self._link_to, t, p)
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
        # The chain's choice of ModelExpress server, made the same way.
        mx_url = (
            modelexpress_url_of(req)
            if modelexpress_url is None
            else modelexpress_url_of(req, modelexpress_url)
        )
        once = self._origin_once(req, mx_url)
        started = trio.current_time()
        log.info(
            "fetch of %s@%s started",
            req.repo_id,
            req.ref,
            extra={"event": "fetch_start", "model": req.repo_id, "revision": req.ref},
        )

        async def via_swarm(r: FetchRequest) -> Path:
            if not once:
                return await self.fetch(r, on_event=on_event)
            return await self.origin.fetch(
                r.repo_id,
                r.ref,
                RepoLayout(r.repo_dir).blobs,
                swarm_fetch=lambda hint=(): self.fetch(r, on_event=on_event, hint=hint),
                pull=lambda downloaded: self._pull_from_origin(r, mx_url, downloaded, on_event),
            )

        try:
            # With origin once and ModelExpress set, ModelExpress is the crowd's origin: the swarm
            # step elects one node to pull from it (the chain's own ModelExpress step is skipped).
            result = await fetch_chain(
                req,
                swarm=via_swarm,
                on_event=on_event,
                modelexpress_in_swarm=once and mx_url is not None,
                **kwargs,
            )
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

    def _origin_once(self, req: FetchRequest, modelexpress_url: str | None = None) -> bool:
        """Whether fetchers of ``req`` coordinate so that one pulls from the origin for all (see
        swarm/origin.py): only where what comes from the origin is seeded, and an origin may be
        used (ModelExpress when ``modelexpress_url`` is set, else the Hub when not offline)."""
        return (
            self.serves_hf_cache
            and not self.draining
            and (modelexpress_url is not None or not req.env.over(SourceEnv.from_environ()).hub_offline)
        )

    async def _pull_from_origin(
        self,
        req: FetchRequest,
        modelexpress_url: str | None,
        downloaded: Callable[[], None],
        on_event: Callable[[dict], None] | None,
    ) -> Path:
        """The elected puller's download, in the chain's order: ModelExpress when set, then (if it
        fails and the Hub may be used) the Hub, so the crowd still pulls once."""
        if modelexpress_url is not None:
            try:
                return await self._pull_from_modelexpress(req, modelexpress_url, downloaded, on_event)
            except Exception as e:
                if req.env.over(SourceEnv.from_environ()).hub_offline:
                    raise
                log.warning(
                    "origin: the pull from ModelExpress failed (%s); pulling from the Hub",
                    str(e).splitlines()[0][:300],
                    extra={"event": "origin_origin_failed", "origin": "modelexpress", "reason": str(e)},
                )
        return await self._pull_from_hub(req, downloaded, on_event)

    async def _pull_from_modelexpress(
        self,
        req: FetchRequest,
        url: str,
        downloaded: Callable[[], None],
        on_event: Callable[[dict], None] | None,
    ) -> Path:
        """The elected puller's download from ModelExpress (swarm/modelexpress/pull.py: paths,
        sizes and the commit checked; ModelExpress offers no content hash), then seeded."""
        if on_event is not None:
            on_event(
                {"event": "origin_pull", "model": req.repo_id, "revision": req.ref, "origin": "modelexpress"}
            )
        # Complete copies of a dead puller's files are taken over under the open policy only
        # (ModelExpress has no hash to check them against; swarm/modelexpress/pull.py).
        take = self.config.trust.mode == "open"
        path = await pull_from_modelexpress(req, url, on_event=on_event, take_copies=take)
        downloaded()
        return await self._seed_pulled(req, path, "modelexpress")

    async def _seed_pulled(self, req: FetchRequest, path: Path, source: str) -> Path:
        self.metrics.origin_bytes.labels(source).inc(await trio.to_thread.run_sync(_snapshot_bytes, path))
        # Followers learn "seeded" from us and then look us up: our own provider record is stored
        # at once, the copies sent to the DHT follow.
        await self.serve_snapshot(req.repo_id, path, announce_later=True)
        return path

    async def _pull_from_hub(
        self, req: FetchRequest, downloaded: Callable[[], None], on_event: Callable[[dict], None] | None
    ) -> Path:
        """The elected puller's download: from the Hub, resuming partial files (swarm/hubpull.py:
        each file checked against the Hub's listing before it is linked), then seeded under the
        model key so the others fetch it from us."""
        if on_event is not None:
            on_event({"event": "origin_pull", "model": req.repo_id, "revision": req.ref, "origin": "hub"})
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
        return await self._seed_pulled(req, path, "hub")

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
