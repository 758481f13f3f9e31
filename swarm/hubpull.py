"""The origin-once puller's download from the Hub: resumable, and checked before it is used.

``huggingface_hub.snapshot_download`` (the chain's Hub step) cannot resume a file another process
began, so the elected puller downloads by itself, into the same HF cache layout:

* the Hub's model info gives the commit, its tree listing the files (size, git blob sha1, LFS
  sha256); files are selected as every source selects them (``sources._selected``);
* each file goes to ``blobs/<etag>.swarm-partial`` (``etag``: the LFS sha256, else the git blob
  sha1, the names huggingface_hub gives its blobs); a partial file already there (this node's
  earlier attempt, or bytes mirrored from a puller that died, see swarm/origin.py) is resumed with
  an HTTP ``Range`` request from its end, as BEP 19 web seeds are read;
* a complete file is checked against the listing (as ``sources.hub_mismatch`` checks: size, then
  sha256 for LFS files, git blob sha1 for the others; hashed as the bytes arrive, so the file is
  not read a second time) before it is renamed to ``blobs/<etag>`` and linked from
  ``snapshots/<commit>/<path>``. A resumed file that fails is downloaded once more from byte 0
  (the resumed bytes came from a peer); a fresh download that fails means the origin's bytes do
  not match the origin's own listing: :class:`~swarm.sources.VerificationFailed`, nothing linked.

A partial file never gets a blob name, so neither huggingface_hub nor the swarm ever takes it for
a file: it is only a resume point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import attrs

from swarm.manifest import validate_path
from swarm.sources import (
    FetchError,
    FetchRequest,
    HubEntry,
    ModelNotFound,
    VerificationFailed,
    _selected,
)
from swarm.store.layout import RepoLayout

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".swarm-partial"
BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
"""A blob name: a git blob sha1 or an LFS sha256, hex."""
READ_CHUNK = 1 << 20
"""Bytes per read from the HTTP body (and per cancellation check)."""
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
"""Seconds without a byte from the origin before the request fails (the puller is replaced by
the others long before: swarm/origin.py STALL_TIMEOUT)."""


GATES: dict[Path, Callable[[str, int, int, threading.Event], None]] = {}
"""Per blobs directory, a function the download calls after each chunk it writes (blob name, bytes
of that file written so far, the byte this request began at, the stop event): it may hold the
download back. The origin-once
puller registers one that keeps the origin from getting more than ``MIRROR_MAX_LAG`` ahead of its
backup's copy (swarm/origin.py)."""


class Cancelled(Exception):
    """The pull was abandoned (the trio side was cancelled)."""


@attrs.frozen
class HubFileInfo:
    path: str
    entry: HubEntry

    @property
    def etag(self) -> str:
        return (self.entry.lfs_sha256 or self.entry.blob_id).lower()


