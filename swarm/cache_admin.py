"""Cache management: what the HF cache holds, removing snapshots, least-recently-used eviction
under ``--max-cache-size``, and collecting abandoned ``.incomplete`` files.

The store (``swarm/store/``: its ``layout`` module owns the cache layout, ``admin`` the crash-safe
removal) does the work; this module decides what may go. Words used here and in ``swarm-node models``:

- **fetched**: a snapshot directory a swarm download created (``Store.snapshot_owner``). Only
  these are ever evicted; snapshots the Hub client made are counted but left to the operator
  (``swarm-node rm``).
- **served**: published by this node as its own content: a ``--serve`` directory (outside the
  cache: never deleted by swarm) or an HF-cache snapshot the node hashed and signs itself
  (``Shared.origin == "built"``). Never evicted; ``rm`` stops serving it first. Snapshots fetched
  through the swarm are only *seeded* (re-served as a courtesy) and may be evicted.
- **in use**: a download of its repo is open (the repo lock, ``Store.repo_exclusive``; never
  overridden, not even by ``--force``), or it was handed to a caller less than ``IN_USE_WINDOW``
  seconds ago (``.swarm/access/<revision>``, written by the node and by the client's local-cache
  path, survives restarts). ``rm`` refuses an in-use snapshot unless forced; eviction never takes
  one.
- **abandoned**: an ``.incomplete`` file no open download holds, untouched for
  ``INCOMPLETE_MAX_AGE``; likewise a blob swarm verified that no snapshot links (a download given
  up before it was finalized, or a removal cut short by a crash). Collected at start and every
  ``GC_INTERVAL``.
- **last access**: the mtime of ``.swarm/access/<revision>``, else of the snapshot directory
  (file atimes are unreliable under relatime/noatime). Eviction takes the oldest first.

Sizes: a snapshot's ``bytes`` are the blobs it links; ``unique_bytes`` those no other snapshot of
the repo links (what removing it frees: shared blobs stay until their last snapshot goes). The
cache's size is every file under ``blobs/`` of every repo, ``.incomplete`` files included (what
``swarm_cache_bytes`` reports).

Imported by the CLI without a node (``swarm-node models``/``rm`` on a cache no node runs on): no
libp2p here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from swarm.manifest import ManifestError, validate_model_name, validate_revision
from swarm.store import LockTimeout, Store, StoreError
from swarm.store.layout import INCOMPLETE

__all__ = [
    "GC_INTERVAL",
    "INCOMPLETE_MAX_AGE",
    "IN_USE_WINDOW",
    "CachedSnapshot",
    "NotCached",
    "Refused",
    "Removal",
    "cache_bytes",
    "collect_incomplete",
    "collect_orphans",
    "evict",
    "parse_target",
    "remove",
    "report",
    "scan",
]

log = logging.getLogger(__name__)

IN_USE_WINDOW = 600.0
"""Seconds after a fetch returns a snapshot during which it counts as in use: the caller opens its
files right after (a 140 GB model loads in a few minutes from local NVMe); once opened, deleting
the files no longer hurts it (Linux keeps an open or mapped inode until it is closed)."""
INCOMPLETE_MAX_AGE = 24 * 3600.0
"""An unlocked ``.incomplete`` untouched this long is abandoned; a younger one is resume state a
restarted node (or a retried fetch) picks up, so collecting it at start would throw progress away
(same age as the store's ``TMP_MAX_AGE``)."""
GC_INTERVAL = 600.0
"""Seconds between collections of abandoned ``.incomplete`` files and eviction passes while the
node runs: a pass stats every blob and reads the repos' manifests, cheap every 10 minutes, and
abandoned files only appear when a fetch dies (they are collected at start too)."""
REMOVE_LOCK_WAIT = 2.0
"""Seconds ``rm`` waits for its repo's lock: a download that is just finishing releases it, one
that is running does not, and ``rm`` then refuses rather than hang."""


class NotCached(StoreError):
    """``rm`` named a model or revision the cache does not hold."""


class Refused(StoreError):
    """``rm`` refused: a snapshot is in use (``reasons``: one line per snapshot)."""

    def __init__(self, message: str, reasons: list[str]) -> None:
        super().__init__(message)
        self.reasons = reasons


@attrs.frozen
class CachedSnapshot:
    model: str
    revision: str
    path: Path
    files: int
    bytes: int
    unique_bytes: int
    last_access: float
    refs: tuple[str, ...]
    fetched: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.revision)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "revision": self.revision,
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "unique_bytes": self.unique_bytes,
            "last_access": self.last_access,
            "refs": list(self.refs),
            "fetched": self.fetched,
        }


@attrs.frozen
class Removal:
    model: str
    revision: str
    bytes: int  # blobs deleted


