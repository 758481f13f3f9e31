"""Whose manifest counts: signed release records of publishers, freshness, and the trust policy.

The node that builds a manifest (the publisher) signs a **release record** of it with its libp2p
identity key (Ed25519): the manifest hash, a sequence number and an expiry. The record travels with
the manifest on the manifest protocol (``ManifestReply.signature``), and every node that re-serves
the snapshot relays the publisher's record unchanged. Pieces are already checked against the
manifest; this decides which manifest to believe.

Release record (what ``ManifestReply.signature`` carries)::

    u8 version = 2 | u64 seq | u64 expires (unix seconds)
    | u16 len + public key (libp2p protobuf PublicKey, Ed25519 only) | u16 len + sig

``sig`` is Ed25519 over ``SIGNING_CONTEXT + manifest_hash + u64 seq + u64 expires``; the context
string keeps a record from ever being valid as any other libp2p-signed message. The manifest hash
commits to the model name and revision (they are part of the manifest). The publisher is the peer
id derived from the public key exactly as libp2p derives it (identity multihash of the protobuf key,
base58btc), so a policy can name publishers by the ids that ``swarm-node status`` prints.

``seq`` orders a publisher's releases of a model: a publisher gives each new manifest of a model a
higher seq than any before (``next_seq``: unix milliseconds, bumped past the last one it used, so
seqs of different publishers are comparable too). ``expires`` bounds how long a relayed record
stays usable: a publisher re-signs (same seq, new expiry) while it serves the manifest.

Policies: ``open`` accepts any well-formed manifest (a fetch by name takes the one most providers
announce; see ``node.Node._choose``); ``trusted-publishers`` accepts only manifests with an
unexpired release record by a listed peer id, and a fetch by name takes the release with the
highest seq, never one below the highest seq the node has seen from that publisher for that model
(rollback refused). Whatever the policy, a fetch pinned to a manifest hash accepts nothing else.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import attrs
import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNING_CONTEXT = b"swarm/release-record/v2\0"
RECORD_VERSION = 2
_ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"  # protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
_ED25519_SIG_LEN = 64
_HEAD = struct.Struct(">BQQ")  # version, seq, expires
_U64_MAX = (1 << 64) - 1

RELEASE_LIFETIME = 7 * 24 * 3600
"""Seconds a release record stays valid. A relayed record outlives its publisher's last re-sign by
at most this long; a node that never saw a newer release can be rolled back within this window only.
Publishers re-sign every record older than half of it (at start and hourly while they serve)."""
EXPIRY_GRACE = 600
"""Seconds a record is still accepted past its expiry: publisher and fetcher clocks may differ."""

POLICIES = ("open", "trusted-publishers")


class TrustError(ValueError):
    """A record that is malformed, invalid, expired, stale, or not by a trusted publisher."""


@attrs.frozen
class Release:
    """A verified release record: ``publisher`` signed ``manifest_hash`` as its release ``seq``,
    valid until ``expires`` (unix seconds). ``blob`` is the record as it travels."""

    publisher: str
    manifest_hash: bytes
    seq: int
    expires: int
    blob: bytes

    def expired(self, now: float) -> bool:
        return now > self.expires + EXPIRY_GRACE

    def rank(self) -> tuple[int, int]:
        """Newer releases rank higher; of two records of one release, the later expiry."""
        return (self.seq, self.expires)


def signing_payload(manifest_hash: bytes, seq: int, expires: int) -> bytes:
    if len(manifest_hash) != 32:
        raise ValueError("manifest hash must be 32 bytes")
    return SIGNING_CONTEXT + manifest_hash + struct.pack(">QQ", seq, expires)


def peer_id_from_public_key(public_key_proto: bytes) -> str:
    """libp2p peer id of a protobuf-serialized public key (keys up to 42 bytes are inlined with the
    identity multihash, which covers Ed25519)."""
    if len(public_key_proto) > 42:
        raise TrustError("only inline (Ed25519) public keys are supported")
    return base58.b58encode(bytes([0x00, len(public_key_proto)]) + public_key_proto).decode()


def next_seq(last: int, now: float | None = None) -> int:
    """A seq above ``last``: unix milliseconds, or ``last + 1`` if the clock is behind it."""
    now = time.time() if now is None else now
    return max(last + 1, int(now * 1000))


def sign_release(keypair: Any, manifest_hash: bytes, seq: int, expires: int) -> bytes:
    """Release record of ``manifest_hash`` by a libp2p key pair (``private_key.sign`` and
    ``public_key.serialize`` are all that is used, so this module never imports libp2p)."""
    if not (0 <= seq <= _U64_MAX and 0 <= expires <= _U64_MAX):
        raise ValueError("seq and expires must fit in 64 bits")
    pub = keypair.public_key.serialize()
    sig = keypair.private_key.sign(signing_payload(manifest_hash, seq, expires))
    return (
        _HEAD.pack(RECORD_VERSION, seq, expires)
        + struct.pack(">H", len(pub))
        + pub
        + struct.pack(">H", len(sig))
        + sig
    )


def sign_manifest(
    keypair: Any,
    manifest_hash: bytes,
    *,
    seq: int | None = None,
    expires: int | None = None,
    now: float | None = None,
) -> bytes:
    """A fresh release record of ``manifest_hash`` (seq from the clock, RELEASE_LIFETIME)."""
    now = time.time() if now is None else now
    return sign_release(
        keypair,
        manifest_hash,
        next_seq(0, now) if seq is None else seq,
        int(now) + RELEASE_LIFETIME if expires is None else expires,
    )


def verify_release(blob: bytes, manifest_hash: bytes) -> Release:
    """The release ``blob`` records if its signature of ``manifest_hash`` is valid (expiry is the
    policy's business); TrustError otherwise."""
    if not blob:
        raise TrustError("unsigned")
    if blob[0] != RECORD_VERSION:
        raise TrustError(f"unknown release record version {blob[0]}")
    try:
        _v, seq, expires = _HEAD.unpack_from(blob, 0)
        at = _HEAD.size
        (klen,) = struct.unpack_from(">H", blob, at)
        pub = blob[at + 2 : at + 2 + klen]
        (slen,) = struct.unpack_from(">H", blob, at + 2 + klen)
        sig = blob[at + 4 + klen : at + 4 + klen + slen]
    except struct.error as e:
        raise TrustError("truncated release record") from e
    if len(pub) != klen or len(sig) != slen or at + 4 + klen + slen != len(blob):
        raise TrustError("malformed release record")
    if len(pub) != 36 or not pub.startswith(_ED25519_KEY_PREFIX) or slen != _ED25519_SIG_LEN:
        raise TrustError("only Ed25519 publisher keys are supported")
    try:
        Ed25519PublicKey.from_public_bytes(pub[4:]).verify(sig, signing_payload(manifest_hash, seq, expires))
    except InvalidSignature as e:
        raise TrustError("signature does not match the manifest") from e
    return Release(peer_id_from_public_key(pub), bytes(manifest_hash), seq, expires, bytes(blob))


def verify_signature(blob: bytes, manifest_hash: bytes) -> str:
    """The publisher's peer id if ``blob`` is a valid release record of ``manifest_hash``."""
    return verify_release(blob, manifest_hash).publisher


@attrs.frozen
class TrustPolicy:
    mode: str = "open"
    publishers: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ValueError(f"trust policy must be one of {', '.join(POLICIES)}, not {self.mode!r}")
        if self.mode == "trusted-publishers" and not self.publishers:
            raise ValueError("trust policy 'trusted-publishers' needs at least one publisher id")

    def check(
        self, manifest_hash: bytes, signature: bytes, now: float | None = None, *, fresh: bool = True
    ) -> Release | None:
        """The verified release (None if unsigned or invalid and the policy is open); TrustError
        if refused. Under ``open`` a record only breaks ties, so its expiry does not matter;
        ``fresh=False`` (a fetch pinned to the hash) does not ask for an unexpired one either."""
        if self.mode == "open":
            try:
                return verify_release(signature, manifest_hash) if signature else None
            except TrustError:
                return None  # open: a bad signature is just no signature
        release = verify_release(signature, manifest_hash)
        if release.publisher not in self.publishers:
            raise TrustError(f"publisher {release.publisher} is not trusted")
        now = time.time() if now is None else now
        if fresh and release.expired(now):
            raise TrustError(
                f"release {release.seq} of publisher {release.publisher[:16]} "
                f"expired {now - release.expires:.0f} s ago"
            )
        return release


def refuse_stale(release: Release, floor: int) -> None:
    """TrustError if ``release`` is older than ``floor``, the highest seq the node has seen from
    its publisher for the model (a relayed old release: a rollback)."""
    if release.seq < floor:
        raise TrustError(
            f"release {release.seq} of publisher {release.publisher[:16]} is older "
            f"than release {floor} seen before (rollback refused)"
        )