def list_hub(req: FetchRequest, endpoint: str, token: str | None) -> tuple[str, list[HubFileInfo]]:
    """(commit, the files ``req`` selects) from the Hub's model info and tree listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    commit = api.model_info(req.repo_id, revision=req.revision).sha
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise FetchError(f"{endpoint} gave no commit for {req.repo_id}@{req.ref}")
    files: dict[str, HubEntry] = {}
    for item in api.list_repo_tree(req.repo_id, revision=commit, recursive=True):
        if isinstance(item, RepoFile):
            files[item.path] = HubEntry(item.size, item.blob_id, item.lfs.sha256 if item.lfs else None)
    sizes = {p: e.size for p, e in files.items()}
    chosen = _selected(req, files, sizes)
    out = []
    for p in sorted(chosen):
        validate_path(p)
        info = HubFileInfo(p, files[p])
        if not BLOB_NAME.fullmatch(info.etag):
            raise FetchError(f"{endpoint} lists {p} with an unusable hash {info.etag[:20]!r}")
        out.append(info)
    if not out:
        raise ModelNotFound(f"no file of {req.repo_id}@{req.ref} on {endpoint} matches the request")
    return commit, out


def pull_snapshot(req: FetchRequest, endpoint: str, token: str | None, stop: threading.Event) -> Path:
    """Download what ``req`` selects into ``req.cache_dir`` (HF layout); the snapshot directory.
    Runs in a worker thread; ``stop`` set makes it give up at the next chunk."""
    import httpx

    commit, files = list_hub(req, endpoint, token)
    repo = RepoLayout(req.repo_dir)
    blobs, snap = repo.blobs, repo.snapshot(commit)
    blobs.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(
        connect=CONNECT_TIMEOUT, read=READ_TIMEOUT, write=READ_TIMEOUT, pool=CONNECT_TIMEOUT
    )
    with httpx.Client(timeout=timeout, headers=headers, follow_redirects=True) as client:
        for f in files:
            blob = blobs / f.etag
            if not blob.exists():
                url = f"{endpoint}/{req.repo_id}/resolve/{commit}/{quote(f.path)}"
                _fetch_verified(client, url, blobs / (f.etag + PARTIAL_SUFFIX), blob, f, stop)
    # Linked only once every file is in and verified: a pull abandoned midway (it gave way to
    # another puller, or was cancelled) leaves blobs and partial files, never a snapshot
    # directory, which the swarm would refuse to complete ("created by something other than
    # swarm"): on the testbed two pullers that gave way fell through to the Hub that way.
    for f in files:
        repo.link(snap, f.path, f.etag)
    if req.revision != commit:
        repo.write_ref(req.ref, commit)
    return snap


def _new_digest(entry: HubEntry):
    """The hash the Hub lists for ``entry``, empty: sha256 for LFS files, else the git blob sha1."""
    if entry.lfs_sha256 is not None:
        return hashlib.sha256()
    return hashlib.sha1(b"blob %d\0" % entry.size, usedforsecurity=False)


def _mismatch(digest, entry: HubEntry) -> str | None:
    """Why a file hashed into ``digest`` is not the one the Hub lists (None: it is), worded as
    ``sources.hub_mismatch`` words it."""
    got = digest.hexdigest()
    if entry.lfs_sha256 is not None:
        if got != entry.lfs_sha256.lower():
            return f"sha256 {got[:16]}..., the Hub lists {entry.lfs_sha256[:16]}..."
        return None
    if got != entry.blob_id.lower():
        return f"git blob sha1 {got[:16]}..., the Hub lists {entry.blob_id[:16]}..."
    return None


def _fetch_verified(
    client, url: str, partial: Path, blob: Path, f: HubFileInfo, stop: threading.Event
) -> None:
    resumed = partial.stat().st_size if partial.exists() else 0
    log.debug("pulling %s from byte %d of %d", f.path, resumed, f.entry.size)
    # Hashed as the bytes arrive (the resumed part first): no second read of the whole file, and
    # the puller reports "seeded" that much sooner.
    why = _mismatch(_download(client, url, partial, f.entry, stop), f.entry)
    if why is not None and resumed:  # the resumed bytes came from elsewhere: once more, from 0
        partial.unlink(missing_ok=True)
        why = _mismatch(_download(client, url, partial, f.entry, stop), f.entry)
    if why is not None:
        partial.unlink(missing_ok=True)
        raise VerificationFailed(
            f"{f.path} from {url.split('/resolve/')[0]} does not match the Hub's listing: {why}; refused"
        )
    os.replace(partial, blob)


def _download(client, url: str, partial: Path, entry: HubEntry, stop: threading.Event):
    """Bring ``partial`` to the ``entry``'s size, resuming from its end with a Range request; the
    digest (``_new_digest``) of the whole file, fed as the bytes were written."""
    size = entry.size
    digest = _new_digest(entry)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have:
        with open(partial, "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                digest.update(chunk)
    if have == size:
        return digest
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 200:
            have = 0  # the server ignored the range: start over
            digest = _new_digest(entry)
        elif r.status_code == 206:
            if not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise FetchError(
                    f"{url}: Content-Range {r.headers.get('Content-Range')!r} does not start at {have}"
                )
        else:
            raise FetchError(f"{url}: HTTP {r.status_code}")
        began = have
        with open(partial, "ab" if have else "wb") as out:
            for chunk in r.iter_bytes(READ_CHUNK):
                if stop.is_set():
                    raise Cancelled("pull abandoned")
                have += len(chunk)
                if have > size:
                    raise VerificationFailed(f"{url}: more than the {size} bytes the Hub lists")
                out.write(chunk)
                digest.update(chunk)
                gate = GATES.get(partial.parent)
                if gate is not None:
                    out.flush()
                    gate(partial.name.removesuffix(PARTIAL_SUFFIX), have, began, stop)
    if have != size:
        raise FetchError(f"{url}: body ended at {have} of {size} bytes")
    return digest
