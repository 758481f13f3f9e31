"""The node itself: construction, lifetime, status and bandwidth limits; the rest of its methods come
from the mixins of this package."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from swarm.config import format_rate
from swarm.discovery import ProviderScores
from swarm.metrics import Metrics
from swarm.net.host import SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import LaneService, bind_host_of
from swarm.node.cache import CacheManagement
from swarm.node.fetch import Fetching
from swarm.node.records import _ManifestCache, _Provenance
from swarm.node.serving import Serving
from swarm.node.state import NodeConfig, Shared
from swarm.node.util import NodeStopped, _close_quietly
from swarm.node.vote import ManifestVote
from swarm.origin import OriginCoordinator
from swarm.ratelimit import Bandwidth, Limits
from swarm.store import Store

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split


class Node(Serving, ManifestVote, Fetching, CacheManagement):
    """One libp2p host, one store, and a Transfer per manifest it trades. Its methods live in
    the modules of this package, one job each (see swarm/node/__init__.py)."""

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
        async with self.host.run(), self._node_nursery() as nursery:
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

    @asynccontextmanager
    async def _node_nursery(self) -> AsyncIterator[trio.Nursery]:
        """The nursery of tasks that outlive a call (links, announcements, seeding); unset once
        closed, so a fetch still unwinding after the node stopped gets ``NodeStopped`` from
        ``_spawn`` instead of trio's "Nursery is closed to new arrivals"."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                yield nursery
        finally:
            self._nursery = None

    def _spawn(self, fn, *args) -> None:
        if self._nursery is None:
            raise NodeStopped("the node has stopped (or is not running)")
        self._nursery.start_soon(fn, *args)

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
                    "unchoked": sorted(pid for pid, p in t.peers.items() if p.slot.unchoked),
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
