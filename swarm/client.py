"""``swarm.fetch``: a model snapshot as a local path, shaped like ``huggingface_hub.snapshot_download``.

The path of one call:

1. the local HF cache already holds a complete snapshot for the request -> return it (no network,
   no node);
2. a node answers on ``<home>/control.sock`` (home: ``home=`` > ``SWARM_HOME`` > the default) ->
   ask it over the control API (see :mod:`swarm.control`); it runs the whole fallback chain (its
   cache, ModelExpress, the swarm, the Hub), seeds what it got, and joins identical concurrent
   requests into one download;
3. otherwise -> run an embedded node for the duration of the call (this imports libp2p, ~1 s).

Steps 1 and 2 never import libp2p (nor the node). Errors are the typed ones of
:mod:`swarm.fetchapi` (``ModelNotFound``, ``VerificationFailed``, ``FetchTimeout``, ``FetchError``),
carrying ``attempts``: which sources were tried and why each failed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from swarm.control_client import (  # the queries: here too, as swarm.client.status(...) etc.
    CacheRefusal,
    NodeUnavailable,
    afetch_via_node,
    cache,
    fetch_via_node,
    limits,
    models,
    node_running,
    peers,
    remove,
    resolve_home,
    status,
)
from swarm.delivery import deliver
from swarm.home import unix_socket_path

__all__ = [
    "CacheRefusal",
    "NodeUnavailable",
    "ProgressPrinter",
    "afetch",
    "afetch_result",
    "cache",
    "fetch",
    "fetch_answer",
    "fetch_result",
    "limits",
    "models",
    "node_running",
    "peers",
    "remove",
    "status",
    "unix_socket_path",
]


def _home(home: os.PathLike | str | None) -> Path:
    return resolve_home(home)


# --- progress ----------------------------------------------------------------------------------


def progress_wanted() -> bool:
    """Progress bars on a terminal unless HF_HUB_DISABLE_PROGRESS_BARS is set (as huggingface_hub)."""
    if (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") or "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressPrinter:
    """Turns fetch events into a tqdm bar on stderr (bytes of the requested files)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress" and isinstance(event.get("total"), int):
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=event["total"],
                    desc=self.desc,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    leave=True,
                )
            have = event.get("have")
            if isinstance(have, int):
                self.bar.update(max(0, have - self.bar.n))
        elif kind in ("done", "fetched") and self.bar is not None:
            self.bar.update(max(0, self.bar.total - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _observer(
    on_event: Callable[[dict], None] | None, progress: bool | None, desc: str
) -> tuple[Callable[[dict], None], Callable[[], None]]:
    printer = ProgressPrinter(desc) if (progress if progress is not None else progress_wanted()) else None

    def emit(event: dict) -> None:
        if printer is not None:
            try:
                printer(event)
            except Exception:
                pass
        if on_event is not None:
            on_event(event)

    return emit, (printer.close if printer is not None else (lambda: None))


# --- selection and copies ----------------------------------------------------------------------


# --- fetch -------------------------------------------------------------------------------------


def _request(
    repo_id: str,
    revision: str | None,
    allow_patterns: Any,
    ignore_patterns: Any,
    configs_only: bool,
    cache_dir: os.PathLike | str | None,
    timeout: float | None,
    env: Any = None,
) -> Any:
    """The FetchRequest, carrying this process's environment (HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT,
    MODEL_EXPRESS_URL, MODEL_EXPRESS_CACHE_PATH) so that the caller, not the node, decides.
    ``env``: a SourceEnv, or :func:`swarm.fetchwire.environ_json`'s dict (checked here)."""
    from swarm.fetchapi import FetchRequest, SourceEnv

    kw: dict[str, Any] = {}
    if cache_dir is not None:
        kw["cache_dir"] = Path(cache_dir).expanduser()
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return FetchRequest(
        repo_id=repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        configs_only=bool(configs_only),
        timeout=timeout,
        env=SourceEnv.from_environ() if env is None else SourceEnv(**env) if isinstance(env, dict) else env,
        **kw,
    )


def _may_be_local(repo_id: Any, cache_dir: os.PathLike | str | None, env: Any) -> bool:
    """False when no cache root the fast path looks in (``cache_dir`` or the default, the
    ModelExpress cache) has a directory for ``repo_id``: then there is no local snapshot, and the
    request goes to the node before the checks of a FetchRequest are even loaded."""
    from swarm.fetchwire import default_cache_dir, repo_folder

    if not isinstance(repo_id, str):
        return True  # let the FetchRequest say what is wrong
    roots = [Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()]
    if env.get("modelexpress_cache") is not None:
        roots.append(Path(env["modelexpress_cache"]))
    return any((root / repo_folder(repo_id)).is_dir() for root in roots)


def _fast_path(req: Any) -> Any | None:
    """A complete local snapshot, as a FetchResult, or None."""
    from swarm.fetchapi import Attempt, FetchResult
    from swarm.sources.local import local_snapshot

    try:
        path = local_snapshot(req)
    except Exception:
        return None
    if path is None:
        return None
    from swarm.store import touch_access

    if path.parent.parent.parent == Path(req.cache_dir):  # ours (not a ModelExpress cache's)
        touch_access(path)  # in use now, and least-recently-used eviction reads it
    return FetchResult(path, "local-cache", path.name, (Attempt("local-cache", "ok", f"snapshot at {path}"),))


async def _embedded(req: Any, home: Path, emit: Callable[[dict], None]) -> Any:
    """Run a node for the duration of this fetch (imports libp2p)."""
    import tempfile

    import trio

    from swarm.config import DEFAULT_LISTEN, resolve_run
    from swarm.fetchapi import FetchTimeout
    from swarm.home import HomeBusy, HomeLock
    from swarm.node import Node, NodeConfig

    settings = resolve_run(home=home, serve=None, no_serve_hf_cache=True)
    # A node that lives for one fetch dials out; it listens on loopback only unless told otherwise.
    listen = settings.listen if settings.listen != DEFAULT_LISTEN else ("/ip4/127.0.0.1/tcp/0",)
    with contextlib.ExitStack() as stack:
        node_home = home
        try:
            stack.enter_context(HomeLock(home))
        except (HomeBusy, OSError):
            node_home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-embedded-")))
        cfg = NodeConfig.from_settings(
            settings,
            home=node_home,
            cache_dir=Path(req.cache_dir),
            serve=(),
            serve_hf_cache=False,
            listen=listen,
        )
        node = Node(cfg)
        deadline = float("inf") if req.timeout is None else trio.current_time() + req.timeout
        with trio.move_on_at(deadline) as scope:
            async with node.running():
                return await node.fetch_with_fallback(req, on_event=emit)
        if scope.cancelled_caught:
            raise FetchTimeout(
                f"cannot fetch {req.repo_id}@{req.ref}: timed out after "
                f"{req.timeout:g} s while starting an embedded node"
            )
    raise AssertionError("unreachable")


def fetch_result(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Any:
    """Like :func:`fetch`, returning the whole ``swarm.fetchapi.FetchResult`` (path, source,
    revision, attempts)."""
    return _fetch(
        repo_id,
        revision,
        allow_patterns,
        ignore_patterns,
        configs_only,
        cache_dir,
        local_dir,
        timeout,
        home,
        on_event,
        progress,
        raw=False,
    )


def fetch_answer(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> dict:
    """:func:`fetch_result` as ``swarm.fetchapi.result_json`` gives it (``{"path", "source",
    "revision", "attempts"}``, what ``swarm-node fetch --json`` prints). Through a running node,
    with nothing to deliver, it never builds a FetchResult: no attrs is loaded at all."""
    return _fetch(
        repo_id,
        revision,
        allow_patterns,
        ignore_patterns,
        configs_only,
        cache_dir,
        local_dir,
        timeout,
        home,
        on_event,
        progress,
        raw=True,
    )


def _fetch(
    repo_id: str,
    revision: str | None,
    allow_patterns: str | Iterable[str] | None,
    ignore_patterns: str | Iterable[str] | None,
    configs_only: bool,
    cache_dir: os.PathLike | str | None,
    local_dir: os.PathLike | str | None,
    timeout: float | None,
    home: os.PathLike | str | None,
    on_event: Callable[[dict], None] | None,
    progress: bool | None,
    *,
    raw: bool,
) -> Any:
    """:func:`fetch_result` (``raw``: :func:`fetch_answer`)."""
    # Only what the request body needs (swarm.fetchwire: no attrs, no checks). Through a running
    # node the request is checked there, once (ValueError from a 400, as the checks here raise).
    from swarm.fetchwire import environ_json, request_body

    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    env = environ_json()
    args = (repo_id, revision, allow_patterns, ignore_patterns, configs_only, cache_dir, timeout, env)
    made: dict[str, Any] = {}

    def request() -> Any:
        if "req" not in made:
            made["req"] = _request(*args)
        return made["req"]

    def answer(result: Any) -> Any:
        if not raw:
            return result
        from swarm.fetchapi import result_json

        return result_json(result)

    if _may_be_local(repo_id, cache_dir, env):
        local = _fast_path(request())
        if local is not None:
            return answer(deliver(local, request(), False, local_dir))
    body = request_body(repo_id, revision, allow_patterns, ignore_patterns, configs_only, timeout, env)
    h = _home(home)
    emit, close = _observer(on_event, progress, repo_id)
    delivering = cache_dir is not None or local_dir is not None
    try:
        try:
            # What delivery needs is built while the node works on the request.
            result = fetch_via_node(
                body, h, emit, after_send=request if delivering else None, raw=raw and not delivering
            )
        except NodeUnavailable:
            import trio

            try:
                trio.lowlevel.current_task()
            except RuntimeError:
                pass
            else:
                raise RuntimeError(
                    "swarm.fetch() called from trio code with no node running: use `await swarm.afetch(...)`"
                ) from None
            result = trio.run(_embedded, request(), h, emit)
    finally:
        close()
    if isinstance(result, dict):  # raw, from the node, and nothing to deliver
        return result
    if delivering:
        result = deliver(result, request(), cache_dir is not None, local_dir)
    return answer(result)


async def afetch_result(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Any:
    """The trio variant of :func:`fetch_result`."""
    import trio

    req = _request(repo_id, revision, allow_patterns, ignore_patterns, configs_only, cache_dir, timeout)
    local = await trio.to_thread.run_sync(_fast_path, req)
    if local is not None:
        return await trio.to_thread.run_sync(deliver, local, req, False, local_dir)
    h = _home(home)
    emit, close = _observer(on_event, progress, repo_id)
    try:
        try:
            from swarm.fetchapi import request_json

            result = await afetch_via_node(request_json(req), h, emit)
        except NodeUnavailable:
            result = await _embedded(req, h, emit)
    finally:
        close()
    return await trio.to_thread.run_sync(deliver, result, req, cache_dir is not None, local_dir)


def fetch(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Path:
    """Fetch a model snapshot and return its local path (``huggingface_hub.snapshot_download``'s
    shape: the snapshot directory in the HF cache layout, or ``local_dir`` when given).

    ``revision``: a branch, tag or commit (default ``main``). ``allow_patterns`` /
    ``ignore_patterns``: huggingface_hub globs. ``configs_only``: config and tokenizer files only.
    ``cache_dir``: the hub cache to return a snapshot in (default: the node's, or HF_HUB_CACHE /
    HF_HOME). ``local_dir``: also copy (hard-link when possible) the files there and return it.
    ``timeout``: seconds for the whole call (FetchTimeout). ``home``: the node's home (default
    ``SWARM_HOME``, else the platform cache dir). ``on_event``: called with each progress event
    (dicts). ``progress``: tqdm bars on stderr (default: when stderr is a terminal).

    Raises ``ModelNotFound``, ``VerificationFailed``, ``FetchTimeout`` or ``FetchError`` (from
    ``swarm.fetchapi``), whose ``attempts`` say which sources were tried and why each failed.
    """
    return fetch_result(
        repo_id,
        revision,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        configs_only=configs_only,
        cache_dir=cache_dir,
        local_dir=local_dir,
        timeout=timeout,
        home=home,
        on_event=on_event,
        progress=progress,
    ).path


async def afetch(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Path:
    """:func:`fetch` for trio code (``await swarm.afetch("org/name")``)."""
    result = await afetch_result(
        repo_id,
        revision,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        configs_only=configs_only,
        cache_dir=cache_dir,
        local_dir=local_dir,
        timeout=timeout,
        home=home,
        on_event=on_event,
        progress=progress,
    )
    return result.path


# --- fetch by Dynamo card -------------------------------------------------------------------------


def _card_request(
    card: Any, weights: bool, cache_dir: os.PathLike | str | None, timeout: float | None
) -> Any:
    from swarm.dynamo.card import CardError, fnmatch_exact, swarm_name
    from swarm.fetchapi import FetchRequest

    if not card.carried:
        raise CardError(f"the card of {card.display_name} lists no files to fetch")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    kw: dict[str, Any] = {}
    if cache_dir is not None:
        kw["cache_dir"] = Path(cache_dir).expanduser()
    # Without weights: exactly the card's files. With them: the whole snapshot whose manifest
    # matches the card (the weights of the very version the card describes).
    allow = None if weights else [fnmatch_exact(f.name) for f in card.carried]
    return FetchRequest(
        repo_id=swarm_name(card), allow_patterns=allow, expect=card.expect(), timeout=timeout, **kw
    )


def _matching_card(result: Any, card: Any) -> Any:
    from swarm.dynamo.card import dir_mismatches
    from swarm.fetchapi import VerificationFailed

    differ = dir_mismatches(result.path, card.expect())
    if differ:
        raise VerificationFailed(
            f"{card.display_name}: the files from {result.source} differ from "
            f"the card: {'; '.join(differ[:4])}",
            result.attempts,
        )
    return result


def fetch_card_result(
    card: Any,
    *,
    weights: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    mdc_cache: os.PathLike | str | bool = False,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Any:
    """Like :func:`fetch_card`, returning the whole ``FetchResult``."""
    from swarm.dynamo.card import dir_mismatches, install_mdc_cache, load_card

    card = load_card(card)
    req = _card_request(card, weights, cache_dir, timeout)
    local = _fast_path(req)
    if local is not None and not dir_mismatches(local.path, req.expect):
        result = local
    else:
        h = _home(home)
        emit, close = _observer(on_event, progress, req.repo_id)
        try:
            try:
                from swarm.fetchapi import request_json

                result = fetch_via_node(request_json(req), h, emit)
            except NodeUnavailable:
                import trio

                try:
                    trio.lowlevel.current_task()
                except RuntimeError:
                    pass
                else:
                    raise RuntimeError(
                        "swarm.fetch_card() called from trio code with no node running: run a swarm-node"
                    ) from None
                result = trio.run(_embedded, req, h, emit)
        finally:
            close()
    result = _matching_card(result, card)
    if mdc_cache:
        install_mdc_cache(result.path, card, None if mdc_cache is True else Path(mdc_cache))
    return deliver(result, req, cache_dir is not None, local_dir)


def fetch_card(
    card: Any,
    *,
    weights: bool = False,
    cache_dir: os.PathLike | str | None = None,
    local_dir: os.PathLike | str | None = None,
    mdc_cache: os.PathLike | str | bool = False,
    timeout: float | None = None,
    home: os.PathLike | str | None = None,
    on_event: Callable[[dict], None] | None = None,
    progress: bool | None = None,
) -> Path:
    """Fetch exactly the files a Dynamo ModelDeploymentCard lists and return a directory Dynamo
    takes as a model path (``register_model(model_path=...)``, the frontend's ``--model-path``).

    ``card``: the card (a dict, JSON text, a path to a JSON file, the discovery record that wraps
    it, or a ``swarm.dynamo.card.Card``). Only a manifest whose entries carry the card's blake3
    checksums and sizes is taken, and the delivered files are checked against the card again:
    other bytes (another version during a rolling update, a tampered file) raise
    ``VerificationFailed``. ``weights``: also fetch the weights of that same snapshot (a new worker
    on scale-out). ``mdc_cache``: also put the files into Dynamo's metadata cache
    (``~/.cache/dynamo/mdc/blobs``, or the given root) so a frontend on this host fetches none of
    them from the worker. Other arguments as in :func:`fetch`.
    """
    return fetch_card_result(
        card,
        weights=weights,
        cache_dir=cache_dir,
        local_dir=local_dir,
        mdc_cache=mdc_cache,
        timeout=timeout,
        home=home,
        on_event=on_event,
        progress=progress,
    ).path
