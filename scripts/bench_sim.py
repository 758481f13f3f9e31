#!/usr/bin/env python3
"""Time the simulator: wall and CPU seconds for one seed of a scenario at several sizes.

    .venv/bin/python scripts/bench_sim.py                       # scale_1000: 1,000 nodes
    .venv/bin/python scripts/bench_sim.py --sizes 100,300,999   # the frontend count at each size
    .venv/bin/python scripts/bench_sim.py --profile             # where the time goes, by layer
    .venv/bin/python scripts/bench_sim.py --memory 6            # what holds memory at t = 6 s
    .venv/bin/python scripts/bench_sim.py --sizes 99999 --watch 1 --max-rss 20
        # RSS, CPU and link ends every virtual second; stop the run if RSS passes 20 GB

The result for this machine is in docs/simulation.md ("Scale").
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations import bounds, report, scenario
from simulations.sim import Simulation

LAYERS = (
    ("swarm/engine", "engine"),
    ("swarm/picker", "picker+choker"),
    ("swarm/choker", "picker+choker"),
    ("simulations/", "simulator"),
    ("/trio/", "trio"),
    ("outcome", "trio"),
    ("random.py", "random"),
    ("attr", "attrs"),
)


def by_layer(stats: pstats.Stats) -> dict[str, float]:
    out: collections.Counter[str] = collections.Counter()
    for (fn, _line, _name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        out[next((label for key, label in LAYERS if key in fn), "other (builtins, heapq, ...)")] += tt
    return dict(out.most_common())


#: Memory layers: the first key found in an allocation's file name (trio's attrs classes are
#: generated into files named "<attrs generated ... trio...>").
MEM_LAYERS = (
    ("swarm/engine", "engine"),
    ("swarm/picker", "picker+choker"),
    ("swarm/choker", "picker+choker"),
    ("swarm/wire", "wire messages"),
    ("simulations/", "simulator"),
    ("trio", "trio"),
    ("outcome", "trio"),
)


def memory_by_layer(snap: tracemalloc.Snapshot, link_ends: int) -> dict[str, Any]:
    """Bytes held at the snapshot, by layer, and per link end (the unit that dominates)."""
    layers: collections.Counter[str] = collections.Counter()
    lines = snap.statistics("lineno")
    for st in lines:
        fn = st.traceback[0].filename
        layers[next((label for key, label in MEM_LAYERS if key in fn), "other")] += st.size
    total = sum(layers.values())
    per = max(1, link_ends)
    return {
        "traced_mb": round(total / 1e6, 1),
        "link_ends": link_ends,
        "bytes_per_link_end": round(total / per),
        "by_layer_bytes_per_link_end": {k: round(v / per) for k, v in layers.most_common()},
        "top_lines": [
            f"{st.size / per:.0f} B/link end  {st.traceback[0].filename.split('/')[-1]}:"
            f"{st.traceback[0].lineno}"
            for st in lines[:15]
        ],
    }


def rss_now_mb() -> float:
    """Resident set size now (not the peak), from /proc (Linux); 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def watch(sim: Simulation, every: float, max_rss_gb: float | None, w0: float, c0: float) -> None:
    """Every ``every`` virtual seconds print virtual time, wall and CPU so far, RSS now and peak,
    link ends and completions (stderr); stop the run once RSS passes ``max_rss_gb``."""

    def tick() -> None:
        rss = rss_now_mb()
        n = len(sim.nodes)
        line = {
            "t": round(sim.tl.now(), 3),
            "wall_s": round(time.perf_counter() - w0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "rss_mb": round(rss),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_kb_per_node": round(rss * 1024 / max(1, n), 1),
            "link_ends": sim.link_ends,
            "finished": sim.finished,
            "load_avg_1min": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(line), file=sys.stderr, flush=True)
        if max_rss_gb is not None and rss > max_rss_gb * 1024:
            print(f"RSS {rss:.0f} MB > {max_rss_gb} GB: stopping the run", file=sys.stderr, flush=True)
            sim._stop("max_rss")
            return
        sim.at(sim.tl.now() + every, tick)

    sim.at(0.0, tick)


def run(
    path: Path,
    count: int | None,
    seed: int,
    profile: bool,
    memory_at: float | None = None,
    watch_every: float | None = None,
    max_rss_gb: float | None = None,
) -> dict:
    overrides = {"groups.frontends.count": count} if count is not None else {}
    w0, c0 = time.perf_counter(), time.process_time()
    sc = scenario.load(path, overrides)
    b = bounds.for_scenario(sc)
    sim = Simulation(sc, seed, log_pieces=False)
    setup_s = time.process_time() - c0
    if watch_every is not None:
        watch(sim, watch_every, max_rss_gb, w0, c0)
    snap: dict[str, Any] = {}
    if memory_at is not None:

        def take() -> None:
            snap["snap"] = tracemalloc.take_snapshot()
            snap["links"] = sum(len(n.links) for n in sim.nodes)

        sim.at(memory_at, take)
        tracemalloc.start(1)
    prof = cProfile.Profile() if profile else None
    w0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    r = sim.run()
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    if memory_at is not None:
        tracemalloc.stop()
    times = r.completion_times()
    out = {
        "scenario": sc.name,
        "nodes": sum(g.count for g in sc.groups),
        "pieces": sc.manifest.num_pieces,
        "seed": seed,
        "stopped_by": r.stopped_by,
        "setup_cpu_s": round(setup_s, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "virtual_s": round(r.end_time, 3),
        "completed": len(times),
        "median_over_T_min": round(report.quantile(times, 0.5) / b["T_min"], 3) if times else None,
        "max_over_T_min": round(times[-1] / b["T_min"], 3) if times else None,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_link_ends_per_node": round(r.stats["peak_link_ends"] / max(1, len(r.nodes)), 1),
        "load_avg_1min": round(os.getloadavg()[0], 1),  # the machine is shared: read wall with it
        **{k: r.stats[k] for k in ("messages", "flows", "peak_flows", "level_steps")},
    }
    if snap:
        out["memory"] = memory_by_layer(snap["snap"], snap["links"])
    if prof:
        layers = by_layer(pstats.Stats(prof))
        total = sum(layers.values())
        out["profile_share"] = {k: round(v / total, 3) for k, v in layers.items()}
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default=str(scenario.SCENARIO_DIR / "scale_1000.toml"))
    ap.add_argument("--sizes", help="comma-separated frontend counts (default: as in the file)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--memory",
        type=float,
        metavar="T",
        help="tracemalloc snapshot at virtual time T: bytes by layer and per link end "
        "(slows the run ~2x; RSS then includes tracemalloc's own tables)",
    )
    ap.add_argument("--watch", type=float, metavar="DT", help="print RSS, CPU, link ends every DT virtual s")
    ap.add_argument("--max-rss", type=float, metavar="GB", help="with --watch: stop the run past this RSS")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else [None]
    for n in sizes:
        print(
            json.dumps(run(Path(a.scenario), n, a.seed, a.profile, a.memory, a.watch, a.max_rss)), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
