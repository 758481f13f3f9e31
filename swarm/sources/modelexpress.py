"""Step 2 of the chain: the ModelExpress server (gRPC, :mod:`swarm.modelexpress.client`, imported
on first use), only when ``MODEL_EXPRESS_URL`` is set."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from swarm.fetchapi import FetchError, FetchRequest, ModelNotFound, VerificationFailed
from swarm.sources.local import _selected, local_snapshot

__all__ = ["from_modelexpress"]


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
