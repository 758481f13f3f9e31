"""Step 2 of the chain: the ModelExpress server (gRPC, :mod:`swarm.modelexpress.client`, imported
on first use), only when ``MODEL_EXPRESS_URL`` is set; and :func:`pull_from_modelexpress`, the
origin-once puller's download from it (swarm/modelexpress/pull.py), run by the node inside the swarm
step when the crowd elects one node to pull for all (docs/protocol.md, "Origin once")."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from swarm.fetchapi import FetchError, FetchRequest, ModelNotFound, VerificationFailed
from swarm.sources.local import _selected, local_snapshot

__all__ = ["from_modelexpress", "pull_from_modelexpress"]


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
    from swarm.modelexpress.client import ModelExpressClient

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

    return await _run_mapped(run, client, req)


async def _run_mapped(run: Callable[[], Path], client, req: FetchRequest) -> Path:
    """``run()`` in a worker thread, ModelExpress's errors mapped to the chain's."""
    from swarm.modelexpress.client import (
        ModelExpressError,
        ModelExpressNotFound,
        ModelExpressProtocolError,
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


async def pull_from_modelexpress(
    req: FetchRequest,
    url: str,
    *,
    on_event: Callable[[dict], None] | None = None,
    take_copies: bool = True,
) -> Path:
    """The origin-once puller's download of ``req`` from the ModelExpress server at ``url`` into
    ``req.cache_dir`` (swarm/modelexpress/pull.py: files under ``blobs/<name>.swarm-partial``
    until each is checked; with ``take_copies``, complete copies mirrored from a puller that died
    are taken over); the snapshot dir. Errors as :func:`from_modelexpress`'s."""
    import threading

    from swarm.hubpull import Cancelled
    from swarm.modelexpress.client import ModelExpressClient
    from swarm.modelexpress.pull import pull_snapshot

    rev = None if req.revision in (None, "main") else req.revision
    left = _remaining()
    try:
        client = ModelExpressClient(url, timeout=None if left is None else left + 2.0)
    except ValueError as exc:
        raise FetchError(f"invalid MODEL_EXPRESS_URL {url!r}: {exc}") from None
    emit = on_event or (lambda e: None)
    stop = threading.Event()

    def want(path: str, size: int) -> bool:
        return bool(_selected(req, [path], {path: size}))

    def shared(commit: str) -> Path | None:
        return local_snapshot(attrs.evolve(req, revision=commit))

    def run() -> Path:
        with client:
            return pull_snapshot(
                client,
                req.repo_id,
                req.cache_dir,
                stop,
                want=want,
                revision=rev,
                ignore_weights=req.configs_only,
                shared=shared,
                on_event=_thread_emitter(emit),
                take_copies=take_copies,
            )

    try:
        return await _run_mapped(run, client, req)
    except Cancelled:
        raise FetchError("the ModelExpress pull was abandoned") from None
    finally:
        stop.set()  # an abandoned thread stops at its next chunk
