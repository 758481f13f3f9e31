"""The store's errors: every OSError of the store becomes a :class:`StoreError` subclass naming
the file involved (``io_errors``)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class StoreError(Exception):
    """A store failure; ``path`` (when known) names the file or directory involved."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class DiskFull(StoreError):
    """No space left (ENOSPC / EDQUOT) while writing ``path``."""


class SnapshotConflict(StoreError):
    """``snapshots/<revision>`` exists and was not created by a download of this manifest."""


class ForeignBlob(StoreError):
    """``blobs/<hex>`` exists, was not verified there by swarm, and does not match the manifest."""


class StorePermissionError(StoreError):
    """Permission denied or read-only filesystem (EACCES / EPERM / EROFS) at ``path``."""


class LockTimeout(StoreError):
    """Another process (or thread) holds the download lock of this manifest past ``lock_timeout``."""


class PieceHashMismatch(StoreError):
    """Data offered for piece ``index`` has the wrong length or blake3; nothing was written."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class PieceNotAvailable(StoreError):
    """Piece ``index`` is not (or no longer) held: not in ``have``, or it failed re-verification."""

    def __init__(self, index: int, message: str, *, path: str | os.PathLike | None = None) -> None:
        super().__init__(message, path=path)
        self.index = index


def wrap_os_error(exc: OSError, action: str, path: str | os.PathLike | None) -> StoreError:
    where = os.fspath(path) if path is not None else exc.filename
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        err: StoreError = DiskFull(f"disk full while {action} {where}: {reason}", path=where)
    elif code == errno.EROFS:
        err = StorePermissionError(f"read-only filesystem while {action} {where}", path=where)
    elif code in (errno.EACCES, errno.EPERM):
        err = StorePermissionError(f"permission denied while {action} {where}: {reason}", path=where)
    else:
        err = StoreError(f"I/O error while {action} {where}: {reason}", path=where)
    err.errno = code  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def io_errors(action: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn OSError into the matching StoreError subclass."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise wrap_os_error(exc, action, path) from exc
