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
    for the sources (``swarm.fetchapi.SourceEnv``: ``hub_offline``, ``hf_token``, ``hf_endpoint``,
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

import swarm
from swarm.control_http import (
    LIMITS_ROUTE,
    MAX_HEADER_BYTES,
    RM_KEYS,
    BadRequest,
    json_object,
    parse_limits,
    read_request,
    send_body,
    send_error,
    send_json,
)
from swarm.control_jobs import Job, job_key, stream_job
from swarm.fetchapi import (
    FetchError,
    FetchRequest,
    error_event,
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

_BadRequest = BadRequest  # the name tests and older callers know

__all__ = ["ControlServer", "HomeBusy", "HomeLock", "UnsafeHome", "check_home", "error_event", "result_event"]

REQUEST_READ_TIMEOUT = 10.0
"""Seconds a client has to send its whole request; a stuck or idle connection is dropped after it."""
MAX_CONNECTIONS = 512
"""Open control connections at once; more are answered 503 at once (each costs a task and a fd)."""
LIVE_PROBE_TIMEOUT = 2.0
"""Seconds to wait for a connection to an existing socket file before calling it stale."""


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
        self._jobs: dict[tuple, Job] = {}
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
                await send_error(stream, 503, "too many control connections")
                return
            try:
                with trio.fail_after(REQUEST_READ_TIMEOUT):
                    request, body = await read_request(stream, conn)
            except trio.TooSlowError:
                await send_error(stream, 408, "request not received in time")
                return
            except BadRequest as e:
                await send_error(stream, e.status, str(e))
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
            await send_json(stream, conn, 404, {"error": f"no route {target}"})
            return
        want, handler = routes[target]
        if method != want:
            await send_json(stream, conn, 405, {"error": f"{target} takes {want}"})
            return
        if handler is not None:
            if not self._ready.is_set():
                await send_json(stream, conn, 503, {"error": "the node is starting"})
                return
            if inspect.iscoroutinefunction(handler):  # the cache routes: disk work in a thread
                try:
                    status, answer = await handler(body)
                except BadRequest as e:
                    await send_json(stream, conn, e.status, {"error": str(e)})
                    return
                await send_json(stream, conn, status, answer)
                return
            answer = handler()
            if isinstance(answer, bytes):  # the metrics exposition
                from swarm.metrics import CONTENT_TYPE

                await send_body(stream, conn, 200, CONTENT_TYPE, answer)
            else:
                await send_json(stream, conn, 200, answer)
            return
        try:
            req, timeout = self._parse_fetch(body)
        except BadRequest as e:
            await send_json(stream, conn, e.status, {"error": str(e)})
            return
        await stream_job(stream, conn, self._job_for(req), timeout)

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
        from swarm import cache_admin  # on first use: it imports the store

        obj = json_object(body, RM_KEYS)
        target, force = obj.get("target"), obj.get("force", False)
        if not isinstance(target, str) or not isinstance(force, bool):
            raise BadRequest(400, "target must be ORG/NAME[@REVISION] and force true or false")
        try:
            model, revision = cache_admin.parse_target(target)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None
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
            await send_json(stream, conn, 405, {"error": f"{LIMITS_ROUTE} takes GET or PUT"})
            return
        if not self._ready.is_set():
            await send_json(stream, conn, 503, {"error": "the node is starting"})
            return
        if method == "PUT":
            try:
                self.node.set_limits(parse_limits(body, self.node.bandwidth.limits))
            except BadRequest as e:
                await send_json(stream, conn, e.status, {"error": str(e)})
                return
        await send_json(stream, conn, 200, self.node.bandwidth.limits.as_dict())

    # -- fetch --

    def _parse_fetch(self, body: bytes) -> tuple[FetchRequest, float | None]:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(400, f"body is not JSON: {e}") from None
        try:
            return request_from_json(obj, self._cache_dir())
        except ValueError as e:
            raise BadRequest(400, str(e)) from None

    def _cache_dir(self) -> Path:
        if self.node is not None:
            return Path(self.node.config.cache_dir)
        from swarm.config import default_cache_dir

        return default_cache_dir()

    def _job_for(self, req: FetchRequest) -> Job:
        key = job_key(req)
        job = self._jobs.get(key)
        if job is None:
            job = Job(key, req)
            self._jobs[key] = job
            assert self._nursery is not None
            self._nursery.start_soon(self._run_job, job)
        return job

    async def _run_job(self, job: Job) -> None:
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
