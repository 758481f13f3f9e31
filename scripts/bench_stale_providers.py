#!/usr/bin/env python
"""A fetch by name with vanished providers in the DHT (issue #12 item 1).

Real processes on 127.0.0.1: a seed (``swarm-node run --serve``, a generated model of ``--size-mb``
MiB) and a front node bootstrapped to it, both ``swarm-node run``. Then:

1. ``clean``: ``swarm-node fetch ORG/NAME --home FRONT --json`` timed (wall time of the process,
   interpreter start included), then ``swarm-node rm --force``; ``--rounds`` times.
2. ``--stale`` (default 8) more nodes are started, bootstrapped to the seed, each fetches the model
   (so each provides it: its record is in the DHT, at the seed and at the front), and then vanishes:
   ``--how stop`` (default) SIGSTOPs it, a black hole (the kernel still completes TCP handshakes,
   nothing ever answers, connections already open stay open); ``--how kill`` SIGKILLs it
   (loopback answers a dial with RST at once).
3. ``stale``: the same fetches again, ``--rounds`` times. The first round is the one that counts
   most: the front has no memory yet of the vanished providers having failed it.
4. ``fresh front``: one more node started after the providers vanished (no links to them, no
   memory of them), its first fetch timed.

Prints every sample, the medians and ``stale - clean`` (target: <= 0.3 s).

    PYTHONPATH=. .venv/bin/python scripts/bench_stale_providers.py [--stale 8] [--how stop|kill]
"""

from __future__ import annotations

import argparse
import contextlib
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

REPO = "bench/stale-providers"


def swarm_node_cmd() -> list[str]:
    script = Path(sys.executable).with_name("swarm-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarm.cli"]


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWARM_", "HF_", "HUGGING"))}
    env.pop("MODEL_EXPRESS_URL", None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "hf-default-cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


class Proc:
    """One ``swarm-node run``."""

    def __init__(self, tmp: Path, name: str, env: dict, *extra: str) -> None:
        self.name = name
        self.home = tmp / name / "home"
        (tmp / name).mkdir(parents=True, exist_ok=True)
        self.logf = open(tmp / name / "node.log", "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            [
                *swarm_node_cmd(),
                "run",
                "--home",
                str(self.home),
                "--cache-dir",
                str(tmp / name / "cache"),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-serve-hf-cache",
                *extra,
            ],
            env=env,
            stdout=self.logf,
            stderr=self.logf,
            stdin=subprocess.DEVNULL,
        )
        self.status: dict = {}

    def wait(self, timeout: float = 120, *, model: bool = False) -> dict:
        from swarm import client

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.popen.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.popen.returncode}; see its log")
            with contextlib.suppress(client.NodeUnavailable):
                self.status = client.status(self.home)
                if not model or any(
                    m.get("model") == REPO and m.get("complete") for m in self.status.get("models") or ()
                ):
                    return self.status
            time.sleep(0.1)
        raise SystemExit(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.logf.close()


def run_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*swarm_node_cmd(), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def timed_fetch(env: dict, home: Path) -> float:
    t0 = time.perf_counter()
    out = run_cli(env, "fetch", REPO, "--home", str(home), "--json")
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"swarm-node fetch failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout)
    assert r["source"] == "swarm", r
    return wall


def drop(env: dict, home: Path) -> None:
    out = run_cli(env, "rm", REPO, "--force", "--home", str(home))
    if out.returncode != 0:
        raise SystemExit(f"swarm-node rm failed: {out.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=8, help="model weights, MiB (default 8)")
    ap.add_argument("--stale", type=int, default=8, help="providers that vanish (default 8)")
    ap.add_argument("--how", choices=("stop", "kill"), default="stop", help="SIGSTOP or SIGKILL them")
    ap.add_argument("--rounds", type=int, default=3, help="fetches timed in each phase (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    from swarm.testmodel import make_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-stale-"))
    env = base_env(tmp)
    os.environ.update({k: v for k, v in env.items() if k.startswith("HF_")})
    procs: list[Proc] = []
    try:
        src = make_model_dir(tmp / "src", weights_bytes=args.size_mb << 20, n_weight_files=2, seed=7)
        seed = Proc(tmp, "seed", env, "--serve", f"{REPO}={src}")
        procs.append(seed)
        boot = seed.wait(model=True)["addrs"][0]
        front = Proc(tmp, "front", env, "--bootstrap", boot)
        procs.append(front)
        front.wait()
        timed_fetch(env, front.home)  # warm: links, DHT, page cache
        drop(env, front.home)
        samples: dict[str, list[float]] = {"clean": [], "stale": [], "fresh front": []}
        for r in range(args.rounds):
            samples["clean"].append(timed_fetch(env, front.home))
            drop(env, front.home)
            print(f"clean round {r + 1}: {samples['clean'][-1]:.3f} s", flush=True)

        stale = [Proc(tmp, f"stale{i}", env, "--bootstrap", boot) for i in range(args.stale)]
        procs += stale
        for s in stale:
            s.wait()
        for s in stale:  # one at a time: each ends up providing the model
            out = run_cli(env, "fetch", REPO, "--home", str(s.home), "--json")
            if out.returncode != 0:
                raise SystemExit(f"{s.name}: fetch failed: {out.stderr[-2000:]}")
        time.sleep(1.0)  # their ADD_PROVIDERs land
        for s in stale:
            s.popen.send_signal(signal.SIGSTOP if args.how == "stop" else signal.SIGKILL)
        print(f"{args.stale} providers fetched the model, then got SIG{args.how.upper()}", flush=True)

        for r in range(args.rounds):
            samples["stale"].append(timed_fetch(env, front.home))
            drop(env, front.home)
            print(f"stale round {r + 1}: {samples['stale'][-1]:.3f} s", flush=True)
        fresh = Proc(tmp, "fresh", env, "--bootstrap", boot)
        procs.append(fresh)
        fresh.wait()
        samples["fresh front"].append(timed_fetch(env, fresh.home))
        print(f"fresh front: {samples['fresh front'][-1]:.3f} s", flush=True)

        med = {k: statistics.median(v) for k, v in samples.items()}
        how = "SIGSTOPped" if args.how == "stop" else "SIGKILLed"
        print(
            f"\n{args.size_mb} MiB, {args.stale} providers {how}; "
            "wall time of `swarm-node fetch` (real processes, 127.0.0.1)"
        )
        print(f"  {'':<12} {'median':>8} {'max':>8}  samples")
        for k, v in samples.items():
            print(f"  {k:<12} {med[k]:>7.3f}s {max(v):>7.3f}s  {', '.join(f'{x:.3f}' for x in v)}")
        print(f"  stale - clean (medians): {med['stale'] - med['clean']:+.3f} s (target <= +0.3 s)")
        print(f"  stale round 1 - clean:   {samples['stale'][0] - med['clean']:+.3f} s")
        print(f"  fresh front - clean:     {med['fresh front'] - med['clean']:+.3f} s")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
