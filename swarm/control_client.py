"""Talking to the running node over its control socket (``<home>/control.sock``): HTTP/1.1 with
the standard library's ``http.client``, this user's or root's node only.

The queries (``status``, ``peers``, ``models``, ``cache``, ``remove``, ``limits``) and the fetch:
``POST /v1/fetch`` streams the node's events as NDJSON and ends with the result or the error
(:mod:`swarm.fetchapi` encodes and decodes them). :func:`afetch_via_node` runs the same client in
a worker thread for trio code. Never imports trio at import, nor libp2p.

A fetch is on its way before anything heavy is loaded (issue #12 item 5): the request is written
to the socket as it is (a few lines of HTTP/1.1), and ``http.client`` (~20 ms: email, ssl), attrs
and the request checks load while the node works on it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

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
    "afetch_via_node",
    "cache",
    "connect",
    "fetch_via_node",
    "limits",
    "models",
    "node_running",
    "open_socket",
    "peers",
    "remove",
    "resolve_home",
    "status",
]

CONNECT_TIMEOUT = 5.0
"""Seconds to connect to the local control socket (it is local: a live node answers at once)."""
QUERY_TIMEOUT = 30.0
"""Seconds for a status / peers / models answer."""
READ_MARGIN = 30.0
"""Extra seconds the client waits past a fetch ``timeout`` for the node's own timeout answer."""


def resolve_home(
    home: os.PathLike | str | None = None, *, cli_config: os.PathLike | str | None = None
) -> Path:
    """``swarm.config.resolve_home``: ``--home`` > ``SWARM_HOME`` > the config file's ``home`` >
    the default; the first two read here, without loading ``swarm.config`` (attrs, tomllib,
    platformdirs: the start of every ``swarm-node fetch``). ConfigError (from swarm.config) only
    from the config file."""
    given = os.fspath(home) if home is not None else ""
    text = given or os.environ.get("SWARM_HOME", "").strip()
    if text:
        return Path(text).expanduser().absolute()
    from swarm.config import resolve_home as resolve

    return resolve(None, cli_config=cli_config)


def _unavailable(home: Path, exc: BaseException) -> NodeUnavailable:
    return NodeUnavailable(f"no swarm-node answers on {socket_path(home)} ({exc})")


def open_socket(home: Path, read_timeout: float | None) -> Any:
    """A socket connected to the node's control socket, its owner checked (this user or root);
    NodeUnavailable if none answers."""
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
    return s


def connect(home: Path, read_timeout: float | None) -> Any:
    """An ``http.client`` connection to the node's socket (the standard library: it imports in
    ~20 ms where httpx takes ~100 ms; on first use, so ``import swarm`` stays small).
    NodeUnavailable if none answers."""
    import http.client

    s = open_socket(home, read_timeout)
    conn = http.client.HTTPConnection("swarm-node")
    conn.sock = s
    return conn


def _ask(
    method: str, route: str, home: os.PathLike | str | None, body: dict | None = None
) -> tuple[int, dict]:
    import http.client

    h = resolve_home(home)
    conn = connect(h, QUERY_TIMEOUT)
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
    h = resolve_home(home)
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
    h = resolve_home(home)
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
    if not changes:
        return _get("/v1/limits", home)
    h = resolve_home(home)
    code, body = _ask("PUT", "/v1/limits", h, changes)
    if code == 400:
        raise ValueError(body.get("error", "bad limits"))
    if code != 200:
        raise NodeUnavailable(f"swarm-node on {socket_path(h)}: HTTP {code}: {body.get('error', '')}")
    return body


def node_running(home: os.PathLike | str | None = None) -> bool:
    try:
        status(home)
    except NodeUnavailable:
        return False
    return True


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


def _fetch_head(length: int) -> bytes:
    """The head of a ``POST /v1/fetch`` request with a JSON body of ``length`` bytes (what
    ``http.client`` would send)."""
    return (
        "POST /v1/fetch HTTP/1.1\r\nHost: swarm-node\r\nAccept-Encoding: identity\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode("ascii")


def fetch_via_node(
    body: dict,
    home: Path,
    emit: Callable[[dict], None],
    on_connect: Callable[[Any], None] | None = None,
    after_send: Callable[[], None] | None = None,
) -> Any:
    """Fetch through the running node (``POST /v1/fetch`` with ``body``, see
    :func:`swarm.fetchapi.request_json`): its events to ``emit``, then the FetchResult, or its
    error raised; NodeUnavailable when no node answers. ``on_connect`` gets the socket once it is
    open (the async variant shuts it down to cancel); ``after_send`` runs once the request is sent,
    while the node works on it (what it raises ends the call). The request goes out before
    ``http.client`` (which reads the answer) or :mod:`swarm.fetchapi` are loaded."""
    sock = socket_path(home)
    repo_id, timeout = body.get("repo_id"), body.get("timeout")
    read = None if timeout is None else timeout + READ_MARGIN
    s = open_socket(home, read)
    if on_connect is not None:
        on_connect(s)
    r = None
    try:
        try:
            data = json.dumps(body).encode()
            s.sendall(_fetch_head(len(data)) + data)
        except OSError as e:
            raise _lost(sock, e) from None
        if after_send is not None:
            after_send()
        import http.client

        from swarm.fetchapi import FetchError, FetchTimeout

        try:
            r = http.client.HTTPResponse(s, method="POST")
            r.begin()
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
                f"cannot fetch {repo_id}: the swarm-node on {sock} did not answer within {timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise _lost(sock, e) from None
    finally:
        if r is not None:
            r.close()
        s.close()
    raise FetchError(f"the swarm-node on {sock} ended the fetch of {repo_id} without a result")


def _lost(sock: Path, e: BaseException) -> Exception:
    from swarm.fetchapi import FetchError

    return FetchError(f"lost the swarm-node on {sock} during the fetch: {e!r}")


async def afetch_via_node(body: dict, home: Path, emit: Callable[[dict], None]) -> Any:
    """:func:`fetch_via_node` for trio code: the same ``http.client`` client in a worker thread,
    its events passed to ``emit`` on the trio thread. Cancelling it closes the connection (the
    node goes on with the download for others; a retry joins it)."""
    import trio

    held: dict[str, Any] = {}

    def on_connect(sock: Any) -> None:
        held["sock"] = sock
        if held.get("cancelled"):
            _abort(sock)

    def from_thread(event: dict) -> None:
        with contextlib.suppress(Exception):
            trio.from_thread.run_sync(emit, event)

    done = False
    try:
        result = await trio.to_thread.run_sync(
            partial(fetch_via_node, body, home, from_thread, on_connect), abandon_on_cancel=True
        )
        done = True
        return result
    finally:
        if not done:
            held["cancelled"] = True
            if "sock" in held:
                _abort(held["sock"])


def _abort(sock: Any) -> None:
    """Make a blocked read of ``sock`` in another thread return at once."""
    import socket

    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
