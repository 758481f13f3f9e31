"""Disk full during a fetch, on a small tmpfs made for the test (``mount -t tmpfs``; skipped when
that is not permitted): a clear error, nothing partial at a final path, and the same store
completes the fetch once there is room (keeping what it had)."""

from __future__ import annotations

import os
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from advkit import MODEL, FinalPathWatcher, assert_honest_alive, record, start_node

from swarm.sources import FetchError, FetchRequest
from swarm.store import DiskFull

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs (the model is ~35 MB)."""
    d = tmp_path / "small-fs"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def grow(fs: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)


def take_every_free_block(fs: Path, filler: Path) -> int:
    """Grow ``filler`` until the filesystem has no block left. One fallocate of statvfs's free
    count is not enough: tmpfs can refuse it (its accounting differs by a few pages) and then
    undoes the whole allocation, leaving the disk as empty as before."""
    taken = 0
    with open(filler, "wb") as f:
        chunk = max(os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize, 4096)
        while chunk >= 4096:
            try:
                os.posix_fallocate(f.fileno(), taken, chunk)
                taken += chunk
            except OSError:
                chunk //= 2
    return taken


def snapshot_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.glob("models--*/snapshots/*")]


def refs(cache: Path) -> list[Path]:
    return [p for p in cache.glob("models--*/refs/*")]


@pytest.mark.timeout(90)
async def test_disk_full_at_preallocation(tmp_path, adv_model, small_fs, error_log, monkeypatch):
    """The weights do not fit: the fetch fails at the first write that needs the space, with an
    error that says so; no snapshot, no ref, no unverified blob; after the filesystem grows, the
    same node and store complete the fetch."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the fallback chain must not try the Internet
    src, m, _pieces = adv_model
    cache = small_fs / "hub"
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        front = await start_node(
            stack, tmp_path, "front", bootstrap=tuple(seeder.host.addrs[:1]), cache_dir=cache
        )
        req = FetchRequest(MODEL, cache_dir=cache)
        with FinalPathWatcher(cache, [m]) as watch:
            with trio.fail_after(60), pytest.raises(FetchError) as ei:
                await front.fetch_with_fallback(req)
            msg = str(ei.value)
            assert "disk full" in msg and "No space left on device" in msg, msg
            assert not snapshot_dirs(cache) and not refs(cache)
            partial = sum(f.stat().st_size for f in cache.rglob("*.incomplete"))
            assert front.shared == {}
            # Room again: the same store finishes the job.
            grow(small_fs, "96m")
            with trio.fail_after(60):
                result = await front.fetch_with_fallback(req)
        watch.assert_clean()
        assert result.source == "swarm"
        (t,) = [sh.transfer for sh in front.shared.values()]
        assert not list(cache.rglob("*.incomplete"))
        assert_honest_alive([seeder, front])
        errors = [r.getMessage() for r in error_log if "transfer of" not in r.getMessage()]
        assert not errors, errors
        swarm_line = next(line for line in msg.splitlines() if "disk full" in line)
        record(
            "disk full: 24 MiB tmpfs, 35 MB model",
            error=swarm_line.strip()[:160],
            snapshot_or_ref_after_failure=0,
            incomplete_bytes_kept=partial,
            refetch_bytes_after_growing=t.bytes_down,
            model_bytes=m.total_size,
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            outcome="clear error; complete after the fs grew",
        )


@pytest.mark.timeout(90)
async def test_disk_fills_up_mid_transfer(tmp_path, adv_model, small_fs, error_log):
    """Another writer takes every free block once 60% of the model has arrived: whatever write
    needs space next (a new file's preallocation, the resume state, the snapshot links, the ref)
    fails with DiskFull; nothing partial appears; freeing the space lets the fetch complete."""
    grow(small_fs, "40m")  # the whole model fits, barely
    src, m, _pieces = adv_model
    cache = small_fs / "hub"
    filler = small_fs / "filler"
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        front = await start_node(
            stack, tmp_path, "front", bootstrap=tuple(seeder.host.addrs[:1]), cache_dir=cache
        )
        filled = []

        def on_event(ev: dict) -> None:
            if ev.get("event") == "progress" and not filled and ev["have"] > 0.6 * m.total_size:
                filled.append(take_every_free_block(small_fs, filler))

        req = FetchRequest(MODEL, cache_dir=cache)
        with FinalPathWatcher(cache, [m]) as watch:
            with trio.fail_after(60), pytest.raises(DiskFull) as ei:
                await front.fetch(req, on_event=on_event)
            assert filled, "the fetch finished before the disk filled up"
            # A snapshot directory appears only whole (one rename of a staged directory, every
            # link to a verified blob): it may exist if only the ref could not be written.
            for d in snapshot_dirs(cache):
                assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if not p.is_dir()) == sorted(
                    f.path for f in m.files
                ), d
            snap_after_failure = len(snapshot_dirs(cache))
            filler.unlink()
            with trio.fail_after(60):
                snap = await front.fetch(req)
        watch.assert_clean()
        assert snap.name == m.revision and refs(cache)
        assert_honest_alive([seeder, front])
        errors = [r.getMessage() for r in error_log if "transfer of" not in r.getMessage()]
        assert not errors, errors
        record(
            "disk full: filled by another writer at 60%",
            filler_bytes=filled[0],
            error=str(ei.value)[-90:],
            complete_snapshots_after_failure=snap_after_failure,
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            outcome="DiskFull; complete once space was freed",
        )
