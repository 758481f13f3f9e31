"""Prometheus metrics of one node, in the text exposition format.

Two kinds of figures, each where it is cheapest and always right:

- Events the node sees once (a fetch ends, a DHT lookup returns, a lane falls back to libp2p,
  bytes arrive from the origin) are pushed into counters and histograms as they happen.
- State the node already keeps (bytes traded per transfer, pieces, bans, links, upload slots,
  the cache's size) is read when Prometheus scrapes, by ``_NodeCollector``: nothing is added to
  the piece path. Totals of transfers the node has dropped are kept in ``retired`` so counters
  never go down.

Served on the control socket (``GET /v1/metrics``) and, opt-in, on a TCP address
(``--metrics-listen``). The scrape runs on the node's event loop, so it sees consistent state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from swarm.store import layout

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format (what every Prometheus server scrapes)."""

FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""A config set through a warm node takes ~0.1 s, multi-GB weights minutes: one ladder for both."""
LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
"""DHT lookups: milliseconds on a LAN, seconds when providers have vanished (timeouts)."""
CACHE_SCAN_INTERVAL = 30.0
"""Seconds the cache's size is reused between scrapes: a scan stats every blob, and a big cache
holds thousands (scraped every 15 s by default, it would otherwise walk the cache constantly)."""


class Metrics:
    """The registry of one node. ``node`` is read at scrape time (see ``_NodeCollector``)."""

    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.fetch_duration = Histogram(
            "swarm_fetch_duration_seconds",
            "Wall time of fetches served by this node, by the "
            "source that delivered (local, modelexpress, swarm, hub; none on failure) and result",
            ["source", "result"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.configs_time = Histogram(
            "swarm_time_to_configs_seconds",
            "Seconds from a swarm fetch's start until its config and tokenizer files were verified",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.dht_lookup = Histogram(
            "swarm_dht_lookup_seconds",
            "Provider lookups in the DHT, by key kind (model, manifest)",
            ["kind"],
            buckets=LOOKUP_BUCKETS,
            registry=r,
        )
        self.origin_bytes = Counter(
            "swarm_origin_bytes",
            "Bytes of snapshots delivered by sources other than the swarm (hub, modelexpress)",
            ["source"],
            registry=r,
        )
        self.lane_fallbacks = Counter(
            "swarm_lane_fallbacks",
            "Links that used a libp2p stream because the data lane could not be opened",
            registry=r,
        )
        self.cache_evictions = Counter(
            "swarm_cache_evictions", "Snapshots removed to keep the cache under --max-cache-size", registry=r
        )
        self.cache_evicted_bytes = Counter(
            "swarm_cache_evicted_bytes", "Bytes of blobs freed by evictions", registry=r
        )
        self.cache_removals = Counter(
            "swarm_cache_removals", "Snapshots removed by swarm-node rm", registry=r
        )
        self.incomplete_collected_bytes = Counter(
            "swarm_incomplete_collected_bytes",
            "Bytes of abandoned downloads collected "
            "(.incomplete files, and finished blobs no snapshot links)",
            registry=r,
        )
        self.retired = {
            "bytes_up": 0,
            "bytes_down": 0,
            "pieces_up": 0,
            "pieces_down": 0,
            "bad_pieces": 0,
            "bans": 0,
        }
        r.register(_NodeCollector(node, self))

    def retire(self, transfer: Any) -> None:
        """Keep the totals of a transfer the node drops, so counters never go down."""
        for k, v in _transfer_totals(transfer).items():
            self.retired[k] += v

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _transfer_totals(t: Any) -> dict[str, int]:
    stats = list(getattr(t, "stats", {}).values())
    return {
        "bytes_up": t.bytes_up,
        "bytes_down": t.bytes_down,
        "pieces_up": sum(s.pieces_up for s in stats),
        "pieces_down": sum(s.pieces_down for s in stats),
        "bad_pieces": sum(s.bad_pieces for s in stats),
        "bans": len(t.banned),
    }


def _link_kind(link: Any) -> str:
    return "lane" if type(link).__name__ == "LaneLink" else "libp2p"


def _limit_gauges(node: Any) -> Iterator[Metric]:
    """The configured bandwidth limits (swarm/ratelimit.py), as set now."""
    bandwidth = getattr(node, "bandwidth", None)
    if bandwidth is None:
        return
    g = GaugeMetricFamily(
        "swarm_rate_limit_bytes_per_second",
        "Bandwidth limit in bytes/s by direction (upload, download, peer_upload: per peer); 0 = unlimited",
        labels=["direction"],
    )
    for direction, rate in bandwidth.limits.as_dict().items():
        g.add_metric([direction], rate or 0)
    yield g


class _NodeCollector:
    """Reads the node's own state at scrape time."""

    def __init__(self, node: Any, metrics: Metrics) -> None:
        self.node = node
        self.metrics = metrics
        self._cache_bytes: tuple[float, int] | None = None

    def describe(self) -> list[Metric]:
        return []  # dynamic: the registry asks collect() only when scraped

    def collect(self) -> Iterator[Metric]:
        shared = list(getattr(self.node, "shared", {}).values())
        totals = dict(self.metrics.retired)
        links = {"lane": 0, "libp2p": 0}
        slots = handshakes = 0
        models = {"complete": 0, "partial": 0}
        for sh in shared:
            t = sh.transfer
            for k, v in _transfer_totals(t).items():
                totals[k] += v
            for p in list(t.peers.values()):
                links[_link_kind(p.link)] += 1
                slots += bool(p.slot.unchoked)
            handshakes += getattr(t, "_handshakes", 0)
            models["complete" if sh.complete else "partial"] += 1

        def counter(
            name: str, doc: str, value: float, labels: dict[str, str] | None = None
        ) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=list(labels or {}))
            m.add_metric(list((labels or {}).values()), value)
            return m

        bytes_ = CounterMetricFamily(
            "swarm_peer_bytes", "Piece bytes traded with swarm peers", labels=["direction"]
        )
        bytes_.add_metric(["up"], totals["bytes_up"])
        bytes_.add_metric(["down"], totals["bytes_down"])
        yield bytes_
        yield counter(
            "swarm_pieces_verified", "Pieces received from peers that verified", totals["pieces_down"]
        )
        yield counter(
            "swarm_pieces_failed",
            "Pieces received from peers that failed blake3 verification",
            totals["bad_pieces"],
        )
        yield counter("swarm_pieces_served", "Pieces sent to peers", totals["pieces_up"])
        yield counter(
            "swarm_peer_bans",
            "Peers banned from a transfer for bad data or protocol violations",
            totals["bans"],
        )
        g = GaugeMetricFamily("swarm_links", "Open links to peers, by transport", labels=["kind"])
        for kind, n in links.items():
            g.add_metric([kind], n)
        yield g
        yield GaugeMetricFamily(
            "swarm_link_handshakes", "Links still exchanging Hello and Bitfield", value=handshakes
        )
        yield GaugeMetricFamily(
            "swarm_upload_slots_in_use", "Peers we are uploading to (unchoked)", value=slots
        )
        g = GaugeMetricFamily("swarm_models", "Manifests this node trades, by state", labels=["state"])
        for state, n in models.items():
            g.add_metric([state], n)
        yield g
        host = getattr(self.node, "host", None)
        if host is not None and getattr(host, "running", False):
            yield GaugeMetricFamily(
                "swarm_connected_peers", "libp2p connections", value=len(host.connected_peers())
            )
        yield from _limit_gauges(self.node)
        cache = getattr(getattr(self.node, "config", None), "cache_dir", None)
        if cache is not None:
            yield GaugeMetricFamily(
                "swarm_cache_bytes", "Bytes of blobs in the HF hub cache", value=self._cache_size(Path(cache))
            )

    def _cache_size(self, root: Path) -> int:
        now = time.monotonic()
        if self._cache_bytes is not None and now - self._cache_bytes[0] < CACHE_SCAN_INTERVAL:
            return self._cache_bytes[1]
        total = 0
        try:
            repos = list(os.scandir(root))
        except OSError:
            repos = []
        for repo in repos:
            if repo.name.startswith(layout.REPO_PREFIX):
                total += layout.RepoLayout(repo.path).blob_bytes()
        self._cache_bytes = (now, total)
        return total
