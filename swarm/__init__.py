"""swarm: peer-to-peer delivery of ML model files across an inference fleet.

``swarm.fetch(repo_id, ...)`` / ``await swarm.afetch(repo_id, ...)`` (see :mod:`swarm.client`) are
imported on first use, so ``import swarm`` stays cheap and never imports libp2p.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "afetch", "fetch", "fetch_card"]

if TYPE_CHECKING:
    from swarm.client import afetch, fetch, fetch_card


def __getattr__(name: str) -> Any:
    if name in ("fetch", "afetch", "fetch_card"):
        from swarm import client

        return getattr(client, name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
