"""The fetch API's values, in one place: what a fetch asks for (:class:`FetchRequest`, with the
caller's :class:`SourceEnv`), what each source did (:class:`Attempt`), what it returns
(:class:`FetchResult`), how it fails (:class:`FetchError` and its kinds), and the codec that carries
them over the control socket: the request body of ``POST /v1/fetch`` and the NDJSON events of its
answer (``result`` / ``error`` last).

The client (``swarm.fetch``), the control server (``swarm.control``), the sources
(``swarm.sources``) and the CLI all take these from here; this module imports neither trio nor
libp2p; ``swarm.manifest`` (for its name checks) only once a request is made, so the client can
send a request to the node before it loads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from swarm.fetchwire import (
    _abspath,
    default_cache_dir,
    environ_json,
    repo_folder,
    request_body,
    result_answer,
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
    "attempt_json",
    "decode_event",
    "default_cache_dir",
    "error_event",
    "error_json",
    "jsonable",
    "repo_folder",
    "request_body",
    "request_from_json",
    "request_json",
    "result_event",
    "result_json",
]

SOURCES = ("local-cache", "modelexpress", "swarm", "hub")
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"

# A value of SourceEnv sent over the control socket: tokens are ~40 characters, URLs and paths a few
# hundred at most; this bounds what a request may make the node hold.
MAX_ENV_VALUE_CHARS = 4096

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# --- the caller's environment ------------------------------------------------------------------


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
        return cls(**environ_json(environ))  # the variables read in one place (swarm.fetchwire)

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
    from swarm.manifest import validate_revision

    for part in str(value).split("/"):
        validate_revision(part)


MAX_EXPECT = 1000
"""Most expected files one request may carry (a Dynamo card lists tens)."""
_DIGEST_RE = re.compile(r"blake3:[0-9a-f]{64}")


def _expect(value: Iterable | None) -> tuple[tuple[str, str, int | None], ...] | None:
    if value is None:
        return None
    from swarm.manifest import validate_path

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
    from swarm.manifest import validate_model_name

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
        from swarm.store.layout import RepoLayout

        return RepoLayout.of(self.cache_dir, self.repo_id).root


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


# --- the codec: requests and events over the control socket ------------------------------------

MAX_PATTERNS = 1000
"""Patterns per list; huggingface_hub users pass a handful."""
MAX_PATTERN_CHARS = 1024
"""Length of one pattern (a relative path glob; paths are at most 1024 bytes in a manifest)."""
REQUEST_KEYS = frozenset(
    {"repo_id", "revision", "allow_patterns", "ignore_patterns", "configs_only", "timeout", "env", "expect"}
)
"""The fields of a ``POST /v1/fetch`` body (unknown ones are refused)."""
ERROR_TYPES: dict[str, type[FetchError]] = {
    "ModelNotFound": ModelNotFound,
    "VerificationFailed": VerificationFailed,
    "FetchTimeout": FetchTimeout,
    "FetchError": FetchError,
}


def request_json(req: FetchRequest) -> dict:
    """The ``POST /v1/fetch`` body of ``req`` (the cache dir is the node's, so it is not sent)."""
    return request_body(
        req.repo_id,
        req.revision,
        req.allow_patterns,
        req.ignore_patterns,
        req.configs_only,
        req.timeout,
        req.env,
        req.expect,
    )


def request_from_json(obj: Any, cache_dir: Path) -> tuple[FetchRequest, float | None]:
    """The inverse of :func:`request_json`, checked field by field (a request comes from another
    process): the request in ``cache_dir`` and its timeout. ValueError naming the bad field (never
    echoing an env value)."""
    if not isinstance(obj, dict):
        raise ValueError("body must be a JSON object")
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    repo_id = obj.get("repo_id")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError("repo_id must be a non-empty string")
    revision = obj.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ValueError("revision must be a string or null")
    configs_only = obj.get("configs_only", False)
    if not isinstance(configs_only, bool):
        raise ValueError("configs_only must be true or false")
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 1e9
    ):
        raise ValueError("timeout must be a positive number of seconds or null")
    pats = {}
    for name in ("allow_patterns", "ignore_patterns"):
        v = obj.get(name)
        if isinstance(v, str):
            v = [v]
        if v is not None:
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise ValueError(f"{name} must be a string, a list of strings or null")
            if len(v) > MAX_PATTERNS or any(len(p) > MAX_PATTERN_CHARS for p in v):
                raise ValueError(
                    f"{name}: at most {MAX_PATTERNS} patterns of at most {MAX_PATTERN_CHARS} characters"
                )
        pats[name] = v
    expect = obj.get("expect")
    if expect is not None and (
        not isinstance(expect, list) or not all(isinstance(e, list) and len(e) == 3 for e in expect)
    ):
        raise ValueError("expect must be a list of [path, checksum, size] or null")
    try:
        env = SourceEnv.from_json(obj.get("env"))
    except (ValueError, TypeError) as e:  # the messages name fields, never values
        raise ValueError(f"bad env: {e}") from None
    try:
        req = FetchRequest(
            repo_id=repo_id,
            revision=revision,
            configs_only=configs_only,
            allow_patterns=pats["allow_patterns"],
            ignore_patterns=pats["ignore_patterns"],
            expect=expect,
            cache_dir=cache_dir,
            env=env,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad fetch request: {e}") from None
    return req, (float(timeout) if timeout is not None else None)


def jsonable(value: Any) -> Any:
    """``value`` as JSON values (paths and odd objects as text, bytes as hex, attempts as objects)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Attempt):
        return attempt_json(value)
    return str(value)


def attempt_json(a: Attempt) -> dict:
    return {"source": a.source, "outcome": a.outcome, "reason": a.reason}


def _attempts_json(attempts: Any) -> list[dict]:
    return [jsonable(a) for a in (attempts or ())]


def _attempts_from(items: Any) -> tuple[Attempt, ...]:
    return tuple(
        Attempt(str(a.get("source", "?")), str(a.get("outcome", "?")), str(a.get("reason", "")))
        for a in items or ()
        if isinstance(a, dict)
    )


def result_json(result: FetchResult) -> dict:
    """A result as ``{"path", "source", "revision", "attempts"}`` (``swarm-node fetch --json``)."""
    return {
        "path": str(result.path),
        "source": result.source,
        "revision": result.revision,
        "attempts": _attempts_json(result.attempts),
    }


def result_event(result: FetchResult) -> dict:
    """The last event of a fetch that succeeded."""
    return {"event": "result", **result_json(result)}


def error_json(exc: BaseException) -> dict:
    """An error as ``{"type", "message", "attempts"}``: the kind of FetchError it is."""
    kind = "FetchError"
    for cls in (ModelNotFound, VerificationFailed, FetchTimeout):
        if isinstance(exc, cls):
            kind = cls.__name__
    return {"type": kind, "message": str(exc), "attempts": _attempts_json(getattr(exc, "attempts", ()))}


def error_event(exc: BaseException) -> dict:
    """The last event of a fetch that failed."""
    return {"event": "error", **error_json(exc)}


def decode_event(event: dict) -> FetchResult | None:
    """The client's side of the last events: a ``result`` event's FetchResult; an ``error``
    event raised as its FetchError kind; None for any other event."""
    kind = event.get("event")
    if kind == "result":
        a = result_answer(event)  # the one normalization (swarm.fetchwire)
        return FetchResult(Path(a["path"]), a["source"], a["revision"], _attempts_from(a["attempts"]))
    if kind == "error":
        cls = ERROR_TYPES.get(str(event.get("type")), FetchError)
        raise cls(str(event.get("message") or "fetch failed"), _attempts_from(event.get("attempts")))
    return None
