"""Manifest rules: format constants and limits, ``ManifestError``, piece sizes, the validation of
names, revisions and paths, and the rules over a whole file list."""

from __future__ import annotations

import re
import struct
import unicodedata
from collections.abc import Iterable

import blake3

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
