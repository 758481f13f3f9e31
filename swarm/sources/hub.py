"""Step 4 of the chain: the Hugging Face Hub (``huggingface_hub``, imported on first use), and the
checks of what it wrote against the Hub's own listing (sizes, sha256 of LFS files, git blob sha1)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import attrs
import trio

from swarm.fetchapi import (
    FetchError,
    FetchRequest,
    ModelNotFound,
    SourceSkipped,
    VerificationFailed,
    _effective_env,
)
from swarm.sources.local import _HASH_CHUNK, _evict, _selected

__all__ = ["HubEntry", "from_hub", "hub_error", "hub_mismatch", "verify_hub_snapshot"]


def _sync_hub_constants(endpoint: str) -> None:
    """Make ``huggingface_hub`` follow this request's endpoint and online mode.

    ``huggingface_hub.constants`` reads ``HF_ENDPOINT`` (``ENDPOINT`` and the resolve-URL template)
    and ``HF_HUB_OFFLINE`` once, at import, in the process running the chain -- the node's, not the
    caller's.  We pass ``endpoint=`` explicitly, but some requests still use the import-time constant
    -- notably the user-agent's agent-registry lookup (``{constants.ENDPOINT}/api/agent-harnesses``),
    which would otherwise reach huggingface.co even with ``HF_ENDPOINT`` pointing at a mirror -- and
    the offline flag gates every request.  So both are set to the request's values before each
    download (an offline request never gets here: the Hub step is skipped).
    """
    from huggingface_hub import constants

    if endpoint != constants.ENDPOINT:
        constants.ENDPOINT = endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    if constants.HF_HUB_OFFLINE:
        constants.HF_HUB_OFFLINE = False


def _glob_literal(path: str) -> str:
    """A huggingface_hub (fnmatch) pattern matching exactly ``path``."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _hub_configs(req: FetchRequest, endpoint: str, token: str | None) -> list[str]:
    """The files of the repo a configs-only request wants, chosen by :func:`_selected` (so by
    ``classify()``, with sizes) over the Hub's tree listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    tree = HfApi(endpoint=endpoint, token=token).list_repo_tree(
        req.repo_id, revision=req.revision, recursive=True
    )
    sizes = {e.path: int(e.size) for e in tree if isinstance(e, RepoFile)}
    return _selected(req, sizes, sizes)


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

    return QuietTqdm


def hub_error(exc: BaseException, req: FetchRequest, endpoint: str) -> FetchError:
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    http = f"HTTP {status} from {endpoint}" if status is not None else f"from {endpoint}"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    gated = getattr(errors, "GatedRepoError", ())
    disabled = getattr(errors, "DisabledRepoError", ())
    if gated and isinstance(exc, gated):
        return FetchError(f"{http}: {req.repo_id} is gated; set HF_TOKEN to a token with access")
    if disabled and isinstance(exc, disabled):
        return ModelNotFound(f"{http}: {req.repo_id} is disabled")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelNotFound(
            f"{http}: repository {req.repo_id} not found (or private without a valid HF_TOKEN)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelNotFound(f"{http}: revision {req.ref!r} of {req.repo_id} not found")
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return FetchError(f"cannot reach {endpoint}: {first_line}")
    if isinstance(exc, errors.EntryNotFoundError):
        return ModelNotFound(f"{http}: a file of {req.repo_id} was not found: {first_line}")
    if isinstance(exc, errors.HfHubHTTPError):
        return FetchError(f"{http}: {first_line}")
    if "Consistency check failed" in str(exc):
        return VerificationFailed(f"download from {endpoint} failed its size check: {first_line}")
    transport = type(exc).__module__.startswith(("httpx", "httpcore"))
    if transport or isinstance(exc, ConnectionError | TimeoutError):
        return FetchError(f"cannot reach {endpoint}: {type(exc).__name__}: {first_line}")
    return FetchError(f"{type(exc).__name__} from {endpoint}: {first_line}")


async def from_hub(req: FetchRequest) -> Path:
    """``huggingface_hub.snapshot_download`` of ``req`` into ``req.cache_dir``; the snapshot dir.

    Offline mode, endpoint and token are the request's (:class:`SourceEnv`, over this process's
    environment): skipped (:class:`SourceSkipped`) when offline.  ``configs_only`` lists the repo's
    tree and downloads exactly the files :func:`_selected` picks.  Raises :class:`ModelNotFound`,
    :class:`VerificationFailed` or :class:`FetchError`.
    """
    env = _effective_env(req)
    if env.hub_offline:
        raise SourceSkipped("HF_HUB_OFFLINE is set")
    from huggingface_hub import snapshot_download

    endpoint = env.endpoint
    tqdm_class = _quiet_tqdm()

    def run() -> str | None:
        _sync_hub_constants(endpoint)
        allow = list(req.allow_patterns) if req.allow_patterns is not None else None
        ignore = list(req.ignore_patterns) if req.ignore_patterns is not None else None
        if req.configs_only:
            names = _hub_configs(req, endpoint, env.hf_token)
            if not names:
                return None
            allow, ignore = [_glob_literal(p) for p in names], None
        return snapshot_download(
            req.repo_id,
            revision=req.revision,
            cache_dir=str(req.cache_dir),
            allow_patterns=allow,
            ignore_patterns=ignore,
            endpoint=endpoint,
            token=env.hf_token,
            tqdm_class=tqdm_class,
        )

    try:
        got = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except Exception as exc:
        raise hub_error(exc, req, endpoint) from None
    path = None if got is None else Path(got)
    if path is None or not path.is_dir() or not any(path.iterdir()):
        raise ModelNotFound(f"no file of {req.repo_id}@{req.ref} on {endpoint} matches the request")
    await trio.to_thread.run_sync(
        verify_hub_snapshot, req, path, endpoint, env.hf_token, abandon_on_cancel=True
    )
    return path


@attrs.frozen
class HubEntry:
    """What the Hub's tree listing says of one file: the checks its bytes must pass."""

    size: int
    blob_id: str  # git blob sha1 of the file (of the LFS pointer for an LFS file)
    lfs_sha256: str | None  # sha256 of the content, for LFS files


