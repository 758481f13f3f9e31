"""Judge a `swarm-sim run` with churn against bounds for the schedule it drew (issue #12 item 4).

    python scripts/sim_churn_bounds.py OUT_DIR [OUT_DIR ...]

For every seed in OUT_DIR (events_seedN.csv, summary.json):

- per fetching node, the online-time bound: the node receives nothing while offline, so it cannot
  complete before it has been online for F / d (``bounds.online_time_bound``); completion times and
  bounds are counted from the node's first arrival, as in summary.json;
- with churning seeds and fetching nodes present from t = 0 (worker_churn.toml), Kumar & Ross with
  the seeds' upload as it was online (``bounds.varying_capacity_bound``).

It prints, per seed, the last completion against the largest per-node bound (and against the
static T_min), the median of completion / bound over nodes, and the time-varying bound.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations import bounds, scenario


def judge(out: Path) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    sc = scenario.load(Path(summary["source"]), summary.get("overrides") or {})
    F = float(sc.file_bytes)
    t_min = summary["bounds"]["T_min"]
    groups = {g.name: g for g in sc.groups}
    rows = []
    for seed in summary["seeds"]:
        online: dict[str, list[list[float]]] = defaultdict(list)
        done: dict[str, float] = {}
        with open(out / f"events_seed{seed}.csv", newline="") as fh:
            events = list(csv.DictReader(fh))
        for e in events:
            t, ev, node = float(e["t"]), e["event"], e["node"]
            if ev == "arrive":
                online[node].append([t, math.inf])
            elif ev == "depart" and online[node] and online[node][-1][1] == math.inf:
                online[node][-1][1] = t
            elif ev == "complete":
                done[node] = t
        per_node = []
        for node, spans in online.items():
            g = groups[node.rsplit("-", 1)[0]]
            if not g.fetches or node not in done:
                continue
            a = spans[0][0]
            b = bounds.online_time_bound([(s, e) for s, e in spans], F / g.download) - a
            per_node.append((done[node] - a, b, node))
        last, _, last_node = max(per_node)
        worst_bound = max(b for _, b, _ in per_node)
        row = {
            "seed": seed,
            "T_min": t_min,
            "last": last,
            "last_over_T_min": last / t_min,
            "largest_online_bound": worst_bound,
            "last_over_bound": last / max(worst_bound, t_min),
            "last_node_online_bound": next(b for c, b, n in per_node if n == last_node),
            "median_completion_over_online_bound": statistics.median(c / b for c, b, _ in per_node),
            "nodes_needing_more_than_one_session": sum(
                1 for _, b, n in per_node if b > online[n][0][1] - online[n][0][0]
            ),
        }
        seeds = [g for g in sc.groups if g.role == "seed"]
        fetch = [g for g in sc.groups if g.fetches and g.count]
        if all(g.arrival.process == "flash" and g.session.mean == math.inf for g in fetch):
            steps: dict[float, int] = defaultdict(int)
            for node, spans in online.items():
                if groups[node.rsplit("-", 1)[0]].role == "seed":
                    u = groups[node.rsplit("-", 1)[0]].upload
                    for s, e in spans:
                        steps[s] += u
                        if e < math.inf:
                            steps[e] -= u
            level, seed_upload = 0.0, []
            for t in sorted(steps):
                level += steps[t]
                seed_upload.append((t, level))
            N = sum(g.count for g in fetch)
            fetch_up = sum(g.upload * g.count for g in fetch if g.serve)
            d_min = min(g.download for g in fetch)
            tv = bounds.varying_capacity_bound(F, N, seed_upload, fetch_up, d_min)
            row["varying_capacity_bound"] = tv
            row["last_over_varying_bound"] = last / tv
            row["seed_upload_mean_until_last"] = _mean_level(seed_upload, last) / sum(
                g.upload * g.count for g in seeds
            )
        rows.append(row)
    return rows


def _mean_level(steps: list[tuple[float, float]], until: float) -> float:
    acc = 0.0
    for k, (t0, u) in enumerate(steps):
        t1 = min(steps[k + 1][0] if k + 1 < len(steps) else until, until)
        if t1 > t0:
            acc += u * (t1 - t0)
    return acc / until


def main(argv: list[str]) -> int:
    for d in argv or ["."]:
        for row in judge(Path(d)):
            print(d, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
