"""swarm's libp2p layer: the only package in the project that imports libp2p or multiaddr.

- ``identity``: the node's persistent Ed25519 key (its peer id).
- ``links``: ``StreamLink``, an ``engine.PeerLink`` over one libp2p stream.
- ``host``: ``SwarmHost`` (noise-only host, Kademlia DHT, manifest and pieces protocols), with
  ``providers`` (DHT provider records), ``requests`` (protocol handlers), ``addrs`` (keys,
  addresses, NetError) and ``manifest_exchange`` (the manifest exchange's rules, pure).
- ``lane``: the direct TCP data lane's setup and listener, with ``lane_link`` (``LaneLink`` and
  its threads), ``lane_codec`` (records, sans-I/O), ``lane_crypto`` (keys, proofs, sealing) and
  ``lane_pool`` (piece buffers).
- ``compat``: every py-libp2p workaround and private-API use, pinned to py-libp2p 0.8.1.

Importing this package itself does not import libp2p (the submodules do; ~1 s, ~86 MB).
"""

from __future__ import annotations

import logging
import os

# Loggers that report ordinary events at ERROR level, raised to CRITICAL: a failed dial or a
# protocol the peer does not speak (SwarmHost raises NetError for both, and basic_host logs a
# multi-line report), an identify reply to a peer that closed the connection right after connecting.
_SPURIOUS_ERROR_LOGGERS = (
    "libp2p.host.basic_host",
    "libp2p.network.swarm",
    "libp2p.protocol_muxer.multiselect_client",
    "libp2p.identity.identify",
)


class _DropLibp2pRootRecords(logging.Filter):
    """py-libp2p also calls ``logging.warning(...)`` on the *root* logger (swarm_connection.py) for
    ordinary connection teardown. A filter on a logger sees only records created on that logger,
    so this drops exactly those (below ERROR) and nothing of ours."""

    prefix = ""  # libp2p's package directory, set by quiet_libp2p_logs

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not (
            self.prefix and record.pathname.startswith(self.prefix)
        )


_root_filter = _DropLibp2pRootRecords()


def quiet_libp2p_logs(level: int = logging.ERROR) -> None:
    """Silence py-libp2p's routine chatter, in one place; idempotent. Call once at startup.

    py-libp2p logs normal stream ends as WARNING hundreds of times per run, and unless
    ``LIBP2P_DEBUG`` is set, ``import libp2p`` detaches its ``libp2p`` logger (``propagate =
    False``, no handler), so what it logs reaches stderr through logging's last-resort handler,
    bypassing the application's configuration. This imports libp2p (so its import-time setup has
    run), raises the ``libp2p`` tree to ``level`` and re-attaches it to the root logger (so real
    libp2p errors go wherever the application logs), raises a few loggers known to report ordinary
    events as ERROR to CRITICAL, and filters libp2p's direct root-logger warnings. ``swarm.*``
    loggers are untouched. With ``LIBP2P_DEBUG`` set this does nothing (libp2p's own debug logging
    was asked for).
    """
    import libp2p  # its import-time logging setup must run before ours

    _root_filter.prefix = os.path.dirname(os.path.abspath(libp2p.__file__)) + os.sep

    global _quiet_level
    if os.environ.get("LIBP2P_DEBUG"):
        return
    _quiet_level = level
    _apply_quiet(level)


_quiet_level: int | None = None


def _apply_quiet(level: int) -> None:
    lg = logging.getLogger("libp2p")
    lg.setLevel(level)
    lg.propagate = True
    # Some modules pin their own level (network.auto_connector: INFO, logging every 10 s).
    for name, obj in list(logging.root.manager.loggerDict.items()):
        if (
            name.startswith("libp2p.")
            and isinstance(obj, logging.Logger)
            and obj.level != logging.NOTSET
            and obj.level < level
        ):
            obj.setLevel(level)
    for name in _SPURIOUS_ERROR_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.CRITICAL))
    root = logging.getLogger()
    if _root_filter not in root.filters:
        root.addFilter(_root_filter)


def _requiet() -> None:
    """Re-apply quiet_libp2p_logs() (if it was called) to loggers of libp2p modules imported since;
    SwarmHost calls this when it starts."""
    if _quiet_level is not None:
        _apply_quiet(_quiet_level)