def parse_target(text: str) -> tuple[str, str | None]:
    """``org/name`` or ``org/name@revision`` (a revision name: a commit, or swarm's 40-hex)."""
    model, sep, rev = text.partition("@")
    try:
        validate_model_name(model)
        if sep:
            validate_revision(rev)
    except ManifestError as e:
        raise ValueError(f"{text!r}: {e.reason} (expected ORG/NAME or ORG/NAME@REVISION)") from None
    return model, (rev if sep else None)


def _blob_sizes(store: Store, model: str) -> dict[str, int]:
    out = {}
    try:
        with os.scandir(store.layout(model).blobs) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False) and not e.name.endswith(INCOMPLETE):
                        out[e.name] = e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        pass
    return out


def scan(store: Store, models: Iterable[str] | None = None) -> list[CachedSnapshot]:
    """Every snapshot directory of the cache (or of ``models``)."""
    out = []
    for model in store.models() if models is None else models:
        sizes = _blob_sizes(store, model)
        links = {rev: store.snapshot_blobs(model, rev) for rev in store.revisions(model)}
        users: dict[str, int] = {}
        for blobs in links.values():
            for b in set(blobs.values()):
                users[b] = users.get(b, 0) + 1
        for rev, blobs in links.items():
            mine = set(blobs.values())
            try:
                fetched = store.snapshot_owner(model, rev) is not None
            except StoreError:
                fetched = False
            out.append(
                CachedSnapshot(
                    model=model,
                    revision=rev,
                    path=store.snapshot_dir(model, rev),
                    files=len(blobs),
                    bytes=sum(sizes.get(b, 0) for b in mine),
                    unique_bytes=sum(sizes.get(b, 0) for b in mine if users[b] == 1),
                    last_access=store.last_access(model, rev),
                    refs=tuple(store.refs_to(model, rev)),
                    fetched=fetched,
                )
            )
    return out


def cache_bytes(store: Store) -> int:
    return sum(store.repo_bytes(m) for m in store.models())


def in_use_reason(snap: CachedSnapshot, now: float, window: float = IN_USE_WINDOW) -> str | None:
    """Why ``snap`` counts as in use by a caller, or None (open downloads are checked by lock)."""
    age = now - snap.last_access
    if 0 <= age < window or age < 0:  # a clock that went back: assume recent
        return f"handed to a caller {max(age, 0):.0f} s ago (in use for {window:.0f} s)"
    return None


def remove(
    store: Store,
    model: str,
    revision: str | None = None,
    *,
    force: bool = False,
    on_removed: Callable[[Removal], None] | None = None,
    window: float = IN_USE_WINDOW,
) -> list[Removal]:
    """Delete ``model@revision`` (every revision of ``model`` when None) from the cache.
    :class:`NotCached` if absent; :class:`Refused` if a download of the repo is open (even with
    ``force``) or, unless ``force``, a snapshot was handed to a caller within ``window`` s.
    ``on_removed`` runs after each snapshot goes (the node stops seeding it)."""
    revs = store.revisions(model)
    if revision is not None:
        if revision not in revs:
            raise NotCached(
                f"{model}@{revision} is not in the cache "
                f"({', '.join(revs) if revs else 'no revisions of ' + model})"
            )
        revs = [revision]
    elif not revs:
        raise NotCached(f"{model} is not in the cache")
    try:
        with store.repo_exclusive(model, timeout=REMOVE_LOCK_WAIT):
            snaps = [s for s in scan(store, [model]) if s.revision in revs]
            now = time.time()
            busy = [
                f"{s.model}@{s.revision}: {why}"
                for s in snaps
                if (why := in_use_reason(s, now, window)) is not None
            ]
            if busy and not force:
                raise Refused(f"{model}: in use (--force to remove anyway): " + "; ".join(busy), busy)
            done = []
            for s in snaps:
                freed = store.remove_snapshot(model, s.revision)
                r = Removal(model, s.revision, freed)
                done.append(r)
                log.info(
                    "removed %s@%s (%d bytes freed)",
                    model,
                    s.revision,
                    freed,
                    extra={"event": "rm", "model": model, "revision": s.revision, "bytes": freed},
                )
                if on_removed is not None:
                    on_removed(r)
            return done
    except LockTimeout:
        raise Refused(
            f"{model}: a download of it is in progress; try again when it ends",
            [f"{model}: being downloaded"],
        ) from None


