"""Small helpers of the node: links, exception groups, snapshot sizes."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from swarm.engine import Transfer
from swarm.fetchapi import FetchError

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split


def _snapshot_bytes(path: Path) -> int:
    """Bytes of the files a snapshot directory links to (what a source delivered)."""
    total = 0
    for f in Path(path).rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


def _remote_host(link: Any) -> str | None:
    """The IP address an inbound link comes from (the engine limits handshakes per address), or
    None if the link cannot tell. The links do not expose it yet, so look inside: the libp2p
    stream of a ``StreamLink``, the socket of a ``LaneLink``."""
    host = getattr(link, "remote_host", None)
    if isinstance(host, str):
        return host
    try:
        stream = getattr(link, "_stream", None)
        if stream is not None:
            addr = stream.get_remote_address()
            return str(addr[0]) if addr else None
        sock = getattr(link, "_sock", None)
        if sock is not None:
            return str(sock.getpeername()[0])
    except Exception:  # a closed socket or stream: no address, no per-address limit
        log.debug("no remote address for %r", link, exc_info=True)
    return None


class NodeStopped(FetchError):
    """A call needed the running node (to start a link, a transfer, an announcement) after it
    stopped: a fetch still unwinding when ``Node.running()`` exits."""


def _single(e: BaseException) -> BaseException:
    """The one real error inside nested trio exception groups (callers want the cause)."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


async def _raise_on_failure(t: Transfer) -> None:
    await t.failed.wait()
    assert t.error is not None
    raise t.error


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:
        log.debug("close failed", exc_info=True)
