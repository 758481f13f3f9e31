"""Cache management on a real Store in tmp dirs (swarm/cache_admin.py): rm, LRU eviction,
abandoned .incomplete files; and the --max-cache-size option."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from swarm import cache_admin
from swarm.config import ConfigError, parse_size, resolve_run
from swarm.manifest import Manifest, build_manifest
from swarm.store import SnapshotReader, Store, touch_access

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
OLD = time.time() - 10 * 86400  # ten days ago: outside every window


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def fetch_into(
    store: Store, src: Path, model: str, rev: str, *, ref: str | None = "main", age: float | None = OLD
) -> Manifest:
    """What a swarm fetch leaves: a finalized download (pieces read from ``src``); the snapshot's
    last access set to ``age`` (None: now)."""
    m = build_manifest(src, model, rev)
    with SnapshotReader(src, m) as reader, store.open_download(m) as dl:
        for i in sorted(dl.missing):
            dl.write_piece(i, reader.read_piece(i))
        dl.finalize(ref)
    if age is not None:
        set_access(store, model, rev, age)
    return m


def set_access(store: Store, model: str, rev: str, when: float) -> None:
    touch_access(store.snapshot_dir(model, rev))
    os.utime(store.access_path(model, rev), (when, when))


def blob(store: Store, m: Manifest, path: str) -> Path:
    return store.repo_dir(m.model) / "blobs" / m.files[m.file_index(path)].blake3.split(":", 1)[1]


def assert_links_resolve(store: Store, model: str) -> None:
    for rev in store.revisions(model):
        for dirpath, _dirs, files in os.walk(store.snapshot_dir(model, rev)):
            for name in files:
                assert os.path.isfile(os.path.join(dirpath, name)), (rev, name)


@pytest.fixture
def two_revisions(tmp_path: Path):
    """Revisions A and B of one model sharing config.json and shared.bin, each with own weights;
    refs/v1 -> A, refs/main -> B."""
    rng = random.Random(3)
    shared = {"config.json": b'{"x": 1}\n', "shared.bin": rng.randbytes(MiB + 7)}
    a_src = make_dir(tmp_path / "a", {**shared, "w.safetensors": rng.randbytes(2 * MiB)})
    b_src = make_dir(tmp_path / "b", {**shared, "w.safetensors": rng.randbytes(3 * MiB)})
    store = Store(tmp_path / "cache")
    a = fetch_into(store, a_src, "org/m", "a" * 40, ref="v1")
    b = fetch_into(store, b_src, "org/m", "b" * 40, ref="main")
    return store, a, b


def test_rm_keeps_shared_blobs_and_drops_refs_and_records(two_revisions) -> None:
    store, a, b = two_revisions
    only_a = blob(store, a, "w.safetensors")
    marker = store.repo_dir("org/m") / ".swarm" / "verified" / only_a.name
    assert marker.exists() and store.snapshot_owner("org/m", a.revision) is not None

    done = cache_admin.remove(store, "org/m", a.revision)

    assert done == [cache_admin.Removal("org/m", a.revision, 2 * MiB)]
    assert store.revisions("org/m") == [b.revision]
    assert not only_a.exists() and not marker.exists()
    assert blob(store, a, "shared.bin").exists() and blob(store, a, "config.json").exists()
    assert store.refs_to("org/m", a.revision) == [] and store.read_ref("org/m", "v1") is None
    assert store.read_ref("org/m", "main") == b.revision
    assert not (store.repo_dir("org/m") / ".swarm" / "snapshots" / a.revision).exists()
    assert_links_resolve(store, "org/m")
    assert store.find_complete("org/m", b.revision, verify=True) is not None
    assert not list((store.repo_dir("org/m") / ".swarm" / "tmp").iterdir())  # trash emptied


def test_rm_of_the_last_revision_frees_every_blob(two_revisions) -> None:
    store, a, b = two_revisions
    before = cache_admin.cache_bytes(store)
    done = cache_admin.remove(store, "org/m")  # every revision
    assert {r.revision for r in done} == {a.revision, b.revision}
    assert sum(r.bytes for r in done) == before
    assert cache_admin.cache_bytes(store) == 0
    assert store.revisions("org/m") == [] and store.read_ref("org/m") is None


def test_rm_refuses_a_snapshot_in_use_unless_forced(two_revisions) -> None:
    store, a, _b = two_revisions
    touch_access(store.snapshot_dir("org/m", a.revision))  # just handed to a caller
    with pytest.raises(cache_admin.Refused, match="handed to a caller"):
        cache_admin.remove(store, "org/m", a.revision)
    assert a.revision in store.revisions("org/m")
    assert cache_admin.remove(store, "org/m", a.revision, force=True)[0].revision == a.revision
    assert a.revision not in store.revisions("org/m")


def test_rm_refuses_while_a_download_of_the_repo_runs_even_forced(two_revisions, tmp_path) -> None:
    store, a, _b = two_revisions
    c_src = make_dir(tmp_path / "c", {"w.safetensors": random.Random(9).randbytes(MiB)})
    c = build_manifest(c_src, "org/m", "c" * 40)
    dl = store.open_download(c)
    try:
        with pytest.raises(cache_admin.Refused, match="download of it is in progress"):
            cache_admin.remove(store, "org/m", a.revision, force=True)
        assert a.revision in store.revisions("org/m")
        assert cache_admin.evict(store, 0) == []  # eviction skips the repo too
    finally:
        dl.close()
    assert cache_admin.remove(store, "org/m", a.revision, force=True)


def test_a_download_waits_for_a_removal_in_progress(two_revisions, tmp_path) -> None:
    store, _a, _b = two_revisions
    c_src = make_dir(tmp_path / "c", {"w.safetensors": random.Random(9).randbytes(MiB)})
    c = build_manifest(c_src, "org/m", "c" * 40)
    opened = threading.Event()

    def open_it() -> None:
        store.open_download(c).close()
        opened.set()

    with store.repo_exclusive("org/m"):
        t = threading.Thread(target=open_it, daemon=True)
        t.start()
        assert not opened.wait(0.3)  # blocked on the repo lock
    assert opened.wait(30)


def test_rm_of_what_is_not_cached(two_revisions) -> None:
    store, _a, _b = two_revisions
    with pytest.raises(cache_admin.NotCached):
        cache_admin.remove(store, "org/m", "f" * 40)
    with pytest.raises(cache_admin.NotCached):
        cache_admin.remove(store, "org/absent")


def test_parse_target() -> None:
    assert cache_admin.parse_target("org/m") == ("org/m", None)
    assert cache_admin.parse_target("org/m@" + "a" * 40) == ("org/m", "a" * 40)
    for bad in ("org/m@", "../x", "org/m@../../etc", "a/b/c", ""):
        with pytest.raises(ValueError):
            cache_admin.parse_target(bad)


@pytest.fixture
def three_models(tmp_path: Path):
    """x, y, z (1, 2, 3 MiB) fetched through swarm, last used 30, 20 and 10 days ago."""
    store = Store(tmp_path / "cache")
    out = {}
    for k, name in enumerate(("x", "y", "z")):
        src = make_dir(tmp_path / name, {"w.bin": random.Random(k).randbytes((k + 1) * MiB)})
        out[name] = fetch_into(
            store, src, f"org/{name}", "%040x" % (k + 1), age=time.time() - (30 - 10 * k) * 86400
        )
    return store, out


def test_evict_takes_least_recently_used_first(three_models) -> None:
    store, ms = three_models
    total = cache_admin.cache_bytes(store)
    assert total == 6 * MiB
    done = cache_admin.evict(store, 5 * MiB)
    assert [r.model for r in done] == ["org/x"]
    assert cache_admin.cache_bytes(store) == 5 * MiB
    done = cache_admin.evict(store, 3 * MiB)
    assert [r.model for r in done] == ["org/y"]
    assert store.revisions("org/z") == [ms["z"].revision]


def test_evict_never_takes_served_in_use_or_hub_snapshots(three_models, tmp_path) -> None:
    store, ms = three_models
    set_access(store, "org/y", ms["y"].revision, time.time())  # handed out just now
    # A snapshot the Hub client made (no swarm ownership record), the oldest of all.
    hub = store.repo_dir("org/hub")
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "e").write_bytes(b"h" * MiB)
    (hub / "snapshots" / ("9" * 40)).mkdir(parents=True)
    os.symlink("../../blobs/e", hub / "snapshots" / ("9" * 40) / "w.bin")
    os.utime(hub / "snapshots" / ("9" * 40), (OLD - 86400 * 100,) * 2, follow_symlinks=False)

    done = cache_admin.evict(store, 0, served=frozenset({("org/x", ms["x"].revision)}))

    assert [r.model for r in done] == ["org/z"]  # x served, y in use, the Hub's left alone
    assert store.revisions("org/hub") == ["9" * 40]
    rows = {
        (r["model"]): r
        for r in cache_admin.report(store, served=frozenset({("org/x", ms["x"].revision)}))["snapshots"]
    }
    assert rows["org/x"]["served"] and not rows["org/x"]["evictable"]
    assert rows["org/y"]["in_use"] and not rows["org/y"]["evictable"]
    assert not rows["org/hub"]["fetched"] and not rows["org/hub"]["evictable"]


def test_report_sizes(two_revisions) -> None:
    store, a, b = two_revisions
    rows = {r["revision"]: r for r in cache_admin.report(store)["snapshots"]}
    shared = MiB + 7 + len(b'{"x": 1}\n')
    assert rows[a.revision]["bytes"] == 2 * MiB + shared
    assert rows[a.revision]["unique_bytes"] == 2 * MiB
    assert rows[b.revision]["unique_bytes"] == 3 * MiB
    assert rows[a.revision]["refs"] == ["v1"] and rows[b.revision]["refs"] == ["main"]
    assert rows[a.revision]["fetched"] and rows[a.revision]["evictable"]


def _partial(store: Store, src: Path, model: str, rev: str) -> tuple[Manifest, Path]:
    """A download that stopped half way: an .incomplete with resume state, no lock held."""
    m = build_manifest(src, model, rev)
    with SnapshotReader(src, m) as reader, store.open_download(m) as dl:
        for i in sorted(dl.missing)[:2]:
            dl.write_piece(i, reader.read_piece(i))
    part = blob(store, m, "w.bin").with_suffix(".incomplete")
    return m, part


def test_abandoned_incomplete_collected_locked_and_foreign_kept(tmp_path) -> None:
    store = Store(tmp_path / "cache")
    rng = random.Random(5)
    src1 = make_dir(tmp_path / "s1", {"w.bin": rng.randbytes(9 * MiB)})
    src2 = make_dir(tmp_path / "s2", {"w.bin": rng.randbytes(9 * MiB)})
    _m1, part1 = _partial(store, src1, "org/one", "1" * 40)
    m2, part2 = _partial(store, src2, "org/two", "2" * 40)
    state1 = store.repo_dir("org/one") / ".swarm" / "partial" / f"{part1.stem}.pieces"
    assert part1.exists() and state1.exists() and part2.exists()
    foreign = store.repo_dir("org/one") / "blobs" / ("ab" * 32 + ".incomplete")  # the Hub's
    foreign.write_bytes(b"x")
    assert cache_admin.collect_incomplete(store) == []  # fresh: resume state, not garbage
    for p in (part1, state1, part2, foreign):
        os.utime(p, (OLD, OLD))
    dl2 = store.open_download(m2)  # a download of org/two is running again
    try:
        got = cache_admin.collect_incomplete(store)
        assert got == [(part1, 9 * MiB)]
        assert not part1.exists() and not state1.exists()
        assert part2.exists() and foreign.exists()
    finally:
        dl2.close()
    assert cache_admin.collect_incomplete(store, max_age=0) == [(part2, 9 * MiB)]
    assert foreign.exists()
    # A later download of the collected one starts from scratch and still completes.
    fetch_into(store, src1, "org/one", "1" * 40)
    assert store.find_complete("org/one", "1" * 40, verify=True) is not None


def test_max_cache_size_option(tmp_path) -> None:
    assert parse_size("500G") == 500 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("2kib") == 2048 and parse_size("10") == 10 and parse_size(10) == 10
    for unbounded in ("0", "none", 0, None, ""):
        assert parse_size(unbounded) is None
    for bad in ("5X", "-1", "1.5.5", True, "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    s = resolve_run(env={"SWARM_MAX_CACHE_SIZE": "1.5TiB", "HF_HUB_CACHE": str(tmp_path)})
    assert s.max_cache_size == int(1.5 * 2**40)
    assert resolve_run(env={}, max_cache_size="20M").max_cache_size == 20 * 10**6
    cfg = tmp_path / "swarm.toml"
    cfg.write_text('max_cache_size = "3GiB"\n')
    assert resolve_run(config=cfg, env={}).max_cache_size == 3 * 2**30
    cfg.write_text("max_cache_size = 1000\n")
    assert resolve_run(config=cfg, env={}).max_cache_size == 1000
    with pytest.raises(ConfigError, match="SWARM_MAX_CACHE_SIZE"):
        resolve_run(env={"SWARM_MAX_CACHE_SIZE": "lots"})


def test_unlinked_blobs_of_an_abandoned_download_collected_linked_ones_never(two_revisions, tmp_path) -> None:
    store, a, b = two_revisions
    rng = random.Random(11)
    src = make_dir(tmp_path / "d", {"done.bin": rng.randbytes(MiB), "rest.bin": rng.randbytes(MiB)})
    d = build_manifest(src, "org/m", "d" * 40)
    with SnapshotReader(src, d) as reader, store.open_download(d) as dl:  # given up, not finalized
        for i in d.file_piece_range(d.file_index("done.bin")):
            dl.write_piece(i, reader.read_piece(i))
    done = blob(store, d, "done.bin")
    assert done.exists()
    assert cache_admin.collect_orphans(store) == []  # fresh: the next fetch resumes from it
    assert cache_admin.collect_orphans(store, max_age=0) == [(done, MiB)]
    assert not done.exists()
    assert not (store.repo_dir("org/m") / ".swarm" / "verified" / done.name).exists()
    assert store.revisions("org/m") == [a.revision, b.revision]
    assert_links_resolve(store, "org/m")
    for m in (a, b):
        assert store.find_complete("org/m", m.revision, verify=True) is not None


CRASH_IN_REMOVAL = """
import os, signal, sys
from swarm import store as store_mod
real_unlink = os.unlink
def unlink(path, *a, **kw):  # the process dies as it deletes the first blob
    if "/blobs/" in os.fspath(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, *a, **kw)
os.unlink = unlink
store = store_mod.Store(sys.argv[1])
with store.repo_exclusive("org/m"):
    store.remove_snapshot("org/m", sys.argv[2])
"""


def test_a_crash_during_removal_leaves_no_dangling_link(two_revisions) -> None:
    import signal
    import subprocess
    import sys

    store, a, b = two_revisions
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        [sys.executable, "-c", CRASH_IN_REMOVAL, str(store.cache_dir), a.revision],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    only_a = blob(store, a, "w.safetensors")
    assert only_a.exists()  # the crash came before the blob went ...
    assert store.revisions("org/m") == [b.revision]  # ... and after the snapshot left
    assert store.read_ref("org/m", "v1") is None
    assert_links_resolve(store, "org/m")
    assert store.find_complete("org/m", b.revision, verify=True) is not None
    # The blob left behind is collected once abandoned.
    assert cache_admin.collect_orphans(store, max_age=0) == [(only_a, 2 * MiB)]
    assert_links_resolve(store, "org/m")
