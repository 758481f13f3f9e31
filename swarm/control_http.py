"""The control API's HTTP/1.1 layer (h11 on trio): reading one bounded request, writing JSON
answers and error answers, and the request bodies other than a fetch's (``POST /v1/rm``,
``PUT /v1/limits``). :mod:`swarm.control` routes; this module only speaks HTTP."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import h11
import trio

import swarm

__all__ = ["BadRequest", "json_object", "parse_limits", "read_request", "send", "send_error", "send_json"]

MAX_HEADER_BYTES = 16 * 1024
"""Request line plus headers. Our clients send < 1 KiB; this is h11's default and well above it."""
MAX_BODY_BYTES = 64 * 1024
"""A fetch request is a name, a revision and two pattern lists: a few hundred bytes in practice."""
RESPONSE_SEND_TIMEOUT = 30.0
"""Seconds one write to a client may block (a client that stops reading is dropped)."""
_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class BadRequest(Exception):
    """A request answered with a 4xx ``status`` and never passed on to the node."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


RM_KEYS = frozenset({"target", "force"})
"""Fields of a ``POST /v1/rm`` body."""


def json_object(body: bytes, keys: frozenset[str]) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(400, f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, "body must be a JSON object")
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)}")
    return obj


async def read_request(stream: trio.SocketStream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise BadRequest(e.error_status_hint or 400, f"bad HTTP request: {e}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(64 * 1024)
            received += len(data)
            conn.receive_data(data)  # b"" marks EOF
            continue
        if isinstance(event, h11.Request):
            # h11 bounds only an *incomplete* head; a complete one that came in one read
            # is measured here.
            if received - len(conn.trailing_data[0]) > MAX_HEADER_BYTES:
                raise BadRequest(431, f"request head over {MAX_HEADER_BYTES} bytes")
            request = event
            for name, value in event.headers:
                if name == b"content-length":
                    try:
                        n = int(value)
                    except ValueError:
                        raise BadRequest(400, "bad Content-Length") from None
                    if n > MAX_BODY_BYTES:
                        raise BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            if request is None:
                return None, b""
            raise BadRequest(400, "connection closed mid-request")


async def send_error(stream: trio.SocketStream, status: int, message: str) -> None:
    """An error answer written directly (h11 refuses to answer a request it could not parse or
    has not seen); the connection is closed after it."""
    body = (json.dumps({"error": message}) + "\n").encode()
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        with trio.fail_after(RESPONSE_SEND_TIMEOUT):
            await stream.send_all(head + body)


async def send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        with trio.fail_after(RESPONSE_SEND_TIMEOUT):
            await stream.send_all(data)


def headers(content_type: str, length: int | None = None) -> list[tuple[str, str]]:
    h = [
        ("content-type", content_type),
        ("connection", "close"),
        ("server", f"swarm-node/{swarm.__version__}"),
    ]
    if length is not None:
        h.append(("content-length", str(length)))
    return h


async def send_json(stream: trio.SocketStream, conn: h11.Connection, status: int, obj: Any) -> None:
    await send_body(stream, conn, status, "application/json", (json.dumps(obj) + "\n").encode())


async def send_body(
    stream: trio.SocketStream, conn: h11.Connection, status: int, content_type: str, data: bytes
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    await send(stream, conn, h11.Response(status_code=status, headers=headers(content_type, len(data))))
    await send(stream, conn, h11.Data(data=data))
    await send(stream, conn, h11.EndOfMessage())


# --- bandwidth limits --------------------------------------------------------------------------

LIMITS_ROUTE = "/v1/limits"
_LIMIT_KEYS = ("upload", "download", "peer_upload")


def parse_limits(body: bytes, current: Any) -> Any:
    """A ``PUT /v1/limits`` body applied to ``current`` (a ``swarm.ratelimit.Limits``): the keys
    it names change, the others stay. Raises BadRequest (400) naming the bad key."""
    import attrs

    from swarm.config import ConfigError, parse_rate

    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(400, f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, 'body must be a JSON object like {"upload": "20MB/s"}')
    unknown = set(obj) - set(_LIMIT_KEYS)
    if unknown:
        raise BadRequest(
            400, f"unknown limit(s) {', '.join(sorted(unknown))} (known: {', '.join(_LIMIT_KEYS)})"
        )
    changes = {}
    for key, value in obj.items():
        try:
            changes[key] = None if value is None else parse_rate(value, key)
        except ConfigError as e:
            raise BadRequest(400, str(e)) from None
    return attrs.evolve(current, **changes)
