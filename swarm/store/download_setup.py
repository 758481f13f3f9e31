"""Opening a :class:`~swarm.store.download.Download`: each file adopted (a blob already in
``blobs/``), published (an empty file) or resumed from its ``.incomplete`` (the bits of its resume
state, then the pieces on disk the state does not record, re-hashed: ``_recover``); and the
free-space check before anything is preallocated. A mixin of ``Download``, which calls these from
its constructor (see swarm/store/__init__.py for the invariants)."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

from swarm.manifest import Manifest
from swarm.store import resume
from swarm.store.errors import ForeignBlob, wrap_os_error
from swarm.store.fileio import unlink_quiet
from swarm.store.layout import RepoLayout
from swarm.store.partfile import PartFile, check_room

log = logging.getLogger("swarm.store.download")


class DownloadSetup:
    """The open-time methods of :class:`~swarm.store.download.Download` (a mixin: it uses the
    download's manifest, files, layout, lock and piece sets)."""

    manifest: Manifest
    _files: list[PartFile]
    _layout: RepoLayout
    _tmp: Path
    _lock: threading.Lock
    _have: set[int]
    _unconfirmed: set[int]
    _have_cache: frozenset[int] | None
    recovered_pieces: int
    recovered_bytes: int

    # -- setup --

    def _init_file(self, f: PartFile) -> None:
        fe = f.entry
        try:
            st = os.stat(f.final_path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise wrap_os_error(exc, "checking", f.final_path) from exc
        if st is not None:
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size == fe.size
                and f.adoptable(st, rehash=f.wanted, tmp_dir=self._tmp)
            ):
                self._mark_final(f)
                unlink_quiet(f.state_path)
                return
            if f.wanted:  # not a blob swarm verified (a Hub blob has a sha256 name): leave it
                raise ForeignBlob(
                    f"{f.final_path} exists ({st.st_size} bytes) but is not {fe.path} of "
                    f"{self.manifest.model}@{self.manifest.revision} as the manifest describes it "
                    f"({fe.size} bytes, blake3 {f.hex[:16]}...); it is left alone",
                    path=f.final_path,
                )
            return
        if not f.wanted:
            return
        if fe.size == 0:
            self._publish_empty(f)
            return
        self._restore(f)

    def _check_room(self) -> None:
        """DiskFull, before a byte is preallocated, if the files still to fetch need more space
        than the filesystem has free (``partfile.check_room``)."""
        what = f"{self.manifest.model}@{self.manifest.revision}"
        check_room([f for f in self._files if f.wanted and not f.final], self._layout.blobs, what)

    def _mark_final(self, f: PartFile) -> None:
        with self._lock:
            f.make_final()
            self._have.update(f.pieces)
            self._unconfirmed.difference_update(f.pieces)
            self._have_cache = None

    def _publish_empty(self, f: PartFile) -> None:
        f.publish_empty(self._tmp)
        self._mark_final(f)

    def _restore(self, f: PartFile) -> None:
        """Resume ``f`` from its ``.incomplete``: take the pieces its resume state records (when
        the state matches the file on disk; re-verified first if the file was replaced), then
        re-hash the pieces the state does not record and keep those that verify (``_recover``)."""
        try:
            st = os.stat(f.part_path)
        except OSError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_size == f.entry.size):
            st = None  # no usable .incomplete: nothing to restore or recover
        judged = self._restore_state(f, st)
        if st is not None:
            self._recover(f, judged)

    def _restore_state(self, f: PartFile, st: os.stat_result | None) -> set[int]:
        """Load the bits of ``f``'s state file (``st``: its ``.incomplete``, None if missing or
        of the wrong size). Returns the file's piece numbers already judged (set bits, trusted or
        re-hashed), which ``_recover`` need not read again."""
        local, same_file = resume.read_state(f, st)
        if not local:
            return set()
        judged = set(local)
        if not same_file:
            # The .incomplete is not the file the bits were written for: trust only what re-hashes.
            local = resume.reverify(self.manifest, f, f.open(), local)
            f.dirty = True
        with self._lock:
            for k in local:
                self._have.add(f.first + k)
                if same_file:
                    self._unconfirmed.add(f.first + k)
            f.set_count(len(local))
            self._have_cache = None
        return judged

    def _recover(self, f: PartFile, judged: set[int]) -> None:
        """Re-hash the pieces of ``f``'s ``.incomplete`` that are not in ``judged`` and keep those
        that verify (``resume.recover``). Recovered pieces were just hashed, so they are not
        "unconfirmed"; the file is marked dirty so the next flush records them (after
        fdatasync, as for any write)."""
        todo = [k for k in range(f.entry.num_pieces) if k not in judged]
        if not todo:
            return
        t0 = time.monotonic()
        good, nread = resume.recover(self.manifest, f, f.open(), todo)
        if good:
            with self._lock:
                for i in good:
                    self._have.add(i)
                    self._unconfirmed.discard(i)
                f.set_count(f.count + len(good))
                f.dirty = True
                self._have_cache = None
            self.recovered_pieces += len(good)
            self.recovered_bytes += sum(self.manifest.pieces[i].length for i in good)
        log.log(
            logging.INFO if good or nread else logging.DEBUG,
            "%s: recovered %d of %d unrecorded pieces from disk (%.1f MiB read, %.2f s)",
            f.part_path,
            len(good),
            len(todo),
            nread / (1 << 20),
            time.monotonic() - t0,
        )
