"""How unevenly do TCP flows share a tbf-capped link? The measurement behind the simulator's
``network.share_spread`` (docs/simulation.md, "Network").

On the namespace testbed (``simulations.netns``: one namespace per host, a bridge in its own
namespace, ``tc tbf`` caps, every host capped alike up and down, as in the ``tb_*`` scenarios),
K flows of one piece each start together and share one host's link:

- ``fan-out``: one sender (its upload capped) to K receivers, as a worker serving K fetchers;
- ``fan-in``: K senders to one receiver (its download capped), as a fetcher pulling from K peers.

Plain TCP sockets with the data lane's ``TCP_NOTSENT_LOWAT`` (``swarm.net.lane_link.SEND_LOWAT``).
Under exactly fair sharing (the flow model with ``share_spread = 0``) all K flows end together at
K x piece / cap. The script prints each flow's end over that time, sorted, per repetition, and the
``share_spread`` s whose flow model (weights uniform in [1 - s, 1 + s], max-min with weights)
gives the same mean ends of the first to the last flow, each over the last (least squares over a
grid of s). The last end over the fair time is the link's goodput (the flow model's capacity).

Needs root (namespaces); traffic stays inside the namespaces it creates, torn down on exit.

    .venv/bin/python scripts/bench_tcp_share.py [--rate 20Mbit/s] [--flows 4] [--reps 8]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations import netns, units  # noqa: E402

PORT = 7411
PIECE = 4 * 1024 * 1024
SEND_LOWAT = 256 * 1024  # swarm.net.lane_link.SEND_LOWAT (not imported: it would load libp2p)
START_DELAY = 1.0
"""Seconds from spawning the processes to the common start (every process is listening by then)."""
REP_TIMEOUT = 120.0

# One process per host. Receivers listen, read each connection to EOF and print the monotonic
# time of each flow's last byte (CLOCK_MONOTONIC is one clock for every namespace); senders wait
# for the common start, then send one piece on each of their connections at once (a thread each).
RECEIVER = r"""
import json, socket, sys, threading, time
port, k = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(k); print("ready", flush=True)
ends = []
def read(c):
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    ends.append((time.monotonic(), n))
ts = []
for _ in range(k):
    c, _ = srv.accept()
    t = threading.Thread(target=read, args=(c,)); t.start(); ts.append(t)
for t in ts:
    t.join()
print(json.dumps(ends), flush=True)
"""
SENDER = r"""
import socket, sys, threading, time
t0, size, lowat = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
targets = sys.argv[4:]
conns = []
for a in targets:
    for _ in range(50):
        try:
            c = socket.create_connection((a, PORT), timeout=5); break
        except OSError:
            time.sleep(0.05)
    c.settimeout(None)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, lowat)
    conns.append(c)
data = b"\0" * size
time.sleep(max(0.0, t0 - time.monotonic()))
def send(c):
    c.sendall(data); c.close()
ts = [threading.Thread(target=send, args=(c,)) for c in conns]
for t in ts: t.start()
for t in ts: t.join()
""".replace("PORT", str(PORT))


def _spawn(ns: str, code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def one_rep(fabric: netns.Fabric, mode: str, k: int) -> list[float]:
    """Each flow's end, seconds after the common start, sorted."""
    hosts = fabric.hosts
    if mode == "fan-out":
        receivers = [(h, 1) for h in hosts[1 : k + 1]]
        senders = [(hosts[0], [h.addr for h in hosts[1 : k + 1]])]
    else:
        receivers = [(hosts[0], k)]
        senders = [(h, [hosts[0].addr]) for h in hosts[1 : k + 1]]
    recv = [_spawn(h.ns, RECEIVER, str(PORT), str(n)) for h, n in receivers]
    for p in recv:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.monotonic() + START_DELAY
    send = [_spawn(h.ns, SENDER, f"{t0:.6f}", str(PIECE), str(SEND_LOWAT), *to) for h, to in senders]
    ends: list[float] = []
    for p in recv:
        out, _ = p.communicate(timeout=REP_TIMEOUT)
        for t, n in json.loads(out.strip().splitlines()[-1]):
            if n != PIECE:
                raise SystemExit(f"a flow moved {n} bytes, not {PIECE}")
            ends.append(t - t0)
    for p in send:
        p.wait(timeout=REP_TIMEOUT)
    return sorted(ends)


