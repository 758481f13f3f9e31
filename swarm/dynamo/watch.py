"""Follow Dynamo's discovery and act on every registered ModelDeploymentCard, inside a node.

Dynamo's file discovery backend (``DYN_DISCOVERY_BACKEND=file``, directory ``DYN_FILE_KV``) keeps
one JSON file per registered model instance under ``<kv>/v1/mdc/``: a record whose ``card_json`` is
the card; its etcd backend (``ETCD_ENDPOINTS``) keeps the same records under the keys
``v1/mdc/<namespace>/<component>/<endpoint>/<instance>``. For each card the watcher:

* serves it when this host has it (worker side): the card's ``source_path`` directory, or the HF
  cache snapshot of a ``source_path`` that is a Hub repo id, whose files match the card's checksums,
  is served under the card's swarm name (:func:`swarm.dynamo.card.swarm_name`), with the card's
  files that manifests skip by default (``LICENSE``, images) carried too;
* otherwise, when prefetching (``swarm-node dynamo-watch``), fetches exactly the card's files
  through the swarm (with ``weights``, the whole snapshot: a worker host about to start), checks
  them against the card and copies them into Dynamo's metadata cache so the frontend on this host
  requests none of them from the worker.

A card whose handling failed is tried again on a later scan; one that succeeded is not touched
again until its record changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import attrs
import blake3
import trio

from swarm.dynamo.card import (
    MAX_CARD_BYTES,
    Card,
    CardError,
    dir_mismatches,
    install_mdc_cache,
    parse_card,
    swarm_name,
)
from swarm.manifest import should_skip

log = logging.getLogger(__name__)

SCAN_INTERVAL = 2.0
"""Seconds between two scans of the discovery directory: a new card is acted on within this (the
frontend itself polls discovery at a similar pace)."""
MAX_RECORDS = 4096
"""Most card records read in one scan; more are left for later scans (a bounded pass)."""
RETRY_INTERVAL = 10.0
"""Seconds before a card whose handling failed (no provider yet, other bytes offered) is retried."""
MDC_DIR = ("v1", "mdc")
"""Where the file discovery backend keeps model cards, under DYN_FILE_KV."""


@attrs.frozen
class WatchConfig:
    kv_root: Path | None = None  # Dynamo's file discovery directory (DYN_FILE_KV), or
    etcd: tuple[str, ...] = ()  # its etcd endpoints (ETCD_ENDPOINTS)
    prefetch: bool = False  # fetch cards this host does not have (frontends, new workers)
    weights: bool = False  # with prefetch: whole snapshots, not just the card's files
    mdc_root: Path | None = None  # Dynamo's metadata cache (default ~/.cache/dynamo/mdc)
    scan_interval: float = SCAN_INTERVAL
    retry_interval: float = RETRY_INTERVAL


def read_records(kv_root: Path) -> list[tuple[str, bytes]]:
    """``(key, raw JSON)`` of each card record under ``<kv_root>/v1/mdc`` (sorted by key; files
    over MAX_CARD_BYTES and unreadable ones are left out)."""
    d = Path(kv_root).joinpath(*MDC_DIR)
    out: list[tuple[str, bytes]] = []
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return out
    for e in entries[:MAX_RECORDS]:
        try:
            if not e.is_file() or e.stat().st_size > MAX_CARD_BYTES:
                continue
            with open(e.path, "rb") as f:
                out.append((e.name, f.read(MAX_CARD_BYTES + 1)))
        except OSError:
            continue  # removed between scandir and open: the worker went away
    return out


ETCD_TIMEOUT = 5.0
"""Seconds for one range read from etcd before the next endpoint is tried (the scan retries later)."""
_MDC_PREFIX = "/".join(MDC_DIR) + "/"


def read_etcd_records(endpoints: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``(key, raw JSON)`` of each card record under ``v1/mdc/`` in etcd, through etcd's v3 JSON
    gateway (``POST /v3/kv/range``; etcd >= 3.4), at most MAX_RECORDS of them; the first endpoint
    that answers is used. Raises OSError when none answers."""
    import base64

    import httpx

    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    # range_end: the prefix with its last byte + 1 ("/" + 1 == "0"), i.e. every key under it.
    body = {
        "key": b64(_MDC_PREFIX),
        "range_end": b64(_MDC_PREFIX[:-1] + "0"),
        "limit": MAX_RECORDS,
        "sort_order": "ASCEND",
        "sort_target": "KEY",
    }
    errors = []
    for ep in endpoints:
        try:
            r = httpx.post(ep.rstrip("/") + "/v3/kv/range", json=body, timeout=ETCD_TIMEOUT)
            r.raise_for_status()
            kvs = r.json().get("kvs") or []
        except (httpx.HTTPError, ValueError) as e:
            errors.append(f"{ep}: {e}")
            continue
        out = []
        for kv in kvs:
            try:
                key = base64.b64decode(kv["key"]).decode()
                value = base64.b64decode(kv.get("value", ""))
            except (KeyError, ValueError, TypeError):
                continue
            if len(value) <= MAX_CARD_BYTES:
                out.append((key.removeprefix(_MDC_PREFIX), value))
        return out
    raise OSError(f"no etcd endpoint answered: {'; '.join(errors)}")


