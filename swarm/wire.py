"""Frames and messages of swarm's peer protocols: pure encode/decode, no I/O (sans-I/O, like h11).

Every message travels as one frame::

    u32 length (big-endian, counts the type byte and the body) | u8 type | body

Two protocols use these frames (ids in ``PIECES_PROTOCOL`` and ``MANIFEST_PROTOCOL``); docs/protocol.md
lists every message, field, limit and timeout. A ``FrameDecoder`` is fed whatever bytes arrive and
hands back whole messages; any frame that breaks a rule raises ``ProtocolError`` and the caller drops
the peer. Nothing here can crash a node: every length is checked before it is trusted.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import ClassVar

import attrs

PIECES_PROTOCOL = "/swarm/pieces/1.0.0"
MANIFEST_PROTOCOL = "/swarm/manifest/1.0.0"
LANE_PROTOCOL = "/swarm/lane/1.0.0"

# Limits. Each bounds the memory one peer can make us commit before we have checked anything.
MAX_PIECE_BYTES = 64 << 20
"""Largest piece a manifest allows (manifest.piece_size_for clamps at 64 MiB)."""
MAX_CONTROL_FRAME = 64 << 10
"""Every non-piece, non-manifest frame: a bitfield of MAX_PIECES bits is 32 KiB, the rest are tiny."""
MAX_PIECE_FRAME = MAX_PIECE_BYTES + 16
"""A PIECE frame is its header (type + index) plus at most one whole piece."""
MAX_MANIFEST_FRAME = (16 << 20) + (4 << 10)
"""A MANIFEST frame: one encoded manifest (manifest.MAX_MANIFEST_BYTES) plus its signature."""
MAX_NAME_BYTES = 256
"""Model names (org/name, 96 + 1 + 96) and revisions (128) fit with room to spare."""
MAX_REASON_BYTES = 512
"""Human-readable text in ERROR frames; longer reasons are cut, never rejected."""
MAX_SIGNATURE_BYTES = 1024
"""An Ed25519 signature is 64 bytes; a libp2p public key protobuf is under 100."""
MAX_MANIFESTS_PER_REPLY = 16
"""A peer may hold several revisions of one model; more than this is noise or abuse."""
MAX_MANIFEST_REPLY_BYTES = 32 << 20
"""All ManifestReply frames of one reply together. A manifest is kilobytes to a few MB (16 MiB
is a repo of ~500,000 files), so this still fits two of the largest; without it one provider
could make the asker hold 16 x 16 MiB before decoding any (measured: 129 MiB heap peak under a
flood of 16 x 4 MiB)."""

HELLO_SERVES = 0x01
"""Hello flag: the sender serves pieces to peers."""

_HDR = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_PIECE_HDR = struct.Struct(">IBI")
"""A PIECE frame's first 9 bytes: length, type, piece index."""
_HASH_LEN = 32


class ProtocolError(Exception):
    """The peer broke the protocol: drop the link and score the peer down."""


# --------------------------------------------------------------------------- messages


@attrs.frozen
class Hello:
    """First message on a pieces stream, from both sides: which snapshot this stream is about."""

    TYPE: ClassVar[int] = 1
    manifest_hash: bytes
    num_pieces: int
    serves: bool = True
    """The sender uploads to peers (False: a fetch-only node). Seeders use it to decide whether
    peers can pass pieces on to each other."""


@attrs.frozen
class Bitfield:
    """The sender's verified pieces, bit i (MSB-first) = piece i. Sent once, right after Hello."""

    TYPE: ClassVar[int] = 2
    bits: bytes


@attrs.frozen
class Have:
    TYPE: ClassVar[int] = 3
    index: int


@attrs.frozen
class Interested:
    TYPE: ClassVar[int] = 4


@attrs.frozen
class NotInterested:
    TYPE: ClassVar[int] = 5


@attrs.frozen
class Choke:
    TYPE: ClassVar[int] = 6


@attrs.frozen
class Unchoke:
    TYPE: ClassVar[int] = 7


@attrs.frozen
class Request:
    TYPE: ClassVar[int] = 8
    index: int


@attrs.frozen
class Cancel:
    TYPE: ClassVar[int] = 9
    index: int


