"""Keys, proofs and record sealing of the data lane (pure: no sockets, no trio, no libp2p).

The lane is negotiated over an authenticated libp2p stream (Noise): each side sends 32 fresh
random bytes over it, so both know a 64-byte secret that nobody else saw, bound to both peer ids.
Everything the direct TCP connection needs comes from that secret through HKDF-SHA256:

- ``lane_id`` (16 bytes): names the pending lane to the listener (sent in clear on TCP);
- ``dialer_proof`` / ``acceptor_proof`` keys: each side proves, with an HMAC-SHA256 over the
  transcript hash, that it knows the secret before the other accepts any further byte;
- ``dialer_to_acceptor`` / ``acceptor_to_dialer``: one AES-256-GCM key per direction.

Nonce discipline: each direction has its own key, used by exactly one sender, and every record
(control frame or piece) takes the next value of a 64-bit counter as its nonce (96-bit GCM nonce =
4 zero bytes + the counter, big-endian). The counter is never sent: the receiver counts records
itself, so a replayed, dropped or reordered record fails authentication. Keys are fresh for every
lane (new random secret), so a counter value is never reused under one key; a lane is closed
before ``MAX_RECORDS`` records (2**32 per direction; at 4 MiB pieces that is 16 PiB), far below
both the counter's range and AES-GCM's usage limits.

Records on the TCP connection, after the proofs::

    header = u8 kind | u32 index | u32 length          (9 bytes, cleartext, authenticated)
    FRAME  (kind 1): header | AES-GCM(frame bytes, aad=header) (length + 16 bytes)
    PIECE  (kind 2), encrypted: header | AES-GCM(piece bytes, aad=header) (length + 16 bytes)
    PIECE  (kind 2), plaintext: header | GCM tag over (empty, aad=header) (16) | piece bytes

A FRAME carries one ``swarm.wire`` frame (Hello, Bitfield, Have, Request, ...): control messages
are always encrypted and authenticated, in both modes. In plaintext mode the piece *payload* is
not covered by the key; it is accepted only after its blake3 matches the manifest (the engine's
store verifies every piece before writing it), so an on-path attacker can make a piece fail (and
the link drop) but cannot make bad bytes land on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import attrs
import cryptography
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "HEADER",
    "KIND_FRAME",
    "KIND_PIECE",
    "MAX_RECORDS",
    "MODE_ENCRYPTED",
    "MODE_PLAINTEXT",
    "NONCE_BYTES",
    "PROOF_BYTES",
    "TAG",
    "InvalidTag",
    "LaneExhausted",
    "LaneKeys",
    "Opener",
    "Sealer",
    "check_proof",
    "derive_keys",
    "make_proof",
]

MODE_ENCRYPTED = 1
MODE_PLAINTEXT = 2
MODE_NAMES = {MODE_ENCRYPTED: "encrypted", MODE_PLAINTEXT: "plaintext"}

NONCE_BYTES = 32
"""Random bytes each side contributes to the lane secret."""
LANE_ID_BYTES = 16
PROOF_BYTES = 32
TAG = 16
"""AES-GCM tag length."""
MAX_RECORDS = 1 << 32
"""Records per direction after which a lane refuses to send or accept more (closed, re-opened)."""

HEADER = struct.Struct(">BII")
"""kind, piece index (0 for a frame), payload length (without the tag)."""
KIND_FRAME = 1
KIND_PIECE = 2

_SALT = b"swarm-lane/1 hkdf salt"

CRYPTOGRAPHY_MIN = (47, 0)
"""The first cryptography release with ``AESGCM.encrypt_into`` / ``decrypt_into`` (pieces are
sealed and opened in place in their page-aligned buffers): 47.0.0 (42.0.8 to 46.0.3 lack them;
checked in their wheels). pyproject.toml requires at least this."""

if not (hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")):
    raise ImportError(
        f"the data lane needs cryptography>={'.'.join(map(str, CRYPTOGRAPHY_MIN))} "
        f"(AESGCM.encrypt_into/decrypt_into); this is {cryptography.__version__}: upgrade it"
    )


class LaneExhausted(Exception):
    """A lane's record counter reached MAX_RECORDS: close the lane (never reuse a nonce)."""


@attrs.frozen(repr=False)
class LaneKeys:
    lane_id: bytes
    transcript: bytes  # sha256 of everything both sides agreed on
    dialer_proof: bytes
    acceptor_proof: bytes
    dialer_to_acceptor: bytes
    acceptor_to_dialer: bytes

    def __repr__(self) -> str:  # never print key material
        return f"<LaneKeys {self.lane_id.hex()[:8]}>"


