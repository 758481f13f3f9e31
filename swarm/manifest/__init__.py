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

One job per module: ``rules`` (constants, limits, ``ManifestError``, piece sizes, name / revision /
path validation, the rules over a whole file list), ``kinds`` (config or weight, files skipped by
default), ``values`` (``Piece``, ``FileEntry``, ``Manifest``), ``codec`` (the bytes above),
``build`` (``build_manifest`` from a directory).
"""

from swarm.manifest.build import build_manifest
from swarm.manifest.codec import decode_manifest, encode_manifest
from swarm.manifest.kinds import (
    CONFIG_PATTERNS,
    TOKENIZER_PATTERNS,
    WEIGHT_SUFFIXES,
    classify,
    is_tokenizer_file,
    should_skip,
)
from swarm.manifest.rules import (
    CONFIG_MAX_BYTES,
    DIGEST_SIZE,
    EMPTY_DIGEST,
    HASH_PREFIX,
    MAGIC,
    MAX_COMPONENT_BYTES,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_PATH_BYTES,
    MAX_PIECE_SIZE,
    MAX_PIECES,
    MAX_TOTAL_BYTES,
    MIN_MULTI_PIECE_SIZE,
    MIN_PIECE_SIZE,
    SINGLE_PIECE_MAX,
    TARGET_PIECES_PER_FILE,
    VERSION,
    GiB,
    KiB,
    ManifestError,
    MiB,
    TiB,
    piece_size_for,
    validate_model_name,
    validate_path,
    validate_revision,
)
from swarm.manifest.values import FileEntry, Manifest, Piece

__all__ = [
    "CONFIG_MAX_BYTES",
    "CONFIG_PATTERNS",
    "DIGEST_SIZE",
    "EMPTY_DIGEST",
    "HASH_PREFIX",
    "MAGIC",
    "MAX_COMPONENT_BYTES",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "MAX_PATH_BYTES",
    "MAX_PIECES",
    "MAX_PIECE_SIZE",
    "MAX_TOTAL_BYTES",
    "MIN_MULTI_PIECE_SIZE",
    "MIN_PIECE_SIZE",
    "SINGLE_PIECE_MAX",
    "TARGET_PIECES_PER_FILE",
    "TOKENIZER_PATTERNS",
    "VERSION",
    "WEIGHT_SUFFIXES",
    "FileEntry",
    "GiB",
    "KiB",
    "Manifest",
    "ManifestError",
    "MiB",
    "Piece",
    "TiB",
    "build_manifest",
    "classify",
    "decode_manifest",
    "encode_manifest",
    "is_tokenizer_file",
    "piece_size_for",
    "should_skip",
    "validate_model_name",
    "validate_path",
    "validate_revision",
]
