"""Delivering a fetched snapshot where the caller asked for it: in the caller's hub cache
(``cache_dir``: blobs linked or copied, snapshot symlinks, ``refs/<branch>``) and in a plain
directory (``local_dir``: large files hard-linked, small ones copied). The files are those the
request selects (:func:`swarm.selection.select_files`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

__all__ = ["LINK_MIN_BYTES", "deliver", "selected_files"]


def selected_files(snapshot: Path, req: Any) -> list[str]:
    """Files of ``snapshot`` (relative POSIX paths, sorted) that the request asks for
    (:func:`swarm.selection.select_files`)."""
    from swarm.selection import select_files

    present: dict[str, int] = {}
    for dirpath, dirs, files in os.walk(snapshot):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, snapshot).replace(os.sep, "/")
            try:
                present[rel] = os.path.getsize(full) if req.configs_only else -1
            except OSError:
                continue
    return select_files(
        present,
        allow_patterns=req.allow_patterns,
        ignore_patterns=req.ignore_patterns,
        configs_only=req.configs_only,
        sizes=present,
    )


LINK_MIN_BYTES = 64 << 20
"""Files this large are hard-linked into ``local_dir`` when possible (weights: a copy costs time and
disk); smaller ones (configs, which people edit in place) are copied, so an edit never reaches the
verified blob the node serves to its peers."""


def _place(src: Path, dest: Path, *, link: bool = True) -> None:
    """Make ``dest`` a copy of the file ``src`` (a hard link when ``link`` and possible), atomically."""
    src = src.resolve()
    with contextlib.suppress(OSError):
        if not dest.is_symlink() and dest.exists():
            if os.path.samefile(src, dest):
                return
            a, b = src.stat(), dest.stat()
            if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
                return  # our earlier copy (copy2 keeps the mtime) of an immutable blob
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.swarm-{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        try:
            if not link:
                raise OSError("copy")
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _to_local_dir(snapshot: Path, local_dir: Path, req: Any) -> Path:
    local_dir = Path(local_dir).expanduser().absolute()
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel in selected_files(snapshot, req):
        src = snapshot / rel
        _place(src, local_dir / rel, link=src.stat().st_size >= LINK_MIN_BYTES)
    return local_dir


def _blob_name(src: Path, blobs: Path | None) -> str:
    """The blob name of a file in a hub cache's ``blobs`` (its name there), else its blake3."""
    if blobs is not None and src.parent == blobs:
        return src.name
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(src, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _to_cache(snapshot: Path, cache_dir: Path, req: Any, revision: str) -> Path:
    """Lay the requested files of ``snapshot`` out in the hub cache ``cache_dir`` (blobs linked or
    copied, snapshot symlinks, ``refs/<branch>``); the new snapshot directory."""
    from swarm.store.layout import RepoLayout, snapshot_parts  # light: not the download machinery

    home = snapshot_parts(snapshot)  # (repo, revision) when the snapshot is in a hub cache (the node's)
    blobs = RepoLayout(home[0]).blobs.resolve() if home is not None else None
    repo = RepoLayout.of(Path(cache_dir).expanduser().absolute(), req.repo_id)
    snap = repo.snapshot(revision)
    for rel in selected_files(snapshot, req):
        src = (snapshot / rel).resolve()
        blob = _blob_name(src, blobs)
        _place(src, repo.blob(blob))
        repo.link(snap, rel, blob)
    ref = req.revision or "main"
    if ref != revision:
        repo.write_ref(ref, revision)
    return snap


def deliver(result: Any, req: Any, cache_dir_given: bool, local_dir: os.PathLike | str | None) -> Any:
    """Apply ``cache_dir`` / ``local_dir`` to a result whose snapshot may live in the node's cache."""
    if not cache_dir_given and local_dir is None:
        return result  # nothing to do (and attrs not loaded for it)
    import attrs

    path = Path(result.path)
    if cache_dir_given:
        want = Path(req.cache_dir).expanduser().absolute()
        try:
            inside = path.resolve().is_relative_to(want.resolve())
        except OSError:
            inside = False
        if not inside:
            path = _to_cache(path, want, req, result.revision)
    if local_dir is not None:
        path = _to_local_dir(path, Path(local_dir), req)
    return attrs.evolve(result, path=path)
