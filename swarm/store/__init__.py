"""The store: bytes on disk. Verified piece writes, atomic completion, resume and locks in the Hub
cache layout.

Modules: ``layout`` (the one owner of the HF cache layout: paths, blobs, symlinks, refs, complete
snapshots), ``store`` (:class:`Store`), ``admin`` (listing, removal, collection), ``download``
(:class:`Download`; what it does at open, adoption and resume, in ``download_setup``),
``partfile`` (per-file state: :class:`FileState` absent / partial / final, and fds), ``resume``
(the resume state), ``hashing`` (whole-file blake3), ``fileio`` (pread / pwrite, O_DIRECT,
directory fsync, atomic writes), ``locks``, ``reader`` (:class:`SnapshotReader`), ``errors``.

Layout (the Hugging Face hub cache, so ``huggingface_hub`` and ``transformers`` find the result with
``local_files_only=True`` / ``HF_HUB_OFFLINE=1``)::

    <cache>/models--<org>--<name>/
        blobs/<blake3 hex>                 a complete, verified file (named by its blake3; we do not
                                           know the Hub's etags)
        blobs/<blake3 hex>.incomplete      a file being fetched (preallocated to its full size)
        snapshots/<revision>/<path>        relative symlink -> ../../blobs/<hex> (one more ../ per
                                           directory level of <path>)
        refs/<ref>                         the revision (no newline), written atomically
        .swarm/manifests/<hash hex>.mf     manifests seen (canonical bytes), so a restart needn't re-hash
                                           (a cache: renamed into place, not fsynced; checked on read)
        .swarm/revisions/<revision>        "<manifest hash hex>": which manifest a revision came from
        .swarm/partial/<blake3 hex>.pieces resume state of the matching ``.incomplete`` (see below)
        .swarm/snapshots/<revision>        "<manifest hex> <dev> <inode>": the download that created
                                           snapshots/<revision> (the only one that may add to it)
        .swarm/verified/<blake3 hex>       "<dev> <inode> <size> <mtime ns>" of a blob swarm verified
                                           and renamed into blobs/ (adopted later without re-hashing)
        .swarm/locks/<hash hex>.lock       inter-process lock of one manifest's download
        .swarm/locks/repo.lock             held shared by every open download of the repo, exclusively
                                           while snapshots are removed or partial files collected
        .swarm/access/<revision>           mtime: when the snapshot was last handed to a caller
                                           (least-recently-used eviction, swarm/cache_admin.py)
        .swarm/tmp/                        staging for everything that is later renamed into place

Invariants: a file appears at ``blobs/<hex>`` only by an atomic rename after its data was fsynced
and its whole-file blake3 checked. That check hashes, in file order, the verified bytes of each
piece as they were handed to ``pwrite`` while the pieces that arrive in file order are written (so
a file fetched in order is never read back), and reads back from disk what came out of order or
was restored from a resume state (a short gap just behind the frontier on the hash thread, so the
frontier moves on; the rest when the file completes). A single-piece file needs no
second hash: its verified piece digest is its file digest. The check catches a manifest whose file
digest disagrees with its pieces and any piece we failed to write; it does not re-read bytes the
disk acknowledged (nor did the earlier full re-read, which mostly came from the page cache).
Symlinks under ``snapshots/`` and files under ``refs/`` appear
only by atomic rename (a fresh snapshot directory is built in ``.swarm/tmp`` and renamed into place
in one step), so nothing partial or unverified is ever visible there.

What swarm did not write, it leaves alone. A snapshot directory is added to only by downloads of
the manifest whose download created it (``.swarm/snapshots/<revision>``); any other one -- the Hub
client's snapshot of a real commit above all, which a manifest naming that commit must not alter
-- makes ``open_download`` raise :class:`SnapshotConflict` before anything is written. A blob
already at ``blobs/<hex>`` is adopted without reading it only if swarm verified it there itself
(``.swarm/verified/<hex>`` matches its inode, size and mtime); otherwise, if the download wants
that file, it is hashed once, adopted if it matches and refused (:class:`ForeignBlob`, never
deleted) if it does not. A download that needs
more bytes than the filesystem has free is refused at open (:class:`DiskFull`), before a byte is
preallocated.

Resume state
------------
Each ``.incomplete`` file has a state file ``.swarm/partial/<hex>.pieces``: a magic line, a JSON
header (blob hex, size, piece size, piece count, and the device/inode of the ``.incomplete`` it
describes), a bitmap of the file's pieces that are on disk, and a trailing blake3 of all of it.
It is rewritten atomically (tmp + fsync + rename) in batches -- every ``FLUSH_BYTES`` written or
``FLUSH_INTERVAL`` seconds, on :meth:`Download.flush` and on :meth:`Download.close` -- and always
*after* ``fdatasync`` of the data file, so every bit set on disk names a piece whose verified bytes
were durably written before the bit was.  A crash loses no piece that was written whole: on
reopen the pieces the state does not record are re-hashed from the ``.incomplete`` (holes
skipped) and kept if they verify (``Download._recover``, ``resume.recover``).

On reopen the bits are trusted when the header matches the ``.incomplete`` on disk (same blob,
size, piece size, device and inode); if only the device/inode differ (the file was copied or
replaced), each set bit is re-verified against its piece digest before it is trusted.  Restored
pieces are additionally checked lazily: the first :meth:`Download.read_piece` of a restored piece
re-hashes it (a mismatch drops it from ``have`` and raises :class:`PieceNotAvailable`), and the
whole-file check always reads restored pieces back from disk; if that check fails, the pieces of
the file that no longer verify are dropped from ``have`` (they become ``missing`` again) instead of the file
being published.

Concurrency: one :class:`Download` per (model, manifest hash) at a time, across threads and
processes (a ``threading.Lock`` in-process plus a ``filelock`` ``flock`` across processes; a waiter
blocks, or gets :class:`LockTimeout` after ``lock_timeout``).  Downloads of *different* manifests
that share a blob may write the same ``.incomplete`` at once; that is safe because both only write
verified, identical bytes at identical offsets, the state file is only ever a subset of the truth,
and whoever completes the file second finds it already final.

Notes for callers: ``have`` only shrinks when restored bytes turn out damaged on disk (see above);
a file completes inside the ``write_piece`` call that delivers its last piece (fsync + re-reading
what arrived out of order, so that call can take longer); empty files are published at open; each
file's fd is opened once and kept until ``close()``, except that single-piece files are closed
once final and read through short-lived fds afterwards (a repo of thousands of small files does
not exhaust fds).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.store.admin import touch_access
    from swarm.store.download import Download
    from swarm.store.errors import (
        DiskFull,
        ForeignBlob,
        LockTimeout,
        PieceHashMismatch,
        PieceNotAvailable,
        SnapshotConflict,
        StoreError,
        StorePermissionError,
    )
    from swarm.store.layout import RepoLayout, private_revision, repo_folder_name
    from swarm.store.partfile import FileState
    from swarm.store.reader import SnapshotReader
    from swarm.store.store import Store

_HOME = {
    "touch_access": "admin",
    "Download": "download",
    **dict.fromkeys(
        (
            "DiskFull",
            "ForeignBlob",
            "LockTimeout",
            "PieceHashMismatch",
            "PieceNotAvailable",
            "SnapshotConflict",
            "StoreError",
            "StorePermissionError",
        ),
        "errors",
    ),
    **dict.fromkeys(("RepoLayout", "private_revision", "repo_folder_name"), "layout"),
    "FileState": "partfile",
    "SnapshotReader": "reader",
    "Store": "store",
}
"""Where each name below lives. They load on first use (PEP 562), so that ``import
swarm.store.layout`` (the client's delivery into a hub cache, the local-cache source) does not load
the download machinery (filelock, the resume state, the store) with it."""


def __getattr__(name: str) -> object:
    import importlib

    home = _HOME.get(name)
    if home is None:
        try:  # a submodule (swarm.store.download ...) not imported yet
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "DiskFull",
    "Download",
    "FileState",
    "ForeignBlob",
    "LockTimeout",
    "PieceHashMismatch",
    "PieceNotAvailable",
    "RepoLayout",
    "SnapshotConflict",
    "SnapshotReader",
    "Store",
    "StoreError",
    "StorePermissionError",
    "private_revision",
    "repo_folder_name",
    "touch_access",
]