@attrs.frozen
class PieceData:
    """One whole piece. ``data`` is anything with a length: bytes here, a size stand-in in the
    simulator (the engine never looks inside; the store verifies)."""

    TYPE: ClassVar[int] = 10
    index: int
    data: object = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class Reject:
    """The sender will not serve this request (choked, busy or lacks the piece): ask elsewhere."""

    TYPE: ClassVar[int] = 11
    index: int


@attrs.frozen
class Error:
    """Sent before closing a stream on purpose, so the other side can log why."""

    TYPE: ClassVar[int] = 12
    reason: str


@attrs.frozen
class ManifestRequest:
    """Ask a peer for its manifests of ``model``; narrowed by revision or by manifest hash if set."""

    TYPE: ClassVar[int] = 20
    model: str
    revision: str = ""
    manifest_hash: bytes = b""


@attrs.frozen
class ManifestReply:
    """One manifest the peer holds (its canonical bytes) and its publisher's signed release record
    (``swarm/trust.py``; empty if the peer has none)."""

    TYPE: ClassVar[int] = 21
    manifest: bytes
    signature: bytes = b""


@attrs.frozen
class ManifestEnd:
    """Ends a manifest reply; ``count`` lets the asker check it saw every ManifestReply."""

    TYPE: ClassVar[int] = 22
    count: int


Message = (
    Hello
    | Bitfield
    | Have
    | Interested
    | NotInterested
    | Choke
    | Unchoke
    | Request
    | Cancel
    | PieceData
    | Reject
    | Error
    | ManifestRequest
    | ManifestReply
    | ManifestEnd
)

_EMPTY = {
    Interested.TYPE: Interested(),
    NotInterested.TYPE: NotInterested(),
    Choke.TYPE: Choke(),
    Unchoke.TYPE: Unchoke(),
}
_INDEXED = {Have.TYPE: Have, Request.TYPE: Request, Cancel.TYPE: Cancel, Reject.TYPE: Reject}


# --------------------------------------------------------------------------- encoding


