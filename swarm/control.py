"""The node's control API: HTTP/1.1 over a Unix socket in the home directory, for processes on
the same host (``swarm-node fetch``/``status`` and ``swarm.fetch``).

The socket is ``<home>/control.sock``, mode 0600 (only the node's user may talk to it). One request
per connection (``Connection: close``). Routes:

``GET /v1/status``
    ``node.status()`` plus ``home``, ``cache_dir``, ``pid``, ``version``, ``control_socket``,
    ``lane`` (the data lane mode: "encrypted", "plaintext" or "off") and ``direct_io``:
    ``{"peer_id", "addrs": [".../p2p/<id>"], "peers": [...], "models": [...], "bytes_up",
    "bytes_down", "serving": {"private_swarm", "hf_cache", "directories", "to"}, ...}``.
    503 ``{"error": ...}`` while the node is still starting.
``GET /v1/peers``
    ``{"peers": [...]}``.
``GET /v1/models``
    ``{"models": [...]}``; each model also has ``peer_stats``: bytes and pieces per peer.
``GET /v1/cache``
    The HF cache (``swarm.cache_admin.report``): ``{"cache_dir", "bytes", "max_bytes",
    "incomplete_bytes", "snapshots": [{"model", "revision", "path", "files", "bytes",
    "unique_bytes", "last_access", "refs", "fetched", "served", "seeded", "in_use", "evictable"}]}``.
``POST /v1/rm``
    Body: ``{"target": "org/name[@revision]", "force": false}``. 200 ``{"removed": [{"model",
    "revision", "bytes"}]}``; 404 when not cached; 409 ``{"error", "in_use": [...]}`` when a
    snapshot is in use (``force`` overrides a recent hand-out, never a running download).
``GET /v1/limits``, ``PUT /v1/limits``
    The bandwidth limits in bytes/s, null = unlimited: ``{"upload", "download", "peer_upload"}``.
    PUT takes an object with any of these keys (a number of bytes/s, a string like ``"20MB/s"``
    or ``"800Mbit/s"``, or 0/null for unlimited), applies it at once to every transfer and
    answers the new limits; a bad value gets 400 and changes nothing. Not saved: a restart
    takes the configured ``max_*_rate`` options again.
``POST /v1/fetch``
    Body: JSON ``{"repo_id": "org/name", "revision": null, "allow_patterns": null,
    "ignore_patterns": null, "configs_only": false, "timeout": null, "env": {}, "expect": null}``
    (only ``repo_id`` is required; unknown keys are refused).  ``env`` is the caller's environment
    for the sources (``swarm.sources.SourceEnv``: ``hub_offline``, ``hf_token``, ``hf_endpoint``,
    ``modelexpress_url``, ``modelexpress_cache``; what the caller has not set is left out and the
    node's own environment applies); the token is never logged nor echoed.  ``expect``: ``[[path,
    "blake3:<hex>", size or null], ...]``, files the result must hold with exactly these bytes (a
    Dynamo card's, ``swarm.fetch_card``): only manifests that match are taken.  The response is
    chunked NDJSON: the fetch's events as they happen (``source``, ``attempt``, ``manifest``,
    ``progress``, ``configs_ready``, ``done``, ...; consecutive ``progress`` events are coalesced
    for a slow reader), then exactly one of
    ``{"event": "result", "path", "source", "revision", "attempts": [...]}`` or
    ``{"event": "error", "type": "ModelNotFound"|"VerificationFailed"|"FetchTimeout"|"FetchError",
    "message", "attempts": [...]}``; each attempt is ``{"source", "outcome", "reason"}``.

Fetches run in the server's nursery, not in the connection's task: identical concurrent requests
join one job (one download), a client that goes away does not cancel a download others wait for,
and a request's ``timeout`` ends only that request's wait (the download goes on and a retry joins
it). A bad request gets a 4xx answer and never reaches the node.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import socket
import stat
import tempfile
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

import swarm
from swarm.fetchapi import (
    FetchError,
    FetchRequest,
    error_event,
    jsonable,
    request_from_json,
    result_event,
)
from swarm.home import (  # HomeBusy, HomeLock, UnsafeHome, check_home: here too for callers
    HomeBusy,
    HomeLock,
    UnsafeHome,
    check_home,
    peer_uid,
    socket_path,
    trusted_uid,
    unix_socket_path,
)

log = logging.getLogger(__name__)

__all__ = ["ControlServer", "HomeBusy", "HomeLock", "UnsafeHome", "check_home", "error_event", "result_event"]

MAX_HEADER_BYTES = 16 * 1024
"""Request line plus headers. Our clients send < 1 KiB; this is h11's default and well above it."""
MAX_BODY_BYTES = 64 * 1024
"""A fetch request is a name, a revision and two pattern lists: a few hundred bytes in practice."""
REQUEST_READ_TIMEOUT = 10.0
"""Seconds a client has to send its whole request; a stuck or idle connection is dropped after it."""
RESPONSE_SEND_TIMEOUT = 30.0
"""Seconds one write to a client may block (a client that stops reading is dropped)."""
MAX_CONNECTIONS = 512
"""Open control connections at once; more are answered 503 at once (each costs a task and a fd)."""
MAX_QUEUED_EVENTS = 256
"""Events waiting for one slow reader; progress events coalesce, so only bursts of others count."""
LIVE_PROBE_TIMEOUT = 2.0
"""Seconds to wait for a connection to an existing socket file before calling it stale."""

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


