"""The one place the simulator imports swarm's code from: the real engine and the real discovery
policies (swarm/discovery.py, the objects swarm/node.py drives), unchanged."""

from __future__ import annotations

from swarm.discovery import (
    FEW_PEERS,
    FIRST_LOOKUPS,
    LOOKUP_FIRST,
    LOOKUP_RETRY,
    LOOKUP_SETTLED,
    MANIFEST_ASK_FANOUT,
    MANIFEST_VOTE_GRACE,
    ConnectPolicy,
    LinkState,
    LookupSchedule,
    ManifestAsk,
    ProviderScores,
)
from swarm.engine import EngineConfig, LinkClosed, Transfer
from swarm.store import PieceHashMismatch

__all__ = [
    "FEW_PEERS",
    "FIRST_LOOKUPS",
    "LOOKUP_FIRST",
    "LOOKUP_RETRY",
    "LOOKUP_SETTLED",
    "MANIFEST_ASK_FANOUT",
    "MANIFEST_VOTE_GRACE",
    "ConnectPolicy",
    "EngineConfig",
    "LinkClosed",
    "LinkState",
    "LookupSchedule",
    "ManifestAsk",
    "PieceHashMismatch",
    "ProviderScores",
    "Transfer",
]
