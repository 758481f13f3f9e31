"""The swarm core with every node in its own OS process, on 127.0.0.1: many frontends trading,
many workers at once, a worker killed mid-transfer, a worker sending corrupted pieces."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from modelgen import carried_files, make_model_dir
from procs import NodeProc, base_env, same_files

from swarm import client

MODEL = "acme/swarm-core"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("swarm")


@pytest.fixture(scope="module")
def model_dir(tmp) -> Path:
    # 96 MiB of weights in 2 shards: 24 pieces of 4 MiB to trade, plus the config set.
    return make_model_dir(tmp / "src", weights_bytes=96 << 20, n_weight_files=2, seed=11)


def model_bytes(model_dir: Path) -> int:
    return sum((model_dir / f).stat().st_size for f in carried_files(2))


def fetch_all(nodes: list[NodeProc], timeout: float = 90.0, **kw) -> dict[str, Path]:
    """Fetch MODEL through every node at once (each via its own control socket)."""
    out: dict[str, Path] = {}
    errors: list[BaseException] = []

    def one(n: NodeProc) -> None:
        try:
            out[n.name] = client.fetch(MODEL, home=n.home, timeout=timeout, progress=False, **kw)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    if errors:
        raise errors[0]
    return out


def model_stats(node: NodeProc) -> dict:
    st = client.status(node.home)
    (m,) = [m for m in st["models"] if m["model"] == MODEL]
    return m


def start_all(nodes: list[NodeProc]) -> None:
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()


@pytest.mark.timeout(180)
def test_one_worker_four_frontends_trade(tmp, model_dir):
    env = base_env(tmp)
    worker = NodeProc(tmp / "t1", "worker", "--serve", f"{MODEL}={model_dir}", env=env)
    fronts: list[NodeProc] = []
    try:
        start_all([worker])
        fronts = [NodeProc(tmp / "t1", f"front{i}", "--bootstrap", worker.addr, env=env) for i in range(4)]
        start_all(fronts)
        paths = fetch_all(fronts)
        names = carried_files(2)
        for p in paths.values():
            same_files(model_dir, p, names)
        size = model_bytes(model_dir)
        up = model_stats(worker)["bytes_up"]
        front_up = [model_stats(f)["bytes_up"] for f in fronts]
        print(
            f"worker uploaded {up / size:.2f}x the model; frontends uploaded "
            f"{[round(u / size, 2) for u in front_up]}x"
        )
        assert up < 3.0 * size, f"worker uploaded {up / size:.2f}x the model size"
        assert sum(front_up) > 0.5 * size
    finally:
        for n in [*fronts, worker]:
            n.stop()


@pytest.mark.timeout(180)
def test_frontend_fetches_from_three_workers_at_once(tmp, model_dir):
    env = base_env(tmp)
    workers = [NodeProc(tmp / "t2", f"w{i}", "--serve", f"{MODEL}={model_dir}", env=env) for i in range(3)]
    front = None
    try:
        start_all(workers[:1])
        for w in workers[1:]:
            w.cmd += ["--bootstrap", workers[0].addr]
        start_all(workers[1:])
        front = NodeProc(tmp / "t2", "front", "--bootstrap", workers[0].addr, env=env)
        start_all([front])
        paths = fetch_all([front])
        same_files(model_dir, paths["front"], carried_files(2))
        ups = [model_stats(w)["bytes_up"] for w in workers]
        print("bytes sent by each worker:", ups)
        assert all(u > 0 for u in ups), ups
        assert sum(ups) >= model_bytes(model_dir)
    finally:
        for n in [front, *workers]:
            if n is not None:
                n.stop()


@pytest.mark.timeout(180)
def test_worker_killed_mid_transfer(tmp, model_dir):
    env = base_env(tmp)
    a = NodeProc(tmp / "t3", "a", "--serve", f"{MODEL}={model_dir}", env=env)
    b = NodeProc(tmp / "t3", "b", "--serve", f"{MODEL}={model_dir}", env=env)
    front = None
    try:
        start_all([a])
        b.cmd += ["--bootstrap", a.addr]
        start_all([b])
        front = NodeProc(tmp / "t3", "front", "--bootstrap", a.addr, env=env)
        start_all([front])
        size = model_bytes(model_dir)
        killed = threading.Event()

        def on_event(ev: dict) -> None:
            if ev.get("event") == "progress" and not killed.is_set() and ev.get("have", 0) > size // 4:
                killed.set()
                os.kill(a.popen.pid, signal.SIGKILL)

        path = client.fetch(MODEL, home=front.home, timeout=120, progress=False, on_event=on_event)
        assert killed.is_set(), "the transfer finished before the kill"
        assert a.popen.wait(5) == -signal.SIGKILL
        same_files(model_dir, path, carried_files(2))
    finally:
        for n in [front, a, b]:
            if n is not None:
                n.stop()


@pytest.mark.timeout(180)
def test_rotten_worker_sends_no_bad_bytes_and_fetch_completes(tmp, model_dir):
    """A worker whose files rotted on disk after it built its manifest. It used to send the bad
    bytes (and get banned); since security issue #18 (finding 7) it checks every piece against its
    manifest before sending, refuses the rotten ones, and the fetch completes from the honest one."""
    env = base_env(tmp)
    liar_dir = tmp / "t4" / "liar-src"
    shutil.copytree(model_dir, liar_dir)
    honest = NodeProc(tmp / "t4", "honest", "--serve", f"{MODEL}={model_dir}", env=env)
    liar = NodeProc(tmp / "t4", "liar", "--serve", f"{MODEL}={liar_dir}", env=env)
    front = None
    try:
        start_all([honest])
        liar.cmd += ["--bootstrap", honest.addr]
        start_all([liar])
        # Same content, so the liar announces the same manifest; now rot its bytes in place
        # (same size and mtime, so it keeps serving the manifest it built).
        for shard in sorted(liar_dir.glob("*.safetensors")):
            st = shard.stat()
            with open(shard, "r+b") as f:
                for off in range(0, st.st_size, 1 << 20):
                    f.seek(off)
                    b = f.read(1)
                    f.seek(off)
                    f.write(bytes([b[0] ^ 0xFF]))
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        front = NodeProc(tmp / "t4", "front", "--bootstrap", honest.addr, env=env)
        start_all([front])
        t0 = time.monotonic()
        path = client.fetch(MODEL, home=front.home, timeout=120, progress=False)
        same_files(model_dir, path, carried_files(2))
        m = model_stats(front)
        liar_id = client.status(liar.home)["peer_id"]
        print(f"fetched in {time.monotonic() - t0:.1f} s; banned: {m['banned']}")
        (stats,) = [x["peer_stats"] for x in client.models(front.home) if x["model"] == MODEL]
        assert stats.get(liar_id, {}).get("bad_pieces", 0) == 0, stats.get(liar_id)
        assert liar_id not in m["banned"]
    finally:
        for n in [front, honest, liar]:
            if n is not None:
                n.stop()
