"""Faults with real processes (``swarm-node run`` subprocesses, tests/procs.py): seeders SIGKILLed
mid-transfer; the fetcher SIGKILLed mid-transfer and restarted (how much it fetches again); 16
frontends on one worker (the worker's file descriptors and memory afterwards)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import blake3
import pytest
import trio
from advkit import (
    MODEL,
    FinalPathWatcher,
    HostilePeer,
    assert_honest_alive,
    record,
    start_node,
    wait_until,
)
from modelgen import carried_files, make_model_dir
from procs import NodeProc, base_env, same_files

from swarm import client
from swarm.manifest import Manifest
from swarm.sources import FetchError, FetchRequest, VerificationFailed
from swarm.store.resume import decode_state

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """96 MiB of weights in 2 shards: 24 pieces of 4 MiB, plus the config set."""
    return make_model_dir(
        tmp_path_factory.mktemp("big-src"), weights_bytes=96 << 20, n_weight_files=2, seed=21
    )


def model_status(home: Path) -> dict:
    st = client.status(home)
    (m,) = [m for m in st["models"] if m["model"] == MODEL]
    return m


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors of ``pid`` by kind: sockets, regular files, other (pipes, epoll...)."""
    out = {"sockets": 0, "files": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out[
            "sockets" if target.startswith("socket:") else "files" if target.startswith("/") else "other"
        ] += 1
    return out


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) << 10
    return out


def stop_all(nodes) -> None:
    for n in nodes:
        if n is not None:
            n.stop()


# --------------------------------------------------------------------------- seeders killed


@pytest.mark.timeout(150)
def test_sigkill_two_of_three_seeders_mid_transfer(tmp_path, big_model):
    env = base_env(tmp_path)
    seeders = [NodeProc(tmp_path, f"s{i}", "--serve", f"{MODEL}={big_model}", env=env) for i in range(3)]
    front = None
    try:
        seeders[0].start().wait_ready()
        for s in seeders[1:]:
            s.cmd += ["--bootstrap", seeders[0].addr]
            s.start()
        for s in seeders[1:]:
            s.wait_ready()
        front = NodeProc(tmp_path, "front", "--bootstrap", seeders[0].addr, env=env).start()
        front.wait_ready()
        size = sum((big_model / f).stat().st_size for f in carried_files(2))
        killed_at: list[int] = []

        def on_event(ev: dict) -> None:
            if ev.get("event") == "progress" and not killed_at and ev["have"] > 0.3 * size:
                killed_at.append(ev["have"])
                for s in seeders[:2]:  # the bootstrap node among them
                    os.kill(s.popen.pid, signal.SIGKILL)

        t0 = time.monotonic()
        with FinalPathWatcher(front.cache) as watch:
            path = client.fetch(MODEL, home=front.home, timeout=120, progress=False, on_event=on_event)
        elapsed = time.monotonic() - t0
        watch.assert_clean()
        assert killed_at, "the transfer finished before the kill"
        for s in seeders[:2]:
            assert s.popen.wait(5) == -signal.SIGKILL
        same_files(big_model, path, carried_files(2))
        m = model_status(front.home)
        assert m["complete"]
        assert seeders[2].popen.poll() is None
        assert model_status(seeders[2].home)["complete"]
        record(
            "processes: SIGKILL 2 of 3 seeders at 30%",
            seeders_killed=2,
            killed_at_fraction=round(killed_at[0] / size, 2),
            fetch_s=round(elapsed, 1),
            bytes_down=m["bytes_down"],
            model_bytes=size,
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            bytes_lost=0,
            outcome="complete",
        )
    finally:
        stop_all([front, *seeders])


