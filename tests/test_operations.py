"""What an operator runs against real ``swarm-node`` processes: Prometheus metrics (read back with
Prometheus's own text parser, from the control socket and from --metrics-listen), JSON log lines
with events, and a drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from modelgen import carried_files, make_model_dir
from procs import NodeProc, base_env, same_files
from prometheus_client.parser import text_string_to_metric_families

from swarm import client
from swarm.config import socket_path
from swarm.sources import FetchError

MODEL = "acme/ops-model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, parsed the way a Prometheus server parses it."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _socket_metrics(home: Path) -> str:
    transport = httpx.HTTPTransport(uds=str(socket_path(home)))
    with httpx.Client(transport=transport, timeout=10) as c:
        r = c.get("http://swarm-node/v1/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def _events(log: Path) -> list[dict]:
    out = []
    # Whole lines only (the node may be writing the last one); each must parse.
    for line in log.read_text(errors="replace").split("\n")[:-1]:
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.timeout(150)
def test_metrics_and_json_logs_of_a_real_fetch(tmp_path):
    src = make_model_dir(tmp_path / "src", weights_bytes=24 << 20, n_weight_files=2, seed=5)
    size = sum((src / f).stat().st_size for f in carried_files(2))
    env = base_env(tmp_path)
    port = _free_port()
    worker = NodeProc(tmp_path, "worker", "--serve", f"{MODEL}={src}", env=env)
    front = None
    try:
        worker.start().wait_ready()
        front = NodeProc(
            tmp_path,
            "front",
            "--bootstrap",
            worker.addr,
            "--log-format",
            "json",
            "--metrics-listen",
            f"127.0.0.1:{port}",
            env=env,
        )
        front.start().wait_ready()
        path = client.fetch(MODEL, home=front.home, timeout=90, progress=False)
        same_files(src, path, carried_files(2))
        with pytest.raises(FetchError):
            client.fetch("acme/absent", home=front.home, timeout=30, progress=False)

        tcp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert tcp.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=10).status_code == 404
        for text in (tcp.text, _socket_metrics(front.home)):
            m = _samples(text)
            ok = ("swarm_fetch_duration_seconds_count", (("result", "ok"), ("source", "swarm")))
            assert m[ok] == 1
            missing = ("swarm_fetch_duration_seconds_count", (("result", "not_found"), ("source", "none")))
            assert m[missing] == 1
            assert m[("swarm_peer_bytes_total", (("direction", "down"),))] >= size
            assert m[("swarm_pieces_verified_total", ())] > 0
            assert m[("swarm_pieces_failed_total", ())] == 0
            assert m[("swarm_time_to_configs_seconds_count", ())] == 1
            assert m[("swarm_cache_bytes", ())] >= size
            assert m[("swarm_models", (("state", "complete"),))] == 1
            assert m[("swarm_connected_peers", ())] >= 1
            assert m[("swarm_dht_lookup_seconds_count", (("kind", "model"),))] >= 2
        up = _samples(_socket_metrics(worker.home))
        assert up[("swarm_peer_bytes_total", (("direction", "up"),))] >= size
        assert up[("swarm_pieces_served_total", ())] > 0

        events = _events(front.log)
        assert events, "no JSON log lines"
        assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in events)
        ends = {e["model"]: e for e in events if e.get("event") == "fetch_end"}
        assert ends[MODEL]["result"] == "ok" and ends[MODEL]["source"] == "swarm"
        assert ends[MODEL]["duration_s"] > 0
        assert ends["acme/absent"]["result"] == "not_found" and ends["acme/absent"]["error"]
        assert any(e.get("event") == "fetch_start" and e["model"] == MODEL for e in events)
    finally:
        for n in (front, worker):
            if n is not None:
                n.stop()


@pytest.mark.timeout(150)
def test_sigterm_drains_before_stopping(tmp_path):
    """A worker told to stop during a transfer stops announcing and taking new work first, gives
    promised pieces time to go out, and exits cleanly (0) within its drain timeout."""
    src = make_model_dir(tmp_path / "src", weights_bytes=24 << 20, n_weight_files=2, seed=6)
    env = base_env(tmp_path)
    env["SWARM_DRAIN_TIMEOUT"] = "5"
    # Held to 4 MB/s, the transfer is surely under way when the signal comes.
    worker = NodeProc(
        tmp_path,
        "worker",
        "--serve",
        f"{MODEL}={src}",
        "--log-format",
        "json",
        "--max-upload-rate",
        "4MB/s",
        env=env,
    )
    front = None
    try:
        worker.start().wait_ready()
        front = NodeProc(tmp_path, "front", "--bootstrap", worker.addr, env=env)
        front.start().wait_ready()
        errors: list[BaseException] = []

        def fetch() -> None:
            try:
                client.fetch(MODEL, home=front.home, timeout=60, progress=False)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=fetch)
        t.start()
        end = time.monotonic() + 30
        while time.monotonic() < end:  # wait until pieces flow
            ms = [m for m in client.status(worker.home)["models"] if m["model"] == MODEL]
            if ms and ms[0]["bytes_up"] > 0:
                break
            time.sleep(0.02)
        t0 = time.monotonic()
        code = worker.stop(signal.SIGTERM, timeout=20)
        took = time.monotonic() - t0
        front.stop()  # its fetch has no source left: end it rather than wait for its timeout
        t.join(30)
        assert code == 0, worker.log.read_text(errors="replace")[-2000:]
        assert took < 5 + 5, f"stopping took {took:.1f} s"
        msgs = [e["msg"] for e in _events(worker.log)]
        i_sig = next(i for i, m in enumerate(msgs) if "shutting down (draining" in m)
        i_drained = next(i for i, m in enumerate(msgs) if m.startswith("drained in"))
        i_stopped = next(i for i, m in enumerate(msgs) if m == "swarm-node stopped")
        assert i_sig < i_drained < i_stopped
    finally:
        for n in (front, worker):
            if n is not None:
                n.stop()
