"""``swarm-sim``: run scenarios in virtual time and write logs, summaries and plots.

    swarm-sim run SCENARIO.toml --seeds 10 --out DIR [--jobs 2] [--set groups.frontends.count=200]
    swarm-sim run SCENARIO.toml --seeds 5 --out DIR --sweep groups.frontends.count=50,100,200
    swarm-sim testbed SCENARIO.toml --reps 3 --out DIR [--compare]   (root: network namespaces)
    swarm-sim bounds SCENARIO.toml
    swarm-sim list

SCENARIO is a path or the name of a shipped scenario (``swarm-sim list``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from simulations import bounds as bounds_mod
from simulations import report, scenario
from simulations.units import fmt_rate, fmt_size


def _resolve(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    cand = scenario.SCENARIO_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if cand.exists():
        return cand
    raise SystemExit(
        f"swarm-sim: no scenario {name!r} (a path, or one of: "
        f"{', '.join(p.stem for p in scenario.shipped())})"
    )


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"swarm-sim: --set wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = scenario.parse_value(v.strip())
    return out


#: Peak RSS of one run per node, measured with scale_1000.toml (~60 link ends per node, each holding
#: the engine core's per-peer state; no trio since issue #13; piece sets as int bits, issue #17):
#: 0.18 MB per node at 1,000 nodes, 0.17 MB at 10,000 (1,664 MB peak); rounded up. Keeps parallel
#: seeds within the memory there is.
RSS_PER_NODE = 0.25e6
#: Peak RSS of a run apart from its nodes (the interpreter, trio, the engine's modules).
RSS_BASE = 100e6


def _available_memory() -> float | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def jobs_that_fit(nodes: int, available: float | None) -> int:
    """Parallel runs of ``nodes`` nodes that fit in ``available`` bytes (at least one)."""
    if available is None:
        return 1 << 30
    return max(1, int(available // (RSS_BASE + nodes * RSS_PER_NODE)))


def _run_one(
    path: str, overrides: dict[str, Any], seed: int, out_dir: str, log_pieces: bool | None, quiet: bool
) -> tuple[dict[str, Any], Any]:
    """One seed (in a worker process): run, write the event log, return summary and result."""
    from simulations.sim import Simulation

    sc = scenario.load(path, overrides)
    b = bounds_mod.for_scenario(sc)

    def progress(t: float, done: int, total: int) -> None:
        if not quiet:
            print(
                f"  seed {seed}: t={t:9.2f} s virtual, {done}/{total} nodes done", file=sys.stderr, flush=True
            )

    sim = Simulation(sc, seed, progress=progress, log_pieces=log_pieces)
    t0 = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - t0
    report.write_events(result, Path(out_dir) / f"events_seed{seed}.csv")
    summary = report.seed_summary(result, b, wall)
    light = type(result)(
        result.scenario,
        result.seed,
        result.end_time,
        result.stopped_by,
        result.nodes,
        [],
        result.samples,
        result.stats,
    )
    return summary, light


def run_scenario(
    path: Path,
    overrides: dict[str, Any],
    seeds: list[int],
    out: Path,
    *,
    jobs: int,
    plots: bool,
    log_pieces: bool | None,
    quiet: bool,
    results_out: list[Any] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    sc = scenario.load(path, overrides)
    b = bounds_mod.for_scenario(sc)
    n_nodes = sum(g.count for g in sc.groups)
    if jobs > 1 and len(seeds) > 1:
        fit = jobs_that_fit(n_nodes, _available_memory())
        if fit < jobs:
            print(
                f"swarm-sim: {jobs} parallel runs of {n_nodes} nodes need ~"
                f"{fmt_size(jobs * (RSS_BASE + n_nodes * RSS_PER_NODE))} of memory; running "
                f"{fit} at a time",
                file=sys.stderr,
                flush=True,
            )
            jobs = fit
    if not quiet:
        print(
            f"{sc.name}: {n_nodes} nodes, {fmt_size(sc.file_bytes)} in {sc.manifest.num_pieces} "
            f"pieces, T_min {b['T_min']:.3f} s; {len(seeds)} seed(s), {jobs} job(s) -> {out}",
            file=sys.stderr,
            flush=True,
        )
    results: dict[int, Any] = {}
    summaries: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()

    def done(seed: int, summary: dict[str, Any], res: Any) -> None:
        summaries[seed], results[seed] = summary, res
        if not quiet:
            c = summary["completion"]
            med = f"{c['median']:.3f} s" if c["median"] is not None else "-"
            ratio = summary.get("over_T_min", {}).get("median")
            rtxt = f" ({ratio:.3f} x T_min)" if ratio else ""
            el = time.perf_counter() - t0
            left = len(seeds) - len(summaries)
            eta = el / len(summaries) * left / max(1, jobs) if left else 0.0
            print(
                f"[{len(summaries)}/{len(seeds)}] seed {seed}: median {med}{rtxt}, "
                f"{summary['completed']}/{summary['fetchers']} done, "
                f"{summary['wall_seconds']:.1f} s wall; eta {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    args = [(str(path), overrides, s, str(out), log_pieces, quiet) for s in seeds]
    if jobs <= 1 or len(seeds) == 1:
        for a in args:
            done(a[2], *_run_one(*a))
    else:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
            futs = {ex.submit(_run_one, *a): a[2] for a in args}
            for f in cf.as_completed(futs):
                done(futs[f], *f.result())
    ordered = [summaries[s] for s in seeds]
    res_list = [results[s] for s in seeds]
    if results_out is not None:
        results_out.extend(res_list)
    doc = {
        "scenario": sc.name,
        "description": sc.description,
        "source": str(path),
        "overrides": overrides,
        "seeds": seeds,
        "bounds": b,
        "seed_groups": [g.name for g in sc.groups if g.role == "seed"],
        "aggregate": report.aggregate(ordered),
        "per_seed": ordered,
    }
    report.write_json(doc, out / "summary.json")
    if plots:
        seed_groups = [g.name for g in sc.groups if g.role == "seed"]
        report.plot_all(res_list, b, seed_groups, out, sc.name)
    if not quiet:
        a = doc["aggregate"]
        med = a["completion_median"]
        line = f"{sc.name}: median completion {_fmt_ci(med)} s"
        if "median_over_T_min" in a:
            line += f" = {_fmt_ci(a['median_over_T_min'])} x T_min"
        print(line + f"; wrote {out}", file=sys.stderr, flush=True)
    return doc


def _fmt_ci(d: dict[str, Any]) -> str:
    if d.get("mean") is None:
        return "-"
    if d.get("ci95") is None:
        return f"{d['mean']:.3f}"
    return f"{d['mean']:.3f} +/- {d['ci95']:.3f}"


def cmd_run(a: argparse.Namespace) -> int:
    path = _resolve(a.scenario)
    overrides = _parse_sets(a.set or [])
    seeds = [a.seed0 + i for i in range(a.seeds)]
    jobs = a.jobs or min(len(seeds), os.cpu_count() or 1)
    out = Path(a.out)
    log_pieces = False if a.no_piece_log else None
    if not a.sweep:
        run_scenario(
            path, overrides, seeds, out, jobs=jobs, plots=not a.no_plots, log_pieces=log_pieces, quiet=a.quiet
        )
        return 0
    if "=" not in a.sweep:
        raise SystemExit("swarm-sim: --sweep wants KEY=V1,V2,...")
    key, vals = a.sweep.split("=", 1)
    values = [scenario.parse_value(v.strip()) for v in vals.split(",") if v.strip()]
    docs = []
    for i, v in enumerate(values):
        if not a.quiet:
            print(f"== sweep {key} = {v!r} ({i + 1}/{len(values)})", file=sys.stderr, flush=True)
        sub = out / f"{key}={v}".replace("/", "_").replace(" ", "")
        docs.append(
            run_scenario(
                path,
                {**overrides, key: v},
                seeds,
                sub,
                jobs=jobs,
                plots=not a.no_plots,
                log_pieces=log_pieces,
                quiet=a.quiet,
            )
        )
    sweep = {
        "scenario": docs[0]["scenario"] if docs else "",
        "parameter": key,
        "values": values,
        "points": [
            {"value": v, "bounds": d["bounds"], "aggregate": d["aggregate"]}
            for v, d in zip(values, docs, strict=True)
        ],
    }
    report.write_json(sweep, out / "sweep.json")
    if not a.no_plots and docs:
        report.plot_sweep(
            key,
            values,
            [d["aggregate"] for d in docs],
            [d["bounds"] for d in docs],
            out / "sweep.png",
            docs[0]["scenario"],
        )
    if not a.quiet:
        print(f"sweep over {key}: wrote {out / 'sweep.json'}", file=sys.stderr)
    return 0


def run_testbed(
    path: Path,
    overrides: dict[str, Any],
    seeds: list[int],
    out: Path,
    *,
    lane: str,
    plots: bool,
    quiet: bool,
    keep_logs: bool = False,
    timeout: float | None = None,
    results_out: list[Any] | None = None,
    queue: str | None = None,
    nice: int | None = None,
) -> dict[str, Any]:
    """Each seed once on the testbed (one repetition per seed: its arrival times and event
    choices); writes what ``run_scenario`` writes."""
    from simulations import testbed

    out.mkdir(parents=True, exist_ok=True)
    sc = scenario.load(path, overrides)
    testbed.check_supported(sc)
    b = bounds_mod.for_scenario(sc)
    removed = testbed.cleanup_stale()
    say = (lambda m: None) if quiet else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    if removed:
        say(f"removed {len(removed)} namespace(s) left by a killed run: {', '.join(removed)}")
    if not quiet:
        print(
            f"{sc.name} on the testbed: {sum(g.count for g in sc.groups)} hosts, "
            f"{fmt_size(sc.file_bytes)}, T_min {b['T_min']:.3f} s; {len(seeds)} repetition(s) "
            f"-> {out}",
            file=sys.stderr,
            flush=True,
        )
    summaries, res_list = [], []
    with testbed.signals_raise():
        for seed in seeds:
            t0 = time.perf_counter()
            tb = testbed.Testbed(
                sc,
                seed,
                lane=lane,
                progress=say,
                timeout=timeout,
                keep=out / "logs" if keep_logs else None,
                queue=queue or testbed.TBF_LATENCY,
                nice=testbed.NODE_NICE if nice is None else (nice or None),
            )
            result = tb.run()
            wall = time.perf_counter() - t0
            report.write_events(result, out / f"events_seed{seed}.csv")
            _write_samples(result, out / f"samples_seed{seed}.csv")
            s = report.seed_summary(result, b, wall)
            summaries.append(s)
            res_list.append(result)
            if not quiet:
                c = s["completion"]
                st = s["stats"]
                med = f"{c['median']:.3f} s" if c["median"] is not None else "-"
                last = f"{c['max']:.3f} s" if c["max"] is not None else "-"
                print(
                    f"[{len(summaries)}/{len(seeds)}] seed {seed}: median {med}, last {last}, "
                    f"{s['completed']}/{s['fetchers']} done; CPU per host "
                    f"{st['cpu_per_host_mean'] * 100:.0f}% mean, {st['cpu_per_host_max'] * 100:.0f}% "
                    f"max; machine {st['machine_busy'] * 100:.0f}% busy"
                    f"{' (CPU-BOUND)' if st['cpu_bound'] else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    if results_out is not None:
        results_out.extend(res_list)
    doc = {
        "scenario": sc.name,
        "description": sc.description,
        "source": str(path),
        "overrides": overrides,
        "seeds": seeds,
        "testbed": {
            "lane": lane,
            "latency_s": testbed.TESTBED_LATENCY,
            "tbf_latency": queue or testbed.TBF_LATENCY,
        },
        "bounds": b,
        "seed_groups": [g.name for g in sc.groups if g.role == "seed"],
        "aggregate": report.aggregate(summaries),
        "per_seed": summaries,
    }
    report.write_json(doc, out / "summary.json")
    if plots:
        report.plot_all(res_list, b, doc["seed_groups"], out, f"{sc.name} (testbed)")
    return doc


def _write_samples(result: Any, path: Path) -> None:
    """Bytes each group had uploaded at each sample (the nodes' own counters)."""
    groups = sorted({n.group for n in result.nodes})
    with path.open("w") as fh:
        fh.write(",".join(["t", "completed", *[f"up_{g}" for g in groups]]) + "\n")
        for t, done, up in result.samples:
            fh.write(",".join([f"{t:.3f}", str(done), *[str(int(up.get(g, 0))) for g in groups]]) + "\n")


def cmd_testbed(a: argparse.Namespace) -> int:
    from simulations import compare, testbed

    why = testbed.available()
    if why is not None:
        print(f"swarm-sim testbed: {why}", file=sys.stderr)
        return 3
    path = _resolve(a.scenario)
    overrides = _parse_sets(a.set or [])
    seeds = [a.seed0 + i for i in range(a.reps)]
    out = Path(a.out)
    tb_results: list[Any] = []
    try:
        tb_doc = run_testbed(
            path,
            overrides,
            seeds,
            out / "testbed" if a.compare else out,
            lane=a.lane,
            plots=not a.no_plots,
            quiet=a.quiet,
            keep_logs=a.keep_logs,
            timeout=a.timeout,
            results_out=tb_results,
            queue=a.queue,
            nice=a.nice,
        )
    except KeyboardInterrupt:
        print("swarm-sim testbed: interrupted; torn down", file=sys.stderr)
        return 130
    except testbed.TestbedError as e:
        print(f"swarm-sim testbed: {e}", file=sys.stderr)
        return 1
    if not a.compare:
        return 0
    sim_results: list[Any] = []
    sim_doc = run_scenario(
        path,
        testbed.for_testbed(path, overrides),
        seeds,
        out / "sim",
        jobs=1,
        plots=not a.no_plots,
        log_pieces=False,
        quiet=a.quiet,
        results_out=sim_results,
    )
    cmp = compare.compare(sim_doc, tb_doc)
    report.write_json(cmp, out / "compare.json")
    text = compare.table(cmp)
    (out / "compare.md").write_text(text)
    if not a.no_plots:
        compare.figure(cmp, compare.curves(sim_results), compare.curves(tb_results), out / "compare.png")
    print(text, end="")
    return 0


def cmd_bounds(a: argparse.Namespace) -> int:
    sc = scenario.load(_resolve(a.scenario), _parse_sets(a.set or []))
    b = bounds_mod.for_scenario(sc)
    print(
        f"{sc.name}: F = {fmt_size(b['F_bytes'])} ({b['M_pieces']} pieces), N = {b['N']}, "
        f"u_s = {fmt_rate(b['u_s'])}, sum u_i = {fmt_rate(b['sum_u_i']) if b['sum_u_i'] else 0}"
    )
    for k, v in b["T_min_terms"].items():
        if v is not None:
            print(f"  {k:20s} {v:10.3f} s")
    print(f"  T_min (Kumar-Ross)   {b['T_min']:10.3f} s")
    print(f"  client-server        {b['T_client_server']:10.3f} s")
    if "T_mundinger" in b:
        print(f"  piece-level (MWW)    {b['T_mundinger']:10.3f} s")
    if "T_startup" in b:
        print(f"  piece start-up       {b['T_startup']:10.3f} s")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    for p in scenario.shipped():
        sc = scenario.load(p)
        print(f"{p.stem:28s} {sc.description.splitlines()[0] if sc.description else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="swarm-sim", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario over several seeds")
    r.add_argument("scenario")
    r.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    r.add_argument("--seed0", type=int, default=1, help="first seed (default 1)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--jobs", type=int, default=0, help="parallel processes (default: cores)")
    r.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a scenario key, e.g. groups.frontends.count=200 (repeatable)",
    )
    r.add_argument("--sweep", metavar="KEY=V1,V2,...", help="run once per value of one key")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-piece-log", action="store_true", help="leave piece events out of the log")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser(
        "testbed", help="run a scenario on real swarm-node processes in network namespaces (root)"
    )
    t.add_argument("scenario")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--reps", type=int, default=1, help="repetitions, one per seed (default 1)")
    t.add_argument("--seed0", type=int, default=1, help="first seed (default 1)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario key")
    t.add_argument(
        "--compare", action="store_true", help="also simulate the same seeds; write compare.md/json/png"
    )
    t.add_argument(
        "--lane",
        choices=("plaintext", "encrypted", "off"),
        default="plaintext",
        help="the nodes' data lane (default plaintext: less CPU per byte)",
    )
    t.add_argument("--timeout", type=float, help="seconds per repetition (default: stop_at)")
    t.add_argument("--keep-logs", action="store_true", help="copy node logs to OUT/logs")
    t.add_argument(
        "--queue", metavar="TIME", help="tbf queue length as time at the cap (tc's `latency`; default 20ms)"
    )
    t.add_argument(
        "--nice",
        type=int,
        help="nice value of the nodes and the testbed during a run (default -5, 0: as started)",
    )
    t.add_argument("--no-plots", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=cmd_testbed)
    b = sub.add_parser("bounds", help="print the lower bounds of a scenario")
    b.add_argument("scenario")
    b.add_argument("--set", action="append", metavar="KEY=VALUE")
    b.set_defaults(fn=cmd_bounds)
    ls = sub.add_parser("list", help="list the shipped scenarios")
    ls.set_defaults(fn=cmd_list)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except scenario.ScenarioError as e:
        print(f"swarm-sim: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
