"""Cache management: which snapshots are served or seeded, removal, eviction and garbage collection."""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import trio

from swarm import cache_admin
from swarm.net.host import manifest_key, model_key
from swarm.node.state import Shared
from swarm.node.util import _close_quietly

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split


class CacheManagement:
    """Part of ``Node`` (swarm/node/core.py): see the module docstring."""

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
