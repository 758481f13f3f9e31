"""Building a manifest from a directory: the scan (confined to the tree), hashing in threads, and
``build_manifest``."""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import attrs
import blake3

from swarm import confine
from swarm.manifest.kinds import should_skip
from swarm.manifest.rules import (
    HASH_PREFIX,
    ManifestError,
    MiB,
    _check_file_set,
    _is_int,
    piece_size_for,
    validate_model_name,
    validate_path,
    validate_revision,
)
from swarm.manifest.values import FileEntry, Manifest

# --- build I/O ---------------------------------------------------------------------------------
# Read size while hashing: large enough that blake3 can spread one update over several cores.
_CHUNK = 4 * MiB
# Below this a hasher runs single-threaded (spreading small inputs over threads costs more).
_PARALLEL_MIN = 1 * MiB

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
