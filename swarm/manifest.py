"""The manifest: a content-addressed description of one model snapshot.

A :class:`Manifest` names a model (``org/name``), a revision (a Hub commit sha or a local label)
and, for every file of the snapshot, its POSIX relative path, size, whole-file blake3 (the string
``blake3:<64 lowercase hex>``, the form NVIDIA Dynamo's ``CheckedFile`` uses), its piece size and
the blake3 (32 raw bytes) of each piece.  ``manifest_hash`` -- the blake3 of the canonical
encoding -- names the snapshot in the DHT and on the wire.  This module is pure: it imports only the
standard library, ``attrs``, ``blake3`` and :mod:`swarm.confine` (safe opening of served files).

Pieces
------
Pieces are numbered globally: file 0's pieces first, then file 1's, and so on.  The piece size of a
file depends only on its size (:func:`piece_size_for`) and is always a power of two:

* ``size <= 4 MiB``: the file is a single piece; ``piece_size`` is the smallest power of two that is
  ``>= max(size, 16 KiB)``.  (So the piece digest equals the whole-file digest.)
* otherwise ``piece_size`` is the smallest power of two ``>= ceil(size / 1024)``, clamped to
  ``[4 MiB, 64 MiB]`` -- about 1024 pieces per file up to 64 GiB, more above that.
* an empty file has ``piece_size`` 16 KiB and zero pieces (its digest is ``blake3(b"")``).

Piece ``k`` of a file covers bytes ``[k * piece_size, min((k + 1) * piece_size, size))``.

Canonical encoding (version 1)
------------------------------
Big-endian throughout::

    magic        4 bytes   b"SWMF"
    version      u8        1
    model        u16 length + UTF-8 bytes
    revision     u16 length + UTF-8 bytes
    file count   u32
    per file, in the order of the UTF-8 bytes of their paths:
        path         u16 length + UTF-8 bytes
        size         u64
        blake3       32 bytes   whole-file digest
        piece size   u8         log2(piece_size)
        piece count  u32        == ceil(size / piece_size)
        piece hashes piece count * 32 bytes

:meth:`Manifest.decode` re-checks every rule below (names, paths, order, piece sizes and counts,
limits) and rejects truncation and trailing bytes, so every accepted byte string is the canonical
encoding of its manifest: ``Manifest.decode(b).encode() == b``.  Two different accepted byte strings
are therefore two different manifests with two different hashes.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import os
import queue
import re
import stat
import struct
import threading
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import attrs
import blake3

from swarm import confine

__all__ = [
    "CONFIG_PATTERNS",
    "EMPTY_DIGEST",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "MAX_PATH_BYTES",
    "MAX_PIECES",
    "MAX_PIECE_SIZE",
    "MAX_TOTAL_BYTES",
    "MIN_PIECE_SIZE",
    "TOKENIZER_PATTERNS",
    "WEIGHT_SUFFIXES",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "Piece",
    "build_manifest",
    "classify",
    "is_tokenizer_file",
    "piece_size_for",
    "should_skip",
    "validate_model_name",
    "validate_path",
    "validate_revision",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

MAGIC = b"SWMF"
VERSION = 1
DIGEST_SIZE = 32
EMPTY_DIGEST = blake3.blake3(b"").digest()
HASH_PREFIX = "blake3:"

# --- piece sizes -------------------------------------------------------------------------------
# Smallest piece: below this, per-piece overhead (a 32-byte digest, one request) stops paying off.
MIN_PIECE_SIZE = 16 * KiB
# Files up to this size are a single piece: config and tokenizer files travel in one request.
SINGLE_PIECE_MAX = 4 * MiB
# Multi-piece files never use pieces smaller than this, so a request moves a useful amount of data.
MIN_MULTI_PIECE_SIZE = 4 * MiB
# Largest piece: bounds the memory a peer holds to verify a piece and the work lost to a bad one.
MAX_PIECE_SIZE = 64 * MiB
# Aim for about this many pieces per file (fine-grained enough to spread a file over many peers).
TARGET_PIECES_PER_FILE = 1024

# --- limits (all enforced both by build_manifest and by decode) ---------------------------------
# Bounds the work of validating a manifest from an untrusted peer; real snapshots have < 1000 files.
MAX_FILES = 10_000
# Bounds sizes to something a fleet can hold; the largest public checkpoints are ~1.5 TiB.
MAX_TOTAL_BYTES = 4 * TiB
# Total piece count: 262_144 * 32-byte digests keeps a manifest (and a peer's bitfield) under ~9 MB.
MAX_PIECES = 262_144
# Longest relative path in bytes; typical PATH_MAX headroom under a cache dir on Linux (4096).
MAX_PATH_BYTES = 1024
# One path component: NAME_MAX on every common filesystem.
MAX_COMPONENT_BYTES = 255
# Hard ceiling on encoded size, checked before parsing anything sent by a peer.
MAX_MANIFEST_BYTES = 16 * MiB
# Non-weight files above this size count as weights (they are payload, not startup metadata).
CONFIG_MAX_BYTES = 64 * MiB

# --- build I/O ---------------------------------------------------------------------------------
# Read size while hashing: large enough that blake3 can spread one update over several cores.
_CHUNK = 4 * MiB
# Below this a hasher runs single-threaded (spreading small inputs over threads costs more).
_PARALLEL_MIN = 1 * MiB

_NAME_PART_MAX = 96
_REVISION_MAX = 128
_SAFE_RE = re.compile(r"[A-Za-z0-9._-]+")
_HASH_RE = re.compile(r"blake3:[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FILE_FIXED = struct.Struct(">Q32sBI")  # size, digest, log2(piece_size), piece count


class ManifestError(ValueError):
    """An invalid manifest, field or build input.

    ``str(err)`` is ``"<field>: <reason>"``, for example
    ``"files[3].path: '..' component not allowed"``; ``err.field`` and ``err.reason`` hold the
    two parts.
    """

    def __init__(self, field: str, reason: str | None = None) -> None:
        if reason is None:  # a single preformatted message (also how pickling rebuilds us)
            message = field
            field, _, reason = message.partition(": ")
        else:
            message = f"{field}: {reason}"
        super().__init__(message)
        self.field = field
        self.reason = reason

    def within(self, prefix: str) -> ManifestError:
        """The same error with its field qualified by ``prefix`` (``path`` -> ``files[3].path``)."""
        return ManifestError(f"{prefix}.{self.field}", self.reason)


# --- small helpers -----------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(s: object, limit: int = 80) -> str:
    """repr() of a possibly long string, shortened for error messages."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _repr_digests(hashes: tuple[bytes, ...]) -> str:
    return f"<{len(hashes)} digests>"


