#!/usr/bin/env python
"""Origin once on the namespace testbed: N node processes, each in a network namespace of its own,
cold-fetch a model that only the Hub-compatible server (tests/fakehub.py) has, the server in a
namespace of its own whose upload is capped with ``tc tbf`` (a WAN origin), the nodes' links
capped at ``--node-rate`` (a LAN). Namespaces, veth pairs and the bridge are built as the fleet
testbed builds them (simulations/testbed.py ``Fabric``); needs root.

Runs (each on fresh node processes and caches, the same namespaces and origin):

* ``swarm``: one node serves the model from a directory, N-1 fetch it through the swarm at once:
  the swarm's T_min for this model and crowd (the last fetcher's time);
* ``today``: the N nodes fetch at once with origin-once switched off: each goes to the origin;
* ``once``: the N nodes fetch at once with origin-once (swarm/origin.py);
* ``kill``: as ``once``, and the first puller is SIGKILLed when the origin has sent ``--kill-at``
  of the model;
* ``vanish``: as ``kill``, but the first puller's bridge port goes down instead (no FIN, no RST:
  the host is gone from the network, its process still runs); it comes back after the run.

Times are wall-clock times of the real node processes (from the common start to each node's
``fetch_with_fallback`` return). It prints one JSON line per run and a table with the targets:
origin bytes <= 1.05 x the model, last node <= 1.3 x (F / origin rate + T_min).

    sudo .venv/bin/python scripts/bench_origin_testbed.py [--nodes 8] [--size 256M]
        [--origin-rate 200mbit] [--node-rate 1gbit] [--runs swarm,once,kill] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(HERE))

from bench_origin import COMMIT, MODEL, parse_size, run_crowd  # noqa: E402

HUB_PORT = 8080
NODE_PORT = 4001


def parse_rate(s: str) -> float:
    """Bytes/s from '200mbit', '1gbit', '25M' (bytes)."""
    s = s.strip().lower()
    for suffix, mult in (("gbit", 1e9 / 8), ("mbit", 1e6 / 8), ("kbit", 1e3 / 8)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(parse_size(s))


# --- the origin's process (in its namespace) ----------------------------------------------------


def hub_child(spec: dict) -> None:
    from fakehub import FakeHub

    hub = FakeHub(host=spec["addr"], port=HUB_PORT)
    hub.add_repo(MODEL, Path(spec["served"]), COMMIT)
    with hub:

        def say(**kw) -> None:
            sys.stdout.write(json.dumps(kw) + "\n")
            sys.stdout.flush()

        say(ready=True, url=hub.url)
        for line in sys.stdin:
            cmd = json.loads(line).get("cmd")
            if cmd == "reset":
                hub.reset()
                say(ok=True)
            elif cmd == "stats":
                gets = [
                    (r.path.rsplit("/", 1)[-1], r.range)
                    for r in hub.model_requests
                    if r.method == "GET" and "/resolve/" in r.path
                ]
                with hub._lock:
                    transfers = [dict(t) for t in hub.transfers]
                say(bytes=hub.bytes_served, gets=gets, transfers=transfers)
            else:
                return


class HubProc:
    """The origin's process, with the ``url`` / ``reset()`` / ``bytes_served`` that
    ``bench_origin.run_crowd`` uses of an in-process FakeHub."""

    def __init__(self, ns: str, addr: str, served: Path, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self.p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                __file__,
                "--hub",
                json.dumps({"addr": addr, "served": str(served)}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=str(REPO_ROOT),
        )
        self.url = self._ask(None, timeout=300)["url"]

    def _ask(self, cmd: str | None, timeout: float = 30) -> dict:
        if cmd is not None:
            self.p.stdin.write((json.dumps({"cmd": cmd}) + "\n").encode())
            self.p.stdin.flush()
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise RuntimeError(f"the origin did not answer {cmd!r}; see {self.log.name}")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the origin exited; see {self.log.name}")
        return json.loads(line)

    def reset(self) -> None:
        self._ask("reset")

    @property
    def bytes_served(self) -> int:
        return self._ask("stats")["bytes"]

    def stats(self) -> dict:
        return self._ask("stats")

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(b'{"cmd": "quit"}\n')
                self.p.stdin.flush()
                self.p.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()
        self.log.close()


# --- the orchestrator ---------------------------------------------------------------------------


def current_puller(hub: HubProc, nets: list) -> int | None:
    """The node the origin sent the latest file body to (the puller now: a node that pulled and
    gave way to another is not it)."""
    transfers = hub.stats()["transfers"]
    who = {net.addr: i for i, net in enumerate(nets)}
    big = [t for t in transfers if t["sent"] > 0]
    if not big:
        return None
    return who.get(max(big, key=lambda t: t["t1"] or t["t0"])["client"])


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--hub":
        hub_child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--size", default="256M", help="weights bytes (two shards)")
    ap.add_argument("--origin-rate", default="200mbit", help="the origin's upload cap (tc tbf)")
    ap.add_argument("--node-rate", default="1gbit", help="each node's upload and download cap")
    ap.add_argument("--runs", default="swarm,once,kill", help="of swarm,today,once,kill,vanish")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the runs (interleaved)")
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--lane", default="plaintext", help="the nodes' data lane (as the fleet testbed)")
    ap.add_argument("--keep", type=Path, help="copy the node logs here")
    ap.add_argument("--json", type=Path, help="append each run's JSON line here")
    args = ap.parse_args()

    from simulations import testbed
    from swarm.testmodel import make_model_dir

    why = testbed.available()
    if why:
        sys.exit(f"cannot run: {why}")
    testbed.cleanup_stale()
    size = parse_size(args.size)
    origin_rate, node_rate = parse_rate(args.origin_rate), parse_rate(args.node_rate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-origin-tb-"))
    fabric = None
    hub = None
    rows: list[dict] = []
    try:
        with testbed.signals_raise():
            served = make_model_dir(tmp / "served", weights_bytes=size, n_weight_files=2, seed=11)
            model_bytes = sum(f.stat().st_size for f in served.rglob("*") if f.is_file())
            fabric = testbed.Fabric(tag="origin")
            hub_net = fabric.add_host(origin_rate, node_rate)
            nets = [fabric.add_host(node_rate, node_rate) for _ in range(args.nodes)]
            hub = HubProc(hub_net.ns, hub_net.addr, served, tmp / "hub.log")
            print(
                f"model {model_bytes / 1e6:.1f} MB; origin {hub.url} in {hub_net.ns}, upload capped at "
                f"{origin_rate * 8 / 1e6:.0f} Mbit/s; {args.nodes} node namespaces at "
                f"{node_rate * 8 / 1e6:.0f} Mbit/s; work dir {tmp}",
                flush=True,
            )
            t_min = None
            for rep in range(args.repeat):
                for name in args.runs.split(","):
                    port = NODE_PORT + len(rows)  # a fresh port per run: no TIME_WAIT clash

                    def place(i: int, port=port) -> tuple[dict, tuple[str, ...]]:
                        net = nets[i]
                        return (
                            {"listen": [f"/ip4/{net.addr}/tcp/{port}"], "lane": args.lane},
                            ("ip", "netns", "exec", net.ns),
                        )

                    swarm = name == "swarm"
                    gone: list[int] = []

                    def vanish(i: int, gone=gone) -> None:
                        fabric.set_port(nets[i], False)
                        gone.append(i)

                    r = run_crowd(
                        tmp,
                        f"{name}-{rep}",
                        hub,
                        args.nodes - 1 if swarm else args.nodes,
                        origin_once=name not in ("today", "swarm"),
                        serve=served if swarm else None,
                        kill_at=args.kill_at if name in ("kill", "vanish") else None,
                        model_bytes=model_bytes,
                        place=place,
                        log=True,
                        kill=vanish if name == "vanish" else None,
                        puller_now=lambda: current_puller(hub, nets),
                    )
                    for i in gone:
                        fabric.set_port(nets[i], True)
                    stats = hub.stats()
                    r["ranged_gets"] = [g for g in stats["gets"] if g[1]]
                    # The origin's per-body log: which node read which file from which byte, how
                    # much, when (seconds from the crowd's start): double reads show up here.
                    who = {net.addr: i for i, net in enumerate(nets)}
                    t_start = r.get("t_start", 0.0)
                    r["transfers"] = [
                        [
                            who.get(t["client"], t["client"]),
                            t["file"],
                            t["start"],
                            t["sent"],
                            round(t["t0"] - t_start, 2),
                            round((t["t1"] or t["t0"]) - t_start, 2),
                        ]
                        for t in stats["transfers"]
                    ]
                    if swarm:
                        t_min = r["last_s"]
                        r["origin_bytes"], r["origin_x"] = 0, 0.0  # it served from a directory
                    r["f_over_rate"] = model_bytes / origin_rate
                    r["t_min"] = t_min
                    if t_min is not None and not swarm:
                        r["last_x_target"] = r["last_s"] / (model_bytes / origin_rate + t_min)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(r) + "\n")
                    if args.keep:
                        for log in (tmp / f"{name}-{rep}").glob("n*/node.log"):
                            dest = args.keep / f"{name}-{rep}"
                            dest.mkdir(parents=True, exist_ok=True)
                            shutil.copy(log, dest / f"{log.parent.name}.log")
    finally:
        if hub is not None:
            hub.stop()
        if fabric is not None:
            fabric.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    f_over = model_bytes / origin_rate
    print(f"\nF / origin rate = {f_over:.2f} s (F = {model_bytes / 1e6:.1f} MB)")
    print("| run | done | origin x model | pulls | first s | last s | T_min | last / (F/r + T_min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = r.get("last_x_target")
        print(
            f"| {r['run']} | {r['done']}/{r['nodes']} | {r['origin_x']:.3f} | {r['pulls']} | "
            f"{r['first_s']:.1f} | {r['last_s']:.1f} | {r['t_min'] or float('nan'):.1f} | "
            f"{'' if x is None else f'{x:.2f}'} |"
        )


if __name__ == "__main__":
    main()
