"""Step 1 of the chain: a complete snapshot already in the local HF cache (or in the ModelExpress
cache root), found without network; see :mod:`swarm.sources` for the rules."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import attrs

from swarm.fetchapi import FetchRequest, _abspath, _effective_env
from swarm.manifest import ManifestError, classify, is_tokenizer_file, should_skip, validate_revision
from swarm.selection import select_files
from swarm.store.layout import INCOMPLETE, RepoLayout

__all__ = ["local_snapshot"]

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HASH_CHUNK = 16 << 20


def _expect_mismatches(snapshot: Path, expect: Iterable[tuple[str, str, int | None]]) -> list[str]:
    from swarm.dynamo.card import dir_mismatches

    return dir_mismatches(snapshot, expect)


@attrs.frozen
class _Local:
    path: Path | None
    reason: str
    kind: str  # "ok" | "not_found" | "verification"
    bad: Path | None = None  # the snapshot entry that failed verification
    repo: Path | None = None  # the repo dir holding ``bad``


def local_snapshot(req: FetchRequest) -> Path | None:
    """The snapshot dir of ``req`` in ``req.cache_dir`` (or the ModelExpress cache root) if it is
    complete (see the module doc)."""
    return _inspect_local(req).path


def _cache_roots(req: FetchRequest) -> list[Path]:
    """``req.cache_dir``, then the ModelExpress cache root when one is set (and is another dir)."""
    roots = [req.cache_dir]
    mx = _effective_env(req).modelexpress_cache
    if mx is not None and _abspath(mx) != req.cache_dir:
        roots.append(_abspath(mx))
    return roots


def _inspect_local(req: FetchRequest) -> _Local:
    """The first complete snapshot among :func:`_cache_roots`.  Only ``req.cache_dir`` can fail
    verification (and be repaired): the ModelExpress root belongs to its server, and an incomplete
    or inconsistent snapshot there is simply not used."""
    roots = _cache_roots(req)
    found = _inspect_root(req)
    if found.path is not None or len(roots) == 1:
        return found
    shared = _inspect_root(attrs.evolve(req, cache_dir=roots[1]))
    if shared.path is not None:
        return shared
    if found.kind == "verification":
        return found
    return _Local(None, f"{found.reason}; ModelExpress cache: {shared.reason}", "not_found")


def _selected(req: FetchRequest, paths: Iterable[str], sizes: dict[str, int]) -> list[str]:
    """The paths ``req`` asks for, as every source selects them (:func:`swarm.selection.select_files`:
    huggingface_hub's pattern semantics, then for ``configs_only`` the config files, sizes from
    ``sizes`` where known, without the files a snapshot never carries)."""
    return select_files(
        paths,
        allow_patterns=req.allow_patterns,
        ignore_patterns=req.ignore_patterns,
        configs_only=req.configs_only,
        sizes=sizes,
    )


def _is_ignored(req: FetchRequest, path: str) -> bool:
    return req.ignore_patterns is not None and not select_files([path], ignore_patterns=req.ignore_patterns)


def _scan_snapshot(snap: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Files under ``snap`` (following file symlinks) -> size, and broken entries -> what is wrong
    (a dangling symlink, a link to an ``*.incomplete`` blob, an unreadable entry)."""
    present: dict[str, int] = {}
    broken: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(snap):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, snap).replace(os.sep, "/")
            try:
                st = os.stat(full)
            except FileNotFoundError:
                broken[rel] = f"dangling symlink {rel} -> {os.readlink(full)}"
                continue
            except OSError as exc:
                broken[rel] = f"cannot stat {rel}: {exc}"
                continue
            if os.path.islink(full) and os.path.realpath(full).endswith(".incomplete"):
                broken[rel] = f"{rel} links to an incomplete blob"
                continue
            present[rel] = st.st_size
    return present, broken


