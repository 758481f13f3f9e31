"""The data lane's record codec, sans-I/O: what each record on a lane's TCP connection means and
what may come next (no sockets, no threads, no trio; fuzzed in tests/test_lane_codec.py).

Records (see ``lane_crypto`` for the sealing and the nonce discipline)::

    header = u8 kind | u32 index | u32 length          (9 bytes, cleartext, authenticated)
    FRAME  (kind 1): header | AES-GCM(one wire frame, aad=header)      (length + 16 bytes)
    PIECE  (kind 2), encrypted: header | AES-GCM(piece, aad=header)    (length + 16 bytes)
    PIECE  (kind 2), plaintext: header | GCM tag (16) | piece bytes    (16 + length bytes)

``RecordReader`` is the receiving side's state machine. The link's I/O drives it one step at a
time: it reads the 9 header bytes and calls ``header``, which checks everything the header alone
decides (kind, length bounds, a PIECE before the Hello, a PIECE longer than its piece in the
manifest) before a byte of the body is read or a buffer taken for it; then it reads
``record.prefix`` bytes (the tag of a plaintext PIECE: ``piece_prefix`` authenticates the header
before a buffer is taken) and ``record.body`` bytes, into memory of its choosing (a pooled piece
buffer, for a PIECE), and calls ``frame`` or ``piece``. Every way a record can break the protocol
is a ``wire.ProtocolError`` (authentication failures included); ``lane_crypto.LaneExhausted``
means the lane's record counter ran out (close the lane, never reuse a nonce).

``RecordDecoder`` is the same reader over an in-memory byte stream (``feed`` / ``next_message``):
what the fuzz tests drive, and a reference for the I/O loops in ``lane_link``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from swarm import wire
from swarm.net import lane_crypto as lc

__all__ = [
    "MAX_FRAME_RECORD",
    "MIN_FRAME_RECORD",
    "Record",
    "RecordDecoder",
    "RecordReader",
    "decode_frame",
    "seal_frame",
]

MIN_FRAME_RECORD = 5
"""Smallest FRAME record payload: a wire frame's 5-byte header (u32 length, u8 type)."""
MAX_FRAME_RECORD = wire.MAX_CONTROL_FRAME + 4
"""Largest FRAME record payload: the largest control frame the pieces protocol allows, with its
u32 length prefix."""


def decode_frame(frame: bytes | bytearray) -> wire.Message:
    """One pieces-protocol message from a FRAME record's plaintext (one whole wire frame)."""
    if len(frame) < 5:
        raise wire.ProtocolError("lane frame too short")
    length, type_ = struct.unpack_from(">IB", frame)
    if length != len(frame) - 4:
        raise wire.ProtocolError("lane frame length mismatch")
    if type_ not in wire.PIECES_TYPES or type_ == wire.PieceData.TYPE:
        raise wire.ProtocolError(f"message type {type_} not allowed on the lane")
    with memoryview(frame) as mv:
        return wire.decode_body(type_, mv[5:])


def seal_frame(sealer: lc.Sealer, msg: wire.Message) -> bytes:
    """One whole FRAME record carrying ``msg`` (any pieces-protocol message but PieceData, which
    goes as a PIECE record: ``Sealer.seal_piece_into`` / ``Sealer.piece_prefix``)."""
    return sealer.seal_frame(wire.encode(msg))


@attrs.frozen
class Record:
    """One record's header, checked: ``prefix`` then ``body`` bytes follow it on the wire."""

    header: bytes
    kind: int
    index: int
    length: int  # payload bytes, without the tag
    prefix: int  # bytes before the body: the tag of a plaintext PIECE, else 0
    body: int  # bytes of the body: sealed frame or piece (+ tag), or plaintext piece

    @property
    def is_piece(self) -> bool:
        return self.kind == lc.KIND_PIECE


