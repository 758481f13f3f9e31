"""The option table: one ``Option`` per setting of ``swarm-node run`` (``OPTIONS``), from which the
flags, the ``SWARM_*`` variables, the TOML keys and the reference in docs/configuration.md come."""

from __future__ import annotations

from typing import Any

import attrs

from swarm.config.base import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_LANE,
    DEFAULT_LISTEN,
    LANE_MODES,
    LOG_FORMATS,
    TRUST_POLICIES,
)

# --- the option table --------------------------------------------------------------------------

KINDS = (
    "path",
    "addrs",
    "peer_addrs",
    "serve",
    "switch",
    "choice",
    "psk",
    "peer_ids",
    "hostport",
    "seconds",
    "size",
    "rate",
)
"""How an option's values are read (see ``Option``)."""
_LIST_KINDS = ("addrs", "peer_addrs", "serve", "peer_ids")


@attrs.frozen
class Option:
    """One setting of ``swarm-node run``. ``kind`` decides how its values are read:

    - ``path``: a directory path;
    - ``addrs`` / ``peer_addrs``: multiaddrs (``peer_addrs`` must end in ``/p2p/<peer id>``);
    - ``serve``: ``ORG/NAME=DIR`` entries (a TOML table ``"ORG/NAME" = "DIR"`` in a file);
    - ``switch``: a boolean with ``--x`` / ``--no-x``;
    - ``choice``: one of ``choices``;
    - ``psk``: a swarm key or the path of a key file;
    - ``peer_ids``: publisher peer ids;
    - ``hostport``: a TCP address ``HOST:PORT``;
    - ``seconds``: a number of seconds, 0 or more;
    - ``size``: a number of bytes with a unit (``parse_size``); 0 or ``none`` for unbounded;
    - ``rate``: bytes per second with units (``parse_rate``), 0 or ``none`` for unlimited.
    """

    key: str
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    help: str
    default: Any = None
    default_doc: str = "none"
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag: str = ""
    noun: str = ""  # how errors name a bad choice ("lane mode must be one of ...")

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "SWARM_" + self.key.upper()

    @property
    def cli_off(self) -> str:
        """A switch's ``--no-x`` flag."""
        return "--no-" + self.cli[2:]

    @property
    def env_off(self) -> str:
        """A switch's ``SWARM_NO_X`` variable."""
        return "SWARM_NO_" + self.key.upper()

    @property
    def is_list(self) -> bool:
        return self.kind in _LIST_KINDS


