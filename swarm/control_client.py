"""Talking to the running node over its control socket (``<home>/control.sock``): HTTP/1.1, this
user's or root's node only.

The queries (``status``, ``peers``, ``models``, ``cache``, ``remove``, ``limits``) and the fetch:
``POST /v1/fetch`` streams the node's events as NDJSON and ends with the result or the error
(:mod:`swarm.fetchapi` encodes and decodes them). :func:`afetch_via_node` runs the same client in
a worker thread for trio code. Never imports trio at import, nor libp2p.

Nothing heavy loads (issue #12 item 5): a request is written to the socket as it is (a few lines
of HTTP/1.1) and its answer read by :class:`_Answer` (a JSON body, or a fetch's chunked NDJSON
stream), not by ``http.client`` (~30 ms of CPU to import: email, ssl; :func:`connect` still gives
an ``http.client`` connection to whoever wants one); :mod:`swarm.fetchapi` (attrs) loads for a
fetch's last event only, and not at all with ``raw`` (``swarm-node fetch``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
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
    """An ``http.client`` connection to the node's socket (not used by this module's own requests,
    which :class:`_Answer` reads). NodeUnavailable if none answers."""
    import http.client

    s = open_socket(home, read_timeout)
    conn = http.client.HTTPConnection("swarm-node")
    conn.sock = s
    return conn


def _ask(
    method: str, route: str, home: os.PathLike | str | None, body: dict | None = None
) -> tuple[int, dict]:
    """One query: (HTTP status, the JSON answer). Written and read here (:class:`_Answer`), as a
    fetch is: ``http.client`` would be most of a ``swarm-node status``'s imports."""
    h = resolve_home(home)
    s = open_socket(h, QUERY_TIMEOUT)
    answer = None
    try:
        data = b"" if body is None else json.dumps(body).encode()
        s.sendall(_head(method, route, len(data) if body is not None else None) + data)
        answer = _Answer(s)
        status = answer.begin()
        raw = answer.read_all()
    except OSError as e:
        raise NodeUnavailable(f"swarm-node on {socket_path(h)} did not answer {route}: {e}") from None
    finally:
        if answer is not None:
            answer.close()
        s.close()
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {"error": raw.decode("utf-8", "replace").strip()[:200]}
    return status, reply


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


def _handle_line(line: bytes, emit: Callable[[dict], None], raw: bool = False) -> Any | None:
    """One NDJSON line: the final result (a FetchResult, or with ``raw`` the ``result`` event as
    :func:`swarm.fetchwire.result_answer` gives it), raises if it is an error, else None (the
    event went to ``emit``). Only the last line loads :mod:`swarm.fetchapi` (and attrs)."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        from swarm.fetchapi import FetchError

        raise FetchError(f"the node sent a bad event line: {line[:200]!r}") from None
    if not isinstance(event, dict):
        return None
    kind = event.get("event")
    if kind == "result" and raw:
        from swarm.fetchwire import result_answer

        return result_answer(event)
    if kind in ("result", "error"):
        from swarm.fetchapi import decode_event

        return decode_event(event)  # raises the error of an "error" event
    with contextlib.suppress(Exception):
        emit(event)
    return None


MAX_LINE = 1 << 20
"""Longest line of the node's answer read (a status line, a header, a chunk size, an event)."""


