"""The manifest's values: ``Piece``, ``FileEntry`` and ``Manifest`` (validated on construction; the
bytes are in swarm/manifest/codec.py)."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable

import attrs
import blake3

from swarm.manifest.kinds import classify
from swarm.manifest.rules import (
    _HASH_RE,
    DIGEST_SIZE,
    EMPTY_DIGEST,
    HASH_PREFIX,
    MAX_PIECE_SIZE,
    MAX_TOTAL_BYTES,
    MIN_PIECE_SIZE,
    ManifestError,
    _check_file_set,
    _fmt_size,
    _is_int,
    _num_pieces,
    _repr_digests,
    _show,
    piece_size_for,
    validate_model_name,
    validate_path,
    validate_revision,
)


@attrs.frozen
class Piece:
    """One piece: global ``index``, its file, and the byte range ``[offset, offset + length)``."""

    index: int
    file_index: int
    offset: int
    length: int
    digest: bytes


@attrs.frozen(slots=False, cache_hash=True)
class FileEntry:
    """One file of a snapshot; validated on construction (raises :class:`ManifestError`)."""

    path: str
    size: int
    blake3: str
    piece_size: int
    piece_hashes: tuple[bytes, ...] = attrs.field(converter=tuple, repr=_repr_digests)

    def __attrs_post_init__(self) -> None:
        validate_path(self.path)
        size = self.size
        if not _is_int(size) or size < 0:
            raise ManifestError("size", f"must be a non-negative int, got {size!r}")
        if size > MAX_TOTAL_BYTES:
            raise ManifestError("size", f"{_fmt_size(size)} over MAX_TOTAL_BYTES")
        if not isinstance(self.blake3, str) or not _HASH_RE.fullmatch(self.blake3):
            raise ManifestError("blake3", f"{_show(self.blake3)} is not 'blake3:<64 lowercase hex>'")
        ps = self.piece_size
        if not _is_int(ps) or ps <= 0 or ps & (ps - 1):
            raise ManifestError("piece_size", f"{ps!r} is not a power of two")
        if not MIN_PIECE_SIZE <= ps <= MAX_PIECE_SIZE:
            raise ManifestError("piece_size", f"{ps} outside [{MIN_PIECE_SIZE}, {MAX_PIECE_SIZE}]")
        want = piece_size_for(size)
        if ps != want:
            raise ManifestError("piece_size", f"{ps} but a {size}-byte file uses {want}")
        hashes = self.piece_hashes
        count = _num_pieces(size, ps)
        if len(hashes) != count:
            raise ManifestError(
                "piece_hashes", f"{len(hashes)} digests but a {size}-byte file has {count} pieces"
            )
        for k, h in enumerate(hashes):
            if type(h) is not bytes or len(h) != DIGEST_SIZE:
                raise ManifestError(f"piece_hashes[{k}]", f"not {DIGEST_SIZE} bytes: {h!r:.80}")
        if count == 0 and self.digest != EMPTY_DIGEST:
            raise ManifestError("blake3", "an empty file must have the digest of b''")
        if count == 1 and hashes[0] != self.digest:
            raise ManifestError("piece_hashes[0]", "a single-piece file's piece digest must equal blake3")

    @property
    def num_pieces(self) -> int:
        return len(self.piece_hashes)

    @functools.cached_property
    def kind(self) -> str:
        """``"config"`` or ``"weight"`` (see :func:`classify`)."""
        return classify(self.path, self.size)

    @functools.cached_property
    def digest(self) -> bytes:
        """The whole-file blake3 as 32 raw bytes."""
        return bytes.fromhex(self.blake3[len(HASH_PREFIX) :])

    def piece_span(self, k: int) -> tuple[int, int]:
        """``(offset, length)`` of this file's piece ``k``."""
        if not 0 <= k < len(self.piece_hashes):
            raise IndexError(f"piece {k} out of range for {self.path!r}")
        offset = k * self.piece_size
        return offset, min(self.piece_size, self.size - offset)


