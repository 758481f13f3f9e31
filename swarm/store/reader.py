"""Serving a complete directory: :class:`SnapshotReader` (an HF snapshot, or a ``--serve``
directory), every piece checked against the manifest before it is handed out."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3

from swarm import confine
from swarm.manifest import Manifest, Piece, validate_path
from swarm.store.errors import PieceNotAvailable, StoreError, io_errors
from swarm.store.fileio import as_bytes_view, pread_into
from swarm.store.layout import valid

log = logging.getLogger("swarm.store")


class SnapshotReader:
    """Serve pieces of ``manifest`` from a directory holding its files (an HF snapshot with
    symlinks into ``blobs/``, or a private ``--serve`` directory).

    Files are opened beneath the directory (:mod:`swarm.confine`): a snapshot's links must lead
    into its own repo's ``blobs/``, a ``--serve`` directory's must stay inside it; a file that
    leads elsewhere is not served (a co-tenant's ``config.json -> ~/.swarm/identity.key`` in a
    shared cache sent the node's private key to whoever asked). A file must still be the one seen
    when the reader was made (same device and inode) when it is first opened.

    ``have`` is every piece of every file present with the manifest's size (all pieces for a
    complete directory). Every piece is checked against its blake3 before it is first handed
    out, and again whenever its file changed since (size, mtime or ctime: a file rewritten in
    place after the manifest was built); a mismatch raises :class:`PieceNotAvailable`.
    ``piece_span`` (zero-copy ``sendfile``) is offered only for pieces already checked in the
    file's current version, so the lane sends each piece through ``read_piece_into`` once first.
    With ``verify=True`` every read is checked, and ``piece_span`` is never offered. Thread-safe.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, *, verify: bool = False) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.verify = verify
        self._confinement = confine.confinement_for(self.root)
        self._lock = threading.Lock()
        self._fds: list[int | None] = [None] * len(manifest.files)
        self._ids: list[tuple[int, int] | None] = [None] * len(manifest.files)
        # Per file: (the file's version when checked, the pieces checked in that version).
        self._checked: list[tuple[tuple[int, ...] | None, set[int]]] = [(None, set()) for _ in manifest.files]
        self._closed = False
        have: set[int] = set()
        for i, fe in enumerate(manifest.files):
            valid(validate_path, fe.path, "path")
            try:
                st = confine.stat_file(self._confinement, fe.path)
            except confine.OutsideTree as e:
                log.warning("not serving %s: %s", self.root / fe.path, e.strerror)
                continue
            except OSError:
                continue
            if st.st_size == fe.size:
                have.update(manifest.file_piece_range(i))
                self._ids[i] = (st.st_dev, st.st_ino)
        self._have = frozenset(have)

    @property
    def have(self) -> frozenset[int]:
        return self._have

    def _fd(self, piece: Piece) -> int:
        fi = piece.file_index
        with self._lock:
            if self._closed:
                raise StoreError(f"SnapshotReader of {self.root} is closed")
            fd = self._fds[fi]
            if fd is not None:
                return fd
            path = self.root / self.manifest.files[fi].path
            with io_errors("opening", path):
                fd = confine.open_file(self._confinement, self.manifest.files[fi].path)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._ids[fi]:
                os.close(fd)
                raise PieceNotAvailable(
                    piece.index,
                    f"{path} was replaced since it was found (another file at that path now)",
                    path=path,
                )
            self._fds[fi] = fd
            return fd

    @staticmethod
    def _version(fd: int) -> tuple[int, ...]:
        st = os.fstat(fd)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _is_checked(self, piece: Piece, version: tuple[int, ...]) -> bool:
        if self.verify:
            return False
        with self._lock:
            seen, pieces = self._checked[piece.file_index]
            return seen == version and piece.index in pieces

    def _mark_checked(self, piece: Piece, version: tuple[int, ...]) -> None:
        with self._lock:
            seen, pieces = self._checked[piece.file_index]
            if seen != version:
                pieces = set()
                self._checked[piece.file_index] = (version, pieces)
            pieces.add(piece.index)

    def _piece(self, index: int) -> Piece:
        if not isinstance(index, int) or not 0 <= index < self.manifest.num_pieces:
            raise StoreError(f"piece {index!r} out of range ({self.manifest.num_pieces} pieces)")
        if index not in self._have:
            raise PieceNotAvailable(index, f"piece {index} is not in {self.root}")
        return self.manifest.pieces[index]

    def read_piece(self, index: int) -> bytes:
        piece = self._piece(index)
        buf = bytearray(piece.length)
        self.read_piece_into(index, memoryview(buf))
        return bytes(buf)

    def read_piece_into(self, index: int, buf: memoryview) -> int:
        piece = self._piece(index)
        mv = as_bytes_view(buf)
        if mv.nbytes < piece.length:
            raise StoreError(f"buffer of {mv.nbytes} bytes too small for piece {index}")
        mv = mv[: piece.length]
        fd = self._fd(piece)
        path = self.root / self.manifest.files[piece.file_index].path
        with io_errors(f"reading piece {index} from", path):
            version = self._version(fd)
            got = pread_into(fd, mv, piece.offset)
        self._check(piece, mv[:got], path, version)
        return piece.length

    @contextlib.contextmanager
    def piece_span(self, index: int) -> Iterator[tuple[int, int, int] | None]:
        """``(fd, offset, length)`` of piece ``index`` for zero-copy sending (``os.sendfile``);
        the fd is a private duplicate, closed when the block exits. Yields None when the bytes
        must be checked on read (not yet checked in the file's current version, or
        ``verify=True``): use ``read_piece_into`` then, which checks them."""
        piece = self._piece(index)
        if self.verify:
            yield None
            return
        path = self.root / self.manifest.files[piece.file_index].path
        src = self._fd(piece)  # opened once and kept
        with io_errors("opening", path):
            if not self._is_checked(piece, self._version(src)):
                fd = None
            else:
                with self._lock:
                    if self._closed or self._fds[piece.file_index] != src:
                        raise StoreError(f"SnapshotReader of {self.root} is closed")
                    fd = os.dup(src)
        if fd is None:
            yield None
            return
        try:
            yield fd, piece.offset, piece.length
        finally:
            os.close(fd)

    def _check(self, piece: Piece, data: bytes | memoryview, path: Path, version: tuple[int, ...]) -> None:
        if len(data) != piece.length:
            raise PieceNotAvailable(piece.index, f"{path} is shorter than the manifest says", path=path)
        if self._is_checked(piece, version):
            return
        if blake3.blake3(data).digest() != piece.digest:
            raise PieceNotAvailable(
                piece.index, f"piece {piece.index} of {path} does not match the manifest", path=path
            )
        self._mark_checked(piece, version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, [None] * len(self._fds)
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
