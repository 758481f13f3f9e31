"""The node's configuration (``NodeConfig``) and what it keeps per manifest it trades (``Shared``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from swarm.engine import EngineConfig, Transfer
from swarm.manifest import Manifest
from swarm.net.lane import LANE_MODES
from swarm.trust import TrustPolicy

if TYPE_CHECKING:
    from swarm.config import RunSettings


@attrs.frozen
class NodeConfig:
    home: Path
    cache_dir: Path
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    serve: tuple[tuple[str, Path], ...] = ()
    serve_hf_cache: bool | None = None
    """Serve the complete snapshots of the local HF cache, and seed what comes from the Hub or
    ModelExpress (gated or private repos pulled with HF_TOKEN among them). None: only with a
    private swarm key (``psk``); without one anyone who reaches the port could fetch them by
    name. ``serve`` directories and what was fetched through the swarm are always served."""
    psk: str | None = None
    engine: EngineConfig = attrs.Factory(EngineConfig)
    lookup_timeout: float = 5.0
    lane: str = attrs.field(default="encrypted", validator=attrs.validators.in_(LANE_MODES))
    """Piece bytes over a direct TCP data lane (swarm/net/lane.py): "encrypted" (AES-256-GCM),
    "plaintext" (trusted networks only: used with peers also set to plaintext; blake3 still
    verifies every piece) or "off" (libp2p streams only). Links fall back to libp2p streams
    whenever a lane cannot be opened."""
    direct_io: bool = True
    """Write whole aligned pieces received over the lane with O_DIRECT (see swarm/store/fileio.py)."""
    trust: TrustPolicy = attrs.Factory(TrustPolicy)
    stall_timeout: float | None = 60.0
    """Seconds a download may go without a verified piece while no linked peer can still send one
    (none holds a missing piece, or each that does let ``max_timeouts`` requests in a row time
    out) before the fetch fails: VerificationFailed if peers were banned for bad data, FetchError
    otherwise. None waits for new providers forever."""
    max_cache_size: int | None = None
    """Bytes the HF cache may hold: after each fetch and every ``cache_admin.GC_INTERVAL`` s,
    fetched snapshots neither served nor in use go, least recently used first (swarm/cache_admin.py).
    None: unbounded."""
    # Bandwidth limits in bytes/s (None: unlimited), shared by all transfers and both transports
    # (swarm/ratelimit.py); ``Node.set_limits`` changes them at run time.
    max_upload_rate: float | None = None
    max_download_rate: float | None = None
    max_peer_upload_rate: float | None = None

    @classmethod
    def from_settings(cls, settings: RunSettings, **overrides: Any) -> NodeConfig:
        """The configuration ``settings`` (resolved ``swarm-node run`` options) give, with
        ``overrides`` (field=value) on top."""
        return cls(**{**settings.node_fields(), **overrides})


@attrs.define
class Shared:
    """One manifest this node trades."""

    manifest: Manifest
    transfer: Transfer
    source: Any  # Download while fetching, SnapshotReader once complete
    path: Path | None = None  # snapshot / served directory once complete
    signature: bytes = b""  # the release record we serve it with (b"": unsigned)
    origin: str = "fetched"  # "built" (we hashed it ourselves and sign it), "fetched", "unknown"
    announced_manifest: bool = False
    announced_model: bool = False
    ready: trio.Event = attrs.Factory(trio.Event)  # finalized (path set) or failed
    error: str = ""
    _encoded: bytes = b""

    @property
    def complete(self) -> bool:
        return self.path is not None

    @property
    def encoded_manifest(self) -> bytes:
        """The manifest's bytes, encoded once: every manifest reply shares them (a reply used to
        hold its own copy for as long as a slow reader took)."""
        if not self._encoded:
            self._encoded = self.manifest.encode()
        return self._encoded
