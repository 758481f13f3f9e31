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
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from swarm.config import resolve_home
from swarm.home import (
    NodeUnavailable,
    check_socket_file,
    peer_uid,
    socket_path,
    trusted_uid,
    unix_socket_path,
)

__all__ = [
    "CacheRefusal",
    "NodeUnavailable",
    "ProgressPrinter",
    "afetch",
    "afetch_result",
    "cache",
    "fetch",
    "fetch_result",
    "limits",
    "models",
    "node_running",
    "peers",
    "remove",
    "status",
    "unix_socket_path",
]

CONNECT_TIMEOUT = 5.0
"""Seconds to connect to the local control socket (it is local: a live node answers at once)."""
QUERY_TIMEOUT = 30.0
"""Seconds for a status / peers / models answer."""
READ_MARGIN = 30.0
"""Extra seconds the client waits past a fetch ``timeout`` for the node's own timeout answer."""


def _home(home: os.PathLike | str | None) -> Path:
    return resolve_home(home)


def _timeout(read: float | None):
    import httpx

    return httpx.Timeout(connect=CONNECT_TIMEOUT, read=read, write=30.0, pool=CONNECT_TIMEOUT)


def _unavailable(home: Path, exc: BaseException) -> NodeUnavailable:
    return NodeUnavailable(f"no swarm-node answers on {socket_path(home)} ({exc})")


