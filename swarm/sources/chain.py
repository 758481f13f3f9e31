"""The chain itself: local cache -> ModelExpress -> swarm -> Hub, each step an :class:`Attempt`
(see :mod:`swarm.sources`)."""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from swarm.fetchapi import (
    Attempt,
    FetchError,
    FetchRequest,
    FetchResult,
    FetchTimeout,
    ModelNotFound,
    SourceSkipped,
    VerificationFailed,
)
from swarm.sources.hub import from_hub
from swarm.sources.local import _evict, _expect_mismatches, _inspect_local
from swarm.sources.modelexpress import from_modelexpress

__all__ = ["fetch_chain", "modelexpress_url_of"]


class _FromEnv:
    def __repr__(self) -> str:
        return "os.environ['MODEL_EXPRESS_URL']"


_FROM_ENV: str | None = _FromEnv()  # type: ignore[assignment]


def modelexpress_url_of(req: FetchRequest, setting: str | None = _FROM_ENV) -> str | None:
    """The ModelExpress URL a fetch of ``req`` uses (None: none): the caller's
    (``req.env.modelexpress_url``) when set, else ``setting`` (the node's), which defaults to
    ``MODEL_EXPRESS_URL`` as set at call time."""
    if req.env.modelexpress_url is not None:  # the caller's setting wins over the node's
        return req.env.modelexpress_url or None
    if setting is _FROM_ENV:
        return os.environ.get("MODEL_EXPRESS_URL") or None
    return setting or None


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
    modelexpress_in_swarm: bool = False,
) -> FetchResult:
    """Try local cache -> ModelExpress -> swarm -> Hub; return the first success (see module doc).

    The ModelExpress URL is ``req.env.modelexpress_url`` (the caller's) when set, else
    ``modelexpress_url`` (the node's setting), which defaults to ``MODEL_EXPRESS_URL`` as set at call
    time; None or "" skips ModelExpress.  ``swarm`` None skips the swarm.  ``on_event(dict)`` gets
    ``{"event": "source", "source": ...}`` when a source starts, ``{"event": "attempt", "source",
    "outcome", "reason", "seconds"}`` when it ends, source-specific progress events, and
    ``{"event": "fetched", ...}``.  ``modelexpress_in_swarm``: the swarm step pulls from
    ModelExpress itself, once for a crowd (origin once, swarm/origin.py), so the ModelExpress step
    is recorded as skipped.
    """
    modelexpress_url = modelexpress_url_of(req, modelexpress_url)
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
        if modelexpress_in_swarm:
            raise SourceSkipped("origin once: the swarm step has one node pull it from ModelExpress for all")
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