def _lp(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def derive_keys(
    dialer_nonce: bytes, acceptor_nonce: bytes, dialer_id: str, acceptor_id: str, mode: int, port: int
) -> LaneKeys:
    """Every key of one lane from both sides' random contributions and what they agreed on."""
    if len(dialer_nonce) != NONCE_BYTES or len(acceptor_nonce) != NONCE_BYTES:
        raise ValueError("lane nonces must be 32 bytes")
    transcript = hashlib.sha256(
        b"swarm-lane/1\0"
        + bytes([mode])
        + struct.pack(">H", port)
        + _lp(dialer_id.encode())
        + _lp(acceptor_id.encode())
        + dialer_nonce
        + acceptor_nonce
    ).digest()
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=LANE_ID_BYTES + 4 * 32,
        salt=_SALT,
        info=b"swarm-lane/1 keys " + transcript,
    ).derive(dialer_nonce + acceptor_nonce)
    k = [okm[LANE_ID_BYTES + 32 * i : LANE_ID_BYTES + 32 * (i + 1)] for i in range(4)]
    return LaneKeys(okm[:LANE_ID_BYTES], transcript, k[0], k[1], k[2], k[3])


def make_proof(keys: LaneKeys, dialer: bool) -> bytes:
    """What one side sends on TCP to show it knows the lane secret."""
    key = keys.dialer_proof if dialer else keys.acceptor_proof
    label = b"dialer" if dialer else b"acceptor"
    return hmac.new(
        key, b"swarm-lane/1 proof " + label + keys.lane_id + keys.transcript, hashlib.sha256
    ).digest()


def check_proof(keys: LaneKeys, dialer: bool, proof: bytes) -> bool:
    """Constant-time check of the other side's proof."""
    return hmac.compare_digest(make_proof(keys, dialer), bytes(proof))


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "big")


class Sealer:
    """The sending half of one direction: one key, one counter. Not thread-safe (the lane
    serializes its sends)."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self.records = 0

    def _next(self) -> bytes:
        if self.records >= MAX_RECORDS:
            raise LaneExhausted("lane record counter exhausted")
        n = self.records
        self.records += 1
        return _nonce(n)

    def seal_frame(self, frame: bytes) -> bytes:
        """One whole FRAME record (header + ciphertext + tag)."""
        header = HEADER.pack(KIND_FRAME, 0, len(frame))
        return header + self._aead.encrypt(self._next(), frame, header)

    def seal_piece_into(self, index: int, buf: memoryview, at: int, length: int) -> memoryview:
        """Encrypt the ``length`` bytes at ``buf[at:]`` in place and write the header into
        ``buf[at - 9: at]``; returns the view of the whole record (the tag lands after the
        payload, so ``buf`` needs 16 spare bytes there)."""
        h0 = at - HEADER.size
        HEADER.pack_into(buf, h0, KIND_PIECE, index, length)
        header = bytes(buf[h0:at])
        payload = buf[at : at + length]
        self._aead.encrypt_into(self._next(), payload, header, buf[at : at + length + TAG])
        return buf[h0 : at + length + TAG]

    def piece_prefix(self, index: int, length: int) -> bytes:
        """Header + tag of a plaintext-mode PIECE record (the payload follows unencrypted)."""
        header = HEADER.pack(KIND_PIECE, index, length)
        return header + self._aead.encrypt(self._next(), b"", header)


class Opener:
    """The receiving half of one direction. Raises ``InvalidTag`` for any record that was not
    sealed by the other side's Sealer, in order."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self.records = 0

    def _next(self) -> bytes:
        if self.records >= MAX_RECORDS:
            raise LaneExhausted("lane record counter exhausted")
        n = self.records
        self.records += 1
        return _nonce(n)

    def open_frame(self, header: bytes, sealed: bytes | bytearray | memoryview) -> bytes:
        return self._aead.decrypt(self._next(), sealed, header)

    def open_piece_into(self, header: bytes, buf: memoryview, length: int) -> None:
        """Decrypt ``buf[:length + 16]`` (ciphertext + tag) in place into ``buf[:length]``."""
        self._aead.decrypt_into(self._next(), buf[: length + TAG], header, buf[:length])

    def check_piece_prefix(self, header: bytes, tag: bytes | bytearray | memoryview) -> None:
        """Authenticate the header of a plaintext-mode PIECE record."""
        self._aead.decrypt(self._next(), bytes(tag), header)
