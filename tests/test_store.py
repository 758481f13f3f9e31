"""swarm.store on real files: verified writes, atomic publication, resume, locks, disk errors."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm import store as store_mod
from swarm.manifest import Manifest, build_manifest
from swarm.store import (
    DiskFull,
    LockTimeout,
    PieceHashMismatch,
    PieceNotAvailable,
    SnapshotReader,
    Store,
    StoreError,
    StorePermissionError,
    fileio,
    hashing,
    private_revision,
    resume,
)
from swarm.store import errors as store_errors

MiB = 1 << 20
MODEL = "test-org/store-model"
REV = "a" * 40
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- helpers -----------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def random_files(seed: int, sizes: list[int]) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for k, size in enumerate(sizes):
        name = f"d{k % 3}/f{k}.bin" if k % 2 else f"f{k}.bin"
        out[name] = rng.randbytes(size)
    return out


def snapshot_entries(store: Store, model: str) -> list[str]:
    snaps = store.repo_dir(model) / "snapshots"
    if not snaps.exists():
        return []
    return sorted(str(p.relative_to(snaps)) for p in snaps.rglob("*"))


def final_blob(store: Store, model: str, entry) -> Path:
    return store.repo_dir(model) / "blobs" / entry.blake3.split(":", 1)[1]


def corrupt(data: bytes, how: int) -> bytes:
    if how == 0:  # flip one bit
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    if how == 1:  # one byte short
        return data[:-1]
    return data + b"\0"  # one byte too many


def assert_snapshot_matches(snap: Path, src: Path, manifest: Manifest, files) -> None:
    for i, fe in enumerate(manifest.files):
        p = snap / fe.path
        if i in files:
            assert p.is_symlink(), fe.path
            target = os.readlink(p)
            assert not os.path.isabs(target)
            assert target == "../" * (2 + fe.path.count("/")) + "blobs/" + fe.blake3[7:]
            assert p.read_bytes() == (src / fe.path).read_bytes(), fe.path
        else:
            assert not p.exists() and not p.is_symlink(), fe.path


@pytest.fixture
def small_model(tmp_path: Path) -> tuple[Path, Manifest]:
    """Two multi-piece files (5 MiB and 9 MiB + 1), single-piece files, an empty file."""
    rng = random.Random(7)
    files = {
        "config.json": b'{"a": 1}\n',
        "empty.txt": b"",
        "model-1.safetensors": rng.randbytes(5 * MiB),
        "model-2.safetensors": rng.randbytes(9 * MiB + 1),
        "sub/tokenizer.json": rng.randbytes(70_000),
    }
    src = write_tree(tmp_path / "src", files)
    return src, build_manifest(src, MODEL, REV)


def fill(dl, reader: SnapshotReader, indices) -> None:
    for i in indices:
        dl.write_piece(i, reader.read_piece(i))


# --- basics ------------------------------------------------------------------------------------


def test_roundtrip_layout(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    assert reader.have == frozenset(range(m.num_pieces))
    with store.open_download(m) as dl:
        assert dl.wanted_files == frozenset(range(len(m.files)))
        assert dl.wanted_pieces == frozenset(range(m.num_pieces))
        assert dl.have == frozenset() and not dl.complete
        empty = m.file_index("empty.txt")
        assert final_blob(store, MODEL, m.files[empty]).stat().st_size == 0  # completes at open
        order = list(dl.missing)
        random.Random(1).shuffle(order)
        for i in order:
            assert dl.write_piece(i, memoryview(reader.read_piece(i))) is True
            assert snapshot_entries(store, MODEL) == []
        assert dl.complete and dl.missing == frozenset()
        assert dl.write_piece(order[0], reader.read_piece(order[0])) is False
        buf = bytearray(m.pieces[order[0]].length + 10)
        assert dl.read_piece_into(order[0], memoryview(buf)) == m.pieces[order[0]].length
        assert bytes(buf[: m.pieces[order[0]].length]) == reader.read_piece(order[0])
        snap = dl.finalize()
    assert snap == store.snapshot_dir(MODEL, REV)
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))
    repo = store.repo_dir(MODEL)
    assert (repo / "refs" / "main").read_text() == REV
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == sorted({f.blake3[7:] for f in m.files})
    assert list((repo / ".swarm" / "partial").iterdir()) == []
    assert store.load_manifest(MODEL, REV) == m
    assert store.load_manifest_by_hash(MODEL, m.manifest_hash) == m
    assert store.load_manifest_by_hash(MODEL, m.hash_str) == m
    assert store.find_complete(MODEL) == snap
    assert store.find_complete(MODEL, REV, verify=True) == snap
    assert store.find_complete(MODEL, "b" * 40) is None
    # Reopening a finished download: everything is already there.
    with store.open_download(m) as dl:
        assert dl.complete and dl.have == frozenset(range(m.num_pieces))
        assert dl.read_piece(0) == reader.read_piece(0)
        assert dl.finalize() == snap
    reader.close()


def test_write_piece_rejects_bad_input(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    big = m.file_index("model-2.safetensors")
    first = m.file_piece_range(big)[0]
    data = reader.read_piece(first)
    with store.open_download(m) as dl:
        for how in range(3):
            with pytest.raises(PieceHashMismatch) as ei:
                dl.write_piece(first, corrupt(data, how))
            assert ei.value.index == first
        assert first not in dl.have
        part = store.repo_dir(MODEL) / "blobs" / (m.files[big].blake3[7:] + ".incomplete")
        assert not part.exists()  # nothing was even opened for a rejected piece
        with pytest.raises(StoreError):
            dl.write_piece(m.num_pieces, data)
        with pytest.raises(StoreError):
            dl.write_piece(-1, data)
        with pytest.raises(PieceNotAvailable):
            dl.read_piece(first)
        with pytest.raises(StoreError, match="missing"):
            dl.finalize()
    with pytest.raises(StoreError, match="closed"):
        dl.write_piece(first, data)


def test_selected_files_only(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    configs = m.select(configs_only=True)
    assert configs and configs != frozenset(range(len(m.files)))
    with store.open_download(m, configs) as dl:
        assert dl.wanted_pieces == m.pieces_of(configs)
        other = next(i for i in range(m.num_pieces) if i not in dl.wanted_pieces)
        with pytest.raises(StoreError, match="does not want"):
            dl.write_piece(other, reader.read_piece(other))
        fill(dl, reader, dl.missing)
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, configs)
    assert store.find_complete(MODEL, REV) is None  # weights are missing
    assert store.find_complete(MODEL, REV, paths=[m.files[i].path for i in configs]) == snap
    # Then the rest: merged into the existing snapshot directory, link by link.
    with store.open_download(m) as dl:
        assert dl.have == m.pieces_of(configs)
        fill(dl, reader, dl.missing)
        assert dl.finalize() == snap
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))
    assert store.find_complete(MODEL, REV, verify=True) == snap


def test_download_never_merges_into_a_hub_made_snapshot(tmp_path: Path) -> None:
    """A manifest naming the revision of a snapshot the Hub client made (even the honest one: the
    store cannot tell) is refused before anything is written: the Hub's links and blobs stay as
    they are (issue #18, finding 5: a lie naming a real commit relinked files of that commit)."""
    from modelgen import make_hf_snapshot

    from swarm.store import SnapshotConflict

    cache = tmp_path / "cache"
    hub_snap = make_hf_snapshot(cache, MODEL, REV, weights_bytes=1 * MiB, n_weight_files=1)
    m = build_manifest(hub_snap, MODEL, REV)  # follows the Hub's symlinks
    store = Store(cache)
    assert store.find_complete(MODEL, REV) == hub_snap  # no stored manifest: presence only
    before = {p: os.readlink(p) for p in hub_snap.rglob("*") if p.is_symlink()}
    with pytest.raises(SnapshotConflict, match="never adds to or relinks"):
        store.open_download(m)
    assert {p: os.readlink(p) for p in hub_snap.rglob("*") if p.is_symlink()} == before
    assert store.load_manifest(MODEL, REV) is None  # not even recorded


def test_private_revision() -> None:
    h = blake3.blake3(b"x").digest()
    assert private_revision(h) == h.hex()[:40]
    assert private_revision(h.hex()) == h.hex()[:40]
    assert private_revision("blake3:" + h.hex()) == h.hex()[:40]
    with pytest.raises(ValueError):
        private_revision(b"short")


def test_bad_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    for bad in ("../x", "a/b/c", "/abs", "", "a/.."):
        with pytest.raises(StoreError):
            store.repo_dir(bad)
    with pytest.raises(StoreError):
        store.snapshot_dir(MODEL, "../../etc")


# --- property: random manifests, random order, corrupted pieces ---------------------------------


@st.composite
def manifests_and_plans(draw):
    small = st.integers(0, 70_000)
    sizes = draw(st.lists(small, min_size=1, max_size=6))
    if draw(st.integers(0, 4)) == 0:  # now and then a multi-piece (4 MiB pieces) file
        sizes.append(draw(st.integers(4 * MiB + 1, 9 * MiB)))
    seed = draw(st.integers(0, 2**32 - 1))
    return sizes, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=manifests_and_plans(), data=st.data())