def _read_tree_cache(repo: Path, commit: str) -> dict[str, int] | None:
    """huggingface_hub's cached tree listing of ``commit`` (path -> size), if any."""
    try:
        with open(repo / "trees" / f"{commit}.json", encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("format_version") != 1:
            return None
        return {str(p): int(info["size"]) for p, info in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _load_manifest(req: FetchRequest, commit: str):
    try:
        from swarm.store import Store

        return Store(req.cache_dir).load_manifest(req.repo_id, commit)
    except Exception:  # no usable manifest: fall back to the other checks
        return None


def _blake3_file(path: Path) -> bytes:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.digest()


def _index_shards(snap: Path, index_rel: str) -> set[str]:
    """Shard files an ``*.index.json`` names (its ``weight_map`` values), relative to ``snap``."""
    try:
        with open(snap / index_rel, encoding="utf-8") as fh:
            data = json.load(fh)
        values = data.get("weight_map", {}).values()
    except (OSError, ValueError, AttributeError):
        return set()
    base = index_rel.rsplit("/", 1)[0] + "/" if "/" in index_rel else ""
    return {base + v for v in values if isinstance(v, str) and v and ".." not in v.split("/")}


def _sample(items: list[str], n: int = 3) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _inspect_root(req: FetchRequest) -> _Local:
    layout = RepoLayout(req.repo_dir)
    repo = layout.root

    def miss(reason: str) -> _Local:
        return _Local(None, reason, "not_found")

    if not repo.is_dir():
        return miss(f"no snapshot of {req.repo_id} in {req.cache_dir}")
    rev = req.ref
    if _COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = layout.ref_path(rev)
        try:
            found = layout.read_ref(rev)
        except OSError as exc:
            return miss(f"cannot read {ref}: {exc}")
        if found is None:
            return miss(f"no complete snapshot in {repo} (no refs/{rev})")
        commit = found
        try:
            validate_revision(commit)
        except ManifestError:
            return miss(f"{ref} holds an invalid revision {commit[:60]!r}")
    snap = layout.snapshot(commit)
    if not snap.is_dir():
        return miss(f"no complete snapshot in {snap} (missing)")
    present, broken = _scan_snapshot(snap)
    if not present and not broken:
        return miss(f"no complete snapshot in {snap} (empty)")

    tree = _read_tree_cache(repo, commit)
    manifest = _load_manifest(req, commit)
    expected: dict[str, int] | None = None
    listing = ""
    if tree is not None:
        # Files swarm never carries (README.md, .gitattributes, ...) are not required.
        expected = {p: tree[p] for p in _selected(req, tree, tree) if not should_skip(p)}
        listing = "the Hub's tree listing"
    elif manifest is not None:
        idx = manifest.select(
            configs_only=req.configs_only,
            allow_patterns=req.allow_patterns,
            ignore_patterns=req.ignore_patterns,
        )
        expected = {manifest.files[i].path: manifest.files[i].size for i in sorted(idx)}
        listing = "the stored swarm manifest"

    if expected is not None:
        if not expected:
            return miss(f"no file of {req.repo_id}@{commit} matches the request ({listing})")
        missing = sorted(p for p in expected if p not in present)
        for p in missing:
            if p in broken:
                return miss(f"no complete snapshot in {snap}: {broken[p]}")
        if missing:
            return miss(
                f"no complete snapshot in {snap}: {len(missing)} of {len(expected)} requested files "
                f"missing ({_sample(missing)})"
            )
        for p, size in expected.items():
            if present[p] != size:
                bad = f"{snap / p}: {present[p]} bytes on disk, {size} in {listing}"
                return _Local(None, bad, "verification", snap / p, repo)
        chosen = sorted(expected)
    else:
        with contextlib.suppress(OSError):
            leftovers = sorted(e.name for e in os.scandir(layout.blobs) if e.name.endswith(INCOMPLETE))
            if leftovers:
                return miss(f"no complete snapshot in {snap}: interrupted download ({_sample(leftovers, 1)})")
        chosen = sorted(_selected(req, [*present, *broken], present))
        for p in chosen:
            if p in broken:
                return miss(f"no complete snapshot in {snap}: {broken[p]}")
        if not chosen:
            return miss(f"no file in {snap} matches the request")
        for pat in req.allow_patterns or ():
            literal = not _GLOB_CHARS.search(pat) and not pat.endswith("/")
            if literal and pat not in present and not _is_ignored(req, pat):
                return miss(f"no complete snapshot in {snap}: {pat} missing")

    if expected is None and req.allow_patterns is None:
        # No file list: the seed's rule for a configs set (AutoConfig alone leaves config.json).
        if "config.json" not in present:
            return miss(f"no complete snapshot in {snap}: no config.json")
        if not any(is_tokenizer_file(p) for p in present):
            return miss(f"no complete snapshot in {snap}: no tokenizer file (only configs?)")
    if tree is None:
        # Sanity checks where the file list is unknown or may have been built from a partial snapshot.
        whole = not req.configs_only and req.allow_patterns is None
        if whole and not any(classify(p, present[p]) == "weight" for p in chosen):
            return miss(f"no complete snapshot in {snap}: no weight files (a configs-only download?)")
        for p in sorted(present):  # every index in the snapshot, selected or not
            if p.endswith(".index.json"):
                shards = _index_shards(snap, p)
                need = shards if whole else set(_selected(req, shards, {}))
                absent = sorted(need - present.keys())
                if absent:
                    return miss(f"no complete snapshot in {snap}: {_sample(absent)} named by {p} missing")

    if req.verify:
        if manifest is None:
            return miss(f"verification asked but no swarm manifest is stored for {req.repo_id}@{commit}")
        for i in manifest.select(
            configs_only=req.configs_only,
            allow_patterns=req.allow_patterns,
            ignore_patterns=req.ignore_patterns,
        ):
            fe = manifest.files[i]
            if fe.path not in present:
                return miss(f"no complete snapshot in {snap}: {fe.path} missing")
            try:
                digest = _blake3_file(snap / fe.path)
            except OSError as exc:
                return miss(f"cannot read {snap / fe.path}: {exc}")
            if digest != fe.digest:
                bad = f"{snap / fe.path}: blake3 does not match the stored manifest"
                return _Local(None, bad, "verification", snap / fe.path, repo)
    return _Local(snap, f"complete snapshot in {snap}", "ok")


def _evict(repo: Path, entry: Path) -> str:
    """Remove a snapshot entry that failed verification, and the blob it links to (the Hub client
    would otherwise re-link the same bad blob); the next source fetches the file again."""
    try:
        target = Path(os.path.realpath(entry)) if entry.is_symlink() else None
        entry.unlink()
        blobs = os.path.realpath(RepoLayout(repo).blobs)
        if target is not None and os.path.dirname(target) == blobs:
            target.unlink(missing_ok=True)
    except OSError as exc:
        return f"; could not remove it: {exc}"
    return "; removed it"