@pytest.mark.timeout(120)
async def test_sigkill_of_the_only_seeder_fails_clearly_then_resumes(tmp_path, big_model, error_log):
    """The only seeder dies at 30%: the fetch fails with a clear error once no peer can send
    anything (stall_timeout 3 s here, 60 s by default); nothing reaches a final path that should
    not; the seeder restarted, the same node fetches the rest (resume state kept)."""
    env = base_env(tmp_path)
    seeder = NodeProc(tmp_path, "seeder", "--serve", f"{MODEL}={big_model}", env=env)
    try:
        await trio.to_thread.run_sync(lambda: seeder.start().wait_ready())
        size = sum((big_model / f).stat().st_size for f in carried_files(2))
        async with AsyncExitStack() as stack:
            front = await start_node(stack, tmp_path, "front", bootstrap=(seeder.addr,), stall_timeout=3.0)
            killed_at: list[int] = []

            def on_event(ev: dict) -> None:
                if ev.get("event") == "progress" and not killed_at and ev["have"] > 0.3 * size:
                    killed_at.append(ev["have"])
                    os.kill(seeder.popen.pid, signal.SIGKILL)

            t0 = trio.current_time()
            with FinalPathWatcher(front.config.cache_dir) as watch:
                with trio.fail_after(60), pytest.raises(FetchError) as ei:
                    await front.fetch(
                        FetchRequest(MODEL, cache_dir=front.config.cache_dir), on_event=on_event
                    )
                failed_after = trio.current_time() - t0
                assert killed_at, "the transfer finished before the kill"
                assert not isinstance(ei.value, VerificationFailed)
                assert "gone" in str(ei.value) or "stopped answering" in str(ei.value), ei.value
                assert not list(Path(front.config.cache_dir).rglob("snapshots/*"))
                # the seeder comes back: the same node resumes and completes
                seeder.popen = None
                await trio.to_thread.run_sync(lambda: seeder.start().wait_ready())
                await front.host.connect(seeder.addr)  # it listens on a new port
                with trio.fail_after(60):
                    snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
            watch.assert_clean()
            same_files(big_model, snap, carried_files(2))
            (t,) = [sh.transfer for sh in front.shared.values()]
            refetched = t.bytes_down
            # a clean failure flushes the resume state: nothing verified is fetched twice
            assert refetched <= size - killed_at[0], (refetched, size, killed_at)
            assert_honest_alive([front])
            assert not error_log, [r.getMessage() for r in error_log]
        record(
            "processes: SIGKILL of the only seeder at 30%, then it restarts",
            killed_at_fraction=round(killed_at[0] / size, 2),
            fails_after_s=round(failed_after, 1),
            error=str(ei.value)[:120],
            bytes_fetched_after_restart=refetched,
            model_bytes=size,
            bad_files_at_final_path=len(watch.violations),
            outcome="FetchError, then resumed and complete",
        )
    finally:
        seeder.stop()


# --------------------------------------------------------------------------- fetcher killed


def persisted_bytes(cache: Path, m: Manifest) -> tuple[int, int]:
    """(bytes of complete blobs, bytes of pieces marked in resume state files) on disk."""
    complete, marked, _verified = disk_pieces(cache, m, verify=False)
    return complete, sum(marked.values())