class RecordReader:
    """The receiving half of one lane direction (see the module docstring): call ``header``,
    then ``piece_prefix`` if ``record.prefix``, then ``frame`` or ``piece``, once per record, in
    order (the opener counts records: a skipped or repeated step fails authentication)."""

    def __init__(self, opener: lc.Opener, *, encrypted: bool):
        self.opener = opener
        self.encrypted = encrypted
        self.greeted = False
        """The peer's Hello came in: PIECE records may follow."""
        self.lengths: Sequence[int] | None = None
        """The manifest's piece lengths, once the engine named the manifest (``expect_pieces``)."""

    def header(self, header: bytes) -> Record:
        """Check a record's 9 header bytes: the record, or ProtocolError."""
        kind, index, n = lc.HEADER.unpack(header)
        if kind == lc.KIND_FRAME:
            if not MIN_FRAME_RECORD <= n <= MAX_FRAME_RECORD:
                raise wire.ProtocolError(f"lane frame of {n} bytes")
            return Record(header, kind, index, n, 0, n + lc.TAG)
        if not self.greeted:
            raise wire.ProtocolError(f"lane record of kind {kind} before Hello")
        if kind != lc.KIND_PIECE:
            raise wire.ProtocolError(f"unknown lane record kind {kind}")
        if not 0 < n <= wire.MAX_PIECE_BYTES:
            raise wire.ProtocolError(f"lane piece of {n} bytes")
        if self.lengths is not None:  # before any byte of it is taken (or a buffer)
            wire.check_piece_fits(self.lengths, index, n)
        if self.encrypted:
            return Record(header, kind, index, n, 0, n + lc.TAG)
        return Record(header, kind, index, n, lc.TAG, n)

    def frame(self, record: Record, sealed: bytes | bytearray | memoryview) -> wire.Message:
        """The message in a FRAME record's body (``record.body`` bytes)."""
        try:
            msg = decode_frame(self.opener.open_frame(record.header, sealed))
        except lc.InvalidTag:
            raise wire.ProtocolError("lane record failed authentication") from None
        if isinstance(msg, wire.Hello):
            self.greeted = True
        return msg

    def piece_prefix(self, record: Record, tag: bytes | bytearray | memoryview) -> None:
        """Authenticate a plaintext PIECE's header from its tag (``record.prefix`` bytes)."""
        try:
            self.opener.check_piece_prefix(record.header, tag)
        except lc.InvalidTag:
            raise wire.ProtocolError("lane record failed authentication") from None

    def piece(self, record: Record, buf: memoryview) -> None:
        """A PIECE record's body, received into ``buf[:record.body]``: decrypted in place (the
        piece is then ``buf[:record.length]``); a plaintext piece is left as it is (the engine
        checks its blake3 against the manifest before it is written)."""
        if not self.encrypted:
            return
        try:
            self.opener.open_piece_into(record.header, buf, record.length)
        except lc.InvalidTag:
            raise wire.ProtocolError("lane record failed authentication") from None


class RecordDecoder:
    """``RecordReader`` over an in-memory byte stream: ``feed`` bytes, take messages with
    ``next_message`` (None: more bytes are needed, ``needed`` says how many at least). A record
    is refused from its header, before its body arrives; a PIECE comes out as
    ``wire.PieceData(index, bytes)``."""

    def __init__(self, reader: RecordReader):
        self.reader = reader
        self._buf = bytearray()
        self._record: Record | None = None
        self._prefixed = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def needed(self) -> int:
        """Bytes to buffer, at least, before the next step can be taken."""
        rec = self._record
        if rec is None:
            return max(0, lc.HEADER.size - len(self._buf))
        if not self._prefixed:
            return max(0, rec.prefix - len(self._buf))
        return max(0, rec.body - len(self._buf))

    def _take(self, n: int) -> bytearray:
        out = self._buf[:n]
        del self._buf[:n]
        return out

    def next_message(self) -> wire.Message | None:
        if self._record is None:
            if len(self._buf) < lc.HEADER.size:
                return None
            self._record = self.reader.header(bytes(self._take(lc.HEADER.size)))
            self._prefixed = False
        rec = self._record
        if not self._prefixed:
            if len(self._buf) < rec.prefix:
                return None
            if rec.prefix:
                self.reader.piece_prefix(rec, self._take(rec.prefix))
            self._prefixed = True
        if len(self._buf) < rec.body:
            return None
        body = self._take(rec.body)
        self._record = None
        if not rec.is_piece:
            return self.reader.frame(rec, body)
        with memoryview(body) as mv:
            self.reader.piece(rec, mv)
        return wire.PieceData(rec.index, bytes(body[: rec.length]))