def test_property_random_writes(case, data) -> None:
    sizes, seed = case
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        files = random_files(seed, sizes)
        src = write_tree(tmp / "src", files)
        m = build_manifest(src, MODEL, REV)
        store = Store(tmp / "cache")
        all_files = list(range(len(m.files)))
        subset = data.draw(st.one_of(st.none(), st.sets(st.sampled_from(all_files), min_size=1)))
        wanted = frozenset(all_files) if subset is None else frozenset(subset)
        reader = SnapshotReader(src, m)
        with store.open_download(m, subset) as dl:
            order = data.draw(st.permutations(sorted(dl.wanted_pieces)))
            for i in order:
                piece = m.pieces[i]
                good = reader.read_piece(i)
                if data.draw(st.integers(0, 3)) == 0:
                    how = data.draw(st.integers(0, 2))
                    with pytest.raises(PieceHashMismatch):
                        dl.write_piece(i, corrupt(good, how))
                    assert i not in dl.have
                assert dl.write_piece(i, good) is True
                assert i in dl.have
                # Nothing published early: no snapshot, no final blob for unfinished files.
                assert snapshot_entries(store, MODEL) == []
                fe = m.files[piece.file_index]
                done = m.pieces_of([piece.file_index]) <= dl.have
                assert final_blob(store, MODEL, fe).exists() == done
            assert dl.complete
            for i in dl.have:
                assert dl.read_piece(i) == reader.read_piece(i)
            snap = dl.finalize()
        reader.close()
        assert_snapshot_matches(snap, src, m, wanted)
        for fi in wanted:
            assert final_blob(store, MODEL, m.files[fi]).read_bytes() == files[m.files[fi].path]