OPTIONS: tuple[Option, ...] = (
    Option(
        "home",
        "path",
        "node state directory: identity, piece state, control socket",
        default_doc="the user cache dir (~/.cache/swarm)",
        metavar="DIR",
    ),
    Option(
        "listen",
        "addrs",
        "address to listen on (repeatable)",
        default=DEFAULT_LISTEN,
        default_doc=DEFAULT_LISTEN[0],
        metavar="MULTIADDR",
    ),
    Option(
        "bootstrap", "peer_addrs", "peer to join through (repeatable)", default=(), metavar="MULTIADDR/p2p/ID"
    ),
    Option(
        "serve", "serve", "serve a private model directory (repeatable)", default=(), metavar="ORG/NAME=DIR"
    ),
    Option(
        "cache_dir",
        "path",
        "where fetched models go, in the Hugging Face hub cache layout",
        default_doc="HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub",
        metavar="DIR",
    ),
    Option(
        "serve_hf_cache",
        "switch",
        "serve the complete snapshots of the local HF cache and "
        "what comes from the Hub or ModelExpress to every peer that can connect",
        default_doc="on with a psk, off without one",
    ),
    Option(
        "psk",
        "psk",
        "private swarm key: 64 hex digits, or a swarm.key file (see "
        "`swarm-node keygen`); nodes without the same key cannot connect",
        metavar="KEY|FILE",
    ),
    Option(
        "trust",
        "choice",
        "which manifests to accept: 'open' (any; a fetch by name takes the "
        "one most providers announce) or 'trusted-publishers' (only those signed by a trusted "
        "publisher)",
        default="open",
        default_doc="open",
        choices=TRUST_POLICIES,
        noun="trust policy",
    ),
    Option(
        "trusted_publishers",
        "peer_ids",
        "peer id whose signed manifests are accepted (repeatable); needs --trust trusted-publishers",
        default=(),
        metavar="PEER_ID",
        flag="--trusted-publisher",
    ),
    Option(
        "lane",
        "choice",
        "how piece bytes travel: over a direct TCP data lane set up through "
        "the authenticated libp2p connection, 'encrypted' (AES-256-GCM) or 'plaintext' (piece "
        "bytes unencrypted on the wire: for trusted networks only; used only when both ends are "
        "set to plaintext, an encrypted peer never accepts it; control messages stay encrypted "
        "and every piece is still verified with blake3); or 'off' (libp2p streams only). A link "
        "falls back to a libp2p stream whenever the lane cannot be opened",
        default=DEFAULT_LANE,
        default_doc=DEFAULT_LANE,
        choices=LANE_MODES,
        noun="lane mode",
    ),
    Option(
        "direct_io",
        "switch",
        "write whole pieces received over the data lane with O_DIRECT (off: through the page cache)",
        default=True,
        default_doc="on",
    ),
    Option(
        "log_format",
        "choice",
        "log lines as text, or as one JSON object per line with event "
        "fields (fetch_start, fetch_end, ban, lane_fallback, evict, rm, gc_incomplete)",
        default="text",
        default_doc="text",
        choices=LOG_FORMATS,
        noun="log format",
    ),
    Option(
        "drain_timeout",
        "seconds",
        "on SIGTERM or SIGINT the node stops announcing and "
        "taking new work, then waits up to this long for pieces peers already asked of it",
        default=DEFAULT_DRAIN_TIMEOUT,
        default_doc=f"{DEFAULT_DRAIN_TIMEOUT:g}",
        metavar="SECONDS",
    ),
    Option(
        "max_cache_size",
        "size",
        "keep the HF cache under this size: after each fetch and "
        "every 10 minutes, snapshots fetched through the swarm that are neither served nor in "
        "use are removed, least recently used first. K/M/G/T are powers of 1000, KiB/MiB/GiB/"
        "TiB powers of 1024; 0 or none: unbounded",
        default=None,
        default_doc="none (unbounded)",
        metavar="SIZE",
    ),
    Option(
        "metrics_listen",
        "hostport",
        "serve Prometheus metrics on this TCP address at "
        "/metrics (they are always on the control socket at /v1/metrics)",
        metavar="HOST:PORT",
    ),
    # Bandwidth limits (swarm/ratelimit.py); changed at run time with `swarm-node limits`.
    Option(
        "max_upload_rate",
        "rate",
        "cap on piece bytes this node sends to all peers together "
        "(data lane and libp2p streams alike); changed at run time with `swarm-node limits`",
        default_doc="unlimited",
        metavar="RATE",
    ),
    Option(
        "max_download_rate",
        "rate",
        "cap on piece bytes this node receives from all peers together (requests are paced to it)",
        default_doc="unlimited",
        metavar="RATE",
    ),
    Option(
        "max_peer_upload_rate",
        "rate",
        "cap on piece bytes this node sends to any one peer",
        default_doc="unlimited",
        metavar="RATE",
    ),
)
_BY_KEY = {o.key: o for o in OPTIONS}


def option(key: str) -> Option:
    """The entry of ``OPTIONS`` for ``key`` (KeyError if there is none)."""
    return _BY_KEY[key]


_NODE_KEYS = (
    "home",
    "cache_dir",
    "listen",
    "bootstrap",
    "serve",
    "serve_hf_cache",
    "psk",
    "lane",
    "direct_io",
    "max_cache_size",
    "max_upload_rate",
    "max_download_rate",
    "max_peer_upload_rate",
)
"""Options that go into ``swarm.node.NodeConfig`` as they are (trust is built from two)."""


_KIND_DOC = {
    "path": "path",
    "addrs": "list of multiaddrs",
    "peer_addrs": "list of multiaddrs ending in /p2p/ID",
    "serve": 'table "ORG/NAME" = "DIR"',
    "switch": "true/false",
    "choice": "string",
    "psk": "64 hex digits or a key file's path",
    "peer_ids": "list of peer ids",
    "hostport": '"HOST:PORT"',
    "seconds": "number",
    "size": 'string ("500G", "1.5TiB") or integer bytes',
    "rate": 'number (bytes/s) or string like "100MB/s"',
}
