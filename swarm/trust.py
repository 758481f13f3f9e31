"""Whose manifest counts: publisher signatures and the node's trust policy.

The node that builds a manifest (the publisher) signs its hash with its libp2p identity key
(Ed25519); the signature travels with the manifest on the manifest protocol, and every node that
re-serves the snapshot relays the publisher's signature unchanged. Pieces are already checked
against the manifest; this decides which manifest to believe.

Signature blob (what ``ManifestReply.signature`` carries)::

    u8 version = 1 | u16 len + public key (libp2p protobuf PublicKey, Ed25519 only) | u16 len + sig

``sig`` is Ed25519 over ``SIGNING_CONTEXT + manifest_hash``; the context string keeps a manifest
signature from ever being valid as any other libp2p-signed message. The publisher is the peer id
derived from the public key exactly as libp2p derives it (identity multihash of the protobuf key,
base58btc), so a policy can name publishers by the ids that ``swarm-node status`` prints.

Policies: ``open`` accepts any well-formed manifest (a fetch by name then takes the one most
providers announce); ``trusted-publishers`` accepts only manifests with a valid signature by a
listed peer id. Whatever the policy, a fetch pinned to a manifest hash accepts nothing else.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNING_CONTEXT = b"swarm/manifest-signature/v1\0"
SIGNATURE_VERSION = 1
_ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"  # protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
_ED25519_SIG_LEN = 64

POLICIES = ("open", "trusted-publishers")


class TrustError(ValueError):
    """A signature that is malformed, invalid, or not by a trusted publisher."""


def signing_payload(manifest_hash: bytes) -> bytes:
    if len(manifest_hash) != 32:
        raise ValueError("manifest hash must be 32 bytes")
    return SIGNING_CONTEXT + manifest_hash


def peer_id_from_public_key(public_key_proto: bytes) -> str:
    """libp2p peer id of a protobuf-serialized public key (keys up to 42 bytes are inlined with the
    identity multihash, which covers Ed25519)."""
    if len(public_key_proto) > 42:
        raise TrustError("only inline (Ed25519) public keys are supported")
    return base58.b58encode(bytes([0x00, len(public_key_proto)]) + public_key_proto).decode()


def sign_manifest(keypair: Any, manifest_hash: bytes) -> bytes:
    """Signature blob for ``manifest_hash`` by a libp2p key pair (``private_key.sign`` and
    ``public_key.serialize`` are all that is used, so this module never imports libp2p)."""
    pub = keypair.public_key.serialize()
    sig = keypair.private_key.sign(signing_payload(manifest_hash))
    return (bytes([SIGNATURE_VERSION]) + struct.pack(">H", len(pub)) + pub
            + struct.pack(">H", len(sig)) + sig)


def verify_signature(blob: bytes, manifest_hash: bytes) -> str:
    """The publisher's peer id if ``blob`` is a valid signature of ``manifest_hash``; TrustError
    otherwise."""
    try:
        if not blob or blob[0] != SIGNATURE_VERSION:
            raise TrustError("unsigned or unknown signature version")
        (klen,) = struct.unpack_from(">H", blob, 1)
        pub = blob[3 : 3 + klen]
        (slen,) = struct.unpack_from(">H", blob, 3 + klen)
        sig = blob[5 + klen : 5 + klen + slen]
    except struct.error as e:
        raise TrustError("truncated signature") from e
    if len(pub) != klen or len(sig) != slen or 5 + klen + slen != len(blob):
        raise TrustError("malformed signature")
    if len(pub) != 36 or not pub.startswith(_ED25519_KEY_PREFIX) or slen != _ED25519_SIG_LEN:
        raise TrustError("only Ed25519 publisher keys are supported")
    try:
        Ed25519PublicKey.from_public_bytes(pub[4:]).verify(sig, signing_payload(manifest_hash))
    except InvalidSignature as e:
        raise TrustError("signature does not match the manifest") from e
    return peer_id_from_public_key(pub)


@attrs.frozen
class TrustPolicy:
    mode: str = "open"
    publishers: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"trust policy must be one of {', '.join(POLICIES)}, not {self.mode!r}")
        if self.mode == "trusted-publishers" and not self.publishers:
            raise ValueError("trust policy 'trusted-publishers' needs at least one publisher id")

    def check(self, manifest_hash: bytes, signature: bytes) -> str | None:
        """The publisher id (None if unsigned and the policy is open); TrustError if refused."""
        if self.mode == "open":
            try:
                return verify_signature(signature, manifest_hash) if signature else None
            except TrustError:
                return None  # open: a bad signature is just no signature
        publisher = verify_signature(signature, manifest_hash)
        if publisher not in self.publishers:
            raise TrustError(f"publisher {publisher} is not trusted")
        return publisher