def _connect(home: Path, read_timeout: float | None) -> Any:
    """An ``http.client`` connection to the node's socket (the sync client uses the standard
    library: it imports in ~20 ms where httpx takes ~100 ms). NodeUnavailable if none answers."""
    import http.client
    import socket

    sock_path = socket_path(home)
    if not sock_path.exists():
        raise NodeUnavailable(f"no swarm-node is running with home {home} (no {sock_path})")
    check_socket_file(sock_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        with unix_socket_path(sock_path) as p:
            s.connect(p)
        uid = peer_uid(s)
    except OSError as e:
        s.close()
        raise _unavailable(home, e) from None
    if not trusted_uid(uid):
        s.close()
        raise NodeUnavailable(
            f"the process on {sock_path} runs as uid {uid}, not as this user or root: not talking to it"
        )
    s.settimeout(read_timeout)
    conn = http.client.HTTPConnection("swarm-node")
    conn.sock = s
    return conn


def _ask(
    method: str, route: str, home: os.PathLike | str | None, body: dict | None = None
) -> tuple[int, dict]:
    import http.client

    h = _home(home)
    conn = _connect(h, QUERY_TIMEOUT)
    try:
        if body is None:
            conn.request(method, route)
        else:
            conn.request(
                method, route, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
        r = conn.getresponse()
        raw = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise NodeUnavailable(f"swarm-node on {socket_path(h)} did not answer {route}: {e}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"error": raw.decode("utf-8", "replace").strip()[:200]}
    return r.status, answer


def _get(route: str, home: os.PathLike | str | None) -> dict:
    h = _home(home)
    code, body = _ask("GET", route, h)
    if code != 200:
        raise NodeUnavailable(
            f"swarm-node on {socket_path(h)}: HTTP {code}: "
            f"{body.get('error', '') if isinstance(body, dict) else body}"
        )
    return body


def status(home: os.PathLike | str | None = None) -> dict:
    """The running node's status (``GET /v1/status``); NodeUnavailable if none answers."""
    return _get("/v1/status", home)


def peers(home: os.PathLike | str | None = None) -> list:
    return _get("/v1/peers", home)["peers"]


def models(home: os.PathLike | str | None = None) -> list:
    return _get("/v1/models", home)["models"]


def cache(home: os.PathLike | str | None = None) -> dict:
    """The node's view of its HF cache (``GET /v1/cache``, see ``swarm.cache_admin.report``)."""
    return _get("/v1/cache", home)


class CacheRefusal(RuntimeError):
    """``remove`` refused: not cached (``status`` 404) or in use (409; ``in_use`` says why)."""

    def __init__(self, message: str, status: int, in_use: list[str]) -> None:
        super().__init__(message)
        self.status = status
        self.in_use = in_use


def remove(target: str, *, force: bool = False, home: os.PathLike | str | None = None) -> list:
    """Remove ``org/name[@revision]`` from the running node's cache (``POST /v1/rm``); returns
    ``[{"model", "revision", "bytes"}]``. :class:`CacheRefusal` when absent or in use."""
    h = _home(home)
    code, body = _ask("POST", "/v1/rm", h, {"target": target, "force": force})
    if code in (404, 409):
        raise CacheRefusal(str(body.get("error", "")), code, list(body.get("in_use", [])))
    if code != 200:
        raise NodeUnavailable(
            f"swarm-node on {socket_path(h)}: HTTP {code}: "
            f"{body.get('error', '') if isinstance(body, dict) else body}"
        )
    return body["removed"]


def limits(home: os.PathLike | str | None = None, **changes: float | str | None) -> dict:
    """The running node's bandwidth limits in bytes/s (None = unlimited): ``{"upload",
    "download", "peer_upload"}``. Keyword arguments change them first (``upload="20MB/s"``,
    ``download=None`` for unlimited; ``PUT /v1/limits``). ValueError for a bad value (the node
    refused it and changed nothing), NodeUnavailable if no node answers."""
    import http.client

    if not changes:
        return _get("/v1/limits", home)
    h = _home(home)
    conn = _connect(h, QUERY_TIMEOUT)
    try:
        conn.request(
            "PUT",
            "/v1/limits",
            body=json.dumps(changes).encode(),
            headers={"content-type": "application/json"},
        )
        r = conn.getresponse()
        raw = r.read()
    except (OSError, http.client.HTTPException) as e:
        raise NodeUnavailable(f"swarm-node on {socket_path(h)} did not answer /v1/limits: {e}") from None
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": raw.decode("utf-8", "replace").strip()[:200]}
    if r.status == 400:
        raise ValueError(body.get("error", "bad limits"))
    if r.status != 200:
        raise NodeUnavailable(f"swarm-node on {socket_path(h)}: HTTP {r.status}: {body.get('error', '')}")
    return body


def node_running(home: os.PathLike | str | None = None) -> bool:
    try:
        status(home)
    except NodeUnavailable:
        return False
    return True


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


def _selected_files(snapshot: Path, req: Any) -> list[str]:
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
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _to_local_dir(snapshot: Path, local_dir: Path, req: Any) -> Path:
    local_dir = Path(local_dir).expanduser().absolute()
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel in _selected_files(snapshot, req):
        src = snapshot / rel
        _place(src, local_dir / rel, link=src.stat().st_size >= LINK_MIN_BYTES)
    return local_dir


def _blob_name(src: Path) -> str:
    """The blob name of a file in the node's cache (its name under ``blobs/``), else its blake3."""
    if src.parent.name == "blobs":
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
    repo = Path(cache_dir).expanduser().absolute() / ("models--" + req.repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    for rel in _selected_files(snapshot, req):
        src = (snapshot / rel).resolve()
        blob = repo / "blobs" / _blob_name(src)
        _place(src, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob, link.parent)
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                continue
        tmp = link.parent / f".{link.name}.swarm-{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    ref = req.revision or "main"
    if ref != revision:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        tmp = repo / "refs" / f".{os.getpid()}.tmp"
        tmp.write_text(revision)
        dest = repo / "refs" / ref
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    return snap


def _deliver(result: Any, req: Any, cache_dir_given: bool, local_dir: os.PathLike | str | None) -> Any:
    """Apply ``cache_dir`` / ``local_dir`` to a result whose snapshot may live in the node's cache."""
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


# --- fetch -------------------------------------------------------------------------------------


def _request(
    repo_id: str,
    revision: str | None,
    allow_patterns: Any,
    ignore_patterns: Any,
    configs_only: bool,
    cache_dir: os.PathLike | str | None,
    timeout: float | None,
) -> Any:
    """The FetchRequest, carrying this process's environment (HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT,
    MODEL_EXPRESS_URL, MODEL_EXPRESS_CACHE_PATH) so that the caller, not the node, decides."""
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
        env=SourceEnv.from_environ(),
        **kw,
    )


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


def _handle_line(line: str, emit: Callable[[dict], None]) -> Any | None:
    """One NDJSON line: the FetchResult if final, raises if it is an error, else None."""
    from swarm.fetchapi import FetchError, decode_event

    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        raise FetchError(f"the node sent a bad event line: {line[:200]!r}") from None
    if not isinstance(event, dict):
        return None
    result = decode_event(event)  # raises the error of an "error" event
    if result is None:
        with contextlib.suppress(Exception):
            emit(event)
    return result


def _bad_status(r: Any, sock: Path) -> Exception:
    from swarm.fetchapi import FetchError

    try:
        msg = r.json().get("error", "")
    except Exception:
        msg = r.text.strip()[:200]
    return FetchError(f"the swarm-node on {sock} refused the fetch: HTTP {r.status_code}: {msg}")


def _via_node_sync(req: Any, home: Path, emit: Callable[[dict], None]) -> Any:
    """Fetch through the running node; NodeUnavailable when none answers."""
    import http.client

    from swarm.fetchapi import FetchError, FetchTimeout, request_json

    sock = socket_path(home)
    read = None if req.timeout is None else req.timeout + READ_MARGIN
    conn = _connect(home, read)
    try:
        body = json.dumps(request_json(req)).encode()
        conn.request("POST", "/v1/fetch", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raw = r.read()
            try:
                msg = json.loads(raw).get("error", "")
            except (ValueError, AttributeError):
                msg = raw.decode("utf-8", "replace").strip()[:200]
            raise FetchError(f"the swarm-node on {sock} refused the fetch: HTTP {r.status}: {msg}")
        while line := r.readline():
            result = _handle_line(line.decode("utf-8", "replace"), emit)
            if result is not None:
                return result
    except TimeoutError:
        raise FetchTimeout(
            f"cannot fetch {req.repo_id}: the swarm-node on {sock} did not answer within {req.timeout:g} s"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"lost the swarm-node on {sock} during the fetch: {e!r}") from None
    finally:
        conn.close()
    raise FetchError(f"the swarm-node on {sock} ended the fetch of {req.repo_id} without a result")


async def _via_node_async(req: Any, home: Path, emit: Callable[[dict], None]) -> Any:
    import httpx

    from swarm.fetchapi import FetchError, request_json

    sock = socket_path(home)
    if not sock.exists():
        raise NodeUnavailable(f"no {sock}")
    _connect(home, CONNECT_TIMEOUT).close()  # who answers there (owner, peer uid); httpx hides it
    read = None if req.timeout is None else req.timeout + READ_MARGIN
    sent = False
    try:
        with unix_socket_path(sock) as p:
            async with (
                httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=p),
                    base_url="http://swarm-node",
                    timeout=_timeout(read),
                ) as c,
                c.stream("POST", "/v1/fetch", json=request_json(req)) as r,
            ):
                sent = True
                if r.status_code != 200:
                    await r.aread()
                    raise _bad_status(r, sock)
                async for line in r.aiter_lines():
                    result = _handle_line(line, emit)
                    if result is not None:
                        return result
    except httpx.ConnectError as e:
        if not sent:
            raise _unavailable(home, e) from None
        raise FetchError(f"lost the swarm-node on {sock}: {e}") from None
    except httpx.TimeoutException:
        from swarm.fetchapi import FetchTimeout

        raise FetchTimeout(
            f"cannot fetch {req.repo_id}: the swarm-node on {sock} did not answer within {req.timeout:g} s"
        ) from None
    except httpx.HTTPError as e:
        raise FetchError(f"lost the swarm-node on {sock} during the fetch: {e}") from None
    raise FetchError(f"the swarm-node on {sock} ended the fetch of {req.repo_id} without a result")


async def _embedded(req: Any, home: Path, emit: Callable[[dict], None]) -> Any:
    """Run a node for the duration of this fetch (imports libp2p)."""
    import trio

    from swarm.config import DEFAULT_LISTEN, resolve_run
    from swarm.control import HomeBusy, HomeLock
    from swarm.fetchapi import FetchTimeout
    from swarm.node import Node

    settings = resolve_run(home=home, serve=None, no_serve_hf_cache=True)
    # A node that lives for one fetch dials out; it listens on loopback only unless told otherwise.
    listen = settings.listen if settings.listen != DEFAULT_LISTEN else ("/ip4/127.0.0.1/tcp/0",)
    with contextlib.ExitStack() as stack:
        node_home = home
        try:
            stack.enter_context(HomeLock(home))
        except (HomeBusy, OSError):
            node_home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-embedded-")))
        cfg = settings.node_config(
            home=node_home, cache_dir=Path(req.cache_dir), serve=(), serve_hf_cache=False, listen=listen
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
    req = _request(repo_id, revision, allow_patterns, ignore_patterns, configs_only, cache_dir, timeout)
    local = _fast_path(req)
    if local is not None:
        return _deliver(local, req, False, local_dir)
    h = _home(home)
    emit, close = _observer(on_event, progress, repo_id)
    try:
        try:
            result = _via_node_sync(req, h, emit)
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
            result = trio.run(_embedded, req, h, emit)
    finally:
        close()
    return _deliver(result, req, cache_dir is not None, local_dir)


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
        return await trio.to_thread.run_sync(_deliver, local, req, False, local_dir)
    h = _home(home)
    emit, close = _observer(on_event, progress, repo_id)
    try:
        try:
            result = await _via_node_async(req, h, emit)
        except NodeUnavailable:
            result = await _embedded(req, h, emit)
    finally:
        close()
    return await trio.to_thread.run_sync(_deliver, result, req, cache_dir is not None, local_dir)


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
                result = _via_node_sync(req, h, emit)
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
    return _deliver(result, req, cache_dir is not None, local_dir)


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