# --- resume ------------------------------------------------------------------------------------


def test_resume_after_close(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    order = list(range(m.num_pieces))
    random.Random(3).shuffle(order)
    half = set(order[: len(order) // 2])
    with store.open_download(m) as dl:
        fill(dl, reader, half)
    assert snapshot_entries(store, MODEL) == []
    with store.open_download(m) as dl:
        assert dl.have == frozenset(half)
        assert dl.missing == frozenset(range(m.num_pieces)) - half
        for i in half:  # restored pieces are served (and re-hashed on first read)
            assert dl.read_piece(i) == reader.read_piece(i)
        fill(dl, reader, dl.missing)
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))


def test_resume_bad_restored_piece_is_dropped(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    fi = m.file_index("model-2.safetensors")
    pieces = list(m.file_piece_range(fi))
    assert len(pieces) == 3
    with store.open_download(m) as dl:
        fill(dl, reader, pieces[:2])
    part = store.repo_dir(MODEL) / "blobs" / (m.files[fi].blake3[7:] + ".incomplete")
    with open(part, "r+b") as fh:  # bit rot in piece 0 and piece 1, same inode
        for p in pieces[:2]:
            fh.seek(m.pieces[p].offset + 5)
            fh.write(b"\xff\x00\xff")
    with store.open_download(m) as dl:
        assert set(pieces[:2]) <= dl.have  # trusted from the state file ...
        with pytest.raises(PieceNotAvailable):  # ... but re-hashed before being served
            dl.read_piece(pieces[0])
        assert pieces[0] not in dl.have
        # Completing the file re-hashes it from disk: the other bad piece is found and dropped.
        fill(dl, reader, [pieces[2], pieces[0]])
        assert dl.missing & set(pieces) == {pieces[1]}
        assert not final_blob(store, MODEL, m.files[fi]).exists()
        fill(dl, reader, dl.missing)
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))


