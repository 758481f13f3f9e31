"""The transfer engine: trades the pieces of one manifest with many peers at once.

- ``config``: ``PeerLink`` and ``PieceStore`` (what a transfer talks through and stores into),
  ``EngineConfig``, ``PeerStats``.
- ``core``: ``TransferCore``, the decisions without I/O (messages and ticks in, queued messages
  and pieces to send out), with ``requests`` (our requests and their deadlines), ``seeding``
  (least-copied-first), ``admission`` (handshake limits) and ``peer`` (per-peer state).
- ``runner``: ``Transfer``, the trio runner of the core over ``PeerLink`` objects, which the
  libp2p layer, the fast data lane and the simulator each implement.

The engine decides with ``swarm.picker`` and ``swarm.choker``; it never imports libp2p, and the
core never imports trio (``Transfer`` is imported on first use, so the simulator, which drives the
core itself, runs without trio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarm.engine.config import EngineConfig, LinkClosed, PeerLink, PeerStats, PieceStore
from swarm.engine.core import TransferCore

if TYPE_CHECKING:
    from swarm.engine.runner import Transfer


def __getattr__(name: str) -> Any:
    if name == "Transfer":
        from swarm.engine.runner import Transfer

        return Transfer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EngineConfig", "LinkClosed", "PeerLink", "PeerStats", "PieceStore", "Transfer", "TransferCore"]
