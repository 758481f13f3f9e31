"""The one place the simulator imports swarm's code from: the real engine's core
(swarm/engine/core.py, which the node's trio runner drives; simulations/driver.py drives it here)
and the real discovery policies (swarm/discovery.py, the objects swarm/node/ drives), unchanged."""

from __future__ import annotations

from swarm.discovery import (
    FEW_PEERS,
    FIRST_LOOKUPS,
    LOOKUP_FIRST,
    LOOKUP_RETRY,
    LOOKUP_SETTLED,
    MANIFEST_ASK_FANOUT,
    MANIFEST_ASK_HEDGE,
    MANIFEST_ASK_MAX_OUT,
    MANIFEST_VOTE_GRACE,
    MANIFEST_VOTE_MIN_GRACE,
    ConnectPolicy,
    LinkState,
    LookupSchedule,
    ManifestAsk,
    ProviderScores,
    lookup_grace,
)
from swarm.engine import EngineConfig, LinkClosed, TransferCore
from swarm.engine.peer import Drop, PeerState
from swarm.store import PieceHashMismatch, StoreError

__all__ = [
    "FEW_PEERS",
    "FIRST_LOOKUPS",
    "LOOKUP_FIRST",
    "LOOKUP_RETRY",
    "LOOKUP_SETTLED",
    "MANIFEST_ASK_FANOUT",
    "MANIFEST_ASK_HEDGE",
    "MANIFEST_ASK_MAX_OUT",
    "MANIFEST_VOTE_GRACE",
    "MANIFEST_VOTE_MIN_GRACE",
    "ConnectPolicy",
    "Drop",
    "EngineConfig",
    "LinkClosed",
    "LinkState",
    "LookupSchedule",
    "ManifestAsk",
    "PeerState",
    "PieceHashMismatch",
    "ProviderScores",
    "StoreError",
    "TransferCore",
    "lookup_grace",
]
