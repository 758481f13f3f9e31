"""What a run leaves behind: the event log (CSV), a JSON summary, and PNG plots.

Plots (matplotlib, only imported here):
- ``completion_cdf.png``: fraction of fetching nodes done by time t, mean over seeds with a 95%
  confidence band (Student t over the per-seed curves), with T_min marked;
- ``seeder_upload.png``: upload rate of the seed groups over time, mean over seeds with a 95% band,
  and their capacity;
- ``completion_over_bound.png``: completion time / T_min (Kumar-Ross), per seed and pooled.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.sim import SimResult

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t95(n: int) -> float:
    """Half-width factor of a 95% confidence interval of a mean of ``n`` samples."""
    if n < 2:
        return math.nan
    df = n - 1
    return _T95[df - 1] if df <= len(_T95) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": m, "ci95": None, "n": len(vals)}
    half = t95(len(vals)) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": m, "ci95": half, "n": len(vals)}


def quantile(sorted_vals: Sequence[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# --------------------------------------------------------------------------- files


def write_events(result: SimResult, path: Path) -> None:
    """The event log: one row per event, times in seconds with microsecond precision."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["t", "event", "node", "peer", "value"])
        for t, ev, node, peer, value in result.events:
            w.writerow([f"{t:.6f}", ev, node, peer, value])


def events_text(result: SimResult) -> str:
    """The event log as it would be written to CSV (for comparing runs)."""
    return "".join(f"{t:.6f},{ev},{node},{peer},{value}\n" for t, ev, node, peer, value in result.events)


def start_of_fetch(result: SimResult) -> dict[str, float | None]:
    """Median over fetching hosts of the seconds from arrival to the manifest chosen and to the
    first piece (each host's first ``manifest`` / ``first_piece`` event; both sides log them)."""
    firsts: dict[str, dict[str, float]] = {"manifest": {}, "first_piece": {}}
    for _t, ev, node, _peer, value in result.events:
        if ev in firsts and node not in firsts[ev]:
            with contextlib.suppress(TypeError, ValueError):
                firsts[ev][node] = float(value)
    return {k: quantile(sorted(v.values()), 0.5) for k, v in firsts.items()}


def _wasted(stats: dict[str, Any]) -> int | None:
    """Piece bytes received late or twice, all hosts (the testbed keeps them per host)."""
    w = stats.get("wasted_bytes")
    if isinstance(w, dict):
        return int(sum(w.values()))
    return int(w) if w is not None else None


def seed_summary(result: SimResult, bounds: dict[str, Any], wall: float | None = None) -> dict[str, Any]:
    times = result.completion_times()
    fetchers = [n for n in result.nodes if n.role == "fetch"]
    cfg = sorted(
        n.configs_at - n.first_arrival
        for n in fetchers
        if n.configs_at is not None and n.first_arrival is not None
    )
    t_min = bounds["T_min"]
    out: dict[str, Any] = {
        "seed": result.seed,
        "end_time": result.end_time,
        "stopped_by": result.stopped_by,
        "fetchers": len(fetchers),
        "completed": len(times),
        "unfinished": len(fetchers) - len(times),
        "completion": {
            "min": times[0] if times else None,
            "median": quantile(times, 0.5),
            "mean": statistics.fmean(times) if times else None,
            "p90": quantile(times, 0.9),
            "max": times[-1] if times else None,
        },
        "configs_ready_median": quantile(cfg, 0.5),
        "start": start_of_fetch(result),
        "wasted_bytes": _wasted(result.stats),
        "stats": result.stats,
        "groups": {},
    }
    if t_min:
        out["over_T_min"] = {k: (v / t_min if v is not None else None) for k, v in out["completion"].items()}
    if bounds.get("T_client_server"):
        tc = bounds["T_client_server"]
        out["over_T_client_server"] = {
            k: (v / tc if v is not None else None) for k, v in out["completion"].items()
        }
    for g in sorted({n.group for n in result.nodes}):
        members = [n for n in result.nodes if n.group == g]
        gt = result.completion_times(g)
        out["groups"][g] = {
            "nodes": len(members),
            "completed": len(gt),
            "median": quantile(gt, 0.5),
            "bytes_up": sum(n.bytes_up for n in members),
            "bytes_down": sum(n.bytes_down for n in members),
            "departures": sum(n.departures for n in members),
        }
    if wall is not None:
        out["wall_seconds"] = wall
    return out


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for key in ("median", "mean", "p90", "max"):
        agg[f"completion_{key}"] = mean_ci(
            [s["completion"][key] for s in summaries if s["completion"][key] is not None]
        )
        if all("over_T_min" in s for s in summaries):
            agg[f"{key}_over_T_min"] = mean_ci(
                [s["over_T_min"][key] for s in summaries if s["over_T_min"][key] is not None]
            )
    agg["unfinished"] = mean_ci([s["unfinished"] for s in summaries])
    agg["configs_ready_median"] = mean_ci(
        [s["configs_ready_median"] for s in summaries if s["configs_ready_median"] is not None]
    )
    walls = [s["wall_seconds"] for s in summaries if "wall_seconds" in s]
    if walls:
        agg["wall_seconds"] = mean_ci(walls)
    return agg


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return None
    if hasattr(o, "__dict__"):
        return vars(o)
    return str(o)