def test_resume_state_for_replaced_file_is_reverified(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    fi = m.file_index("model-2.safetensors")
    pieces = list(m.file_piece_range(fi))
    with store.open_download(m) as dl:
        fill(dl, reader, pieces[:2])
    part = store.repo_dir(MODEL) / "blobs" / (m.files[fi].blake3[7:] + ".incomplete")
    copy = part.with_name("copy")
    shutil.copyfile(part, copy)  # a new inode (as after a copy to another disk) ...
    with open(copy, "r+b") as fh:  # ... with piece 1 damaged
        fh.seek(m.pieces[pieces[1]].offset)
        fh.write(b"junk")
    os.replace(copy, part)
    with store.open_download(m) as dl:
        assert dl.have & set(pieces) == {pieces[0]}
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


def test_resume_garbage_state_is_ignored(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    fi = m.file_index("model-1.safetensors")
    pieces = list(m.file_piece_range(fi))
    with store.open_download(m) as dl:
        fill(dl, reader, pieces[:1])
    state = store.repo_dir(MODEL) / ".swarm" / "partial" / (m.files[fi].blake3[7:] + ".pieces")
    raw = bytearray(state.read_bytes())
    raw[-40] ^= 0xFF
    state.write_bytes(bytes(raw))
    with store.open_download(m) as dl:
        # The state is discarded, but the piece on disk is re-hashed and recovered (trusted: it
        # was just hashed); the never-written pieces are not.
        assert dl.have & set(pieces) == {pieces[0]}
        assert dl.recovered_pieces == 1 and not dl._unconfirmed & set(pieces)
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


def test_incomplete_deleted_under_us(tmp_path: Path, small_model) -> None:
    """A cache cleaner removes the .incomplete mid-download: the file starts over, no corruption."""
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    fi = m.file_index("model-2.safetensors")
    pieces = list(m.file_piece_range(fi))
    with store.open_download(m) as dl:
        fill(dl, reader, pieces[:-1])
        part = store.repo_dir(MODEL) / "blobs" / (m.files[fi].blake3[7:] + ".incomplete")
        part.unlink()
        with pytest.raises(StoreError, match="deleted"):
            dl.write_piece(pieces[-1], reader.read_piece(pieces[-1]))
        assert not dl.have & set(pieces)
        assert not final_blob(store, MODEL, m.files[fi]).exists()
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


class Child:
    """A subprocess running CHILD with a JSON plan; its stdout lines arrive on a queue."""

    def __init__(self, plan: dict) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(plan)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<eof>")

    def expect(self, word: str | tuple[str, ...], timeout: float = 30.0) -> list[str]:
        words = (word,) if isinstance(word, str) else word
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"child did not say {word!r}; saw {self.seen}") from None
            self.seen.append(line)
            parts = line.split(" ")
            if parts[0] in words:
                return parts[1:]
            if line == "<eof>":
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"child exited before {word!r}; saw {self.seen}\n{err}")

    def wait(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


CHILD = r"""
import json, os, sys, time
import swarm.store as S
import swarm.store.download as D
from swarm.manifest import Manifest
S.Store, S.SnapshotReader  # loaded now (swarm.store loads its names on first use), before uid drops

plan = json.loads(sys.argv[1])
m = Manifest.decode(open(plan["manifest"], "rb").read())
if plan.get("flush_interval"):
    D.FLUSH_INTERVAL = plan["flush_interval"]
    D.FLUSH_BYTES = 1 << 60

def say(*words):
    print(*words, flush=True)

if plan.get("uid") is not None:  # drop root after the imports: permissions apply from here on
    try:
        os.setgroups([])
        os.setgid(plan["uid"])
        os.setuid(plan["uid"])
    except OSError as e:
        say("cannot-drop-root", str(e).replace(" ", "_"))
        sys.exit(6)
reader = S.SnapshotReader(plan["src"], m)
try:
    store = S.Store(plan["cache"])
    say("opening", time.time())
    dl = store.open_download(m, lock_timeout=plan.get("lock_timeout"))
    say("locked", time.time())
    for step in plan["steps"]:
        op = step[0]
        if op == "write":
            new = sum(dl.write_piece(i, reader.read_piece(i)) for i in step[1])
            say("wrote", new)
        elif op == "flush":
            dl.flush()
        elif op == "say":
            say(step[1])
        elif op == "sleep":
            time.sleep(step[1])
        elif op == "wait_file":
            while not os.path.exists(step[1]):
                time.sleep(0.01)
        elif op == "hang":
            time.sleep(3600)
        elif op == "finalize":
            say("snapshot", dl.finalize())
        elif op == "close":
            say("closing", time.time())
            dl.close()
except S.LockTimeout as e:
    say("locktimeout", str(e).replace(" ", "_"))
    sys.exit(3)
except S.StorePermissionError as e:
    say("permission", str(e).replace(" ", "_"))
    sys.exit(4)
except S.DiskFull as e:
    say("diskfull", str(e).replace(" ", "_"))
    sys.exit(5)
say("done")
"""


def child_plan(tmp_path: Path, m: Manifest, src: Path, cache: Path, steps, **kw) -> dict:
    mf = tmp_path / f"{m.manifest_hash.hex()[:16]}.mf"
    mf.write_bytes(m.encode())
    return {"manifest": str(mf), "src": str(src), "cache": str(cache), "steps": steps, **kw}


def test_resume_after_sigkill(tmp_path: Path, small_model) -> None:
    src, m = small_model
    cache = tmp_path / "cache"
    fi = m.file_index("model-2.safetensors")
    big = list(m.file_piece_range(fi))
    single = [m.file_piece_range(m.file_index("config.json"))[0]]
    flushed = [big[0], big[2], *single]
    unflushed = [big[1]]  # would complete the file if it were written: it is not
    child = Child(
        child_plan(
            tmp_path,
            m,
            src,
            cache,
            [["write", flushed], ["flush"], ["say", "ready"], ["hang"]],
            flush_interval=3600,
        )
    )
    try:
        child.expect("ready")
        store = Store(cache)
        with pytest.raises(LockTimeout):  # the live child holds the lock
            store.open_download(m, lock_timeout=0.2)
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL
    assert snapshot_entries(store, MODEL) == []
    assert not final_blob(store, MODEL, m.files[fi]).exists()
    reader = SnapshotReader(src, m)
    with store.open_download(m, lock_timeout=10) as dl:  # the kernel freed the dead child's lock
        assert dl.have == frozenset(flushed)
        assert dl.missing == frozenset(range(m.num_pieces)) - set(flushed)
        fill(dl, reader, unflushed)
        assert final_blob(store, MODEL, m.files[fi]).read_bytes() == (src / m.files[fi].path).read_bytes()
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


def test_sigkill_unflushed_piece_is_recovered_from_disk(tmp_path: Path, small_model) -> None:
    src, m = small_model
    cache = tmp_path / "cache"
    fi = m.file_index("model-2.safetensors")
    big = list(m.file_piece_range(fi))
    child = Child(
        child_plan(
            tmp_path,
            m,
            src,
            cache,
            [["write", big[:1]], ["flush"], ["write", big[1:2]], ["say", "ready"], ["hang"]],
            flush_interval=3600,
        )
    )
    try:
        child.expect("ready")
    finally:
        child.kill()
    store = Store(cache)
    with store.open_download(m, lock_timeout=10) as dl:
        # big[0] from the state file (re-hashed on first read), big[1] (written after the last
        # flush) re-hashed from disk at open; the never-written big[2] is not claimed.
        assert dl.have == {big[0], big[1]}
        assert dl._unconfirmed == {big[0]}
        assert dl.recovered_pieces == 1 and dl.recovered_bytes == m.pieces[big[1]].length
        reader = SnapshotReader(src, m)
        assert dl.read_piece(big[0]) == reader.read_piece(big[0])
        assert dl.read_piece(big[1]) == reader.read_piece(big[1])


def test_crash_before_any_flush_recovers_written_pieces(tmp_path: Path, small_model, monkeypatch) -> None:
    """Killed before any resume state was written: the verified pieces on disk are re-hashed and
    kept at reopen (not fetched again), a piece damaged on disk afterwards is not, nor are the
    never-written ones (holes: not even read where the filesystem reports them)."""
    src, m = small_model
    cache = tmp_path / "cache"
    big = list(m.file_piece_range(m.file_index("model-2.safetensors")))  # 3 pieces
    one = list(m.file_piece_range(m.file_index("model-1.safetensors")))  # 2 pieces
    written = [big[0], big[2], one[1]]
    child = Child(
        child_plan(
            tmp_path, m, src, cache, [["write", written], ["say", "ready"], ["hang"]], flush_interval=3600
        )
    )
    try:
        child.expect("ready")
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL
    store = Store(cache)
    repo = store.repo_dir(MODEL)
    assert not list((repo / ".swarm" / "partial").glob("*.pieces"))  # nothing was recorded
    part = repo / "blobs" / (m.files[m.file_index("model-2.safetensors")].blake3[7:] + ".incomplete")
    with open(part, "r+b") as fh:  # damage big[2] on disk: torn write, bit rot
        fh.seek(m.pieces[big[2]].offset + 1000)
        fh.write(b"\xde\xad")
    reads = []
    real_pread_into = resume.pread_into

    def counting_pread_into(fd, buf, offset):
        reads.append(offset)
        return real_pread_into(fd, buf, offset)

    monkeypatch.setattr(resume, "pread_into", counting_pread_into)
    reader = SnapshotReader(src, m)
    with store.open_download(m, lock_timeout=10) as dl:
        monkeypatch.setattr(resume, "pread_into", real_pread_into)
        assert dl.have == {big[0], one[1]}
        assert dl.recovered_pieces == 2 and not dl._unconfirmed
        with os.fdopen(os.open(part, os.O_RDONLY), "rb") as fh:
            holes_known = fileio.data_extents(fh.fileno(), part.stat().st_size) is not None
        # Only the three written pieces were read, not the holes around them.
        assert len(reads) == len(written) if holes_known else len(reads) <= 5, reads
        assert dl.read_piece(big[0]) == reader.read_piece(big[0])
        # Not fetched again: writing a recovered piece is a no-op.
        assert not dl.write_piece(one[1], reader.read_piece(one[1]))
        assert big[2] in dl.missing and big[1] in dl.missing and one[0] in dl.missing
    # close() flushed: the next open trusts the state file and recovers nothing more.
    with store.open_download(m, lock_timeout=10) as dl:
        assert dl.have == {big[0], one[1]} and dl.recovered_pieces == 0
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


@pytest.mark.parametrize("kill_after", [0.05, 0.2, 0.5])
def test_sigkill_at_any_moment(tmp_path: Path, small_model, kill_after: float) -> None:
    """Killed mid-write (flushing often): whatever is claimed afterwards is correct."""
    src, m = small_model
    cache = tmp_path / "cache"
    order = list(range(m.num_pieces))
    random.Random(int(kill_after * 100)).shuffle(order)
    steps: list[list] = [["say", "ready"]]
    for i in order:
        steps += [["write", [i]], ["sleep", 0.01]]
    child = Child(child_plan(tmp_path, m, src, cache, [*steps, ["hang"]], flush_interval=0.001))
    try:
        child.expect("ready")
        time.sleep(kill_after)
    finally:
        child.kill()
    store = Store(cache)
    assert snapshot_entries(store, MODEL) == []
    reader = SnapshotReader(src, m)
    with store.open_download(m, lock_timeout=10) as dl:
        for i in dl.have:  # restored pieces are re-hashed on read: none may fail
            assert dl.read_piece(i) == reader.read_piece(i)
        for fi, fe in enumerate(m.files):
            blob = final_blob(store, MODEL, fe)
            if blob.exists():
                assert blob.read_bytes() == (src / fe.path).read_bytes()
                assert m.pieces_of([fi]) <= dl.have
        fill(dl, reader, dl.missing)
        assert_snapshot_matches(dl.finalize(), src, m, set(range(len(m.files))))


# --- locks and concurrency ---------------------------------------------------------------------


def test_two_processes_same_manifest(tmp_path: Path, small_model) -> None:
    src, m = small_model
    cache = tmp_path / "cache"
    order = list(range(m.num_pieces))
    random.Random(5).shuffle(order)
    half = len(order) // 2
    go = tmp_path / "go"
    a = Child(
        child_plan(
            tmp_path,
            m,
            src,
            cache,
            [
                ["write", order[:half]],
                ["say", "half"],
                ["wait_file", str(go)],
                ["write", order[half:]],
                ["finalize"],
                ["close"],
            ],
        )
    )
    b = None
    try:
        a.expect("locked")
        a.expect("half")
        b = Child(child_plan(tmp_path, m, src, cache, [["write", order], ["finalize"], ["close"]]))
        b_opening = float(b.expect("opening")[0])
        time.sleep(0.3)  # let b block on the lock (the assertions hold either way)
        go.touch()
        a_closing = float(a.expect("closing")[0])
        b_locked = float(b.expect("locked")[0])
        assert b_opening < a_closing <= b_locked  # b waited for a
        assert b.expect("wrote") == ["0"]  # everything was already there
        b.expect("snapshot")
        assert a.wait() == 0 and b.wait() == 0
    finally:
        a.kill()
        if b is not None:
            b.kill()
    store = Store(cache)
    snap = store.find_complete(MODEL, REV, verify=True)
    assert snap is not None
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))