# --- events ------------------------------------------------------------------------------------


class _Subscriber:
    """One waiting connection's queue of events (progress coalesced, bounded)."""

    def __init__(self) -> None:
        self.events: deque[dict] = deque()
        self._wake = trio.Event()

    def put(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress" and self.events and self.events[-1].get("event") == "progress":
            self.events[-1] = event
        else:
            if len(self.events) >= MAX_QUEUED_EVENTS:
                # Drop the oldest informational event; final events are put last and never dropped.
                self.events.popleft()
            self.events.append(event)
        self._wake.set()

    async def get(self) -> dict:
        while not self.events:
            self._wake = trio.Event()
            await self._wake.wait()
        return self.events.popleft()


class _Job:
    """One fetch running on the node, watched by any number of connections."""

    REPLAYED = ("source", "attempt", "manifest", "progress", "configs_ready")

    def __init__(self, key: tuple, req: FetchRequest) -> None:
        self.key = key
        self.req = req
        self.subscribers: set[_Subscriber] = set()
        self.history: list[dict] = []  # what a late joiner is told first (progress kept last only)
        self.attempts: list[dict] = []
        self.current_source: str | None = None
        self.final: dict | None = None
        self.done = trio.Event()

    def emit(self, event: dict) -> None:
        try:
            event = jsonable(dict(event))
        except Exception:  # an odd event must not break the fetch
            return
        kind = event.get("event")
        if kind == "source":
            self.current_source = event.get("source")
        elif kind == "attempt":
            self.attempts.append({k: event.get(k) for k in ("source", "outcome", "reason")})
        if kind in self.REPLAYED:
            if kind == "progress" and self.history and self.history[-1].get("event") == "progress":
                self.history[-1] = event
            elif len(self.history) < MAX_QUEUED_EVENTS:
                self.history.append(event)
        for s in self.subscribers:
            s.put(event)

    def subscribe(self) -> _Subscriber:
        s = _Subscriber()
        for e in self.history:
            s.put(e)
        if self.final is not None:
            s.put(self.final)
        else:
            self.subscribers.add(s)
        return s

    def finish(self, final: dict) -> None:
        self.final = final
        for s in self.subscribers:
            s.put(final)
        self.subscribers.clear()
        self.done.set()

    def timeout_event(self, timeout: float) -> dict:
        attempts = list(self.attempts)
        if self.current_source is not None:
            attempts.append(
                {
                    "source": self.current_source,
                    "outcome": "failed",
                    "reason": f"still running after {timeout:g} s (the node goes on with it)",
                }
            )
        lines = [f"cannot fetch {self.req.repo_id}@{self.req.ref}: timed out after {timeout:g} s"]
        lines += [f"  {a['source']}: {a['outcome']}: {a['reason']}" for a in attempts]
        return {"event": "error", "type": "FetchTimeout", "message": "\n".join(lines), "attempts": attempts}


_RM_KEYS = frozenset({"target", "force"})
"""Fields of a ``POST /v1/rm`` body."""


def _json_object(body: bytes, keys: frozenset[str]) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadRequest(400, f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _BadRequest(400, "body must be a JSON object")
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise _BadRequest(400, f"unknown field(s): {', '.join(unknown)}")
    return obj


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- the server --------------------------------------------------------------------------------


def _sockname(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlServer:
    """Serves the control API for ``node`` (attach it with :meth:`attach` once it is running; until
    then requests get 503, fetches wait).

    ``async with trio.open_nursery() as n: await n.start(server.run)`` binds the socket (removing a
    stale one, refusing to start when a live node answers on it) and serves until cancelled; the
    socket file is removed on the way out.
    """

    def __init__(
        self,
        home: Path | str,
        node: Any = None,
        *,
        modelexpress_url: str | None = None,
        fetcher: Callable[..., Any] | None = None,
    ) -> None:
        self.home = Path(home)
        self.path = socket_path(self.home)
        self.node = node
        self.modelexpress_url = modelexpress_url
        self._fetcher = fetcher
        self._ready = trio.Event()
        if node is not None:
            self._ready.set()
        self._jobs: dict[tuple, _Job] = {}
        self._connections = 0
        self._nursery: trio.Nursery | None = None
        self._inode: tuple[int, int] | None = None

    def attach(self, node: Any) -> None:
        self.node = node
        self._ready.set()

    # -- socket lifetime --

    def _probe_live(self) -> bool:
        """True if something accepts connections on the socket file."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(LIVE_PROBE_TIMEOUT)
        try:
            with unix_socket_path(self.path) as p:
                s.connect(p)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # it exists and is busy: someone is there
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        finally:
            s.close()

    def _bind(self) -> socket.socket:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise HomeBusy(f"{self.path} exists and is not a socket; remove it")
            if self._probe_live():
                raise HomeBusy(f"a swarm-node already answers on {self.path}")
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound in a private 0700 directory, made 0600, then renamed into place: no moment with
        # looser permissions at the public path, and no process-wide umask change (other threads
        # of this process create files meanwhile).
        private = tempfile.mkdtemp(prefix=".control-", dir=self.home)
        try:
            staged = os.path.join(private, self.path.name)
            with unix_socket_path(staged) as p:
                sock.bind(p)
            os.chmod(staged, 0o600)
            sock.listen(128)
            os.rename(staged, self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise HomeBusy(f"a swarm-node already listens on {self.path}") from None
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, self.path.name))
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return sock

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raw = self._bind()
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                log.info("control API on %s", self.path)
                task_status.started(self.path)
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("control socket accept failed: %s", e)
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(self._connection, trio.SocketStream(conn))
        finally:
            sock.close()
            self._unlink()

    # -- one connection --

    async def serve_metrics(self, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Prometheus metrics over TCP on ``listen`` (``HOST:PORT``, from ``--metrics-listen``):
        ``GET /metrics`` only; everything else of the API stays on the Unix socket."""
        host, _, port = listen.rpartition(":")
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"))
        log.info(
            "metrics on http://%s/metrics",
            ", ".join(_sockname(lst.socket.getsockname()) for lst in listeners),
        )
        async with trio.open_nursery() as nursery:
            task_status.started([lst.socket.getsockname() for lst in listeners])
            await trio.serve_listeners(
                partial(self._connection, public=True), listeners, handler_nursery=nursery
            )

    async def _connection(self, stream: trio.SocketStream, *, public: bool = False) -> None:
        self._connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            uid = None if public else peer_uid(stream.socket)
            if not public and not trusted_uid(uid):  # closed unanswered: nothing is read or told
                log.warning(
                    "refused a control connection from uid %d (only this user's and root's are taken)", uid
                )
                return
            if self._connections > MAX_CONNECTIONS:
                await self._send_error(stream, 503, "too many control connections")
                return
            try:
                with trio.fail_after(REQUEST_READ_TIMEOUT):
                    request, body = await self._read_request(stream, conn)
            except trio.TooSlowError:
                await self._send_error(stream, 408, "request not received in time")
                return
            except _BadRequest as e:
                await self._send_error(stream, e.status, str(e))
                return
            if request is None:
                return  # the client closed before sending anything
            await self._route(stream, conn, request, body, public=public)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away or stopped reading
        except Exception:
            log.exception("control connection failed")
        finally:
            self._connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        received = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _BadRequest(e.error_status_hint or 400, f"bad HTTP request: {e}") from None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(64 * 1024)
                received += len(data)
                conn.receive_data(data)  # b"" marks EOF
                continue
            if isinstance(event, h11.Request):
                # h11 bounds only an *incomplete* head; a complete one that came in one read
                # is measured here.
                if received - len(conn.trailing_data[0]) > MAX_HEADER_BYTES:
                    raise _BadRequest(431, f"request head over {MAX_HEADER_BYTES} bytes")
                request = event
                for name, value in event.headers:
                    if name == b"content-length":
                        try:
                            n = int(value)
                        except ValueError:
                            raise _BadRequest(400, "bad Content-Length") from None
                        if n > MAX_BODY_BYTES:
                            raise _BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                if request is None:
                    return None, b""
                raise _BadRequest(400, "connection closed mid-request")

    async def _send_error(self, stream: trio.SocketStream, status: int, message: str) -> None:
        """An error answer written directly (h11 refuses to answer a request it could not parse or
        has not seen); the connection is closed after it."""
        body = (json.dumps({"error": message}) + "\n").encode()
        reason = _REASONS.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError
        ):
            with trio.fail_after(RESPONSE_SEND_TIMEOUT):
                await stream.send_all(head + body)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if data:
            with trio.fail_after(RESPONSE_SEND_TIMEOUT):
                await stream.send_all(data)

    def _headers(self, content_type: str, length: int | None = None) -> list[tuple[str, str]]:
        h = [
            ("content-type", content_type),
            ("connection", "close"),
            ("server", f"swarm-node/{swarm.__version__}"),
        ]
        if length is not None:
            h.append(("content-length", str(length)))
        return h

    async def _send_json(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, obj: Any
    ) -> None:
        await self._send_body(stream, conn, status, "application/json", (json.dumps(obj) + "\n").encode())

    async def _send_body(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, content_type: str, data: bytes
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await self._send(
            stream, conn, h11.Response(status_code=status, headers=self._headers(content_type, len(data)))
        )
        await self._send(stream, conn, h11.Data(data=data))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _route(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        body: bytes,
        *,
        public: bool = False,
    ) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if target == LIMITS_ROUTE and not public:
            await self._limits_route(stream, conn, method, body)
            return
        routes: dict[str, tuple[str, Any]] = (
            {"/metrics": ("GET", self._metrics)}
            if public
            else {
                "/v1/status": ("GET", self._status),
                "/v1/peers": ("GET", self._peers),
                "/v1/models": ("GET", self._models),
                "/v1/metrics": ("GET", self._metrics),
                "/v1/cache": ("GET", self._cache),
                "/v1/rm": ("POST", self._rm),
                "/v1/fetch": ("POST", None),
            }
        )
        if target not in routes:
            await self._send_json(stream, conn, 404, {"error": f"no route {target}"})
            return
        want, handler = routes[target]
        if method != want:
            await self._send_json(stream, conn, 405, {"error": f"{target} takes {want}"})
            return
        if handler is not None:
            if not self._ready.is_set():
                await self._send_json(stream, conn, 503, {"error": "the node is starting"})
                return
            if inspect.iscoroutinefunction(handler):  # the cache routes: disk work in a thread
                try:
                    status, answer = await handler(body)
                except _BadRequest as e:
                    await self._send_json(stream, conn, e.status, {"error": str(e)})
                    return
                await self._send_json(stream, conn, status, answer)
                return
            answer = handler()
            if isinstance(answer, bytes):  # the metrics exposition
                from swarm.metrics import CONTENT_TYPE  # not at import: the client imports us

                await self._send_body(stream, conn, 200, CONTENT_TYPE, answer)
            else:
                await self._send_json(stream, conn, 200, answer)
            return
        try:
            req, timeout = self._parse_fetch(body)
        except _BadRequest as e:
            await self._send_json(stream, conn, e.status, {"error": str(e)})
            return
        await self._fetch(stream, conn, req, timeout)

    # -- GET routes --

    def _status(self) -> dict:
        st = dict(self.node.status())
        config = self.node.config
        st.update(
            home=str(self.home),
            cache_dir=str(config.cache_dir),
            pid=os.getpid(),
            version=swarm.__version__,
            control_socket=str(self.path),
            lane=getattr(config, "lane", None),
            direct_io=getattr(config, "direct_io", None),
        )
        return st

    def _metrics(self) -> bytes:
        return self.node.metrics.exposition()

    def _peers(self) -> dict:
        return {"peers": self.node.status().get("peers", [])}

    def _models(self) -> dict:
        models = self.node.status().get("models", [])
        shared = getattr(self.node, "shared", {}) or {}
        by_manifest = {}
        for sh in list(shared.values()):
            with contextlib.suppress(Exception):
                stats = sh.transfer.stats
                by_manifest[sh.manifest.hash_str] = {
                    pid: {
                        "bytes_up": s.bytes_up,
                        "bytes_down": s.bytes_down,
                        "pieces_up": s.pieces_up,
                        "pieces_down": s.pieces_down,
                        "bad_pieces": s.bad_pieces,
                        "banned": s.banned,
                    }
                    for pid, s in stats.items()
                }
        out = []
        for m in models:
            m = dict(m)
            m["peer_stats"] = by_manifest.get(m.get("manifest"), {})
            out.append(m)
        return {"models": out}

    # -- cache --

    async def _cache(self, body: bytes) -> tuple[int, dict]:
        return 200, await self.node.cache_report()

    async def _rm(self, body: bytes) -> tuple[int, dict]:
        from swarm import cache_admin  # not at import: the client imports us

        obj = _json_object(body, _RM_KEYS)
        target, force = obj.get("target"), obj.get("force", False)
        if not isinstance(target, str) or not isinstance(force, bool):
            raise _BadRequest(400, "target must be ORG/NAME[@REVISION] and force true or false")
        try:
            model, revision = cache_admin.parse_target(target)
        except ValueError as e:
            raise _BadRequest(400, str(e)) from None
        try:
            done = await self.node.remove_cached(model, revision, force=force)
        except cache_admin.NotCached as e:
            return 404, {"error": str(e)}
        except cache_admin.Refused as e:
            return 409, {"error": str(e), "in_use": e.reasons}
        return 200, {"removed": [{"model": r.model, "revision": r.revision, "bytes": r.bytes} for r in done]}

    # -- bandwidth limits --

    async def _limits_route(
        self, stream: trio.SocketStream, conn: h11.Connection, method: str, body: bytes
    ) -> None:
        if method not in ("GET", "PUT"):
            await self._send_json(stream, conn, 405, {"error": f"{LIMITS_ROUTE} takes GET or PUT"})
            return
        if not self._ready.is_set():
            await self._send_json(stream, conn, 503, {"error": "the node is starting"})
            return
        if method == "PUT":
            try:
                self.node.set_limits(parse_limits(body, self.node.bandwidth.limits))
            except _BadRequest as e:
                await self._send_json(stream, conn, e.status, {"error": str(e)})
                return
        await self._send_json(stream, conn, 200, self.node.bandwidth.limits.as_dict())

    # -- fetch --

    def _parse_fetch(self, body: bytes) -> tuple[FetchRequest, float | None]:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _BadRequest(400, f"body is not JSON: {e}") from None
        try:
            return request_from_json(obj, self._cache_dir())
        except ValueError as e:
            raise _BadRequest(400, str(e)) from None

    def _cache_dir(self) -> Path:
        if self.node is not None:
            return Path(self.node.config.cache_dir)
        from swarm.config import default_cache_dir

        return default_cache_dir()

    def _job_for(self, req: FetchRequest) -> _Job:
        # Callers with another environment (offline, token, endpoint, ModelExpress) get their own job.
        key = (
            req.repo_id,
            req.revision,
            req.configs_only,
            req.allow_patterns,
            req.ignore_patterns,
            req.expect,
            req.env,
        )
        job = self._jobs.get(key)
        if job is None:
            job = _Job(key, req)
            self._jobs[key] = job
            assert self._nursery is not None
            self._nursery.start_soon(self._run_job, job)
        return job

    async def _run_job(self, job: _Job) -> None:
        final: dict | None = None
        try:
            await self._ready.wait()
            # The cache dir may have been a default before the node was attached.
            req = attrs.evolve(job.req, cache_dir=Path(self.node.config.cache_dir))
            fetch = self._fetcher or self._default_fetch
            result = await fetch(req, on_event=job.emit)
            final = result_event(result)
        except FetchError as e:
            final = error_event(e)
        except Exception as e:
            log.exception("fetch of %s failed", job.req.repo_id)
            final = {
                "event": "error",
                "type": "FetchError",
                "message": f"cannot fetch {job.req.repo_id}: internal error: {e!r}",
                "attempts": list(job.attempts),
            }
        finally:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            job.finish(
                final
                or {
                    "event": "error",
                    "type": "FetchError",
                    "message": "the node is shutting down",
                    "attempts": job.attempts,
                }
            )

    async def _default_fetch(self, req: FetchRequest, *, on_event: Callable[[dict], None]) -> Any:
        kw = {} if self.modelexpress_url is None else {"modelexpress_url": self.modelexpress_url}
        return await self.node.fetch_with_fallback(req, on_event=on_event, **kw)

    async def _fetch(
        self, stream: trio.SocketStream, conn: h11.Connection, req: FetchRequest, timeout: float | None
    ) -> None:
        job = self._job_for(req)
        sub = job.subscribe()
        try:
            await self._send(
                stream, conn, h11.Response(status_code=200, headers=self._headers("application/x-ndjson"))
            )
            deadline = trio.current_time() + timeout if timeout is not None else float("inf")
            while True:
                event = None
                with trio.move_on_at(deadline):
                    event = await sub.get()
                if event is None:
                    event = job.timeout_event(timeout or 0.0)
                await self._send(stream, conn, h11.Data(data=(json.dumps(event) + "\n").encode()))
                if event.get("event") in ("result", "error"):
                    break
            await self._send(stream, conn, h11.EndOfMessage())
        finally:
            job.subscribers.discard(sub)


# --- bandwidth limits --------------------------------------------------------------------------

LIMITS_ROUTE = "/v1/limits"
_LIMIT_KEYS = ("upload", "download", "peer_upload")


def parse_limits(body: bytes, current: Any) -> Any:
    """A ``PUT /v1/limits`` body applied to ``current`` (a ``swarm.ratelimit.Limits``): the keys
    it names change, the others stay. Raises _BadRequest (400) naming the bad key."""
    import attrs

    from swarm.config import ConfigError, parse_rate

    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _BadRequest(400, f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _BadRequest(400, 'body must be a JSON object like {"upload": "20MB/s"}')
    unknown = set(obj) - set(_LIMIT_KEYS)
    if unknown:
        raise _BadRequest(
            400, f"unknown limit(s) {', '.join(sorted(unknown))} (known: {', '.join(_LIMIT_KEYS)})"
        )
    changes = {}
    for key, value in obj.items():
        try:
            changes[key] = None if value is None else parse_rate(value, key)
        except ConfigError as e:
            raise _BadRequest(400, str(e)) from None
    return attrs.evolve(current, **changes)