def _hub_tree(req: FetchRequest, commit: str, endpoint: str, token: str | None) -> dict[str, HubEntry]:
    """The Hub's tree listing of ``commit``: huggingface_hub's cached copy (``trees/<commit>.json``,
    written by its ``snapshot_download``), else asked of the Hub (one request)."""
    try:
        with open(req.repo_dir / "trees" / f"{commit}.json", encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("format_version") == 1:
            return {
                str(p): HubEntry(int(i["size"]), str(i["blob_id"]), i.get("lfs_sha256"))
                for p, i in data["files"].items()
            }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    out = {}
    for item in HfApi(endpoint=endpoint, token=token).list_repo_tree(
        req.repo_id, revision=commit, recursive=True
    ):
        if isinstance(item, RepoFile):
            out[item.path] = HubEntry(item.size, item.blob_id, item.lfs.sha256 if item.lfs else None)
    return out


def _file_digest(path: Path, h) -> str:
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hub_mismatch(path: Path, entry: HubEntry) -> str | None:
    """Why the file at ``path`` is not the one the Hub lists, or None when it is: its size, then
    the sha256 of the content for an LFS file (the Hub's ``lfs.oid``, also its ``X-Linked-Etag``),
    else the git blob sha1 (the tree's ``oid``, also the file's ``ETag``)."""
    size = path.stat().st_size
    if size != entry.size:
        return f"{size} bytes, the Hub lists {entry.size}"
    if entry.lfs_sha256 is not None:
        sha256 = _file_digest(path, hashlib.sha256())
        if sha256 != entry.lfs_sha256.lower():
            return f"sha256 {sha256[:16]}..., the Hub lists {entry.lfs_sha256[:16]}..."
        return None
    sha1 = _file_digest(path, hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False))
    if sha1 != entry.blob_id.lower():
        return f"git blob sha1 {sha1[:16]}..., the Hub lists {entry.blob_id[:16]}..."
    return None


def verify_hub_snapshot(req: FetchRequest, snap: Path, endpoint: str, token: str | None) -> None:
    """Check every file of a snapshot the Hub client wrote against the Hub's own listing (sizes,
    sha256 of LFS files, git blob sha1 of the others) before anyone uses or serves it: the Hub
    client checks sizes but not content. A file that fails is evicted (entry and blob) and
    :class:`VerificationFailed` raised; a file the listing does not name fails too."""
    commit = snap.name
    try:
        tree = _hub_tree(req, commit, endpoint, token)
    except Exception as exc:
        raise FetchError(
            f"cannot list {req.repo_id}@{commit} on {endpoint} to verify the download: {exc}"
        ) from None
    bad = []
    for f in sorted(p for p in snap.rglob("*") if p.is_file()):
        rel = f.relative_to(snap).as_posix()
        entry = tree.get(rel)
        why = f"not in the Hub's listing of {commit}" if entry is None else hub_mismatch(f, entry)
        if why is not None:
            bad.append(f"{rel}: {why}{_evict(req.repo_dir, f)}")
    if bad:
        raise VerificationFailed(
            f"{req.repo_id}@{commit} from {endpoint} does not match the Hub's listing: {'; '.join(bad[:4])}"
        )