@attrs.frozen(slots=False, cache_hash=True)
class Manifest:
    """A snapshot: model, revision and its files sorted by the UTF-8 bytes of their paths.

    Validated on construction (raises :class:`ManifestError`); equality and hashing use the fields.
    """

    model: str
    revision: str
    files: tuple[FileEntry, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        validate_model_name(self.model)
        validate_revision(self.revision)
        for i, f in enumerate(self.files):
            if not isinstance(f, FileEntry):
                raise ManifestError(f"files[{i}]", f"not a FileEntry: {type(f).__name__}")
        _check_file_set(
            self.model,
            self.revision,
            [f.path for f in self.files],
            [f.size for f in self.files],
        )

    # -- encoding --

    def encode(self) -> bytes:
        """The canonical bytes (format in the module docstring)."""
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        from swarm.manifest.codec import encode_manifest  # codec builds these values

        return encode_manifest(self)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and validate canonical bytes; raises :class:`ManifestError` on anything else."""
        from swarm.manifest.codec import decode_manifest

        return decode_manifest(cls, data)

    # -- identity --

    @functools.cached_property
    def manifest_hash(self) -> bytes:
        """blake3 of :meth:`encode` (32 bytes): the snapshot's name in the DHT and on the wire."""
        return blake3.blake3(self.encode()).digest()

    @property
    def hash_str(self) -> str:
        return HASH_PREFIX + self.manifest_hash.hex()

    # -- pieces --

    @functools.cached_property
    def _file_starts(self) -> tuple[int, ...]:
        """Global index of each file's first piece, plus the total piece count at the end."""
        starts = [0]
        for f in self.files:
            starts.append(starts[-1] + f.num_pieces)
        return tuple(starts)

    @functools.cached_property
    def pieces(self) -> tuple[Piece, ...]:
        """Every piece, in global order."""
        out = []
        index = 0
        for fi, f in enumerate(self.files):
            ps, size = f.piece_size, f.size
            for k, digest in enumerate(f.piece_hashes):
                offset = k * ps
                out.append(Piece(index, fi, offset, min(ps, size - offset), digest))
                index += 1
        return tuple(out)

    @property
    def num_pieces(self) -> int:
        return self._file_starts[-1]

    @functools.cached_property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file_piece_range(self, file_index: int) -> range:
        """Global piece indices of file ``file_index``."""
        if not 0 <= file_index < len(self.files):
            raise IndexError(f"file index {file_index} out of range ({len(self.files)} files)")
        return range(self._file_starts[file_index], self._file_starts[file_index + 1])

    def file_of_piece(self, index: int) -> int:
        """Index of the file holding global piece ``index``."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} out of range ({self.num_pieces} pieces)")
        return bisect.bisect_right(self._file_starts, index) - 1

    def pieces_of(self, file_indices: Iterable[int]) -> frozenset[int]:
        """Global piece indices of the given files."""
        out: set[int] = set()
        for i in file_indices:
            out.update(self.file_piece_range(i))
        return frozenset(out)

    @functools.cached_property
    def _config_pieces(self) -> frozenset[int]:
        return self.pieces_of(i for i, f in enumerate(self.files) if f.kind == "config")

    def config_piece_indices(self) -> frozenset[int]:
        """Global piece indices of the config files."""
        return self._config_pieces

    # -- selection --

    def select(
        self,
        *,
        configs_only: bool = False,
        allow_patterns: str | Iterable[str] | None = None,
        ignore_patterns: str | Iterable[str] | None = None,
    ) -> frozenset[int]:
        """File indices to fetch, with huggingface_hub's ``allow_patterns`` / ``ignore_patterns``
        semantics (case-sensitive fnmatch on the path, ``*`` crosses ``/``, ``"dir/"`` means
        ``"dir/*"``).  ``configs_only`` keeps only ``kind == "config"`` files.  The manifest and its
        hash are unchanged.
        """
        from swarm.selection import select_files  # the one selection function

        kinds = {f.path: f.kind for f in self.files}
        chosen = select_files(
            kinds,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            configs_only=configs_only,
            kinds=kinds,
        )
        return frozenset(self._by_path[p] for p in chosen)

    def subset(self, file_indices: Iterable[int]) -> Manifest:
        """A new manifest (with its own hash) holding only the given files."""
        chosen = sorted(set(file_indices))
        for i in chosen:
            if not _is_int(i) or not 0 <= i < len(self.files):
                raise ManifestError("file_indices", f"{i!r} out of range ({len(self.files)} files)")
        return Manifest(self.model, self.revision, tuple(self.files[i] for i in chosen))

    def file_index(self, path: str) -> int:
        """Index of the file at ``path``; raises KeyError."""
        return self._by_path[path]

    @functools.cached_property
    def _by_path(self) -> dict[str, int]:
        return {f.path: i for i, f in enumerate(self.files)}
