#!/usr/bin/env python3
"""Time the simulator: wall and CPU seconds for one seed of a scenario at several sizes.

    .venv/bin/python scripts/bench_sim.py                       # scale_1000: 1,000 nodes
    .venv/bin/python scripts/bench_sim.py --sizes 100,300,999   # the frontend count at each size
    .venv/bin/python scripts/bench_sim.py --profile             # where the time goes, by layer

The result for this machine is in docs/simulation.md ("Scale").
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations import bounds, report, scenario
from simulations.sim import Simulation

LAYERS = (("swarm/engine", "engine"), ("swarm/picker", "picker+choker"),
          ("swarm/choker", "picker+choker"), ("simulations/", "simulator"), ("/trio/", "trio"),
          ("outcome", "trio"), ("random.py", "random"), ("attr", "attrs"))


def by_layer(stats: pstats.Stats) -> dict[str, float]:
    out: collections.Counter[str] = collections.Counter()
    for (fn, _line, _name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        out[next((label for key, label in LAYERS if key in fn), "other (builtins, heapq, ...)")] += tt
    return dict(out.most_common())


def run(path: Path, count: int | None, seed: int, profile: bool) -> dict:
    overrides = {"groups.frontends.count": count} if count is not None else {}
    sc = scenario.load(path, overrides)
    b = bounds.for_scenario(sc)
    sim = Simulation(sc, seed, log_pieces=False)
    prof = cProfile.Profile() if profile else None
    w0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    r = sim.run()
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    times = r.completion_times()
    out = {
        "scenario": sc.name,
        "nodes": sum(g.count for g in sc.groups),
        "pieces": sc.manifest.num_pieces,
        "seed": seed,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "virtual_s": round(r.end_time, 3),
        "completed": len(times),
        "median_over_T_min": round(report.quantile(times, 0.5) / b["T_min"], 3) if times else None,
        "max_over_T_min": round(times[-1] / b["T_min"], 3) if times else None,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **{k: r.stats[k] for k in ("messages", "flows", "peak_flows", "level_steps")},
    }
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
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else [None]
    for n in sizes:
        print(json.dumps(run(Path(a.scenario), n, a.seed, a.profile)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
