"""The node's identity: one Ed25519 key pair, kept in a file, so the peer id survives restarts.

The file holds the libp2p protobuf serialization of the private key (``PrivateKey.serialize()``:
key type Ed25519 + the key bytes), the format libp2p implementations exchange. py-libp2p writes the
32-byte seed; go-libp2p writes seed + public key (64 bytes); both are read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID

from swarm.store.fileio import fsync_dir

log = logging.getLogger(__name__)

__all__ = ["KeyPair", "load_or_create_identity", "peer_id_of"]


class IdentityError(ValueError):
    """The identity file exists but does not hold a usable Ed25519 key."""


def peer_id_of(keypair: KeyPair) -> str:
    """The base58 peer id (``12D3KooW...``) of a key pair."""
    return ID.from_pubkey(keypair.public_key).to_base58()


def load_or_create_identity(path: Path) -> KeyPair:
    """The key pair stored at ``path``; a new Ed25519 one is created (mode 0600, atomic) if the file
    does not exist. A file that exists but cannot be parsed raises IdentityError: it is never
    silently replaced (that would change the node's peer id)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        kp = create_new_key_pair()
        if _create_exclusive(path, kp.private_key.serialize()):
            log.info("created identity %s in %s", peer_id_of(kp), path)
            return kp
        data = path.read_bytes()  # another process created it first: use theirs
    _check_mode(path)
    return _keypair_from_bytes(data, path)


def _keypair_from_bytes(data: bytes, path: Path) -> KeyPair:
    try:
        pb = crypto_pb2.PrivateKey.FromString(data)
    except Exception as e:
        raise IdentityError(f"{path}: not a libp2p private key ({e})") from e
    if pb.key_type != KeyType.Ed25519.value:
        raise IdentityError(f"{path}: key type {pb.key_type} is not Ed25519")
    raw = bytes(pb.data)
    if len(raw) == 64:  # go-libp2p layout: seed || public key
        seed, pub = raw[:32], raw[32:]
    elif len(raw) == 32:
        seed, pub = raw, None
    else:
        raise IdentityError(f"{path}: Ed25519 key of {len(raw)} bytes")
    try:
        priv: PrivateKey = Ed25519PrivateKey.from_bytes(seed)
    except Exception as e:
        raise IdentityError(f"{path}: bad Ed25519 key ({e})") from e
    public = priv.get_public_key()
    if pub is not None and public.to_bytes() != pub:
        raise IdentityError(f"{path}: public key does not match the private key")
    return KeyPair(priv, public)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically with mode 0600, only if ``path`` does not exist.
    Returns False if it appeared meanwhile. A crash never leaves a partial file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent, unlike rename
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: rename (racy only between processes)
            if path.exists():
                return False
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _check_mode(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("identity file %s is readable by others (mode %o); chmod 600 it", path, mode)
