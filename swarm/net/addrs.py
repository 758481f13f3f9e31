"""Keys and addresses of the net layer (pure apart from py-libp2p's peer id and multiaddr types):
DHT keys of models and manifests, ``PeerAddr``, parsing of peer targets and of the swarm key, and
``NetError``, the error every net operation raises (here because every net module imports this
one).

- ``model_key`` / ``manifest_key``: DHT keys are multihashes (34 bytes): py-libp2p's DHT nodes
  reject non-multihash keys over 50 bytes.
- ``parse_target``: a PeerAddr, a multiaddr ending in ``/p2p/<id>`` or a bare peer id, as
  (peer id, addresses without the ``/p2p`` suffix).
- ``expand_wildcards``: our listen addresses as peers can dial them (never 0.0.0.0 or ::).
"""

from __future__ import annotations

import hashlib
import logging
import re

import attrs
import multiaddr
from libp2p.peer.id import ID
from libp2p.utils.address_validation import expand_wildcard_address

log = logging.getLogger(__name__)

__all__ = [
    "NetError",
    "PeerAddr",
    "check_key",
    "expand_wildcards",
    "manifest_key",
    "model_key",
    "parse_id",
    "parse_psk",
    "parse_target",
    "strip_p2p",
]

_SHA2_256 = 0x12
_BLAKE3 = 0x1E
_MODEL_KEY_PREFIX = b"swarm/model/"


class NetError(Exception):
    """A network operation failed: unreachable peer, refused or timed-out request, bad reply."""


def model_key(model: str) -> bytes:
    """DHT key of a model name: the sha2-256 multihash (34 bytes) of ``b"swarm/model/" + name``.

    Raw bytes are what the DHT stores and sends; py-libp2p's ``KadDHT.provide(key: str)`` would
    take a CID string or the hex of these bytes (raw bytes also happen to pass its CID parser), but
    SwarmHost hands the bytes to the provider store directly."""
    return bytes([_SHA2_256, 32]) + hashlib.sha256(_MODEL_KEY_PREFIX + model.encode("utf-8")).digest()


def manifest_key(manifest_hash: bytes) -> bytes:
    """DHT key of a manifest: its 32-byte blake3 as a blake3 multihash (code 0x1e, length 32).

    The DHT accepts any multihash (remote FIND_NODE validates with ``multihash.decode``, which
    knows blake3; ADD_PROVIDER / GET_PROVIDERS only bound the length); XOR distances are taken over
    sha256 of the key either way."""
    if len(manifest_hash) != 32:
        raise ValueError(f"manifest hash must be 32 bytes, got {len(manifest_hash)}")
    return bytes([_BLAKE3, 32]) + bytes(manifest_hash)


@attrs.frozen
class PeerAddr:
    """A peer and the multiaddrs it can be dialled at (without the ``/p2p/<id>`` suffix)."""

    peer_id: str
    addrs: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def p2p_addrs(self) -> list[str]:
        """The addresses with the ``/p2p/<id>`` suffix, as ``SwarmHost.connect`` takes them."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]


def strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    if value:
        return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}"))
    return addr


def expand_wildcards(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Our listen addresses as peers can dial them: a wildcard IP (0.0.0.0, ::) becomes the
    machine's interface addresses (py-libp2p advertises the wildcard itself otherwise)."""
    out: list[multiaddr.Multiaddr] = []
    for a in candidates:
        ip = None
        for proto in ("ip4", "ip6"):
            try:
                ip = a.value_for_protocol(proto)
            except Exception:
                continue
            if ip:
                break
        expanded = [a]
        if ip in ("0.0.0.0", "::"):
            try:
                expanded = expand_wildcard_address(a) or [a]
            except Exception as e:
                log.debug("cannot expand %s: %r", a, e)
        for x in expanded:
            if x not in out:
                out.append(x)
    return out


def parse_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as e:
        raise NetError(f"not a peer id: {peer_id!r}") from e


def parse_target(peer: str | PeerAddr) -> tuple[ID, list[multiaddr.Multiaddr]]:
    """(peer id, addrs without /p2p) from a PeerAddr, a multiaddr ending in /p2p/<id>, or a bare
    peer id."""
    if isinstance(peer, PeerAddr):
        pid = parse_id(peer.peer_id)
        addrs = []
        for a in peer.addrs:
            try:
                addrs.append(strip_p2p(multiaddr.Multiaddr(a)))
            except Exception as e:
                log.debug("ignoring bad address %r of %s: %s", a, peer.peer_id, e)
        return pid, addrs
    if not isinstance(peer, str):
        raise TypeError(f"expected a peer id, a multiaddr or a PeerAddr, got {type(peer).__name__}")
    if not peer.startswith("/"):
        return parse_id(peer), []
    try:
        ma = multiaddr.Multiaddr(peer)
        value = ma.value_for_protocol("p2p")
    except Exception as e:
        raise NetError(f"bad multiaddr {peer!r}: {e}") from e
    if not value:
        raise NetError(f"multiaddr {peer!r} does not end in /p2p/<peer id>")
    return parse_id(value), [strip_p2p(ma)]


_SWARM_KEY_RE = re.compile(r"/key/swarm/psk/1\.0\.0/\s*/base16/\s*([0-9a-fA-F]{64})\s*$")


def parse_psk(psk: str) -> str:
    """The 64-hex-digit form py-libp2p takes, from 64 hex digits or the text of a go-style
    ``swarm.key`` file (``/key/swarm/psk/1.0.0/``, ``/base16/``, the key). ValueError otherwise."""
    s = psk.strip()
    m = _SWARM_KEY_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if len(s) != 64 or not all(c in "0123456789abcdefABCDEF" for c in s):
        raise ValueError("psk must be 32 bytes as 64 hex digits (or a swarm.key file's text)")
    return s.lower()


def check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not 2 <= len(key) <= 80:
        raise ValueError("DHT key must be 2..80 bytes (use model_key / manifest_key)")
    return bytes(key)