def local_copy(card: Card, cache_dir: Path) -> tuple[Path, str | None] | None:
    """``(directory, revision)`` of this host's copy of the card's model, with the card's bytes:
    its ``source_path`` directory (a worker's model directory; revision derived from content), or,
    for a Hub repo id, a complete snapshot of it in the HF cache (revision: the commit)."""
    from swarm.sources import FetchRequest, local_snapshot

    sp = card.source_path or card.display_name
    if os.path.isabs(sp):
        d = Path(sp)
        if d.is_dir() and not dir_mismatches(d, card.expect()):
            return d, None
        return None
    try:
        snap = local_snapshot(FetchRequest(repo_id=sp, cache_dir=cache_dir))
    except (ValueError, OSError):
        return None
    if snap is not None and not dir_mismatches(snap, card.expect()):
        return snap, snap.name
    return None


def kept_files(card: Card) -> frozenset[str]:
    """The card's files that a manifest would skip by default and must carry for this card."""
    return frozenset(f.name for f in card.carried if should_skip(f.name))


class Watcher:
    def __init__(self, node: Any, config: WatchConfig) -> None:
        self.node = node
        self.config = config
        self.handled: dict[str, bytes] = {}  # record key -> digest of the record handled
        self.failed_at: dict[str, float] = {}
        self.served: dict[str, str] = {}  # record key -> swarm name served
        self.prefetched: dict[str, Path] = {}  # record key -> verified directory
        self.scans = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.scan()
            await trio.sleep(self.config.scan_interval)

    async def scan(self) -> None:
        try:
            records = await trio.to_thread.run_sync(self._read)
        except OSError as e:
            log.warning("dynamo discovery: %s", e)
            return
        now = trio.current_time()
        present = {key for key, _ in records}
        for book in (self.handled, self.failed_at):  # instances come and go: forget the gone
            for key in [k for k in book if k not in present]:
                del book[key]
        for key, raw in records:
            digest = blake3.blake3(raw).digest()
            if self.handled.get(key) == digest:
                continue
            if now - self.failed_at.get(key, -1e9) < self.config.retry_interval:
                continue
            try:
                card = parse_card(raw, key)
            except (CardError, UnicodeDecodeError) as e:
                log.warning("dynamo card %s: not usable: %s", key, e)
                self.handled[key] = digest  # a new version of the record is looked at again
                continue
            try:
                await self.handle(key, card)
            except Exception as e:  # one card must not stop the watcher
                log.warning(
                    "dynamo card %s (%s): %s; retrying in %.0f s",
                    key,
                    card.display_name,
                    e,
                    self.config.retry_interval,
                )
                self.failed_at[key] = trio.current_time()
                continue
            self.failed_at.pop(key, None)
            self.handled[key] = digest
        self.scans += 1

    def _read(self) -> list[tuple[str, bytes]]:
        if self.config.kv_root is not None:
            return read_records(self.config.kv_root)
        return read_etcd_records(self.config.etcd)

    async def handle(self, key: str, card: Card) -> None:
        name = swarm_name(card)
        if not card.carried:
            log.info("dynamo card %s (%s) lists no files; nothing to do", key, card.display_name)
            return
        cache_dir = Path(self.node.config.cache_dir)
        here = await trio.to_thread.run_sync(local_copy, card, cache_dir)
        if here is not None:
            path, revision = here
            m = await self.node.serve_directory(name, path, revision, keep=kept_files(card))
            self.served[key] = name
            log.info("dynamo card %s: serving %s as %s (manifest %s)", key, path, name, m.hash_str[:20])
        if not self.config.prefetch:
            return
        if here is None:
            path = await self._prefetch(card)
            differ = await trio.to_thread.run_sync(dir_mismatches, path, card.expect())
            if differ:
                raise CardError(f"fetched files differ from the card: {'; '.join(differ[:3])}")
        await trio.to_thread.run_sync(install_mdc_cache, path, card, self.config.mdc_root)
        self.prefetched[key] = path
        log.info(
            "dynamo card %s: %s ready at %s and in Dynamo's metadata cache", key, card.display_name, path
        )

    async def _prefetch(self, card: Card) -> Path:
        from swarm.client import _card_request

        req = _card_request(card, self.config.weights, self.node.config.cache_dir, None)
        result = await self.node.fetch_with_fallback(req)
        return Path(result.path)
