"""The one place the simulator imports the engine from (the real one, unchanged)."""

from __future__ import annotations

from swarm.engine import EngineConfig, LinkClosed, Transfer
from swarm.store import PieceHashMismatch

__all__ = ["EngineConfig", "LinkClosed", "PieceHashMismatch", "Transfer"]