def test_lock_timeout_and_threads(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    dl = store.open_download(m)
    with pytest.raises(LockTimeout):
        store.open_download(m, lock_timeout=0.1)
    got: list[object] = []

    def second() -> None:
        d2 = store.open_download(m, lock_timeout=20)
        got.append(d2.have)
        d2.close()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert got == []  # still waiting
    reader = SnapshotReader(src, m)
    fill(dl, reader, [0])
    dl.close()
    dl.close()  # idempotent
    t.join(20)
    assert got == [frozenset({0})]


def test_threads_write_and_read_concurrently(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    order = list(range(m.num_pieces)) * 2  # duplicates race too
    random.Random(11).shuffle(order)
    work: queue.Queue[int] = queue.Queue()
    for i in order:
        work.put(i)
    errors: list[BaseException] = []
    written = []
    with store.open_download(m) as dl:

        def worker() -> None:
            try:
                while True:
                    try:
                        i = work.get_nowait()
                    except queue.Empty:
                        return
                    if dl.write_piece(i, reader.read_piece(i)):
                        written.append(i)
                    for j in list(dl.have)[:3]:
                        assert dl.read_piece(j) == reader.read_piece(j)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(written) == sorted(set(order))  # each piece stored exactly once
        assert dl.complete
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))


def test_two_manifests_sharing_blobs_concurrently(tmp_path: Path, small_model) -> None:
    """Different revisions with the same files hold different locks and share blobs."""
    src, m1 = small_model
    m2 = Manifest(MODEL, "b" * 40, m1.files)
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m1)
    errors: list[BaseException] = []
    snaps: dict[str, Path] = {}

    def run(m: Manifest, seed: int) -> None:
        try:
            with store.open_download(m) as dl:
                order = list(range(m.num_pieces))
                random.Random(seed).shuffle(order)
                fill(dl, reader, order)
                assert dl.complete
                snaps[m.revision] = dl.finalize(ref=None)
        except BaseException as e:
            errors.append(e)

    for seed in range(3):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        store = Store(tmp_path / "cache")
        threads = [threading.Thread(target=run, args=(m, seed + k)) for k, m in enumerate((m1, m2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for m in (m1, m2):
            assert_snapshot_matches(snaps[m.revision], src, m, set(range(len(m.files))))
        assert not (store.repo_dir(MODEL) / "refs" / "main").exists()


# --- disk full and permissions -----------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (to make a full disk for real)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full(tmp_path: Path) -> None:
    rng = random.Random(2)
    src = write_tree(tmp_path / "src", {"a.json": b"{}", "w.bin": rng.randbytes(6 * MiB)})
    m = build_manifest(src, MODEL, REV)
    reader = SnapshotReader(src, m)
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        filler = mnt / "filler"
        store = Store(mnt / "cache")
        fi = m.file_index("w.bin")
        wpieces = list(m.file_piece_range(fi))
        with store.open_download(m) as dl:
            # Taken after the open (which refuses a download that cannot fit: test_store below).
            filler.write_bytes(b"\0" * (4 * MiB))
            fill(dl, reader, m.file_piece_range(m.file_index("a.json")))
            with pytest.raises(DiskFull) as ei:
                dl.write_piece(wpieces[0], reader.read_piece(wpieces[0]))
            assert ei.value.path.endswith(".incomplete")  # names the file on disk
            assert "disk full" in str(ei.value)
            blob = final_blob(store, MODEL, m.files[fi])
            assert not blob.exists()
            assert not blob.with_name(blob.name + ".incomplete").exists()  # no half-reserved file
            assert wpieces[0] not in dl.have
            filler.unlink()  # free space: the same Download carries on
            fill(dl, reader, dl.missing)
            snap = dl.finalize()
        assert_snapshot_matches(snap, src, m, {0, 1})


def test_disk_full_while_publishing_state(tmp_path: Path) -> None:
    """Space runs out after the data was reserved: the error is DiskFull, nothing is published."""
    rng = random.Random(4)
    src = write_tree(tmp_path / "src", {"w.bin": rng.randbytes(5 * MiB)})
    m = build_manifest(src, MODEL, REV)
    reader = SnapshotReader(src, m)
    with tmpfs(tmp_path / "mnt", "6m") as mnt:
        store = Store(mnt / "cache")
        pieces = list(m.file_piece_range(0))
        with store.open_download(m) as dl:
            dl.write_piece(pieces[0], reader.read_piece(pieces[0]))  # reserves 5 MiB
            hog = mnt / "hog"
            with open(hog, "wb", buffering=0) as fh, contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 65536)
            with pytest.raises(DiskFull):
                dl.flush()
            assert not final_blob(store, MODEL, m.files[0]).exists()
            hog.unlink()
            fill(dl, reader, pieces[1:])
            assert_snapshot_matches(dl.finalize(), src, m, {0})


def test_read_only_filesystem(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.json": b"{}", "w.bin": os.urandom(100_000)})
    m = build_manifest(src, MODEL, REV)
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        Store(mnt / "cache").open_download(m).close()
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        with pytest.raises(StorePermissionError) as ei:
            Store(mnt / "other-cache")
        assert ei.value.path == str(mnt / "other-cache")
        assert "read-only" in str(ei.value).lower()
        with pytest.raises(StorePermissionError):
            Store(mnt / "cache").open_download(m)
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)


def test_permission_denied(small_model) -> None:
    """A cache whose blobs/ the process may not write: StorePermissionError, nothing published."""
    src0, m = small_model
    base = Path(tempfile.mkdtemp(prefix="swarm-perm-"))
    try:
        os.chmod(base, 0o755)  # the unprivileged child must reach it
        src = Path(shutil.copytree(src0, base / "src"))
        cache = base / "cache"
        Store(cache).open_download(m).close()
        repo = Store(cache).repo_dir(MODEL)
        uid = None
        if os.geteuid() == 0:
            uid = 65534  # root ignores permissions: drop to nobody in the child
            for dirpath, dirnames, filenames in os.walk(cache):
                for name in [*dirnames, *filenames]:
                    os.chown(os.path.join(dirpath, name), uid, uid)
            os.chown(repo / "blobs", 0, 0)
        os.chmod(repo / "blobs", 0o555)
        for p in (base / "src").rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        mf = base / "m.mf"
        mf.write_bytes(m.encode())
        os.chmod(mf, 0o644)
        plan = {
            "manifest": str(mf),
            "src": str(src),
            "cache": str(cache),
            "uid": uid,
            "steps": [["write", [m.file_piece_range(m.file_index("config.json"))[0]]]],
        }
        child = Child(plan)
        try:
            detail = child.expect(("permission", "cannot-drop-root"))[0]
            if child.seen[-1].startswith("cannot-drop-root"):
                pytest.skip(f"cannot drop root privileges here: {detail}")
            assert child.wait() == 4
        finally:
            child.kill()
        assert str(repo / "blobs") in detail
        empty = m.files[m.file_index("empty.txt")].blake3[7:]  # made by the first open
        assert [p.name for p in (repo / "blobs").iterdir()] == [empty]
        assert snapshot_entries(Store(cache), MODEL) == []
    finally:
        with contextlib.suppress(OSError):
            os.chmod(base / "cache" / store_mod.repo_folder_name(MODEL) / "blobs", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_errors_carry_errno(tmp_path: Path) -> None:
    e = store_errors.wrap_os_error(OSError(errno.ENOSPC, "No space left on device"), "writing", tmp_path)
    assert isinstance(e, DiskFull) and e.path == str(tmp_path)
    e = store_errors.wrap_os_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "writing", tmp_path)
    assert isinstance(e, DiskFull)
    e = store_errors.wrap_os_error(OSError(errno.EACCES, "Permission denied"), "writing", tmp_path)
    assert isinstance(e, StorePermissionError)
    e = store_errors.wrap_os_error(OSError(errno.EIO, "I/O error"), "writing", tmp_path)
    assert type(e) is StoreError and str(tmp_path) in str(e)


# --- serving -----------------------------------------------------------------------------------


def test_snapshot_reader(tmp_path: Path, small_model) -> None:
    src, m = small_model
    with SnapshotReader(src, m, verify=True) as r:
        assert r.have == frozenset(range(m.num_pieces))
        for i in range(m.num_pieces):
            data = r.read_piece(i)
            assert blake3.blake3(data).digest() == m.pieces[i].digest
        buf = bytearray(4 * MiB + 1)
        assert r.read_piece_into(0, memoryview(buf)) == m.pieces[0].length
    fi = m.file_index("model-1.safetensors")
    p = src / m.files[fi].path
    with open(p, "r+b") as fh:
        fh.write(b"changed")
    with SnapshotReader(src, m, verify=True) as r, pytest.raises(PieceNotAvailable):
        r.read_piece(m.file_piece_range(fi)[0])
    os.truncate(p, 10)
    with SnapshotReader(src, m) as r:
        assert not r.have & set(m.file_piece_range(fi))
        with pytest.raises(PieceNotAvailable):
            r.read_piece(m.file_piece_range(fi)[0])
    r.close()
    with pytest.raises(StoreError):
        r.read_piece(0)


# --- the whole-file check ----------------------------------------------------------------------


def _record_rereads(monkeypatch) -> list[tuple[int, int]]:
    """(file size, first byte re-read from disk) of every whole-file check."""
    seen: list[tuple[int, int]] = []
    for name in ("hash_fd", "hash_fd_direct"):
        real = getattr(hashing, name)

        def wrapped(fd, size, hasher=None, start=0, _real=real):
            seen.append((size, start))
            return _real(fd, size, hasher, start)

        monkeypatch.setattr(hashing, name, wrapped)
    return seen


@pytest.mark.parametrize("order", ["in-order", "reversed", "one-early"])
def test_whole_file_check_rereads_only_what_arrived_out_of_order(
    tmp_path: Path, small_model, monkeypatch, order: str
) -> None:
    src, m = small_model
    seen = _record_rereads(monkeypatch)
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    pieces = list(range(m.num_pieces))
    if order == "reversed":
        pieces.reverse()
    elif order == "one-early":  # each file's second piece first (as a random first pick)
        pieces = []
        for fi in range(len(m.files)):
            own = sorted(m.pieces_of([fi]))
            pieces += own[1:2] + own[:1] + own[2:]
    with store.open_download(m) as dl:
        fill(dl, reader, pieces)
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))
    multi = sorted(fe.size for fe in m.files if fe.num_pieces > 1)
    # Single-piece files are never re-read: their verified piece digest is the file digest.
    assert sorted(size for size, _ in seen) == multi
    for fe in m.files:
        if fe.num_pieces > 1:
            start = next(s for size, s in seen if size == fe.size)
            # In order: nothing is re-read at completion. One early: the early piece is read back
            # by the hash thread when its successor arrives (CATCH_UP_PIECES), not at completion.
            # Reversed: the first piece arrives last and is hashed from memory; every other
            # piece is read back.
            # (A two-piece file has no successor to trigger that: read at completion.)
            reread_from = fe.size
            if order == "reversed" or (order == "one-early" and fe.num_pieces == 2):
                reread_from = fe.piece_size
            assert start == reread_from


