#!/usr/bin/env python3
"""Hold the simulator against the namespace testbed and regenerate the "Testbed validation" section
of docs/simulation.md.

    sudo .venv/bin/python scripts/validate_testbed.py [--reps 3] [--out out/validate] [--only NAME]
    .venv/bin/python scripts/validate_testbed.py --from out/validate     # docs from earlier runs
    .venv/bin/python scripts/validate_testbed.py --from out/validate --resim   # + simulate again

Each scenario runs ``swarm-sim testbed SCENARIO --reps N --compare`` (the testbed, then the
simulator on the same seeds with the testbed's latency); the section gets one summary table, each
scenario's per-quantile table, the CPU figures, and its comparison figure
(simulations/figures/testbed_<name>.png). Needs root for the runs (not for ``--from``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations import cli, compare  # noqa: E402

SCENARIOS = ("tb_flash_crowd", "tb_heterogeneous", "tb_vanish", "tb_rolling_churn")
DOC = ROOT / "docs" / "simulation.md"
FIGURES = ROOT / "simulations" / "figures"
BEGIN = "<!-- testbed-validation:begin (scripts/validate_testbed.py writes this section) -->"
END = "<!-- testbed-validation:end -->"
TARGET = 0.10
"""The simulator should predict the testbed's median and last completion within 10%."""
MIN_REPS = {"tb_vanish": 9}
"""Repetitions a scenario gets at least. tb_vanish's late fetchers trade 4 pieces of 4 MiB, so
one piece more or less through a seeder moves a run's median by ~20%: two runs of the same code
on the same day measured a testbed median of 15.65 +/- 1.02 s (6 repetitions) and 18.20 +/- 2.39
s (3), so 3 repetitions cannot tell a 10% error from the testbed's own spread."""


def run(names: list[str], reps: int, out: Path) -> None:
    for name in names:
        t0 = time.perf_counter()
        rc = cli.main(
            [
                "testbed",
                name,
                "--reps",
                str(max(reps, MIN_REPS.get(name, 0))),
                "--compare",
                "--out",
                str(out / name),
                "--quiet",
            ]
        )
        if rc != 0:
            raise SystemExit(f"{name}: swarm-sim testbed exited with {rc}")
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def resimulate(names: list[str], out: Path) -> None:
    """The simulator's side again (e.g. after a model change), against the stored testbed runs."""
    from simulations import report, testbed

    for name in names:
        d = out / name
        tb_doc = json.loads((d / "testbed" / "summary.json").read_text())
        path = cli._resolve(name)
        sim_results: list = []
        sim_doc = cli.run_scenario(
            path,
            testbed.for_testbed(path, tb_doc["overrides"]),
            tb_doc["seeds"],
            d / "sim",
            jobs=1,
            plots=False,
            log_pieces=False,
            quiet=True,
            results_out=sim_results,
        )
        cmp = compare.compare(sim_doc, tb_doc)
        report.write_json(cmp, d / "compare.json")
        (d / "compare.md").write_text(compare.table(cmp))
        compare.figure(
            cmp, compare.curves(sim_results), compare.curves_from_dir(d / "testbed"), d / "compare.png"
        )
        print(f"{name}: simulated again", file=sys.stderr, flush=True)


def cpu_fit(docs: list[dict]) -> dict | None:
    """Least squares over every host of every run: CPU seconds = a x run seconds + b x MB the
    host moved (up + down). a: a node's cost of being there (cores), b: seconds per MB."""
    rows = []
    for doc in docs:
        for s in doc["per_seed"]:
            st, T = s["stats"], s["end_time"]
            per_mb = st.get("cpu_seconds_per_mb", {})
            for h, cpu in st.get("cpu_seconds", {}).items():
                mb = st.get("mb_moved", {}).get(h)
                if mb is None and per_mb.get(h):
                    mb = cpu / per_mb[h]
                if mb is not None and T > 0:
                    rows.append((T, mb, cpu))
    if len(rows) < 3:
        return None
    stt = sum(t * t for t, _m, _c in rows)
    stm = sum(t * m for t, m, _c in rows)
    smm = sum(m * m for _t, m, _c in rows)
    stc = sum(t * c for t, _m, c in rows)
    smc = sum(m * c for _t, m, c in rows)
    det = stt * smm - stm * stm
    if det <= 0:
        return None
    a = (stc * smm - smc * stm) / det
    b = (smc * stt - stc * stm) / det
    return {"core_idle": a, "s_per_mb": b, "hosts": len(rows)}


def budget_lines(fit: dict | None) -> list[str]:
    if fit is None:
        return []
    a, b = fit["core_idle"], fit["s_per_mb"]
    line = 100e6 / 8 / 1e6  # MB/s at 100 Mbit/s
    per_host = a + b * 2 * line  # a fetching host at line rate moves ~its download + as much up
    fits = int(2 / per_host) if per_host > 0 else 0
    rate_for_16 = ((2 / 16 - a) / (2 * b) * 8) if b > 0 else float("inf")
    return [
        f"CPU model, least squares over {fit['hosts']} host-runs of the runs above: a node costs "
        f"**{a:.3f} core** while it runs plus **{b * 1000:.0f} ms per MB** it moves (up + down). "
        f"A host fetching at 100 Mbit/s and serving as much moves ~{2 * line:.0f} MB/s: "
        f"~{per_host:.2f} core, so 16 such hosts need ~{16 * per_host:.1f} cores and 2 cores carry "
        f"~{fits}; 16 hosts fit in 2 cores (with nothing else running) up to ~{rate_for_16:.0f} "
        "Mbit/s per host. These figures are from a machine shared with other jobs (see machine "
        "busy): CPU time includes the cost of contention.",
        "",
    ]