# --------------------------------------------------------------------------- curves


def cdf_curves(results: list[SimResult], grid: list[float]) -> list[list[float]]:
    """Per seed: fraction of fetching nodes done by each grid time."""
    out = []
    for r in results:
        times = r.completion_times()
        n = sum(1 for x in r.nodes if x.role == "fetch") or 1
        row, k = [], 0
        for t in grid:
            while k < len(times) and times[k] <= t:
                k += 1
            row.append(k / n)
        out.append(row)
    return out


def upload_curves(results: list[SimResult], groups: list[str], grid: list[float]) -> list[list[float]]:
    """Per seed: upload rate (bytes/s) of ``groups`` over each grid interval (0 after the end)."""
    out = []
    for r in results:
        pts = [(t, sum(up.get(g, 0.0) for g in groups)) for t, _, up in r.samples]
        # cumulative bytes at both ends of each interval, by linear interpolation of the samples
        row = [(_interp(pts, b) - _interp(pts, a)) / (b - a) for a, b in itertools.pairwise(grid)]
        out.append(row)
    return out


def _interp(pts: list[tuple[float, float]], t: float) -> float:
    if not pts:
        return 0.0
    if t <= pts[0][0]:
        return pts[0][1]
    if t >= pts[-1][0]:
        return pts[-1][1]
    lo, hi = 0, len(pts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pts[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, v0), (t1, v1) = pts[lo], pts[hi]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1


def band(rows: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% band (Student t) per column."""
    mean, lo, hi = [], [], []
    n = len(rows)
    for col in zip(*rows, strict=True):
        m = statistics.fmean(col)
        h = t95(n) * statistics.stdev(col) / math.sqrt(n) if n > 1 else 0.0
        mean.append(m)
        lo.append(m - h)
        hi.append(m + h)
    return mean, lo, hi


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(
    results: list[SimResult], bounds: dict[str, Any], seed_groups: list[str], out: Path, title: str
) -> list[Path]:
    """Write the three PNGs; returns their paths (none if matplotlib is missing)."""
    try:
        plt = _plt()
    except ImportError:  # pragma: no cover - matplotlib is the `sim` extra
        return []
    paths = []
    end = max([r.end_time for r in results] + [1e-9])
    grid = [end * i / 400 for i in range(401)]
    n = len(results)
    t_min = bounds["T_min"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = cdf_curves(results, grid)
    m, lo, hi = band(rows)
    ax.plot(grid, m, color="C0", label=f"mean over {n} seed{'s' if n > 1 else ''}")
    if n > 1:
        ax.fill_between(
            grid,
            [max(0, v) for v in lo],
            [min(1, v) for v in hi],
            color="C0",
            alpha=0.25,
            label="95% confidence band",
        )
    ax.axvline(t_min, color="k", ls="--", lw=1, label=f"T_min (Kumar-Ross) = {t_min:.3g} s")
    xmax = max(end, t_min) * 1.05
    tcs = bounds.get("T_client_server")
    if tcs and tcs != t_min and tcs <= xmax:
        ax.axvline(tcs, color="grey", ls=":", lw=1, label=f"client-server N*F/u_s = {tcs:.3g} s")
    ax.set_xlim(0, xmax)
    ax.set_xlabel("time since the node arrived (s)")
    ax.set_ylabel("fraction of fetching nodes done")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}: completion CDF")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "completion_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    step = max(r.samples[1][0] - r.samples[0][0] if len(r.samples) > 1 else 1.0 for r in results)
    ugrid = [i * step for i in range(int(end / step) + 2)]
    urows = upload_curves(results, seed_groups, ugrid)
    um, ulo, uhi = band(urows)
    mids = [(a + b) / 2 for a, b in itertools.pairwise(ugrid)]
    scale = 8 / 1e6
    ax.plot(mids, [v * scale for v in um], color="C1", label="mean upload of seed nodes")
    if n > 1:
        cap = bounds["u_s"]
        ax.fill_between(
            mids,
            [max(0.0, v) * scale for v in ulo],
            [min(cap, v) * scale for v in uhi],
            color="C1",
            alpha=0.25,
            label="95% confidence band",
        )
    ax.axhline(bounds["u_s"] * scale, color="k", ls="--", lw=1, label="seed capacity u_s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Mbit/s")
    ax.set_title(f"{title}: seeder upload over time")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "seeder_upload.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    pooled: list[float] = []
    for i, r in enumerate(results):
        ratios = [t / t_min for t in r.completion_times()]
        pooled += ratios
        if ratios:
            ys = [(k + 1) / len(ratios) for k in range(len(ratios))]
            ax.step(
                ratios, ys, where="post", color="C2", alpha=0.35, lw=0.8, label="per seed" if i == 0 else None
            )
    pooled.sort()
    if pooled:
        ax.step(
            pooled,
            [(k + 1) / len(pooled) for k in range(len(pooled))],
            where="post",
            color="C2",
            lw=2,
            label="all seeds",
        )
        med = quantile(pooled, 0.5)
        ax.axvline(med, color="C2", ls=":", lw=1, label=f"median = {med:.3f} x T_min")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="T_min")
    ax.set_xlabel("completion time / T_min")
    ax.set_ylabel("fraction of completed nodes")
    ax.set_title(f"{title}: completion over the Kumar-Ross bound")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "completion_over_bound.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_sweep(
    key: str,
    values: list[Any],
    aggs: list[dict[str, Any]],
    bounds: list[dict[str, Any]],
    path: Path,
    title: str,
) -> Path | None:
    try:
        plt = _plt()
    except ImportError:  # pragma: no cover
        return None
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key_, label, color in (
        ("completion_median", "median completion", "C0"),
        ("completion_max", "last completion", "C3"),
    ):
        ms = [a[key_]["mean"] for a in aggs]
        cis = [a[key_]["ci95"] or 0.0 for a in aggs]
        ok = [(x, m, c) for x, m, c in zip(xs, ms, cis, strict=True) if m is not None]
        if ok:
            ax.errorbar(
                [o[0] for o in ok],
                [o[1] for o in ok],
                yerr=[o[2] for o in ok],
                marker="o",
                color=color,
                capsize=3,
                label=f"{label} (mean, 95% CI)",
            )
    ax.plot(xs, [b["T_min"] for b in bounds], "k--", lw=1, label="T_min (Kumar-Ross)")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel("seconds")
    ax.set_title(f"{title}: sweep over {key}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
