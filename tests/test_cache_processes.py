"""Cache management against real ``swarm-node`` processes: abandoned partial downloads collected at
start, --max-cache-size evicting the least recently used snapshot after a fetch (and the node no
longer seeding it), ``swarm-node models`` / ``rm`` / ``peers``."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest
from modelgen import carried_files, make_model_dir
from procs import NodeProc, base_env, same_files, swarm_node
from prometheus_client.parser import text_string_to_metric_families

from swarm import client
from swarm.config import socket_path
from swarm.manifest import build_manifest
from swarm.store import SnapshotReader, Store

A, B, C = "acme/cache-a", "acme/cache-b", "acme/cache-c"
MiB = 1 << 20
OLD = time.time() - 10 * 86400


def _metric(home: Path, name: str) -> float:
    transport = httpx.HTTPTransport(uds=str(socket_path(home)))
    with httpx.Client(transport=transport, timeout=10) as c:
        text = c.get("http://swarm-node/v1/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"no {name}")


def _events(log: Path, kind: str) -> list[dict]:
    # Whole lines only: the node may be writing the last one while we read.
    lines = log.read_text(errors="replace").split("\n")[:-1]
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == kind]


def _abandoned_partial(cache: Path, src: Path) -> Path:
    """A download of C that died half way, untouched for ten days."""
    store = Store(cache)
    m = build_manifest(src, C, "c" * 40)
    with SnapshotReader(src, m) as reader, store.open_download(m) as dl:
        big = max(range(len(m.files)), key=lambda k: m.files[k].size)
        first = m.file_piece_range(big)[0]  # one piece of the largest file: it stays partial
        dl.write_piece(first, reader.read_piece(first))
    parts = list((store.repo_dir(C) / "blobs").glob("*.incomplete"))
    assert parts
    for p in [*parts, *(store.repo_dir(C) / ".swarm" / "partial").iterdir()]:
        os.utime(p, (OLD, OLD))
    return parts[0]


def _wait_gone(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < end, f"{path} still there after {timeout} s"
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_eviction_rm_models_peers_on_real_nodes(tmp_path):
    srcs = {
        m: make_model_dir(
            tmp_path / m.split("/")[1], n_weight_files=2, seed=k, weights_bytes=(16 if m == C else 6) * MiB
        )  # C: multi-piece files
        for k, m in enumerate((A, B, C))
    }
    sizes = {m: sum((srcs[m] / f).stat().st_size for f in carried_files(2)) for m in (A, B)}
    size = sizes[A]
    env = base_env(tmp_path)
    worker = NodeProc(tmp_path, "worker", "--serve", f"{A}={srcs[A]}", "--serve", f"{B}={srcs[B]}", env=env)
    front = NodeProc(
        tmp_path, "front", "--log-format", "json", "--max-cache-size", str(int(size * 1.5)), env=env
    )
    part = _abandoned_partial(front.cache, srcs[C])
    try:
        worker.start().wait_ready()
        front.cmd += ["--bootstrap", worker.addr]
        front.start().wait_ready()
        _wait_gone(part)  # collected at start
        end = time.monotonic() + 30  # the event is logged once the pass is over
        while not _events(front.log, "gc_incomplete"):
            assert time.monotonic() < end, "no gc_incomplete event logged"
            time.sleep(0.05)
        assert _events(front.log, "gc_incomplete")[0]["model"] == C

        path_a = client.fetch(A, home=front.home, timeout=90, progress=False)
        same_files(srcs[A], path_a, carried_files(2))
        access = path_a.parent.parent / ".swarm" / "access" / path_a.name
        assert access.exists()  # the fetch recorded the hand-out
        os.utime(access, (OLD, OLD))  # A was last used ten days ago
        path_b = client.fetch(B, home=front.home, timeout=90, progress=False)

        # Two models do not fit in 1.5 models: A (least recently used) goes, B (in use) stays.
        _wait_gone(path_a)
        end = time.monotonic() + 30  # then the node stops seeding it (after counting it)
        while [m["model"] for m in client.status(front.home)["models"]] != [B]:
            assert time.monotonic() < end, client.status(front.home)["models"]
            time.sleep(0.05)
        same_files(srcs[B], path_b, carried_files(2))
        ev = _events(front.log, "evict")
        assert [(e["model"], e["revision"]) for e in ev] == [(A, path_a.name)]
        assert ev[0]["bytes"] == size
        assert _metric(front.home, "swarm_cache_evictions_total") == 1
        assert _metric(front.home, "swarm_cache_evicted_bytes_total") == size

        r = swarm_node("models", "--json", "--home", str(front.home), env=env)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["node"] and report["max_bytes"] == int(size * 1.5)
        rows = {s["model"]: s for s in report["snapshots"]}
        assert set(rows) == {B}
        assert rows[B]["seeded"] and rows[B]["in_use"] and not rows[B]["evictable"]
        assert rows[B]["bytes"] == sizes[B] and rows[B]["refs"] == ["main"]
        text = swarm_node("models", "--home", str(front.home), env=env)
        assert B in text.stdout and "in use" in text.stdout

        r = swarm_node("rm", B, "--home", str(front.home), env=env)
        assert r.returncode == 1 and "in use" in r.stderr and path_b.exists()
        r = swarm_node("rm", B, "--force", "--json", "--home", str(front.home), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["removed"] == [{"model": B, "revision": path_b.name, "bytes": sizes[B]}]
        assert not path_b.exists() and client.status(front.home)["models"] == []
        assert _events(front.log, "rm")[0]["model"] == B
        r = swarm_node("rm", B, "--home", str(front.home), env=env)
        assert r.returncode == 1 and "not in the cache" in r.stderr

        # The control route checks what it is given before touching the cache.
        transport = httpx.HTTPTransport(uds=str(socket_path(front.home)))
        with httpx.Client(transport=transport, timeout=10) as c:
            for body in (
                {"target": "../../etc"},
                {"target": f"{A}@../../x"},
                {"target": A, "force": "yes"},
                {"target": A, "path": "/"},
                [],
            ):
                r = c.post("http://swarm-node/v1/rm", json=body)
                assert r.status_code == 400 and r.json()["error"], body
            assert c.get("http://swarm-node/v1/rm").status_code == 405

        r = swarm_node("peers", "--json", "--home", str(front.home), env=env)
        assert r.returncode == 0 and worker.status["peer_id"] in json.loads(r.stdout)["peers"]

        # What was evicted is fetched again on demand.
        again = client.fetch(A, home=front.home, timeout=90, progress=False)
        same_files(srcs[A], again, carried_files(2))
    finally:
        for n in (front, worker):
            n.stop()


@pytest.mark.timeout(60)
def test_models_and_rm_without_a_node(tmp_path):
    env = base_env(tmp_path)
    src = make_model_dir(
        tmp_path / "src", weights_bytes=2 * MiB, n_weight_files=1, seed=random.Random(1).randrange(100)
    )
    store = Store(tmp_path / "cache")
    m = build_manifest(src, A, "a" * 40)
    with SnapshotReader(src, m) as reader, store.open_download(m) as dl:
        for i in sorted(dl.missing):
            dl.write_piece(i, reader.read_piece(i))
        dl.finalize("main")
    home = ["--home", str(tmp_path / "nohome")]
    r = swarm_node("models", "--json", "--cache-dir", str(store.cache_dir), *home, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert not report["node"] and [s["model"] for s in report["snapshots"]] == [A]
    env["SWARM_CACHE_DIR"] = str(store.cache_dir)  # found through the config without --cache-dir
    r = swarm_node("rm", A, *home, env=env)  # just made: counts as in use
    assert r.returncode == 1 and "in use" in r.stderr
    r = swarm_node("rm", f"{A}@{'a' * 40}", "--force", *home, env=env)
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout and store.revisions(A) == []
    r = swarm_node("rm", "not a name", *home, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error:")