def _row(cmp: dict, key: str) -> dict:
    return next(r for r in cmp["rows"] if r["key"] == key)


def section(names: list[str], out: Path) -> str:
    lines = [
        BEGIN,
        "",
        "Generated by `scripts/validate_testbed.py` from `swarm-sim testbed SCENARIO --reps N "
        "--compare` (testbed first, then the simulator on the same seeds with "
        "`testbed.for_testbed`: every latency set to the testbed's, caps as payload rates, TCP's "
        "uneven shares, the start of a fetch measured on it). Each repetition draws arrival "
        "times and event choices from its seed "
        "exactly as the simulator does. Spread: mean +/- sd (min-max) over repetitions. "
        "Error: simulator mean / testbed mean - 1.",
        "",
        "| scenario | hosts | T_min s | median: sim / testbed | error | last: sim / testbed | "
        "error | within 10% | CPU per host (mean, max) | machine busy | load | nodes' nice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    docs = []
    for name in names:
        d = out / name
        cmp = json.loads((d / "compare.json").read_text())
        tb = json.loads((d / "testbed" / "summary.json").read_text())
        docs.append(tb)
        med, last = _row(cmp, "median"), _row(cmp, "max")
        ok = all(r["sim_error"] is not None and abs(r["sim_error"]) <= TARGET for r in (med, last))
        stats = [s["stats"] for s in tb["per_seed"]]
        cpu_mean = sum(s["cpu_per_host_mean"] for s in stats) / len(stats)
        cpu_max = max(s["cpu_per_host_max"] for s in stats)
        busy = [s["machine_busy"] for s in stats]
        loads = [float(s["loadavg"][0]) for s in stats if s.get("loadavg")]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        nices = sorted({s["nice"] for s in stats if s.get("nice") is not None})
        nice = ", ".join(f"{n:+d}" if n else "0" for n in nices) if nices else "0"
        hosts = sum(g["nodes"] for g in tb["per_seed"][0]["groups"].values())
        lines.append(
            f"| {cmp['scenario']} | {hosts} | {cmp['T_min']:.2f} | "
            f"{med['sim']['mean']:.2f} / {med['testbed']['mean']:.2f} +/- {med['testbed']['sd']:.2f} | "
            f"{med['sim_error'] * 100:+.0f}% | "
            f"{last['sim']['mean']:.2f} / {last['testbed']['mean']:.2f} +/- {last['testbed']['sd']:.2f} | "
            f"{last['sim_error'] * 100:+.0f}% | {'yes' if ok else '**no**'} | "
            f"{cpu_mean * 100:.0f}%, {cpu_max * 100:.0f}% | "
            f"{min(busy) * 100:.0f}-{max(busy) * 100:.0f}% | {load} | {nice} |"
        )
        fig = FIGURES / f"testbed_{name}.png"
        if (d / "compare.png").exists():
            FIGURES.mkdir(exist_ok=True)
            shutil.copy(d / "compare.png", fig)
        unfinished = cmp.get("testbed_unfinished", 0)
        details += [
            f"#### {cmp['scenario']}",
            "",
            tb["description"].replace("\n", " "),
            "",
            compare.table(cmp).rstrip(),
            "",
        ]
        if unfinished:
            details += [f"Testbed: {unfinished} fetch(es) did not finish over all repetitions.", ""]
        if fig.exists():
            details += [f"![{cmp['scenario']}: simulator vs testbed](../simulations/figures/{fig.name})", ""]
    lines += [
        "",
        "CPU per host: node CPU seconds over the run's wall time (1 = one core). "
        "Machine busy: all CPUs over the run, from /proc/stat, other jobs on the machine "
        "included; above 90% a run is flagged CPU-bound in its summary.json. Load: the "
        "1-minute load average at each run's end (2 cores). Nodes' nice: the scheduling priority "
        "of the node processes and the testbed during the runs (`simulations.testbed.NODE_NICE`; "
        "0 = the same as the machine's other jobs, before December 2026).",
        "",
        *budget_lines(cpu_fit(docs)),
    ]
    return "\n".join(lines + details + [END]) + "\n"


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc = head + text.rstrip("\n") + tail
    else:
        doc = doc.rstrip("\n") + "\n\n### Testbed validation\n\n" + text
    DOC.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="out/validate_testbed")
    ap.add_argument("--from", dest="from_dir", help="only regenerate the docs from this directory")
    ap.add_argument("--only", action="append", help="scenario name (repeatable)")
    ap.add_argument(
        "--resim",
        action="store_true",
        help="with --from: run the simulator's side again before writing the docs",
    )
    a = ap.parse_args()
    names = a.only or list(SCENARIOS)
    out = Path(a.from_dir or a.out)
    if not a.from_dir:
        run(names, a.reps, out)
    elif a.resim:
        resimulate([n for n in names if (out / n / "testbed" / "summary.json").exists()], out)
    write_doc(section([n for n in SCENARIOS if (out / n / "compare.json").exists()], out))
    print(f"wrote the testbed validation section of {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
