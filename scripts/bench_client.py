#!/usr/bin/env python
"""How long a configs-only ``swarm.fetch`` takes from a fresh Python process through a warm node.

Starts a worker node serving a few generated models and a frontend node bootstrapped to it (both
``swarm-node run`` subprocesses on 127.0.0.1, HF_HUB_OFFLINE=1), then runs, each in a fresh
``python -c`` process, ``swarm.fetch(model, configs_only=True)`` through the frontend:

* ``swarm``: the frontend does not hold the model yet; it finds the worker in the DHT, gets the
  manifest and the config pieces from it (one sample per model);
* ``node cache``: the frontend holds the configs; the client asks for them in another cache dir
  (the node answers from its cache, the client lays the snapshot out in its own cache);
* ``local``: the client's own cache holds them: no node, no network.

For each it prints the wall time of the whole subprocess (interpreter start included), of
``import swarm`` and of the ``swarm.fetch`` call, and whether libp2p was imported (it must not be).

    .venv/bin/python scripts/bench_client.py [--models 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swarm import client
from swarm.testmodel import make_model_dir

CHILD = r"""
import time
t0 = time.perf_counter()
import sys, json
import swarm
t1 = time.perf_counter()
p = swarm.fetch({repo!r}, configs_only=True, home={home!r}, cache_dir={cache!r}, progress=False)
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "fetch": t2 - t1, "path": str(p),
                  "libp2p": any(m == "libp2p" or m.startswith("libp2p.") for m in sys.modules)}}))
"""


def start_node(tmp: Path, name: str, env: dict, *extra: str) -> tuple[subprocess.Popen, Path]:
    home = tmp / name / "home"
    (tmp / name).mkdir(parents=True)
    log = open(tmp / name / "node.log", "wb")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarm.cli",
            "run",
            "--home",
            str(home),
            "--cache-dir",
            str(tmp / name / "cache"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-serve-hf-cache",
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    return p, home


def wait_ready(p: subprocess.Popen, home: Path, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise SystemExit(f"node {home} exited with {p.returncode}")
        try:
            return client.status(home)
        except client.NodeUnavailable:
            time.sleep(0.05)
    raise SystemExit(f"node {home} not ready after {timeout} s")


def run_child(env: dict, repo: str, home: Path, cache: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=repo, home=str(home), cache=str(cache))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"fetch failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall"] = wall
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=3, help="models served (one cold sample each)")
    ap.add_argument("--repeat", type=int, default=3, help="samples of the warm cases")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-client-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWARM_", "HF_"))}
    env.update(
        HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp / "hf"), PYTHONUNBUFFERED="1"
    )
    procs: list[subprocess.Popen] = []
    try:
        serve = []
        repos = []
        for i in range(args.models):
            repo = f"bench/model-{i}"
            d = make_model_dir(tmp / f"src-{i}", weights_bytes=16 << 20, n_weight_files=2, seed=100 + i)
            serve += ["--serve", f"{repo}={d}"]
            repos.append(repo)
        worker, whome = start_node(tmp, "worker", env, *serve)
        procs.append(worker)
        wst = wait_ready(worker, whome)
        front, fhome = start_node(tmp, "front", env, "--bootstrap", wst["addrs"][0])
        procs.append(front)
        wait_ready(front, fhome)
        print(f"worker {wst['peer_id']} serves {len(repos)} models; frontend ready\n")

        rows: list[tuple[str, dict]] = []
        for i, repo in enumerate(repos):  # cold data, warm node: through the swarm
            rows.append(("swarm", run_child(env, repo, fhome, tmp / f"c-swarm-{i}")))
        for k in range(args.repeat):  # the node has them; another client cache
            rows.append(("node cache", run_child(env, repos[0], fhome, tmp / f"c-node-{k}")))
        for _ in range(args.repeat):  # the client's cache has them
            rows.append(("local", run_child(env, repos[0], fhome, tmp / "c-swarm-0")))

        print(f"{'case':<11} {'process':>9} {'import':>8} {'fetch':>8}  libp2p imported")
        for case, r in rows:
            print(f"{case:<11} {r['wall']:>8.3f}s {r['import']:>7.3f}s {r['fetch']:>7.3f}s  {r['libp2p']}")
        print()
        for case in ("swarm", "node cache", "local"):
            walls = [r["wall"] for c, r in rows if c == case]
            fetches = [r["fetch"] for c, r in rows if c == case]
            print(
                f"{case:<11} median: process {statistics.median(walls):.3f} s, "
                f"fetch call {statistics.median(fetches):.3f} s"
            )
        if any(r["libp2p"] for _, r in rows):
            print("FAIL: libp2p was imported by the client")
            return 1
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
