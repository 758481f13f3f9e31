"""The node: one libp2p host, one store, and a Transfer per manifest it trades.

A node serves what it holds (private directories, complete snapshots of the local HF cache, and
whatever it fetched) and fetches through the swarm: a DHT lookup by model name (or by manifest hash
when one is pinned), manifests from the providers, then pieces from many peers at once. It announces
itself under the manifest key as soon as it holds a verified piece (partial seeding) and under the
model key once complete.

One job per module:

- ``state``: ``NodeConfig`` and ``Shared`` (one manifest this node trades);
- ``core``: ``Node`` itself (construction, lifetime, status, bandwidth limits), made of the mixins
  below;
- ``serving``: serving directories and cache snapshots, release records, announcing, draining,
  the manifest and pieces protocol handlers;
- ``vote``: provider lookup, the manifest vote, provider order and scores;
- ``fetch``: the download path and the fallback chain around it;
- ``cache``: served / seeded snapshots, removal, eviction, garbage collection;
- ``records``: the manifest cache of served directories and the provenance records on disk;
- ``util``: small helpers.
"""

from swarm.discovery import (  # the limits stay importable from here
    MANIFEST_ASK_FANOUT,
    MAX_LINKS_PER_FETCH,
    PROVIDER_FAILURE_MEMORY,
)
from swarm.node.core import Node
from swarm.node.records import _ManifestCache, _Provenance
from swarm.node.serving import DRAIN_POLL, REPROVIDE_INTERVAL
from swarm.node.state import NodeConfig, Shared
from swarm.node.vote import MANIFEST_ASK_TIMEOUT

__all__ = [
    "DRAIN_POLL",
    "MANIFEST_ASK_FANOUT",
    "MANIFEST_ASK_TIMEOUT",
    "MAX_LINKS_PER_FETCH",
    "PROVIDER_FAILURE_MEMORY",
    "REPROVIDE_INTERVAL",
    "Node",
    "NodeConfig",
    "Shared",
    "_ManifestCache",
    "_Provenance",
]