def _str(s: str, limit: int, what: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > limit:
        raise ValueError(f"{what}: {len(b)} bytes exceeds {limit}")
    return struct.pack(">H", len(b)) + b


def _frame(type_: int, body: bytes) -> bytes:
    return _HDR.pack(len(body) + 1, type_) + body


def piece_header(index: int, length: int) -> bytes:
    """Frame header of a PIECE; send it followed by the ``length`` payload bytes (no copy)."""
    return _HDR.pack(length + 5, PieceData.TYPE) + _U32.pack(index)


def encode(msg: Message) -> bytes:
    """Bytes of one frame. Raises ValueError for a message that no peer would accept."""
    t = msg.TYPE
    if t in _EMPTY:
        return _frame(t, b"")
    if t in _INDEXED:
        return _frame(t, _U32.pack(msg.index))
    if isinstance(msg, Hello):
        if len(msg.manifest_hash) != _HASH_LEN:
            raise ValueError("Hello.manifest_hash must be 32 bytes")
        flags = HELLO_SERVES if msg.serves else 0
        return _frame(t, msg.manifest_hash + _U32.pack(msg.num_pieces) + bytes([flags]))
    if isinstance(msg, Bitfield):
        return _frame(t, bytes(msg.bits))
    if isinstance(msg, PieceData):
        return piece_header(msg.index, len(msg.data)) + bytes(msg.data)
    if isinstance(msg, Error):
        reason = msg.reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
        return _frame(t, _str(reason, MAX_REASON_BYTES, "Error.reason"))
    if isinstance(msg, ManifestRequest):
        if msg.manifest_hash and len(msg.manifest_hash) != _HASH_LEN:
            raise ValueError("ManifestRequest.manifest_hash must be empty or 32 bytes")
        return _frame(
            t,
            _str(msg.model, MAX_NAME_BYTES, "ManifestRequest.model")
            + _str(msg.revision, MAX_NAME_BYTES, "ManifestRequest.revision")
            + bytes([len(msg.manifest_hash)])
            + msg.manifest_hash,
        )
    if isinstance(msg, ManifestReply):
        if len(msg.signature) > MAX_SIGNATURE_BYTES:
            raise ValueError("ManifestReply.signature too long")
        return _frame(
            t,
            _U32.pack(len(msg.manifest))
            + msg.manifest
            + struct.pack(">H", len(msg.signature))
            + msg.signature,
        )
    if isinstance(msg, ManifestEnd):
        return _frame(t, struct.pack(">H", msg.count))
    raise ValueError(f"not a wire message: {msg!r}")


# --------------------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked cursor over one frame body."""

    __slots__ = ("body", "pos", "what")

    def __init__(self, body: memoryview, what: str):
        self.body, self.pos, self.what = body, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise ProtocolError(f"{self.what}: truncated (needs {n} more bytes at {self.pos})")
        out = bytes(self.body[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def text(self, limit: int, field: str) -> str:
        n = self.u16()
        if n > limit:
            raise ProtocolError(f"{self.what}.{field}: {n} bytes exceeds {limit}")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{self.what}.{field}: invalid UTF-8") from e

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(f"{self.what}: {len(self.body) - self.pos} trailing bytes")


def decode_body(type_: int, body: memoryview) -> Message:
    """One message from its type and body (the frame without its 5-byte header)."""
    if type_ in _EMPTY:
        if len(body):
            raise ProtocolError(f"type {type_}: body must be empty")
        return _EMPTY[type_]
    if type_ in _INDEXED:
        r = _Reader(body, _INDEXED[type_].__name__)
        idx = r.u32()
        r.end()
        return _INDEXED[type_](idx)
    if type_ == PieceData.TYPE:
        if len(body) < 4:
            raise ProtocolError("PieceData: truncated header")
        return PieceData(_U32.unpack(body[:4])[0], bytes(body[4:]))
    if type_ == Hello.TYPE:
        r = _Reader(body, "Hello")
        mh, n = r.take(_HASH_LEN), r.u32()
        flags = r.u8()  # unknown bits are ignored: later versions may add flags
        r.end()
        return Hello(mh, n, bool(flags & HELLO_SERVES))
    if type_ == Bitfield.TYPE:
        return Bitfield(bytes(body))
    if type_ == Error.TYPE:
        r = _Reader(body, "Error")
        e = Error(r.text(MAX_REASON_BYTES, "reason"))
        r.end()
        return e
    if type_ == ManifestRequest.TYPE:
        r = _Reader(body, "ManifestRequest")
        model = r.text(MAX_NAME_BYTES, "model")
        revision = r.text(MAX_NAME_BYTES, "revision")
        n = r.u8()
        if n not in (0, _HASH_LEN):
            raise ProtocolError("ManifestRequest.manifest_hash: must be empty or 32 bytes")
        mh = r.take(n)
        r.end()
        return ManifestRequest(model, revision, mh)
    if type_ == ManifestReply.TYPE:
        r = _Reader(body, "ManifestReply")
        manifest = r.take(r.u32())
        n = r.u16()
        if n > MAX_SIGNATURE_BYTES:
            raise ProtocolError(f"ManifestReply.signature: {n} bytes exceeds {MAX_SIGNATURE_BYTES}")
        sig = r.take(n)
        r.end()
        return ManifestReply(manifest, sig)
    if type_ == ManifestEnd.TYPE:
        r = _Reader(body, "ManifestEnd")
        c = r.u16()
        r.end()
        if c > MAX_MANIFESTS_PER_REPLY:
            raise ProtocolError(f"ManifestEnd.count: {c} exceeds {MAX_MANIFESTS_PER_REPLY}")
        return ManifestEnd(c)
    raise ProtocolError(f"unknown message type {type_}")


def check_piece_fits(lengths: Sequence[int], index: int, n: int) -> None:
    """ProtocolError unless piece ``index`` is in the manifest (``lengths``: its piece lengths)
    and ``n`` bytes do not exceed that piece. Checked from a piece's header, before memory is
    taken for its payload: a longer piece can never verify, so memory per link follows the
    manifest's piece size, not MAX_PIECE_BYTES. A shorter one is let through (it costs no more
    than an honest piece) so the engine sees its length and bans the sender."""
    if not 0 <= index < len(lengths):
        raise ProtocolError(f"piece index {index} out of range 0..{len(lengths) - 1}")
    if n > lengths[index]:
        raise ProtocolError(f"piece {index} of {n} bytes, manifest says {lengths[index]}")


def frame_limit(type_: int) -> int:
    """Largest frame (length field value) allowed for this message type."""
    if type_ == PieceData.TYPE:
        return MAX_PIECE_FRAME
    if type_ == ManifestReply.TYPE:
        return MAX_MANIFEST_FRAME
    return MAX_CONTROL_FRAME


class FrameDecoder:
    """Feed bytes in, take whole messages out. Buffers at most one frame (checked against its
    type's limit before any of its body is kept).

    ``hello_first``: PIECE frames are refused until a Hello was decoded (the pieces protocol's
    first frame is a Hello, and until then nobody knows which manifest's piece sizes apply).
    ``expect_pieces(lengths)``: from then on a PIECE frame is checked against the manifest
    (``check_piece_fits``) from its first 9 bytes."""

    def __init__(self, allowed: frozenset[int] | None = None, *, hello_first: bool = False):
        self._buf = bytearray()
        self._allowed = allowed
        self._pieces_ok = not hello_first
        self._lengths: Sequence[int] | None = None

    def expect_pieces(self, lengths: Sequence[int]) -> None:
        """Check every PIECE frame from now on against these piece lengths (the manifest's)."""
        self._lengths = lengths
        if len(self._buf) >= _HDR.size:
            self._check_header()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def needed(self) -> int:
        """Bytes still missing for the frame in progress (at least 1 when nothing is buffered)."""
        if len(self._buf) < _HDR.size:
            return _HDR.size - len(self._buf)
        length, _ = _HDR.unpack_from(self._buf)
        return max(1, 4 + length - len(self._buf))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _HDR.size:
            self._check_header()

    def _check_header(self) -> None:
        length, type_ = _HDR.unpack_from(self._buf)
        if length < 1:
            raise ProtocolError("frame length 0")
        if self._allowed is not None and type_ not in self._allowed:
            raise ProtocolError(f"message type {type_} not allowed on this protocol")
        if length > frame_limit(type_):
            raise ProtocolError(
                f"frame of {length} bytes exceeds limit {frame_limit(type_)} for type {type_}"
            )
        if type_ == PieceData.TYPE:
            if not self._pieces_ok:
                raise ProtocolError("PieceData before Hello")
            if self._lengths is not None and len(self._buf) >= _PIECE_HDR.size:
                _, _, index = _PIECE_HDR.unpack_from(self._buf)
                check_piece_fits(self._lengths, index, length - 5)  # less type and index

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes are fed."""
        if len(self._buf) < _HDR.size:
            return None
        length, type_ = _HDR.unpack_from(self._buf)
        end = 4 + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as mv:
            msg = decode_body(type_, mv[_HDR.size : end])
        del self._buf[:end]
        if type_ == Hello.TYPE:
            self._pieces_ok = True
        if len(self._buf) >= _HDR.size:
            self._check_header()
        return msg


PIECES_TYPES = frozenset(
    {
        Hello.TYPE,
        Bitfield.TYPE,
        Have.TYPE,
        Interested.TYPE,
        NotInterested.TYPE,
        Choke.TYPE,
        Unchoke.TYPE,
        Request.TYPE,
        Cancel.TYPE,
        PieceData.TYPE,
        Reject.TYPE,
        Error.TYPE,
    }
)
MANIFEST_TYPES = frozenset({ManifestRequest.TYPE, ManifestReply.TYPE, ManifestEnd.TYPE, Error.TYPE})


# --------------------------------------------------------------------------- bitfields


def bitfield_bytes(num_pieces: int) -> int:
    return (num_pieces + 7) // 8


def pack_bitfield(indices, num_pieces: int) -> bytes:
    out = bytearray(bitfield_bytes(num_pieces))
    for i in indices:
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def unpack_bitfield(bits: bytes, num_pieces: int) -> set[int]:
    """Indices set in ``bits``; ProtocolError if its length or spare bits are wrong."""
    if len(bits) != bitfield_bytes(num_pieces):
        raise ProtocolError(f"Bitfield: {len(bits)} bytes for {num_pieces} pieces")
    spare = len(bits) * 8 - num_pieces
    if spare and bits[-1] & ((1 << spare) - 1):
        raise ProtocolError("Bitfield: spare bits set")
    out = set()
    for byte_i, b in enumerate(bits):
        if b:
            base = byte_i << 3
            for bit in range(8):
                if b & (0x80 >> bit):
                    out.add(base + bit)
    return out