def model_ends(k: int, s: float, rng: random.Random, draws: int = 4000) -> list[float]:
    """Mean sorted ends (over K x piece / cap) of K equal flows through one link under weighted
    processor sharing, weights uniform in [1 - s, 1 + s]: what the simulator's flow model gives."""
    acc = [0.0] * k
    for _ in range(draws):
        w = sorted(rng.uniform(1 - s, 1 + s) for _ in range(k))  # lightest ends last
        left = [1.0] * k  # in pieces; link rate k pieces per unit time (all k end at 1 if fair)
        t = 0.0
        alive = list(range(k))
        ends = []
        while alive:
            tot = sum(w[i] for i in alive)
            # the flow with the least remaining / weight ends first
            dt, j = min((left[i] / (w[i] * k / tot), i) for i in alive)
            for i in alive:
                left[i] -= w[i] * k / tot * dt
            t += dt
            ends.append(t)
            alive.remove(j)
        for i, e in enumerate(ends):
            acc[i] += e
    return [a / draws for a in acc]


def fit_spread(k: int, measured: list[float]) -> tuple[float, list[float]]:
    best = (float("inf"), 0.0, [1.0] * k)
    for i in range(0, 96, 5):
        s = i / 100
        m = model_ends(k, s, random.Random(1))
        err = sum((a - b) ** 2 for a, b in zip(m, measured, strict=True))
        if err < best[0]:
            best = (err, s, m)
    return best[1], best[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="20 Mbit/s", help="the capped link's rate")
    ap.add_argument("--flows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=8)
    a = ap.parse_args()
    why = netns.available()
    if why:
        print(f"bench_tcp_share: cannot run here: {why}", file=sys.stderr)
        return 2
    rate = units.rate(a.rate)
    k = a.flows
    fair = k * PIECE / rate
    print(
        f"{k} flows of {PIECE >> 20} MiB through one {a.rate} tbf link; fair sharing ends all at {fair:.2f} s"
    )
    netns.cleanup_stale()
    fabric = netns.Fabric("share")
    try:
        with netns.signals_raise():
            for _ in range(k + 1):
                fabric.add_host(rate, rate)  # every host capped alike, as in the tb_* scenarios
            results = {}
            for mode in ("fan-out", "fan-in"):
                reps = []
                for r in range(a.reps):
                    ends = [e / fair for e in one_rep(fabric, mode, k)]
                    reps.append(ends)
                    shown = ", ".join(f"{e:.2f}" for e in ends)
                    print(f"  {mode} rep {r + 1}: ends / fair = {shown}", flush=True)
                mean = [sum(col) / len(col) for col in zip(*reps, strict=True)]
                # The shape (ends over the last one) gives the spread; the last end over the fair
                # time is the link's goodput, which the flow model takes as its capacity.
                shape = [x / mean[-1] for x in mean]
                s, m = fit_spread(k, shape)
                results[mode] = {
                    "mean_ends_over_fair": mean,
                    "ends_over_last": shape,
                    "share_spread": s,
                    "model_ends": m,
                }
                print(
                    f"{mode}: mean ends / fair {', '.join(f'{x:.2f}' for x in mean)}; over the last "
                    f"{', '.join(f'{x:.2f}' for x in shape)}; flow model with share_spread {s:.2f}: "
                    f"{', '.join(f'{x:.2f}' for x in m)}",
                    flush=True,
                )
    finally:
        fabric.teardown()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