def test_threads_writing_in_random_order_publish_correct_files(tmp_path: Path, small_model) -> None:
    src, m = small_model
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    data = {i: reader.read_piece(i) for i in range(m.num_pieces)}
    work: queue.Queue[int] = queue.Queue()
    order = list(range(m.num_pieces))
    random.Random(5).shuffle(order)
    for i in order:
        work.put(i)
    with store.open_download(m) as dl:

        def worker() -> None:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                dl.write_piece(i, data[i])
                dl.write_piece(i, data[i])  # a duplicate changes nothing

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))


@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_manifest_whose_file_digest_disagrees_with_its_pieces_is_refused(
    tmp_path: Path, small_model, order: str
) -> None:
    """A (hostile) manifest can list a whole-file digest its pieces do not produce: every piece
    verifies, but the file must not be published under that digest."""
    import attrs

    src, m = small_model
    k = next(i for i, fe in enumerate(m.files) if fe.num_pieces > 1)
    files = list(m.files)
    files[k] = attrs.evolve(files[k], blake3="blake3:" + "ab" * 32)
    liar = attrs.evolve(m, files=tuple(files))
    store = Store(tmp_path / "cache")
    reader = SnapshotReader(src, m)
    pieces = sorted(liar.pieces_of([k]))
    if order == "reversed":
        pieces.reverse()
    with store.open_download(liar, [k]) as dl:
        with pytest.raises(StoreError, match="manifest is inconsistent"):
            fill(dl, reader, pieces)
        assert not final_blob(store, MODEL, liar.files[k]).exists()
        with pytest.raises(StoreError):
            dl.finalize()
    assert snapshot_entries(store, MODEL) == []


@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_direct_io_from_aligned_buffers_including_partial_last_pages(
    tmp_path: Path, small_model, order: str
) -> None:
    """The lane hands pieces over in page-aligned buffers: whole pages go to disk with O_DIRECT,
    a file's last partial page through the page cache (model-2 is 9 MiB + 1 byte: its last piece
    is 1 MiB of pages plus one byte). The result must be byte-identical either way."""
    import mmap

    src, m = small_model
    store = Store(tmp_path / "cache", direct_io=True)
    reader = SnapshotReader(src, m)
    buf = mmap.mmap(-1, max(p.length for p in m.pieces))
    pieces = list(range(m.num_pieces))
    if order == "reversed":
        pieces.reverse()
    with store.open_download(m) as dl:
        for i in pieces:
            n = reader.read_piece_into(i, memoryview(buf))
            assert dl.write_piece(i, memoryview(buf)[:n]) is True
        for i in range(m.num_pieces):
            assert dl.read_piece(i) == reader.read_piece(i)
        snap = dl.finalize()
    assert_snapshot_matches(snap, src, m, set(range(len(m.files))))
    buf.close()
