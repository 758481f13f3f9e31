"""The simulator's prediction next to the testbed's measurement of one scenario: a table and a figure.

Per repetition (testbed) and per seed (simulator) the same statistics are taken from the two
``summary.json`` documents: median, p90 and last completion time, and what the seed group uploaded
over the model size. The table gives mean, spread (min-max) and the simulator's error relative to
the testbed for each.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from simulations import report

QUANTITIES = (
    ("median", "median completion (s)"),
    ("p90", "p90 completion (s)"),
    ("max", "last completion (s)"),
    ("seed_upload", "worker upload / model"),
    ("wasted", "piece bytes received twice or late / model"),
    ("manifest", "arrival to manifest, median over hosts (s)"),
    ("first_piece", "arrival to first piece, median over hosts (s)"),
)


def _values(doc: dict[str, Any], key: str) -> list[float]:
    out = []
    F = doc["bounds"]["F_bytes"]
    for s in doc["per_seed"]:
        if key == "seed_upload":
            seeds = doc.get("seed_groups") or []
            up = sum(s["groups"][g]["bytes_up"] for g in seeds if g in s["groups"])
            out.append(up / F if F else 0.0)
        elif key == "wasted":
            if s.get("wasted_bytes") is not None and F:
                out.append(s["wasted_bytes"] / F)
        elif key in ("manifest", "first_piece"):
            v = (s.get("start") or {}).get(key)
            if v is not None:
                out.append(v)
        else:
            v = s["completion"][key]
            if v is not None:
                out.append(v)
    return out


def _stat(vals: list[float]) -> dict[str, Any]:
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def compare(sim_doc: dict[str, Any], tb_doc: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for key, label in QUANTITIES:
        s, t = _stat(_values(sim_doc, key)), _stat(_values(tb_doc, key))
        err = (s["mean"] / t["mean"] - 1) if s["mean"] is not None and t["mean"] else None
        rows.append({"key": key, "label": label, "sim": s, "testbed": t, "sim_error": err})
    unfinished = sum(s["unfinished"] for s in tb_doc["per_seed"])
    return {
        "scenario": tb_doc["scenario"],
        "T_min": tb_doc["bounds"]["T_min"],
        "rows": rows,
        "testbed_unfinished": unfinished,
        "testbed_cpu_bound": any(s["stats"].get("cpu_bound") for s in tb_doc["per_seed"]),
    }


def _fmt(st: dict[str, Any]) -> str:
    if st["mean"] is None:
        return "-"
    return f"{st['mean']:.2f} +/- {st['sd']:.2f} ({st['min']:.2f}-{st['max']:.2f})"


def table(cmp: dict[str, Any]) -> str:
    lines = [
        "| quantity | simulator, mean +/- sd (range) | testbed, mean +/- sd (range) | sim / testbed - 1 |",
        "|---|---|---|---|",
    ]
    for r in cmp["rows"]:
        e = f"{r['sim_error'] * 100:+.1f}%" if r["sim_error"] is not None else "-"
        lines.append(f"| {r['label']} | {_fmt(r['sim'])} | {_fmt(r['testbed'])} | {e} |")
    return "\n".join(lines) + "\n"


Curve = tuple[list[float], int]
"""Sorted completion times of one run and its number of fetching nodes."""


def curves(results: list[Any]) -> list[Curve]:
    return [(r.completion_times(), sum(1 for x in r.nodes if x.role == "fetch")) for r in results]


def curves_from_dir(d: Path) -> list[Curve]:
    """The curves of the runs in an output directory (events CSVs + summary.json)."""
    import csv

    doc = json.loads((d / "summary.json").read_text())
    out = []
    for s in doc["per_seed"]:
        with open(d / f"events_seed{s['seed']}.csv") as fh:
            ts = sorted(float(r["value"]) for r in csv.DictReader(fh) if r["event"] == "complete")
        out.append((ts, s["fetchers"]))
    return out


def figure(cmp: dict[str, Any], sim_curves: list[Curve], tb_curves: list[Curve], path: Path) -> Path | None:
    try:
        plt = report._plt()
    except ImportError:  # pragma: no cover - matplotlib is the `sim` extra
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for results, color, name in ((sim_curves, "C0", "simulator"), (tb_curves, "C3", "testbed")):
        for i, (ts, n) in enumerate(results):
            n = n or 1
            if ts:
                ax.step(
                    [0.0, *ts],
                    [0.0, *[(k + 1) / n for k in range(len(ts))]],
                    where="post",
                    color=color,
                    alpha=0.7,
                    lw=1.2,
                    label=f"{name} ({len(results)} run{'s' if len(results) > 1 else ''})" if i == 0 else None,
                )
    ax.axvline(cmp["T_min"], color="k", ls="--", lw=1, label=f"T_min = {cmp['T_min']:.3g} s")
    ax.set_xlabel("time since the host arrived (s)")
    ax.set_ylabel("fraction of fetching hosts done")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{cmp['scenario']}: completion CDF")
    rows = [r for r in cmp["rows"] if r["key"] in ("median", "p90", "max")]
    xs = range(len(rows))
    w = 0.38
    for off, side, color in ((-w / 2, "sim", "C0"), (w / 2, "testbed", "C3")):
        means = [r[side]["mean"] or 0.0 for r in rows]
        pairs = list(zip(means, rows, strict=True))
        lo = [m - (r[side]["min"] if r[side]["min"] is not None else m) for m, r in pairs]
        hi = [(r[side]["max"] if r[side]["max"] is not None else m) - m for m, r in pairs]
        bx.bar(
            [x + off for x in xs],
            means,
            w,
            yerr=[lo, hi],
            capsize=3,
            color=color,
            label="simulator" if side == "sim" else "testbed",
        )
    bx.set_xticks(list(xs), [r["key"] for r in rows])
    bx.axhline(cmp["T_min"], color="k", ls="--", lw=1)
    bx.set_ylabel("seconds (bar: mean, whisker: range)")
    bx.set_title("completion quantiles")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
