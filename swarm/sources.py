"""The fallback chain behind ``swarm.fetch``: local HF cache -> ModelExpress -> swarm -> Hugging Face Hub.

:func:`fetch_chain` tries each source in turn and returns the first verified snapshot directory (HF
cache layout: ``<cache>/models--org--name/snapshots/<revision>/``; ``models--name`` for a
single-part name such as ``gpt2``).  Every source leaves an :class:`Attempt` -- taken or skipped,
and why -- and when all fail the error is typed:

* :class:`VerificationFailed` if any source produced data that failed verification;
* :class:`ModelNotFound` if every source was skipped or reported that it does not have the model;
* :class:`FetchTimeout` if ``FetchRequest.timeout`` expired (the source in progress is cancelled);
* :class:`FetchError` otherwise (a source failed for another reason, e.g. a server was down).

The message of each lists every source with its outcome and reason.

The environment that steers the sources -- ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_ENDPOINT``,
``MODEL_EXPRESS_URL``, ``MODEL_EXPRESS_CACHE_PATH`` -- is the caller's: ``FetchRequest.env``
(:class:`SourceEnv`) carries what the calling process has set, ``swarm.fetch`` sends it to the node
with the request, and only what the caller left unset falls back to the node's own environment.

Every source selects files the same way: the request's allow/ignore patterns (huggingface_hub's
semantics), then for ``configs_only`` :func:`swarm.manifest.classify` over a listing with sizes
(the manifest, ModelExpress's ``ListModelFiles``, the Hub's tree, the Hub's cached tree).

1. **local-cache** (:func:`local_snapshot`): in ``FetchRequest.cache_dir``, then in the
   ModelExpress cache root (``MODEL_EXPRESS_CACHE_PATH``, or ModelExpress's current name
   ``MODEL_EXPRESS_CACHE_DIRECTORY``; a cache shared with a ModelExpress server, read only), resolve
   the revision the way ``huggingface_hub`` does offline (``refs/<name>`` for a branch or tag,
   ``snapshots/<sha>`` for a commit) and check that the snapshot holds every requested file.  The
   list of files a commit should have comes from ``huggingface_hub``'s tree cache
   (``trees/<commit>.json``, written by its ``snapshot_download``) or else from a swarm manifest
   stored beside the snapshot (swarm/store.py); sizes are checked against it, and blake3 digests too
   when ``FetchRequest.verify`` is set (which needs a stored manifest).  A dangling symlink or a link
   to an ``*.incomplete`` blob means incomplete.  Without a file list, a snapshot counts as a configs
   set only with ``config.json`` and a tokenizer file (:data:`swarm.manifest.TOKENIZER_PATTERNS`:
   ``AutoConfig`` alone leaves just ``config.json`` behind), a request for the whole model also
   needs at least one weight file and every shard named by an ``*.index.json``, and a leftover
   ``blobs/*.incomplete`` (an interrupted download) means incomplete.
2. **modelexpress** (:func:`from_modelexpress`), only when ``MODEL_EXPRESS_URL`` is set: see
   :mod:`swarm.modelexpress.client`.  The revision is sent to the server (a branch, tag or commit;
   none for the default branch) and the server's resolved commit is checked; ``configs_only`` asks
   it for ``ignore_weights``.
3. **swarm**: the callable the node passes in.  It should raise :class:`ModelNotFound` when no peer
   has the model (e.g. no providers in the DHT), :class:`VerificationFailed` when peers only sent bad
   data, or :class:`SourceSkipped` to record a skip; any other exception is recorded as a failure.
4. **hub** (:func:`from_hub`): ``huggingface_hub.snapshot_download`` in a worker thread; skipped when
   ``HF_HUB_OFFLINE`` is set.  ``configs_only`` lists the repo's tree first and downloads exactly the
   files ``classify()`` calls configs.

Steps 2 and 4 leave their result in the HF cache layout under ``FetchRequest.cache_dir``; building a
manifest and seeding it is the caller's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import attrs
import blake3
import trio

from swarm.manifest import (
    ManifestError,
    classify,
    is_tokenizer_file,
    should_skip,
    validate_model_name,
    validate_path,
    validate_revision,
)

__all__ = [
    "SOURCES",
    "Attempt",
    "FetchError",
    "FetchRequest",
    "FetchResult",
    "FetchTimeout",
    "ModelNotFound",
    "SourceEnv",
    "SourceSkipped",
    "VerificationFailed",
    "default_cache_dir",
    "fetch_chain",
    "from_hub",
    "from_modelexpress",
    "local_snapshot",
]

SOURCES = ("local-cache", "modelexpress", "swarm", "hub")
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"

# A value of SourceEnv sent over the control socket: tokens are ~40 characters, URLs and paths a few
# hundred at most; this bounds what a request may make the node hold.
MAX_ENV_VALUE_CHARS = 4096

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_GLOB_CHARS = re.compile(r"[*?\[]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HASH_CHUNK = 16 << 20


# --- the caller's environment ------------------------------------------------------------------

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


def _set(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to a non-empty value (empty counts as unset, as in huggingface_hub)."""
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def _check_env_text(_inst: object, attr: attrs.Attribute, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{attr.name} must be a string or None")
    if not value or len(value) > MAX_ENV_VALUE_CHARS or _CONTROL_CHARS.search(value):
        raise ValueError(f"{attr.name}: 1-{MAX_ENV_VALUE_CHARS} characters, no control characters")


def _check_endpoint(inst: object, attr: attrs.Attribute, value: str | None) -> None:
    _check_env_text(inst, attr, value)
    if value is not None and not value.lower().startswith(("http://", "https://")):
        raise ValueError(f"{attr.name} must be an http:// or https:// URL")


def _check_cache_root(inst: object, attr: attrs.Attribute, value: str | None) -> None:
    _check_env_text(inst, attr, value)
    if value is not None and not os.path.isabs(os.path.expanduser(value)):
        raise ValueError(f"{attr.name} must be an absolute path")


def _check_offline(_inst: object, attr: attrs.Attribute, value: bool | None) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be true, false or None")


def _hide(value: str | None) -> str:
    return "None" if value is None else "'***'"


@attrs.frozen
class SourceEnv:
    """The environment variables that steer the sources, as one process has them; None = not set.

    ``swarm.fetch`` takes the calling process's (:meth:`from_environ`) and sends it to the node with
    the request, so the caller decides; what the caller left unset falls back to the node's own
    environment (:meth:`over`).  The token is never shown (``repr``) nor logged.
    """

    hub_offline: bool | None = attrs.field(default=None, validator=_check_offline)
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` (huggingface_hub's truth values)."""
    hf_token: str | None = attrs.field(default=None, validator=_check_env_text, repr=_hide)
    """``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``)."""
    hf_endpoint: str | None = attrs.field(default=None, validator=_check_endpoint)
    """``HF_ENDPOINT``."""
    modelexpress_url: str | None = attrs.field(default=None, validator=_check_env_text)
    """``MODEL_EXPRESS_URL``."""
    modelexpress_cache: str | None = attrs.field(default=None, validator=_check_cache_root)
    """``MODEL_EXPRESS_CACHE_PATH`` (or ModelExpress's current name ``MODEL_EXPRESS_CACHE_DIRECTORY``)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SourceEnv:
        env = os.environ if environ is None else environ
        offline = [env.get(n) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if env.get(n)]
        cache = _set(env, "MODEL_EXPRESS_CACHE_PATH", "MODEL_EXPRESS_CACHE_DIRECTORY")
        return cls(
            hub_offline=any(v.upper() in _TRUE for v in offline) if offline else None,
            hf_token=_set(env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            hf_endpoint=_set(env, "HF_ENDPOINT"),
            modelexpress_url=_set(env, "MODEL_EXPRESS_URL"),
            modelexpress_cache=None if cache is None else str(_abspath(cache)),
        )

    def over(self, fallback: SourceEnv) -> SourceEnv:
        """This environment, with ``fallback``'s values where this one has none."""
        return SourceEnv(
            **{
                f.name: getattr(fallback, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in attrs.fields(SourceEnv)
            }
        )

    def to_json(self) -> dict:
        """The values that are set (what a fetch request carries to the node)."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: object) -> SourceEnv:
        """The inverse of :meth:`to_json`; ValueError / TypeError on anything else."""
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise TypeError("env must be an object")
        names = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown env field(s): {', '.join(unknown)}")
        return cls(**obj)

    @property
    def endpoint(self) -> str:
        return (self.hf_endpoint or DEFAULT_HUB_ENDPOINT).rstrip("/")


def _effective_env(req: FetchRequest) -> SourceEnv:
    """The request's environment over this process's, read now."""
    return req.env.over(SourceEnv.from_environ())


# --- values ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The HF hub cache dir from the environment *now* (``HF_HUB_CACHE``, ``HF_HOME``, XDG, ~)."""
    env = os.environ
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not raw:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        raw = os.path.join(home, "hub")
    return _abspath(os.path.expandvars(raw))


def _abspath(value: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"patterns must be strings, got {p!r}")
    return out


def _check_revision(_inst: object, _attr: object, value: str | None) -> None:
    if value is None:
        return
    # A branch, a tag or a commit; HF refs may contain "/" (refs/pr/1), each part a safe name.
    for part in str(value).split("/"):
        validate_revision(part)


MAX_EXPECT = 1000
"""Most expected files one request may carry (a Dynamo card lists tens)."""
_DIGEST_RE = re.compile(r"blake3:[0-9a-f]{64}")


def _expect(value: Iterable | None) -> tuple[tuple[str, str, int | None], ...] | None:
    if value is None:
        return None
    out = []
    for item in value:
        path, checksum, size = item
        validate_path(path)
        if not isinstance(checksum, str) or not _DIGEST_RE.fullmatch(checksum):
            raise ValueError(f"expect: {checksum!r} is not 'blake3:<64 lowercase hex>'")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"expect: size {size!r} is not a byte count")
        out.append((path, checksum, size))
    if not out or len(out) > MAX_EXPECT:
        raise ValueError(f"expect: 1 to {MAX_EXPECT} files, got {len(out)}")
    return tuple(sorted(out))


def _check_repo(_inst: object, _attr: object, value: str) -> None:
    validate_model_name(value)


@attrs.frozen
class FetchRequest:
    """What to fetch.  ``revision`` None means the default branch (``main``)."""

    repo_id: str = attrs.field(validator=_check_repo)
    revision: str | None = attrs.field(default=None, validator=_check_revision)
    allow_patterns: tuple[str, ...] | None = attrs.field(default=None, converter=_patterns)
    ignore_patterns: tuple[str, ...] | None = attrs.field(default=None, converter=_patterns)
    configs_only: bool = False
    cache_dir: Path = attrs.field(factory=default_cache_dir, converter=_abspath)
    timeout: float | None = None
    verify: bool = False
    """Also re-hash the local snapshot against its stored swarm manifest (blake3) in step 1."""
    expect: tuple[tuple[str, str, int | None], ...] | None = attrs.field(default=None, converter=_expect)
    """Files the result must hold with exactly these bytes: ``(path, "blake3:<hex>", size or
    None)``, e.g. a Dynamo card's files. The swarm takes only a manifest whose entries match, and a
    local snapshot that differs is passed over."""
    env: SourceEnv = attrs.field(factory=SourceEnv, validator=attrs.validators.instance_of(SourceEnv))
    """The caller's environment (``SourceEnv.from_environ()`` in ``swarm.fetch``); unset values fall
    back to the environment of the process running the chain."""

    @property
    def ref(self) -> str:
        return self.revision or "main"

    @property
    def repo_dir(self) -> Path:
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))


@attrs.frozen
class Attempt:
    source: str  # "local-cache" | "modelexpress" | "swarm" | "hub"
    outcome: str  # "ok" | "skipped" | "failed"
    reason: str


@attrs.frozen
class FetchResult:
    path: Path  # the snapshot directory
    source: str
    revision: str
    attempts: tuple[Attempt, ...]


class FetchError(Exception):
    """A fetch failed.  ``attempts`` holds what each source did (empty when raised by one source)."""

    def __init__(self, message: str, attempts: Iterable[Attempt] = ()) -> None:
        super().__init__(message)
        self.attempts: tuple[Attempt, ...] = tuple(attempts)

    def __reduce__(self):
        return (type(self), (str(self), self.attempts))


class ModelNotFound(FetchError):
    """No source has the model (or the revision, or any file matching the request)."""


class VerificationFailed(FetchError):
    """Data from some source failed verification (sizes, digests, unsafe or inconsistent files)."""


class FetchTimeout(FetchError):
    """``FetchRequest.timeout`` expired."""


class SourceSkipped(Exception):
    """Raised by a source that does not apply; its message is the recorded reason."""


# --- step 1: the local cache -------------------------------------------------------------------


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
    """The paths ``req`` asks for, as every source selects them: huggingface_hub's pattern semantics
    over the request's own patterns, then, for ``configs_only``, ``classify() == "config"`` (sizes
    from ``sizes`` where known) without the files a snapshot never carries (``should_skip``:
    README.md, .gitattributes, images, ...), as the swarm's manifests leave them out."""
    from huggingface_hub.utils import filter_repo_objects

    allow = list(req.allow_patterns) if req.allow_patterns is not None else None
    ignore = list(req.ignore_patterns) if req.ignore_patterns is not None else None
    chosen = list(filter_repo_objects(items=list(paths), allow_patterns=allow, ignore_patterns=ignore))
    if req.configs_only:
        chosen = [p for p in chosen if classify(p, sizes.get(p)) == "config" and not should_skip(p)]
    return chosen


def _is_ignored(req: FetchRequest, path: str) -> bool:
    from huggingface_hub.utils import filter_repo_objects

    if req.ignore_patterns is None:
        return False
    return not list(filter_repo_objects(items=[path], ignore_patterns=list(req.ignore_patterns)))


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
    repo = req.repo_dir

    def miss(reason: str) -> _Local:
        return _Local(None, reason, "not_found")

    if not repo.is_dir():
        return miss(f"no snapshot of {req.repo_id} in {req.cache_dir}")
    rev = req.ref
    if _COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = repo / "refs" / rev
        try:
            commit = ref.read_text().strip()
        except FileNotFoundError:
            return miss(f"no complete snapshot in {repo} (no refs/{rev})")
        except OSError as exc:
            return miss(f"cannot read {ref}: {exc}")
        try:
            validate_revision(commit)
        except ManifestError:
            return miss(f"{ref} holds an invalid revision {commit[:60]!r}")
    snap = repo / "snapshots" / commit
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
        blobs = repo / "blobs"
        with contextlib.suppress(OSError):
            leftovers = sorted(e.name for e in os.scandir(blobs) if e.name.endswith(".incomplete"))
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
        blobs = os.path.realpath(repo / "blobs")
        if target is not None and os.path.dirname(target) == blobs:
            target.unlink(missing_ok=True)
    except OSError as exc:
        return f"; could not remove it: {exc}"
    return "; removed it"


# --- step 2: ModelExpress ----------------------------------------------------------------------


def _thread_emitter(emit: Callable[[dict], None]) -> Callable[[dict], None]:
    """An event sink for a trio worker thread: runs ``emit`` on the trio thread, best effort."""

    def from_thread(event: dict) -> None:
        with contextlib.suppress(Exception, trio.Cancelled):
            trio.from_thread.run_sync(emit, event)

    return from_thread


def _remaining() -> float | None:
    left = trio.current_effective_deadline() - trio.current_time()
    return None if math.isinf(left) else max(left, 0.001)


async def from_modelexpress(
    req: FetchRequest, url: str, *, on_event: Callable[[dict], None] | None = None
) -> Path:
    """Fetch ``req`` from the ModelExpress server at ``url`` into ``req.cache_dir``; the snapshot dir.

    The revision goes to the server (``main`` and None as the server's default branch, which keeps
    working with servers from before pinned revisions and through the server's Hub outages); a
    ``configs_only`` request asks it for ``ignore_weights``.  After the server holds the model, a
    complete snapshot of the resolved commit already in one of our cache roots (shared storage) is
    returned without streaming.

    Raises :class:`ModelNotFound` (the server lacks the model, the revision or matching files),
    :class:`VerificationFailed` (the server sent bad data: unsafe paths, wrong sizes or offsets, a
    commit that is not the one asked for), or :class:`FetchError` (unreachable, server error, a
    server that cannot pin revisions, timeout).
    """
    from swarm.modelexpress.client import (
        ModelExpressClient,
        ModelExpressError,
        ModelExpressNotFound,
        ModelExpressProtocolError,
    )

    rev = None if req.revision in (None, "main") else req.revision
    left = _remaining()
    try:
        # The chain's deadline rules (cancelling the calls below); the gRPC deadline, a little later,
        # only guarantees that an abandoned worker thread ends.
        client = ModelExpressClient(url, timeout=None if left is None else left + 2.0)
    except ValueError as exc:
        raise FetchError(f"invalid MODEL_EXPRESS_URL {url!r}: {exc}") from None
    emit = on_event or (lambda e: None)

    def want(path: str, size: int) -> bool:
        return bool(_selected(req, [path], {path: size}))

    def shared(commit: str | None) -> Path | None:
        return local_snapshot(req if commit is None else attrs.evolve(req, revision=commit))

    def run() -> Path:
        with client:
            return client.download_snapshot(
                req.repo_id,
                req.cache_dir,
                want=want,
                revision=rev,
                ignore_weights=req.configs_only,
                skip_stream=shared,
                on_event=_thread_emitter(emit),
            )

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except ModelExpressNotFound as exc:
        raise ModelNotFound(str(exc)) from None
    except ModelExpressProtocolError as exc:
        raise VerificationFailed(str(exc)) from None
    except ModelExpressError as exc:
        raise FetchError(str(exc)) from None
    except OSError as exc:
        raise FetchError(f"writing ModelExpress files into {req.cache_dir}: {exc}") from None
    except BaseException:
        client.cancel()  # cancelled (timeout): stop the calls in the abandoned thread
        raise


# --- step 4: the Hub ---------------------------------------------------------------------------


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


# --- the chain ---------------------------------------------------------------------------------


class _FromEnv:
    def __repr__(self) -> str:
        return "os.environ['MODEL_EXPRESS_URL']"


_FROM_ENV: str | None = _FromEnv()  # type: ignore[assignment]


def _safe_emit(on_event: Callable[[dict], None] | None) -> Callable[[dict], None]:
    if on_event is None:
        return lambda event: None

    def emit(event: dict) -> None:
        try:
            on_event(event)
        except Exception:  # an observer must not break a fetch
            import logging

            logging.getLogger(__name__).exception("on_event callback failed")

    return emit


def _format_failure(req: FetchRequest, headline: str, attempts: list[Attempt]) -> str:
    lines = [f"cannot fetch {req.repo_id}@{req.ref}: {headline}"]
    lines += [f"  {a.source}: {a.outcome}: {a.reason}" for a in attempts]
    return "\n".join(lines)


async def fetch_chain(
    req: FetchRequest,
    *,
    swarm: Callable[[FetchRequest], Awaitable[Path]] | None,
    modelexpress_url: str | None = _FROM_ENV,
    on_event: Callable[[dict], None] | None = None,
) -> FetchResult:
    """Try local cache -> ModelExpress -> swarm -> Hub; return the first success (see module doc).

    The ModelExpress URL is ``req.env.modelexpress_url`` (the caller's) when set, else
    ``modelexpress_url`` (the node's setting), which defaults to ``MODEL_EXPRESS_URL`` as set at call
    time; None or "" skips ModelExpress.  ``swarm`` None skips the swarm.  ``on_event(dict)`` gets
    ``{"event": "source", "source": ...}`` when a source starts, ``{"event": "attempt", "source",
    "outcome", "reason", "seconds"}`` when it ends, source-specific progress events, and
    ``{"event": "fetched", ...}``.
    """
    if req.env.modelexpress_url is not None:  # the caller's setting wins over the node's
        modelexpress_url = req.env.modelexpress_url
    elif modelexpress_url is _FROM_ENV:
        modelexpress_url = os.environ.get("MODEL_EXPRESS_URL") or None
    emit = _safe_emit(on_event)

    async def local() -> Path:
        found = await trio.to_thread.run_sync(_inspect_local, req, abandon_on_cancel=True)
        if found.path is not None and req.expect:
            differ = await trio.to_thread.run_sync(
                _expect_mismatches, found.path, req.expect, abandon_on_cancel=True
            )
            if differ:
                raise ModelNotFound(
                    f"the local snapshot differs from the expected files: {'; '.join(differ[:3])}"
                )
        if found.path is not None:
            return found.path
        if found.kind != "verification":
            raise ModelNotFound(found.reason)
        repo = found.repo or req.repo_dir
        note = "" if found.bad is None else await trio.to_thread.run_sync(_evict, repo, found.bad)
        raise VerificationFailed(found.reason + note)

    async def modelexpress() -> Path:
        if not modelexpress_url:
            raise SourceSkipped("MODEL_EXPRESS_URL not set")
        return await from_modelexpress(req, modelexpress_url, on_event=emit)

    async def via_swarm() -> Path:
        if swarm is None:
            raise SourceSkipped("no swarm node to ask")
        return Path(await swarm(req))

    async def hub() -> Path:
        return await from_hub(req)

    steps: list[tuple[str, Callable[[], Awaitable[Path]]]] = [
        ("local-cache", local),
        ("modelexpress", modelexpress),
        ("swarm", via_swarm),
        ("hub", hub),
    ]
    attempts: list[Attempt] = []
    kinds: list[str] = []

    def record(source: str, outcome: str, reason: str, kind: str, started: float) -> None:
        attempts.append(Attempt(source, outcome, reason))
        kinds.append(kind)
        emit(
            {
                "event": "attempt",
                "source": source,
                "outcome": outcome,
                "reason": reason,
                "seconds": round(trio.current_time() - started, 3),
            }
        )

    timeout = req.timeout
    deadline = math.inf if timeout is None else trio.current_time() + timeout
    current: str | None = None
    started = trio.current_time()
    with trio.CancelScope(deadline=deadline) as scope:
        for name, step in steps:
            current = name
            started = trio.current_time()
            emit({"event": "source", "source": name})
            try:
                path = await step()
            except SourceSkipped as exc:
                record(name, "skipped", str(exc) or "skipped", "skipped", started)
            except ModelNotFound as exc:
                record(name, "failed", str(exc) or "not found", "not_found", started)
            except VerificationFailed as exc:
                record(name, "failed", str(exc) or "verification failed", "verification", started)
            except Exception as exc:
                record(name, "failed", str(exc) or type(exc).__name__, "error", started)
            else:
                path = Path(path)
                if not path.is_dir():
                    record(name, "failed", f"returned {path}, which is not a directory", "error", started)
                    continue
                record(name, "ok", f"snapshot at {path}", "ok", started)
                emit({"event": "fetched", "source": name, "path": str(path), "revision": path.name})
                return FetchResult(path, name, path.name, tuple(attempts))
        current = None

    if scope.cancelled_caught and current is not None:
        record(current, "failed", f"timed out (fetch timeout {timeout:g} s)", "timeout", started)
        names = [n for n, _ in steps]
        for name in names[names.index(current) + 1 :]:
            attempts.append(Attempt(name, "skipped", "not tried: the fetch timed out"))
            kinds.append("skipped")
        raise FetchTimeout(_format_failure(req, f"timed out after {timeout:g} s", attempts), attempts)
    if "verification" in kinds:
        raise VerificationFailed(_format_failure(req, "verification failed", attempts), attempts)
    if all(k in ("skipped", "not_found") for k in kinds):
        raise ModelNotFound(_format_failure(req, "no source has it", attempts), attempts)
    raise FetchError(_format_failure(req, "every source failed", attempts), attempts)
