"""What the node keeps on disk besides the store: the manifests of served directories
(``_ManifestCache``) and the provenance of every manifest it serves (``_Provenance``)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import attrs
import blake3

from swarm.confine import OutsideTree, confinement_for, stat_file
from swarm.manifest import Manifest, ManifestError, build_manifest
from swarm.trust import next_seq

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split


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
