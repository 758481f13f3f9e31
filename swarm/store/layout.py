"""The Hugging Face hub cache layout: the one place that knows it. Every module that touches the
cache (the store, cache administration, the Hub and ModelExpress pulls, test fixtures) finds its
paths, writes its links and refs and looks for complete snapshots through this module::

    <cache>/models--<org>--<name>/
        blobs/<name>                 file contents (swarm: the blake3 hex; the Hub: the etag)
        blobs/<name>.incomplete      a file being fetched by swarm
        snapshots/<revision>/<path>  relative symlink -> ../../blobs/<name> (one more ../ per
                                     directory level of <path>)
        refs/<ref>                   the revision (no newline), written atomically
        .no_exist/<revision>/<path>  the Hub client's "this file does not exist" markers
        .swarm/                      swarm's own records (see swarm/store/__init__.py)

``huggingface_hub`` and ``transformers`` find what is laid out here with ``local_files_only=True``
/ ``HF_HUB_OFFLINE=1``. Functions raise OSError for I/O failures (the store wraps them into
:class:`~swarm.store.errors.StoreError`) and StoreError for invalid names.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from swarm.manifest import (
    FileEntry,
    ManifestError,
    validate_model_name,
    validate_revision,
)
from swarm.store.errors import StoreError
from swarm.store.fileio import atomic_write, fsync_dir, unlink_quiet
from swarm.store.hashing import hash_fd

REPO_PREFIX = "models--"
HASH_HEX = re.compile(r"(?:blake3:)?([0-9a-f]{64})")
INCOMPLETE = ".incomplete"


def valid(fn, value: object, what: str) -> str:
    """``fn(value)`` (a manifest validator), its ManifestError turned into a StoreError."""
    try:
        return fn(value)
    except ManifestError as exc:
        raise StoreError(f"invalid {what}: {exc.reason}") from None


def repo_folder_name(model: str) -> str:
    """``org/name`` -> ``models--org--name`` (the Hub cache's repo directory name)."""
    valid(validate_model_name, model, "model name")
    return REPO_PREFIX + model.replace("/", "--")


def model_of_folder(name: str) -> str | None:
    """``models--org--name`` -> ``org/name``; None for anything that is not a model repo folder."""
    if not name.startswith(REPO_PREFIX):
        return None
    model = name[len(REPO_PREFIX) :].replace("--", "/", 1)
    try:
        validate_model_name(model)
    except ManifestError:
        return None
    return model if repo_folder_name(model) == name else None


def models(cache_dir: str | os.PathLike) -> list[str]:
    """The models with a repo directory in ``cache_dir``, sorted."""
    try:
        entries = sorted(os.listdir(cache_dir))
    except OSError:
        return []
    return [m for m in map(model_of_folder, entries) if m is not None]


def private_revision(manifest_hash: bytes | str) -> str:
    """A 40-hex revision for a model without a Hub commit: the first 40 hex of its manifest hash.

    Accepts the 32-byte hash, its hex, or ``blake3:<hex>``.  Looks like a git sha, so
    ``huggingface_hub`` uses it directly as a snapshot directory name.
    """
    if isinstance(manifest_hash, bytes | bytearray | memoryview):
        raw = bytes(manifest_hash)
        if len(raw) != 32:
            raise ValueError(f"manifest hash must be 32 bytes, got {len(raw)}")
        return raw.hex()[:40]
    m = HASH_HEX.fullmatch(manifest_hash)
    if m is None:
        raise ValueError(f"not a manifest hash: {manifest_hash!r}")
    return m.group(1)[:40]


def check_ref(ref: str) -> str:
    """``ref`` if it is a valid ref name (``main``, ``v1``, ``refs/pr/1``), else StoreError."""
    if not isinstance(ref, str) or not ref:
        raise StoreError(f"invalid ref {ref!r}")
    for part in ref.split("/"):
        valid(validate_revision, part, f"ref {ref!r}")
    return ref


def link_target(path: str, blob: str) -> str:
    """Relative symlink target from ``snapshots/<rev>/<path>`` to ``blobs/<blob>``."""
    return "../" * (2 + path.count("/")) + "blobs/" + blob


def snapshot_parts(snapshot: str | os.PathLike) -> tuple[Path, str] | None:
    """``(repo dir, revision)`` of a ``<cache>/models--*/snapshots/<rev>`` path, else None."""
    snap = Path(snapshot)
    repo = snap.parent.parent
    if snap.parent.name != "snapshots" or not repo.name.startswith(REPO_PREFIX):
        return None
    return repo, snap.name


class RepoLayout:
    """The paths of one model repo in a hub cache, and the operations on its links and refs."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.snapshots = self.root / "snapshots"
        self.refs = self.root / "refs"
        self.meta = self.root / ".swarm"
        self.no_exist = self.root / ".no_exist"

    @classmethod
    def of(cls, cache_dir: str | os.PathLike, model: str) -> RepoLayout:
        """The repo of ``model`` (``org/name``, validated) in ``cache_dir``."""
        return cls(Path(cache_dir) / repo_folder_name(model))

    def __repr__(self) -> str:
        return f"RepoLayout({str(self.root)!r})"

    # -- paths --

    def blob(self, name: str) -> Path:
        return self.blobs / name

    def incomplete(self, name: str) -> Path:
        return self.blobs / (name + INCOMPLETE)

    def snapshot(self, revision: str) -> Path:
        return self.snapshots / valid(validate_revision, revision, "revision")

    def ref_path(self, ref: str) -> Path:
        return self.refs / check_ref(ref)

    # -- refs --

    def read_ref(self, ref: str = "main") -> str | None:
        """The revision ``refs/<ref>`` names, None if there is no such ref (OSError otherwise)."""
        try:
            rev = self.ref_path(ref).read_text().strip()
        except FileNotFoundError:
            return None
        return rev or None

    def write_ref(self, ref: str, revision: str, tmp_dir: Path | None = None) -> None:
        """``refs/<ref>`` := ``revision``, atomically and durably (staged in ``tmp_dir``, default
        ``refs/``'s own directory, which must be on the same filesystem)."""
        path = self.ref_path(ref)
        try:
            if path.read_text() == revision:
                return
        except OSError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.parent if tmp_dir is None else tmp_dir, path, revision.encode())

    def refs_to(self, revision: str) -> list[str]:
        """The refs (``main``, ``v1``, ``refs/pr/1`` ...) that name ``revision``."""
        out = []
        for dirpath, _dirs, files in os.walk(self.refs):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    if Path(p).read_text().strip() == revision:
                        out.append(os.path.relpath(p, self.refs))
                except OSError:
                    continue
        return sorted(out)

    # -- snapshots --

    def link(self, snapshot: Path, path: str, blob: str, tmp_dir: Path | None = None) -> bool:
        """Make ``snapshot/<path>`` a link to ``blobs/<blob>`` (created beside it, or in
        ``tmp_dir``, then renamed over whatever is there). False if it already was; the caller
        fsyncs the directories it changed."""
        dest = snapshot / path
        target = link_target(path, blob)
        try:
            if os.readlink(dest) == target:
                return False
        except OSError:
            pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        where = dest.parent if tmp_dir is None else tmp_dir
        tmp = where / f".link-{os.getpid()}-{secrets.token_hex(6)}"
        os.symlink(target, tmp)
        try:
            os.replace(tmp, dest)
        except BaseException:
            unlink_quiet(tmp)
            raise
        return True

    def link_all(self, snapshot: Path, links: Iterable[tuple[str, str]], tmp_dir: Path | None = None) -> None:
        """``link`` each (path, blob), then fsync the directories changed."""
        touched: set[Path] = set()
        for path, blob in links:
            if self.link(snapshot, path, blob, tmp_dir):
                touched.add((snapshot / path).parent)
        for d in touched:
            fsync_dir(d)

    def revisions(self) -> list[str]:
        """The snapshot directories (revision names), sorted."""
        try:
            names = sorted(os.listdir(self.snapshots))
        except OSError:
            return []
        out = []
        for name in names:
            try:
                validate_revision(name)
            except ManifestError:
                continue
            out.append(name)
        return out

    def snapshot_blobs(self, revision: str) -> dict[str, str]:
        """``{path: blob name}`` of the links in ``snapshots/<revision>`` that lead into the repo's
        ``blobs/`` (any other file is not counted: it is removed with the directory)."""
        snap = self.snapshot(revision)
        blobs = os.fspath(self.blobs)
        real_blobs = os.path.realpath(blobs)
        out: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(snap):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    target = os.readlink(p)
                except OSError:
                    continue
                resolved = os.path.normpath(os.path.join(dirpath, target))
                where = os.path.dirname(resolved)  # absolute links too (older Hub clients)
                if where == blobs or os.path.realpath(where) == real_blobs:
                    out[os.path.relpath(p, snap)] = os.path.basename(resolved)
        return out

    def complete_snapshot(
        self,
        revision: str,
        entries: Sequence[FileEntry] | None,
        paths: Iterable[str] | None = None,
        *,
        verify: bool = False,
    ) -> Path | None:
        """``snapshots/<revision>`` if it is complete, else None.

        With ``entries`` (the manifest's files to check), complete means each is present with its
        size; ``verify=True`` also re-hashes each in full. Without (a snapshot the Hub client
        made), complete means the directory is non-empty, no symlink in it is broken and every
        one of ``paths`` is present; ``verify=True`` then returns None (nothing to verify
        against)."""
        try:
            snap = self.snapshot(revision)
        except StoreError:
            return None
        if not snap.is_dir():
            return None
        if entries is None:
            if verify:
                return None
            if paths is not None:
                return snap if all((snap / p).is_file() for p in paths) else None
            found = False
            for dirpath, _dirs, files in os.walk(snap):
                for name in files:
                    if not os.path.isfile(os.path.join(dirpath, name)):
                        return None  # broken symlink
                    found = True
            return snap if found else None
        for fe in entries:
            p = snap / fe.path
            try:
                st = os.stat(p)
            except OSError:
                return None
            if not stat.S_ISREG(st.st_mode) or st.st_size != fe.size:
                return None
            if verify:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None
                try:
                    if hash_fd(fd, fe.size) != fe.digest:
                        return None
                finally:
                    os.close(fd)
        return snap

    def forget_no_exist(self, revision: str, paths: Iterable[str]) -> None:
        """Drop the Hub client's cached 'file does not exist' markers for files we now have."""
        base = self.no_exist / revision
        if not base.is_dir():
            return
        for p in paths:
            unlink_quiet(base / p)

    def blob_bytes(self) -> int:
        """Bytes of the files under ``blobs/`` (complete blobs and ``.incomplete`` files)."""
        total = 0
        try:
            with os.scandir(self.blobs) as it:
                for e in it:
                    try:
                        if e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass
        return total
