"""The canonical bytes of a manifest (format in swarm/manifest/__init__.py): encoding, and the decoding
that re-checks every rule."""

from __future__ import annotations

import struct

from swarm.manifest.rules import (
    _FILE_FIXED,
    _U8,
    _U16,
    _U32,
    _U64,
    DIGEST_SIZE,
    HASH_PREFIX,
    MAGIC,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_PIECE_SIZE,
    MAX_PIECES,
    MIN_PIECE_SIZE,
    VERSION,
    ManifestError,
    validate_model_name,
    validate_revision,
)
from swarm.manifest.values import FileEntry, Manifest


def encode_manifest(self: Manifest) -> bytes:
    """The canonical bytes of a manifest (format in swarm/manifest/__init__.py)."""
    out = [MAGIC, _U8.pack(VERSION)]
    for s in (self.model, self.revision):
        b = s.encode()
        out += (_U16.pack(len(b)), b)
    out.append(_U32.pack(len(self.files)))
    for f in self.files:
        p = f.path.encode()
        log2 = f.piece_size.bit_length() - 1
        out += (_U16.pack(len(p)), p, _FILE_FIXED.pack(f.size, f.digest, log2, f.num_pieces))
        out.extend(f.piece_hashes)
    return b"".join(out)


def decode_manifest(cls: type[Manifest], data: bytes | bytearray | memoryview) -> Manifest:
    """Parse and validate canonical bytes; raises :class:`ManifestError` on anything else."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise ManifestError("manifest", f"not bytes: {type(data).__name__}")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest", f"{len(data)} bytes, over MAX_MANIFEST_BYTES ({MAX_MANIFEST_BYTES})")
    r = _Reader(data)
    magic = r.take(4, "magic")
    if magic != MAGIC:
        raise ManifestError("magic", f"expected {MAGIC!r}, got {magic!r}")
    version = r.unpack(_U8, "version")[0]
    if version != VERSION:
        raise ManifestError("version", f"unsupported version {version} (expected {VERSION})")
    model = validate_model_name(r.text("model"))
    revision = validate_revision(r.text("revision"))
    count = r.unpack(_U32, "files")[0]
    if count > MAX_FILES:
        raise ManifestError("files", f"{count} files, over MAX_FILES ({MAX_FILES})")
    files = []
    total_pieces = 0
    for i in range(count):
        where = f"files[{i}]"
        path = r.text(f"{where}.path")
        size = r.unpack(_U64, f"{where}.size")[0]
        digest = r.take(DIGEST_SIZE, f"{where}.blake3")
        log2 = r.unpack(_U8, f"{where}.piece_size")[0]
        npieces = r.unpack(_U32, f"{where}.piece_hashes")[0]
        if not 14 <= log2 <= 26:  # 16 KiB .. 64 MiB
            raise ManifestError(
                f"{where}.piece_size",
                f"2**{log2} outside [{MIN_PIECE_SIZE}, {MAX_PIECE_SIZE}]",
            )
        total_pieces += npieces
        if total_pieces > MAX_PIECES:
            raise ManifestError(f"{where}.piece_hashes", f"over MAX_PIECES ({MAX_PIECES}) pieces in total")
        blob = r.take(npieces * DIGEST_SIZE, f"{where}.piece_hashes")
        hashes = tuple(blob[k : k + DIGEST_SIZE] for k in range(0, len(blob), DIGEST_SIZE))
        try:
            entry = FileEntry(path, size, HASH_PREFIX + digest.hex(), 1 << log2, hashes)
        except ManifestError as e:
            raise e.within(where) from None
        files.append(entry)
    if r.remaining:
        raise ManifestError("manifest", f"{r.remaining} trailing bytes after the last file")
    m = cls(model, revision, tuple(files))
    # Cannot fail if the checks above are complete; cheap insurance that decode is canonical.
    if m.encode() != data:
        raise ManifestError("manifest", "not in canonical form")
    return m


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining:
            raise ManifestError(field, f"truncated: need {n} bytes, {self.remaining} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, field: str) -> tuple:
        return st.unpack(self.take(st.size, field))

    def text(self, field: str) -> str:
        n = self.unpack(_U16, field)[0]
        raw = self.take(n, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(field, f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