def _fmt_size(n: int) -> str:
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def piece_size_for(size: int) -> int:
    """The piece size of a file of ``size`` bytes (see the module docstring); a power of two."""
    if not _is_int(size) or size < 0:
        raise ManifestError("size", f"must be a non-negative int, got {size!r}")
    if size <= SINGLE_PIECE_MAX:
        return max(_next_pow2(size), MIN_PIECE_SIZE)
    target = _next_pow2(-(-size // TARGET_PIECES_PER_FILE))
    return min(max(target, MIN_MULTI_PIECE_SIZE), MAX_PIECE_SIZE)


def _num_pieces(size: int, piece_size: int) -> int:
    return -(-size // piece_size)


def validate_model_name(name: object) -> str:
    """Check a Hub repo id: ``name`` (``gpt2``) or ``org/name``, each part 1-96 ``[A-Za-z0-9._-]``,
    not starting with ``.``/``-`` and without ``--`` or ``..`` (as the Hub rules them out: the cache
    folder ``models--org--name`` must map back to one name)."""
    if not isinstance(name, str):
        raise ManifestError("model", f"must be a string, got {type(name).__name__}")
    parts = name.split("/")
    if len(parts) > 2:
        raise ManifestError("model", f"{_show(name)} is not of the form 'name' or 'org/name'")
    for part in parts:
        if not part:
            raise ManifestError("model", f"{_show(name)} has an empty part")
        if len(part) > _NAME_PART_MAX:
            raise ManifestError("model", f"part {part[:20]!r}... longer than {_NAME_PART_MAX}")
        if not _SAFE_RE.fullmatch(part):
            raise ManifestError("model", f"{_show(name)}: only letters, digits, '.', '_', '-' allowed")
        if part[0] in ".-":
            raise ManifestError("model", f"{_show(name)}: a part may not start with {part[0]!r}")
        for pair in ("..", "--"):
            if pair in part:
                raise ManifestError("model", f"{_show(name)}: {pair!r} not allowed")
    return name


def validate_revision(rev: object) -> str:
    """Check a revision: 1-128 ``[A-Za-z0-9._-]``, not ``.`` or ``..`` (a directory name)."""
    if not isinstance(rev, str):
        raise ManifestError("revision", f"must be a string, got {type(rev).__name__}")
    if not rev:
        raise ManifestError("revision", "empty")
    if len(rev) > _REVISION_MAX:
        raise ManifestError("revision", f"longer than {_REVISION_MAX} characters")
    if not _SAFE_RE.fullmatch(rev):
        raise ManifestError("revision", f"{_show(rev)}: only letters, digits, '.', '_', '-' allowed")
    if rev in (".", ".."):
        raise ManifestError("revision", f"{_show(rev)} not allowed")
    return rev


def validate_path(path: object) -> str:
    """Check a POSIX relative path that is safe to create under a snapshot directory."""
    if not isinstance(path, str):
        raise ManifestError("path", f"must be a string, got {type(path).__name__}")
    if not path:
        raise ManifestError("path", "empty")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError("path", f"{_show(path)} is not valid Unicode (lone surrogate)") from None
    if len(raw) > MAX_PATH_BYTES:
        raise ManifestError("path", f"{len(raw)} bytes, over MAX_PATH_BYTES ({MAX_PATH_BYTES})")
    ctrl = _CONTROL_RE.search(path)
    if ctrl:
        raise ManifestError("path", f"{_show(path)}: control character U+{ord(ctrl[0]):04X} not allowed")
    if "\\" in path:
        raise ManifestError("path", f"{_show(path)}: backslash not allowed")
    if path.startswith("/"):
        raise ManifestError("path", f"{_show(path)}: absolute path not allowed")
    for comp in path.split("/"):
        if not comp:
            raise ManifestError("path", f"{_show(path)}: empty component not allowed")
        if comp in (".", ".."):
            raise ManifestError("path", f"{_show(path)}: {comp!r} component not allowed")
        if len(comp.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ManifestError("path", f"{_show(path)}: component over {MAX_COMPONENT_BYTES} bytes")
    return path


def _fold(path: str) -> str:
    """Caseless, normalization-insensitive key: equal keys collide on macOS/Windows filesystems."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


# --- classification and skipping ---------------------------------------------------------------

# The one list of config files, used by every source (the swarm, the local cache, ModelExpress and
# the Hub all select with classify() over a file listing): basename globs (fnmatch, matched against
# the lower-cased basename) of files that are configs at any size -- model, generation and processor
# configs, tokenizers of every common kind, chat templates and shard indexes.
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer.model.v*",  # Mistral's versioned sentencepiece models
    "tekken.json",
    "tiktoken.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "vocab.bpe",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.spm",
)
"""Files that hold a tokenizer's vocabulary: a configs set needs one (with ``config.json``)."""
CONFIG_PATTERNS: tuple[str, ...] = (
    "config.json",
    "*_config.json",  # tokenizer_, generation_, preprocessor_, processor_, adapter_config.json, ...
    "params.json",
    "model_index.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.index.json",
    *TOKENIZER_PATTERNS,
)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".gguf",
    ".pt",
    ".pth",
    ".onnx",
    ".onnx_data",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".ckpt.index",  # with .iop and .gas: what ModelExpress's ignore_weights leaves out
    ".iop",
    ".gas",
    ".pkl",
    ".npz",
    ".npy",
    ".tflite",
    ".ot",
    ".nemo",
    ".llamafile",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
_LEFTOVER_SUFFIXES = (".lock", ".incomplete")


def _matches(patterns: tuple[str, ...], path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_tokenizer_file(path: str) -> bool:
    """True if ``path``'s basename matches :data:`TOKENIZER_PATTERNS` (case-insensitively)."""
    return _matches(TOKENIZER_PATTERNS, path)


def classify(path: str, size: int | None = None) -> str:
    """``"config"`` or ``"weight"``, by basename (compared case-insensitively).

    A file matching :data:`CONFIG_PATTERNS` (``config.json``, tokenizer files, ``*.index.json``,
    ...) is a config at any size; weight extensions (:data:`WEIGHT_SUFFIXES`: ``*.safetensors``,
    ``*.bin``, ``*.gguf``, ...) are weights; any other file is a config unless ``size`` is given and
    exceeds ``CONFIG_MAX_BYTES``.
    """
    if _matches(CONFIG_PATTERNS, path):
        return "config"
    if path.lower().endswith(WEIGHT_SUFFIXES):
        return "weight"
    if size is not None and size > CONFIG_MAX_BYTES:
        return "weight"
    return "config"


def should_skip(path: str) -> bool:
    """True for files a snapshot does not carry.

    Anything under a hidden directory (``.git/``, ``.cache/``, ...) or itself hidden
    (``.gitattributes``), ``README.md`` (any case, any depth), ``LICENSE*``/``LICENCE*``, images and
    ``*.lock`` / ``*.incomplete`` download leftovers.
    """
    parts = path.split("/")
    if any(p.startswith(".") for p in parts):
        return True
    lower = parts[-1].lower()
    return (
        lower == "readme.md"
        or lower.startswith(("license", "licence"))
        or lower.endswith(_IMAGE_SUFFIXES)
        or lower.endswith(_LEFTOVER_SUFFIXES)
    )


# --- values ------------------------------------------------------------------------------------


def _encoded_size(model: str, revision: str, paths: Iterable[str], counts: Iterable[int]) -> int:
    n = 4 + 1 + 2 + len(model.encode()) + 2 + len(revision.encode()) + 4
    for path, count in zip(paths, counts, strict=True):
        n += 2 + len(path.encode()) + _FILE_FIXED.size + DIGEST_SIZE * count
    return n


def _check_file_set(model: str, revision: str, paths: list[str], sizes: list[int]) -> None:
    """Rules over the whole file list: count, order, collisions, total size, pieces, encoded size.

    Each path must already have passed :func:`validate_path`.
    """
    if not paths:
        raise ManifestError("files", "no files")
    if len(paths) > MAX_FILES:
        raise ManifestError("files", f"{len(paths)} files, over MAX_FILES ({MAX_FILES})")
    # Python orders str by code point, which is the order of their UTF-8 bytes.
    for i in range(1, len(paths)):
        if paths[i] <= paths[i - 1]:
            what = "duplicate of" if paths[i] == paths[i - 1] else "not sorted after"
            raise ManifestError(f"files[{i}].path", f"{_show(paths[i])} {what} files[{i - 1}].path")
    folded: dict[str, int] = {}
    for i, path in enumerate(paths):
        j = folded.setdefault(_fold(path), i)
        if j != i:
            raise ManifestError(
                f"files[{i}].path",
                f"{_show(path)} collides with files[{j}].path {_show(paths[j])} (ignoring case)",
            )
    for i, path in enumerate(paths):
        key = _fold(path)
        pos = key.find("/")
        while pos != -1:
            j = folded.get(key[:pos])
            if j is not None:
                raise ManifestError(
                    f"files[{i}].path",
                    f"{_show(path)} is under files[{j}].path {_show(paths[j])}, a file",
                )
            pos = key.find("/", pos + 1)
    total = sum(sizes)
    if total > MAX_TOTAL_BYTES:
        raise ManifestError(
            "files",
            f"total size {_fmt_size(total)} over MAX_TOTAL_BYTES ({_fmt_size(MAX_TOTAL_BYTES)})",
        )
    counts = [_num_pieces(s, piece_size_for(s)) for s in sizes]
    pieces = sum(counts)
    if pieces > MAX_PIECES:
        raise ManifestError("files", f"{pieces} pieces, over MAX_PIECES ({MAX_PIECES})")
    encoded = _encoded_size(model, revision, paths, counts)
    if encoded > MAX_MANIFEST_BYTES:
        raise ManifestError(
            "manifest",
            f"encodes to {encoded} bytes, over MAX_MANIFEST_BYTES ({MAX_MANIFEST_BYTES})",
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


def _patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    # huggingface_hub semantics: "dir/" means everything under dir.
    return [p + "*" if p.endswith("/") else p for p in patterns]


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

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and validate canonical bytes; raises :class:`ManifestError` on anything else."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        elif not isinstance(data, bytes):
            raise ManifestError("manifest", f"not bytes: {type(data).__name__}")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                "manifest", f"{len(data)} bytes, over MAX_MANIFEST_BYTES ({MAX_MANIFEST_BYTES})"
            )
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
                raise ManifestError(
                    f"{where}.piece_hashes", f"over MAX_PIECES ({MAX_PIECES}) pieces in total"
                )
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


# --- building from a directory -----------------------------------------------------------------


@attrs.frozen
class _Job:
    index: int
    path: str  # relative, POSIX
    abspath: str
    size: int
    confinement: confine.Confinement


def _scan(root: str, keep: frozenset[str] = frozenset()) -> list[_Job]:
    """Files under root (sorted by path), following file symlinks (only where
    :func:`swarm.confine.confinement_for` allows: a snapshot's links into its repo's ``blobs/``,
    nothing outside a plain directory) but not directory symlinks; paths in ``keep`` are carried
    even where :func:`should_skip` would drop them."""
    c = confine.confinement_for(root)
    found: list[tuple[str, str, int]] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            entries = list(it)
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.name.startswith("."):
                continue  # hidden files and directories (.git/, .cache/, .gitattributes)
            if e.is_symlink():
                try:
                    st = os.stat(e.path)
                except OSError as exc:
                    raise ManifestError(f"files[{rel!r}]", f"broken symlink: {exc}") from None
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinked directories are not followed
                try:
                    st = confine.stat_file(c, rel)
                except OSError as exc:
                    raise ManifestError(f"files[{rel!r}]", f"symlink refused: {exc}") from None
            elif e.is_dir(follow_symlinks=False):
                stack.append((rel, e.path))
                continue
            elif e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
            else:
                continue  # sockets, fifos, devices
            if should_skip(rel) and rel not in keep:
                continue
            try:
                validate_path(rel)
            except ManifestError as exc:
                raise exc.within(f"files[{rel!r}]") from None
            found.append((rel, e.path, st.st_size))
    found.sort(key=lambda t: t[0])
    return [_Job(i, rel, ap, size, c) for i, (rel, ap, size) in enumerate(found)]


class _Cancelled(Exception):
    pass


def _read_exact(fh, mv: memoryview) -> int:
    got = 0
    while got < len(mv):
        n = fh.readinto(mv[got:])
        if not n:
            break
        got += n
    return got


def _chunks(fh, size: int, chunk: int, cancel: threading.Event, where: str):
    """Yield memoryviews over consecutive chunks of the file; a reader thread keeps one chunk ahead.

    Each yielded view is valid until the next one is requested.
    """
    if size <= chunk:  # small file: no reader thread
        buf = bytearray(size)
        if _read_exact(fh, memoryview(buf)) != size:
            raise ManifestError(where, "file shrank while hashing")
        yield memoryview(buf)
        return
    bufs = [bytearray(chunk) for _ in range(3)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    for b in bufs:
        free.put(b)

    def reader() -> None:
        try:
            remaining = size
            while remaining:
                b = free.get()
                if b is None or cancel.is_set():  # consumer gone, or the build was cancelled
                    full.put((None, _Cancelled()))
                    return
                want = min(chunk, remaining)
                n = _read_exact(fh, memoryview(b)[:want])
                full.put((b, n))
                if n < want:
                    return
                remaining -= n
        except BaseException as exc:
            full.put((None, exc))

    t = threading.Thread(target=reader, name="swarm-manifest-read", daemon=True)
    t.start()
    try:
        remaining = size
        while remaining:
            if cancel.is_set():
                raise _Cancelled
            b, n = full.get()
            if b is None:
                raise n
            want = min(chunk, remaining)
            if n < want:
                raise ManifestError(where, "file shrank while hashing")
            yield memoryview(b)[:n]
            remaining -= n
            free.put(b)
    finally:
        free.put(None)
        t.join()


def _hash_file(
    job: _Job,
    chunk: int,
    report: Callable[[int], None],
    cancel: threading.Event,
) -> FileEntry:
    where = f"files[{job.path!r}]"
    size = job.size
    ps = piece_size_for(size)
    threads = blake3.blake3.AUTO if size >= _PARALLEL_MIN else 1
    try:
        # Opened beneath the tree, not by path: a file swapped for a link since the scan must not
        # put another file's bytes (a private key) into the manifest.
        fh = os.fdopen(confine.open_file(job.confinement, job.path), "rb", buffering=0)
    except OSError as exc:
        raise ManifestError(where, f"cannot open: {exc}") from None
    with fh:
        if os.fstat(fh.fileno()).st_size != size:
            raise ManifestError(where, "file changed size while building the manifest")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        whole = blake3.blake3(max_threads=threads)
        hashes: list[bytes] = []
        single = size <= ps  # one piece: its digest is the whole-file digest
        piece = None if single else blake3.blake3(max_threads=threads)
        filled = 0  # bytes in the current piece
        chunks = _chunks(fh, size, chunk, cancel, where)
        try:
            for data in chunks:
                whole.update(data)
                n = len(data)
                if piece is not None:
                    off = 0
                    while off < n:
                        take = min(ps - filled, n - off)
                        if filled == 0 and take == ps:
                            hashes.append(blake3.blake3(data[off : off + ps], max_threads=threads).digest())
                        else:
                            piece.update(data[off : off + take])
                            filled += take
                            if filled == ps:
                                hashes.append(piece.digest())
                                piece = blake3.blake3(max_threads=threads)
                                filled = 0
                        off += take
                report(n)
        finally:
            chunks.close()  # stops and joins the reader thread even when we leave early
        if fh.read(1):
            raise ManifestError(where, "file grew while hashing")
    digest = whole.digest()
    if single:
        hashes = [digest] if size else []
    elif filled:
        hashes.append(piece.digest())
    return FileEntry(job.path, size, HASH_PREFIX + digest.hex(), ps, tuple(hashes))


def build_manifest(
    root: str | os.PathLike,
    model: str,
    revision: str,
    *,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    keep: Iterable[str] = (),
) -> Manifest:
    """Hash the files under ``root`` into a manifest.

    ``keep``: relative paths to carry although :func:`should_skip` drops them by default (a
    ``LICENSE`` or a logo a Dynamo card lists); hidden files are never carried.

    Walks ``root`` (skipping :func:`should_skip` files and hidden directories, following symlinks
    to files that stay inside the tree -- Hub snapshots link into their repo's ``blobs/``, see
    :func:`swarm.confine.confinement_for`; a link leading elsewhere is an error -- but not symlinks
    to directories), then
    streams every file once, feeding each chunk to both a whole-file and a per-piece hasher, with
    ``threads`` files in flight (default ``min(4, os.cpu_count())``).  ``progress(n)`` is called
    on the calling thread with the number of bytes hashed since the previous call.  Limits are
    checked before any hashing.  Raises :class:`ManifestError`.
    """
    validate_model_name(model)
    validate_revision(revision)
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    if not _is_int(threads) or threads < 1:
        raise ManifestError("threads", f"must be a positive int, got {threads!r}")
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        raise ManifestError("root", f"{root_s!r} is not a directory")
    keep = frozenset(keep)
    jobs = _scan(root_s, keep) if keep else _scan(root_s)
    if not jobs:
        raise ManifestError("files", f"no files to carry under {root_s!r}")
    _check_file_set(model, revision, [j.path for j in jobs], [j.size for j in jobs])

    cancel = threading.Event()
    done_bytes: queue.SimpleQueue[int] = queue.SimpleQueue()

    def report(n: int) -> None:
        if cancel.is_set():
            raise _Cancelled
        if progress is not None:
            done_bytes.put(n)

    def drain() -> None:
        total = 0
        while True:
            try:
                total += done_bytes.get_nowait()
            except queue.Empty:
                break
        if total and progress is not None:
            progress(total)

    entries: list[FileEntry | None] = [None] * len(jobs)
    ex = ThreadPoolExecutor(max_workers=min(threads, len(jobs)), thread_name_prefix="swarm-hash")
    try:
        # Largest first: the big files set the finish time.
        futures = {
            ex.submit(_hash_file, j, _CHUNK, report, cancel): j.index
            for j in sorted(jobs, key=lambda j: -j.size)
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            for fut in finished:
                entries[futures[fut]] = fut.result()  # re-raises a worker's error
            drain()
    except BaseException:
        cancel.set()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return Manifest(model, revision, tuple(e for e in entries if e is not None))
