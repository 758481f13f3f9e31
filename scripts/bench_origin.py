#!/usr/bin/env python
"""Origin once, measured on loopback: N node processes cold-fetch a model only a capped
Hub-compatible origin has (tests/fakehub.py in this process, rate-limited like a WAN link).

Three runs on the same generated model and machine, each node its own OS process:

* ``swarm``: one node serves the model from a directory, N-1 fetch it through the swarm at once:
  the swarm's T_min for this model and crowd (the last fetcher's time);
* ``today``: the N nodes fetch at once with origin-once switched off: each goes to the origin;
* ``once``: the N nodes fetch at once with origin-once (swarm/origin.py): one pulls, the others
  follow and fetch from it through the swarm;
* ``kill``: as ``once``, and the first puller is killed (SIGKILL) when the origin has served
  ``--kill-at`` of the model.

For each it prints the bytes the origin served (and / model size), the last node's time, and the
target ``1.3 x (F / origin rate + T_min)``.

``--origin mx`` makes the origin a ModelExpress server instead (tests/fake_modelexpress.py, the
0.7 server's behaviour, in this process, capped at ``--rate``): every node's request carries
``MODEL_EXPRESS_URL`` and ``HF_HUB_OFFLINE`` (so every byte comes from ModelExpress or a peer), and
``today`` is the chain's plain ModelExpress step on every node (what main did before ModelExpress
was an origin). ``--shards`` splits the weights into that many files (ModelExpress cannot resume
inside a file, so a killed puller costs the file in progress).

    .venv/bin/python scripts/bench_origin.py [--nodes 8] [--size 256M] [--rate 25M]
        [--runs swarm,today,once,kill] [--kill-at 0.5] [--origin hub|mx] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

MODEL = "bench-org/origin-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B")
    return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(s)


# --- the child: one node ------------------------------------------------------------------------

CHILD_USAGE = "bench_origin.py --child JSON"


def child(spec: dict) -> None:
    import trio

    from swarm.net import quiet_libp2p_logs
    from swarm.node import Node, NodeConfig
    from swarm.sources import FetchRequest, SourceEnv

    if spec.get("log"):  # the node's own INFO log (stderr: node.log), timestamped
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
            datefmt="%H:%M:%S",
        )
    quiet_libp2p_logs()

    def say(**kw) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    async def main() -> None:
        cfg = NodeConfig(
            home=Path(spec["home"]),
            cache_dir=Path(spec["cache"]),
            serve=tuple((MODEL, Path(d)) for d in spec.get("serve", ())),
            bootstrap=tuple(spec.get("bootstrap", ())),
            serve_hf_cache=True,
            **({"listen": tuple(spec["listen"])} if spec.get("listen") else {}),
            **({"lane": spec["lane"]} if spec.get("lane") else {}),
        )
        node = Node(cfg)
        if not spec.get("origin_once", True):
            node._origin_once = lambda *_a, **_k: False  # today's behaviour: every node to the origin
        async with node.running():
            with trio.move_on_after(10):
                while len(node.host.connected_peers()) < len(cfg.bootstrap):
                    await trio.sleep(0.01)
            say(ready=True, addrs=node.host.addrs, peer_id=node.peer_id)
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            cmd = json.loads(line)
            if cmd.get("cmd") != "fetch":
                return
            await trio.sleep(max(0.0, cmd["at"] - time.time()))
            t0 = time.time()

            def on_event(e: dict) -> None:
                if e.get("event") == "origin_pull":
                    say(event="pull", t=time.time() - t0)
                elif e.get("event") in ("manifest", "configs_ready", "done"):
                    say(event=e["event"], t=time.time() - t0)
                elif e.get("event") == "attempt" and e.get("outcome") == "failed":
                    say(event="failed_" + e["source"], t=time.time() - t0, reason=e.get("reason", "")[:300])

            if spec.get("mx"):  # ModelExpress is the origin; the Hub is off
                env = SourceEnv(modelexpress_url=spec["endpoint"], hub_offline=True)
            elif spec.get("hub_off"):  # the swarm alone (T_min beside a ModelExpress origin)
                env = SourceEnv(hub_offline=True)
            else:
                env = SourceEnv(hf_endpoint=spec["endpoint"])
            req = FetchRequest(MODEL, cache_dir=cfg.cache_dir, timeout=600.0, env=env)
            try:
                r = await node.fetch_with_fallback(req, on_event=on_event)
                say(done=True, seconds=time.time() - t0, source=r.source)
            except Exception as e:
                say(done=False, seconds=time.time() - t0, error=repr(e)[:300])
            # Keep seeding until told to stop.
            await trio.to_thread.run_sync(sys.stdin.readline)

    trio.run(main)


# --- the orchestrator ---------------------------------------------------------------------------


class Proc:
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", ns): where the node runs

    def __init__(self, spec: dict, log: Path, prefix: tuple[str, ...] = ()) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 (closed in stop())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SWARM_"))}
        env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(Path(spec["home"]) / "hf"), PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            [*prefix, sys.executable, __file__, "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self.buf = b""

    def lines(self, timeout: float) -> list[dict]:
        out = []
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if r:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"node exited (rc={self.p.poll()}); see {self.log.name}")
            self.buf += chunk
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                out.append(json.loads(line))
        return out

    def send(self, **cmd) -> None:
        with_nl = (json.dumps(cmd) + "\n").encode()
        try:
            self.p.stdin.write(with_nl)
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def stop(self) -> None:
        if self.p.poll() is None:
            self.send(cmd="quit")
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def run_crowd(
    tmp: Path,
    name: str,
    hub,
    n: int,
    *,
    origin_once: bool,
    serve: Path | None,
    kill_at: float | None,
    model_bytes: int,
    place=None,
    log: bool = False,
    kill=None,
    puller_now=None,
) -> dict:
    """One crowd; ``place(i)``: (extra spec fields, command prefix) of node ``i`` (the testbed puts
        each in a namespace of its own, scripts/bench_origin_testbed.py); ``kill(i)``: how the first
        puller (node ``i``) is taken away at ``kill_at`` (default: SIGKILL); ``puller_now()``: the node
    the origin is sending to at that moment (default: the first that started a pull, which may have
    given way to another by then)."""
    root = tmp / name
    procs: list[Proc] = []
    peer_ids: list[str] = []
    try:
        boot: list[str] = []
        count = n + (1 if serve is not None else 0)
        for i in range(count):
            spec = {
                "home": str(root / f"n{i}" / "home"),
                "cache": str(root / f"n{i}" / "cache"),
                "endpoint": hub.url,
                # ModelExpress as the origin: given to the fetchers, except in the swarm-only
                # run (T_min), whose fetchers have neither ModelExpress nor the Hub.
                "mx": bool(getattr(hub, "is_modelexpress", False)) and serve is None,
                "hub_off": bool(getattr(hub, "is_modelexpress", False)) and serve is not None,
                "bootstrap": boot[:1],
                "origin_once": origin_once,
                "serve": [str(serve)] if serve is not None and i == 0 else [],
                "log": log,
            }
            extra, prefix = place(i) if place is not None else ({}, ())
            spec.update(extra)
            (root / f"n{i}").mkdir(parents=True, exist_ok=True)
            p = Proc(spec, root / f"n{i}" / "node.log", prefix)
            got: list[dict] = []
            end = time.time() + 60
            while not got and time.time() < end:
                got = p.lines(1.0)
            if not got:
                raise RuntimeError(f"node {i} did not start; see {p.log.name}")
            procs.append(p)
            peer_ids.append(got[0]["peer_id"])
            if not boot:
                boot = [a if "/p2p/" in a else f"{a}/p2p/{got[0]['peer_id']}" for a in got[0]["addrs"]]
        fetchers = procs[1:] if serve is not None else procs
        time.sleep(1.0)  # let the DHT routing tables settle
        hub.reset()
        at = time.time() + 0.5
        for p in fetchers:
            p.send(cmd="fetch", at=at)
        results: dict[int, dict] = {}
        pulls: list[tuple[float, int]] = []
        timeline: dict[int, dict] = {}  # node -> {event: seconds}: manifest, configs_ready, done, end
        killed = None
        deadline = time.time() + 900
        while len(results) + (killed is not None) < len(fetchers) and time.time() < deadline:
            for i, p in enumerate(fetchers):
                if i in results or i == killed:
                    continue
                for msg in p.lines(0.01):
                    if msg.get("event") == "pull":
                        pulls.append((msg["t"], i))
                    elif msg.get("event"):
                        timeline.setdefault(i, {})[msg["event"]] = round(msg["t"], 2)
                        if msg.get("reason"):
                            timeline[i][msg["event"] + "_why"] = msg["reason"]
                    elif "done" in msg:
                        results[i] = msg
                        timeline.setdefault(i, {})["end"] = round(msg["seconds"], 2)
            if kill_at is not None and killed is None and pulls and hub.bytes_served >= kill_at * model_bytes:
                killed = puller_now() if puller_now is not None else None
                if killed is None or not 0 <= killed < len(fetchers):
                    killed = min(pulls)[1]
                if kill is None:
                    fetchers[killed].p.send_signal(signal.SIGKILL)
                else:
                    kill(killed)
                kill_time = time.time() - at
        ok = [r for r in results.values() if r.get("done")]
        out = {
            "run": name,
            "nodes": len(fetchers),
            "done": len(ok),
            "failed": [r.get("error") for r in results.values() if not r.get("done")],
            "origin_bytes": hub.bytes_served,
            "origin_x": hub.bytes_served / model_bytes,
            "last_s": max((r["seconds"] for r in ok), default=float("nan")),
            "first_s": min((r["seconds"] for r in ok), default=float("nan")),
            "pulls": len(pulls),
            "sources": sorted({r.get("source", "") for r in ok}),
            "timeline": {i: timeline[i] for i in sorted(timeline)},
            "pullers": [i for _t, i in sorted(pulls)],
            "t_start": at,
        }
        if killed is not None:
            out["killed_at_s"] = round(kill_time, 2)
        return out
    finally:
        for p in procs:
            p.stop()


def _origin(kind: str, rate: int):
    """The capped origin: the fake Hub, or the fake ModelExpress server (``is_modelexpress``)."""
    if kind == "hub":
        from fakehub import FakeHub

        return FakeHub(rate=rate)
    from fake_modelexpress import FakeModelExpress

    mx = FakeModelExpress()
    mx.rate = rate
    mx.is_modelexpress = True
    return mx


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--size", default="256M", help="weights bytes (two shards)")
    ap.add_argument("--rate", default="25M", help="origin cap, bytes/s (25M = 200 Mbit/s)")
    ap.add_argument("--runs", default="swarm,today,once,kill")
    ap.add_argument("--kill-at", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--origin", choices=("hub", "mx"), default="hub", help="the Hub or ModelExpress")
    ap.add_argument("--shards", type=int, default=2, help="weight files")
    args = ap.parse_args()

    from swarm.testmodel import make_model_dir

    size, rate = parse_size(args.size), parse_size(args.rate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-origin-"))
    served = make_model_dir(tmp / "served", weights_bytes=size, n_weight_files=args.shards, seed=11)
    model_bytes = sum(f.stat().st_size for f in served.rglob("*") if f.is_file())
    runs = args.runs.split(",")
    print(
        f"model {model_bytes / 1e6:.1f} MB in {args.shards} weight files, origin "
        f"{'ModelExpress' if args.origin == 'mx' else 'Hub'} capped at {rate / 1e6:.1f} MB/s, "
        f"{args.nodes} nodes; work dir {tmp}",
        flush=True,
    )
    t_min = None
    rows = []
    with _origin(args.origin, rate) as hub:
        if args.origin == "mx":
            hub.add_model(MODEL, served, COMMIT)
        else:
            hub.add_repo(MODEL, served, COMMIT)
        for name in runs:
            if name == "swarm":
                r = run_crowd(
                    tmp,
                    name,
                    hub,
                    args.nodes - 1,
                    origin_once=False,
                    serve=served,
                    kill_at=None,
                    model_bytes=model_bytes,
                )
                t_min = r["last_s"]
            else:
                r = run_crowd(
                    tmp,
                    name,
                    hub,
                    args.nodes,
                    origin_once=name != "today",
                    serve=None,
                    kill_at=args.kill_at if name == "kill" else None,
                    model_bytes=model_bytes,
                )
            rows.append(r)
            print(json.dumps(r), flush=True)
    f_over_rate = model_bytes / rate
    print(
        f"\nF / origin rate = {f_over_rate:.2f} s; swarm T_min (1 seed -> {args.nodes - 1}) = "
        f"{t_min if t_min is not None else float('nan'):.2f} s"
    )
    if t_min is not None:
        print(
            f"target: last node within 1.3 x (F/rate + T_min) = {1.3 * (f_over_rate + t_min):.2f} s;"
            f" origin bytes <= 1.05 x"
        )
    print("| run | nodes done | origin bytes (x model) | pulls | first s | last s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['done']}/{r['nodes']} | {r['origin_x']:.2f} | {r['pulls']} | "
            f"{r['first_s']:.1f} | {r['last_s']:.1f} |"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