class _Answer:
    """The node's HTTP/1.1 answer to ``POST /v1/fetch``, read off the socket: the status line and
    headers, then the body (chunked, as the node streams events; or of a Content-Length, as its
    error answers; or up to the end) as lines. The standard library's ``http.client`` does the
    same but costs ~30 ms of CPU to import, which a 2-core host takes from the node's download
    (issue #12 item 5). A malformed or cut answer raises ConnectionError (an OSError)."""

    def __init__(self, sock: Any) -> None:
        self._file = sock.makefile("rb")
        self.status = 0
        self._chunked = False
        self._length: int | None = None

    def close(self) -> None:
        self._file.close()

    def _line(self) -> bytes:
        line = self._file.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise ConnectionError(
                "the answer was cut short" if len(line) <= MAX_LINE else "answer line too long"
            )
        return line

    def begin(self) -> int:
        parts = self._line().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP/1.1 answer: {b' '.join(parts)[:100]!r}")
        self.status = int(parts[1])
        while (header := self._line()) not in (b"\r\n", b"\n"):
            name, _, value = header.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                self._chunked = b"chunked" in value
            elif name == b"content-length" and value.isdigit():
                self._length = int(value)
        return self.status

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) < n:
            raise ConnectionError("the answer was cut short")
        return data

    def _chunks(self) -> Iterator[bytes]:
        if self._chunked:
            while True:
                size_text = self._line().split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ConnectionError(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:
                    while self._line() not in (b"\r\n", b"\n"):  # trailers
                        pass
                    return
                yield self._read(size)
                self._line()  # the chunk's CRLF
        elif self._length is not None:
            yield self._read(self._length)
        else:
            while data := self._file.read1(64 * 1024):
                yield data

    def read_all(self) -> bytes:
        """The whole body."""
        return b"".join(self._chunks())

    def lines(self) -> Iterator[bytes]:
        """The body's lines (the last one may lack its newline)."""
        rest = b""
        for chunk in self._chunks():
            rest += chunk
            if b"\n" in rest:
                *done, rest = rest.split(b"\n")
                yield from done
            if len(rest) > MAX_LINE:
                raise ConnectionError("answer line too long")
        if rest:
            yield rest


def _head(method: str, route: str, length: int | None) -> bytes:
    """The head of a request (what ``http.client`` would send), with a JSON body of ``length``
    bytes unless None."""
    body = "" if length is None else f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
    return (
        f"{method} {route} HTTP/1.1\r\nHost: swarm-node\r\nAccept-Encoding: identity\r\n{body}\r\n".encode()
    )


def fetch_via_node(
    body: dict,
    home: Path,
    emit: Callable[[dict], None],
    on_connect: Callable[[Any], None] | None = None,
    after_send: Callable[[], None] | None = None,
    *,
    raw: bool = False,
) -> Any:
    """Fetch through the running node (``POST /v1/fetch`` with ``body``, see
    :func:`swarm.fetchapi.request_json`): its events to ``emit``, then the FetchResult (with
    ``raw``, the ``result`` event as :func:`swarm.fetchwire.result_answer` gives it), or its
    error raised; NodeUnavailable when no node answers, ValueError when the node refuses the
    request as bad (HTTP 400: the checks of a FetchRequest, made by the node). ``on_connect`` gets
    the socket once it is open (the async variant shuts it down to cancel); ``after_send`` runs
    once the request is sent, while the node works on it (what it raises ends the call)."""
    sock = socket_path(home)
    repo_id, timeout = body.get("repo_id"), body.get("timeout")
    read = None if timeout is None else timeout + READ_MARGIN
    s = open_socket(home, read)
    if on_connect is not None:
        on_connect(s)
    answer = None
    try:
        try:
            data = json.dumps(body).encode()
            s.sendall(_head("POST", "/v1/fetch", len(data)) + data)
            if after_send is not None:
                after_send()
            answer = _Answer(s)
            status = answer.begin()
            if status != 200:
                raw_body = b"".join(answer.lines())
                try:
                    msg = json.loads(raw_body).get("error", "")
                except (ValueError, AttributeError):
                    msg = raw_body.decode("utf-8", "replace").strip()[:200]
                text = f"the swarm-node on {sock} refused the fetch: HTTP {status}: {msg}"
                if status == 400:
                    raise ValueError(text)
                from swarm.fetchapi import FetchError

                raise FetchError(text)
            for line in answer.lines():
                result = _handle_line(line, emit, raw)
                if result is not None:
                    return result
        except TimeoutError:
            from swarm.fetchapi import FetchTimeout

            raise FetchTimeout(
                f"cannot fetch {repo_id}: the swarm-node on {sock} did not answer within {timeout:g} s"
            ) from None
        except OSError as e:
            from swarm.fetchapi import FetchError

            raise FetchError(f"lost the swarm-node on {sock} during the fetch: {e!r}") from None
    finally:
        if answer is not None:
            answer.close()
        s.close()
    from swarm.fetchapi import FetchError

    raise FetchError(f"the swarm-node on {sock} ended the fetch of {repo_id} without a result")


async def afetch_via_node(body: dict, home: Path, emit: Callable[[dict], None]) -> Any:
    """:func:`fetch_via_node` for trio code: the same client in a worker thread,
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