def evict(
    store: Store,
    limit: int,
    *,
    served: frozenset[tuple[str, str]] = frozenset(),
    on_removed: Callable[[Removal], None] | None = None,
    window: float = IN_USE_WINDOW,
) -> list[Removal]:
    """Remove fetched snapshots that are neither ``served`` ((model, revision) pairs) nor in use,
    least recently used first, until the cache holds at most ``limit`` bytes (or nothing more may
    go). Repos with a download open are skipped. Each removal is logged (``evict`` event)."""
    total = cache_bytes(store)
    if total <= limit:
        return []
    now = time.time()
    candidates = sorted(
        (
            s
            for s in scan(store)
            if s.fetched and s.key not in served and in_use_reason(s, now, window) is None
        ),
        key=lambda s: (s.last_access, s.model, s.revision),
    )
    done = []
    for s in candidates:
        if total <= limit:
            break
        try:
            with store.repo_exclusive(s.model, timeout=0.0):
                again = [x for x in scan(store, [s.model]) if x.revision == s.revision]
                if not again or in_use_reason(again[0], time.time(), window) is not None:
                    continue  # handed out since the scan
                freed = store.remove_snapshot(s.model, s.revision)
        except LockTimeout:
            continue  # a download of that repo is running
        except StoreError as e:
            log.warning("cannot evict %s@%s: %s", s.model, s.revision, e)
            continue
        total -= freed
        r = Removal(s.model, s.revision, freed)
        done.append(r)
        log.info(
            "evicted %s@%s (%d bytes freed; cache %d of %d bytes)",
            s.model,
            s.revision,
            freed,
            total,
            limit,
            extra={"event": "evict", "model": s.model, "revision": s.revision, "bytes": freed},
        )
        if on_removed is not None:
            on_removed(r)
    if total > limit:
        log.warning(
            "cache holds %d bytes, over --max-cache-size %d: the rest is served, in use, "
            "being downloaded or not fetched by swarm",
            total,
            limit,
        )
    return done


def downloading(store: Store, model: str) -> bool:
    """Whether a download of ``model`` is open (in any process)."""
    try:
        with store.repo_exclusive(model, timeout=0.0):
            return False
    except LockTimeout:
        return True


def report(
    store: Store,
    *,
    served: frozenset[tuple[str, str]] = frozenset(),
    seeded: frozenset[tuple[str, str]] = frozenset(),
    limit: int | None = None,
    window: float = IN_USE_WINDOW,
) -> dict:
    """What ``swarm-node models`` shows: ``{"cache_dir", "bytes", "max_bytes", "incomplete_bytes",
    "snapshots": [...]}``; each snapshot is ``CachedSnapshot.to_json()`` plus ``served``,
    ``seeded``, ``in_use`` (a reason, or null) and ``evictable``."""
    now = time.time()
    snaps = scan(store)
    busy = {m: downloading(store, m) for m in {s.model for s in snaps}}
    rows = []
    for s in sorted(snaps, key=lambda s: (s.model, -s.last_access, s.revision)):
        why = "a download of this model is in progress" if busy[s.model] else in_use_reason(s, now, window)
        row = s.to_json()
        row.update(
            served=s.key in served,
            seeded=s.key in seeded,
            in_use=why,
            evictable=s.fetched and s.key not in served and why is None,
        )
        rows.append(row)
    total = cache_bytes(store)
    linked = 0
    for m in store.models():
        sizes = _blob_sizes(store, m)
        linked += sum(sizes.values())
    return {
        "cache_dir": str(store.cache_dir),
        "bytes": total,
        "max_bytes": limit,
        "incomplete_bytes": total - linked,
        "snapshots": rows,
    }


def collect_incomplete(store: Store, max_age: float = INCOMPLETE_MAX_AGE) -> list[tuple[Path, int]]:
    """Delete abandoned ``.incomplete`` files (no download of their repo open, untouched for
    ``max_age`` s) in every repo; returns (path, bytes) of each."""
    out = []
    for model in store.models():
        try:
            got = store.collect_incomplete(model, max_age)
        except StoreError as e:
            log.warning("cannot collect abandoned downloads of %s: %s", model, e)
            continue
        for path, size in got:
            log.info(
                "collected abandoned partial file %s (%d bytes)",
                path,
                size,
                extra={"event": "gc_incomplete", "model": model, "bytes": size},
            )
        out.extend(got)
    return out


def collect_orphans(store: Store, max_age: float = INCOMPLETE_MAX_AGE) -> list[tuple[Path, int]]:
    """Delete blobs swarm verified that no snapshot links (``Store.collect_orphan_blobs``), untouched
    for ``max_age`` s, in every repo; returns (path, bytes) of each."""
    out = []
    for model in store.models():
        try:
            got = store.collect_orphan_blobs(model, max_age)
        except StoreError as e:
            log.warning("cannot collect unlinked blobs of %s: %s", model, e)
            continue
        for path, size in got:
            log.info(
                "collected unlinked blob %s (%d bytes)",
                path,
                size,
                extra={"event": "gc_orphan", "model": model, "bytes": size},
            )
        out.extend(got)
    return out