def disk_pieces(
    cache: Path, m: Manifest, verify: bool = True
) -> tuple[int, dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """What a killed fetcher left on disk, judged by the test itself (not by the store):
    (bytes of complete blobs, {(blob hex, piece k): bytes} marked in resume state files,
    {(blob hex, piece k): bytes} of ``*.incomplete`` pieces whose blake3 matches the manifest)."""
    repo = next(Path(cache).glob("models--*"))
    by_hex = {f.digest.hex(): f for f in m.files}
    complete = sum(by_hex[b.name].size for b in (repo / "blobs").glob("*") if b.name in by_hex)
    marked: dict[tuple[str, int], int] = {}
    for state in (repo / ".swarm" / "partial").glob("*.pieces"):
        decoded = decode_state(state.read_bytes())
        if decoded is None:
            continue
        header, bits = decoded
        fe = by_hex[header["blob"]]
        for k in range(fe.num_pieces):
            if bits[k >> 3] & (1 << (k & 7)):
                marked[(fe.digest.hex(), k)] = fe.piece_span(k)[1]
    verified: dict[tuple[str, int], int] = {}
    if verify:
        pieces = {
            (fe.digest.hex(), k): m.pieces[i]
            for fi, fe in enumerate(m.files)
            for k, i in enumerate(m.file_piece_range(fi))
        }
        for part in (repo / "blobs").glob("*.incomplete"):
            hex_ = part.name.removesuffix(".incomplete")
            with open(part, "rb") as fh:
                for k in range(by_hex[hex_].num_pieces):
                    p = pieces[(hex_, k)]
                    fh.seek(p.offset)
                    if blake3.blake3(fh.read(p.length)).digest() == p.digest:
                        verified[(hex_, k)] = p.length
    return complete, marked, verified


_RECOVERED = re.compile(r"recovered (\d+) of (\d+) unrecorded pieces from disk")


@pytest.mark.timeout(150)
async def test_sigkill_of_the_fetcher_then_restart(tmp_path, adv_model, error_log):
    """A fetcher process is SIGKILLed past 60% of a download from a seeder that sends 8 MiB/s (an
    in-process peer with honest bytes, slowed so the store's 2 s resume-state flush happens during
    the transfer), at a moment when it holds verified pieces its resume state does not record yet.
    Restarted on the same home and cache, it re-hashes what is on disk and fetches exactly the
    pieces that were not written whole at the kill: the pieces in flight (and those never asked
    for). Nothing verified is lost or fetched twice; what was on the wire at the kill is at most
    the piece being sent plus one received but not yet written."""
    src, m, pieces = adv_model
    size = m.total_size
    piece_size = max(p.length for p in m.pieces)
    env = base_env(tmp_path)
    async with AsyncExitStack() as stack:
        seeder = HostilePeer(
            tmp_path, "slow-seeder", manifest=m, pieces=pieces, pieces_mode="slow", slow_rate=8 * MiB
        )
        await stack.enter_async_context(seeder.running())
        front = NodeProc(tmp_path, "front", "--bootstrap", seeder.host.addrs[0], env=env)
        try:
            await trio.to_thread.run_sync(lambda: front.start().wait_ready())
            events: list[int] = []  # "have" of each progress event
            killed: list[str] = []

            def on_event(ev: dict) -> None:
                if ev.get("event") != "progress" or killed:
                    return
                have = ev["have"]
                events.append(have)
                if have <= 0.6 * size:
                    return
                # Kill while some verified piece is not in the resume state yet (the case the
                # restart must not refetch), or, failing that, past 85%.
                recorded = sum(persisted_bytes(front.cache, m))
                if have > recorded or have > 0.85 * size:
                    killed.append("unrecorded pieces" if have > recorded else "85%")
                    os.kill(front.popen.pid, signal.SIGKILL)

            def first_fetch() -> BaseException | None:
                try:
                    client.fetch(MODEL, home=front.home, timeout=60, progress=False, on_event=on_event)
                except BaseException as e:
                    return e
                return None

            with FinalPathWatcher(front.cache, [m]) as watch:
                err = await trio.to_thread.run_sync(first_fetch)
                assert killed, f"the fetch ended before the kill: {err!r}"
                have_at_kill = events[-1]
                await trio.to_thread.run_sync(front.popen.wait)
                served_before = seeder.stats["slow_bytes"]
                complete, marked, verified = await trio.to_thread.run_sync(
                    lambda: disk_pieces(front.cache, m)
                )
                assert set(marked) <= set(verified), "the resume state claims a bad piece"
                on_disk = complete + sum(verified.values())
                recorded = complete + sum(marked.values())
                unrecorded = {k: n for k, n in verified.items() if k not in marked}
                log_before = front.log.read_text(errors="replace")
                front.popen = None
                await trio.to_thread.run_sync(lambda: front.start().wait_ready())
                path = await trio.to_thread.run_sync(
                    lambda: client.fetch(MODEL, home=front.home, timeout=60, progress=False)
                )
                after = await trio.to_thread.run_sync(lambda: model_status(front.home))
            watch.assert_clean()
            same_files(src, path, [f.path for f in m.files])
            refetched = after["bytes_down"]
            restart_log = front.log.read_text(errors="replace")[len(log_before) :]
            recovered = sum(int(n) for n, _ in _RECOVERED.findall(restart_log))
            in_flight = served_before - on_disk  # sent by the seeder, not on disk at the kill
            # Nothing verified is lost: every piece reported written before the kill is on disk.
            assert on_disk >= have_at_kill, (on_disk, have_at_kill)
            # The restart re-hashed and kept every verified piece the resume state missed ...
            assert recovered == len(unrecorded), (recovered, unrecorded, restart_log[-2000:])
            # ... and fetches exactly what was not on disk whole: nothing verified twice.
            assert refetched == size - on_disk, (refetched, size, on_disk, recorded)
            # What was sent before the kill and fetched again: the pieces in flight at the kill.
            assert 0 <= in_flight <= 2 * piece_size, (in_flight, served_before, on_disk)
            assert not error_log, [r.getMessage() for r in error_log]
            record(
                "processes: SIGKILL of the fetcher, restart",
                model_bytes=size,
                killed_when=killed[0],
                have_at_kill=have_at_kill,
                seeder_bytes_before_kill=served_before,
                verified_on_disk=on_disk,
                complete_blobs=complete,
                resume_state_bytes=recorded - complete,
                recovered_pieces=recovered,
                recovered_bytes=sum(unrecorded.values()),
                in_flight_bytes=in_flight,
                refetched_after_restart=refetched,
                fetched_twice=served_before + refetched - size,
                lost_bytes=0,
                bad_files_at_final_path=len(watch.violations),
                outcome="complete; refetch == model - verified on disk",
            )
        finally:
            front.stop()


# --------------------------------------------------------------------------- 16 frontends


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from swarm.manifest import build_manifest

    src = make_model_dir(
        tmp_path_factory.mktemp("small-src"), weights_bytes=8 << 20, n_weight_files=2, seed=5
    )
    return src, build_manifest(src, MODEL, "local")


@pytest.mark.timeout(150)
def test_sixteen_frontends_on_one_worker(tmp_path, small_model):
    """A worker process serves 16 frontend processes fetching at once (each through its control
    socket). After they finish and stop, the worker holds no more sockets than before (within a
    small constant; the only new descriptors are the served snapshot's files, opened once each and
    kept) and its memory stayed bounded."""
    src, m = small_model
    env = base_env(tmp_path)
    worker = NodeProc(tmp_path, "worker", "--serve", f"{MODEL}={src}", env=env)
    fronts: list[NodeProc] = []
    try:
        worker.start().wait_ready()
        pid = worker.popen.pid
        time.sleep(0.5)
        fds_before = proc_fds(pid)
        kinds_before = proc_fd_kinds(pid)
        mem_before = proc_mem(pid)
        fronts = [NodeProc(tmp_path, f"f{k}", "--bootstrap", worker.addr, env=env) for k in range(16)]
        for f in fronts:
            f.start()
        wid = worker.status["peer_id"]
        for f in fronts:  # up, and connected to the worker (not just answering on the socket)
            f.wait_ready(60)
            assert wait_until(lambda f=f: wid in (client.status(f.home).get("peers") or ()), 60)
        paths: dict[str, Path] = {}
        errors: list[BaseException] = []
        peak = [fds_before]
        done = threading.Event()

        def fetch(f: NodeProc) -> None:
            try:
                paths[f.name] = client.fetch(MODEL, home=f.home, timeout=90, progress=False)
            except BaseException as e:
                errors.append(e)

        def watch_fds() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc_fds(pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_fds, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=fetch, args=(f,)) for f in fronts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        elapsed = time.monotonic() - t0
        done.set()
        assert not errors, errors[0]
        assert len(paths) == 16
        for p in paths.values():
            same_files(src, p, [f.path for f in m.files])
        st = model_status(worker.home)
        for f in fronts:
            f.stop()
        # frontends stopped: their connections and links to the worker are gone
        n_files = len(m.files)
        wait_until(lambda: proc_fd_kinds(pid)["sockets"] <= kinds_before["sockets"] + 2, 20)
        kinds_after = proc_fd_kinds(pid)
        fds_after = proc_fds(pid)
        mem_after = proc_mem(pid)
        assert worker.popen.poll() is None
        record(
            "processes: 16 frontend processes on 1 worker",
            frontends=16,
            fetch_all_s=round(elapsed, 1),
            worker_upload_x_model=round(st["bytes_up"] / m.total_size, 2),
            worker_fds_before=fds_before,
            worker_fds_peak=peak[0],
            worker_fds_after=fds_after,
            worker_fd_kinds_before=kinds_before,
            worker_fd_kinds_after=kinds_after,
            snapshot_files=n_files,
            worker_rss_before_mib=mem_before["VmRSS"] >> 20,
            worker_rss_after_mib=mem_after["VmRSS"] >> 20,
            worker_hwm_mib=mem_after["VmHWM"] >> 20,
            outcome="complete",
        )
        assert kinds_after["sockets"] <= kinds_before["sockets"] + 2, (kinds_before, kinds_after)
        assert kinds_after["files"] <= kinds_before["files"] + n_files, (kinds_before, kinds_after)
        assert kinds_after["other"] <= kinds_before["other"] + 2, (kinds_before, kinds_after)
        assert mem_after["VmHWM"] < mem_before["VmRSS"] + 400 * MiB, (mem_before, mem_after)
    finally:
        stop_all([*fronts, worker])
