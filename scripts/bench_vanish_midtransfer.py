#!/usr/bin/env python
"""Hosts that vanish mid-transfer, on the namespace testbed (issue #12 item 2).

Each repetition runs the flash crowd ``tb_midtransfer`` (1 worker + 8 frontends at 50 Mbit/s, a
69 MB model) without faults, then each fault variant on the same seed:

* ``vanish``: 3 frontends vanish (bridge port down: no FIN, no RST) when the 8 fetchers together
  hold ``--at`` (30%) of their bytes (``tb_vanish_mid.toml``);
* ``kill``: the same 3 are SIGKILLed instead (``tb_kill_mid.toml``);
* ``worker``: the worker vanishes as soon as the frontends hold every piece between them
  (``tb_vanish_worker_mid.toml``), read from their caches: a finished blob, or the written ranges
  of a preallocated ``.incomplete`` (SEEK_DATA / SEEK_HOLE).

The scenario files give the event a fixed time; here it fires on progress instead (a watcher
thread of the run). After it fires, every surviving node's status is polled every 0.25 s: how long
each gone host stays among a transfer's linked peers (``models[].peers``) and holds one of its
upload slots (``models[].unchoked``) is the "link hold" / "slot hold" below (in-process view of
the node, wall time of real processes).

Printed: one JSON line per run and a table per variant: the last surviving frontend's completion
(seconds from the crowd's start) fault / no fault, against the target 1.3. Every run holds the
testbed lock (the caller runs the script under ``flock /tmp/swarm-testbed.lock``).

    sudo flock /tmp/swarm-testbed.lock .venv/bin/python scripts/bench_vanish_midtransfer.py \
        [--reps 2] [--variants vanish,kill,worker] [--out out/vanish_mid] [--keep-logs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations import bounds as bounds_mod  # noqa: E402
from simulations import report, scenario, testbed  # noqa: E402

NOFAULT = "tb_midtransfer"
VARIANTS = {"vanish": "tb_vanish_mid", "kill": "tb_kill_mid", "worker": "tb_vanish_worker_mid"}
TARGET = 1.3
POLL = 0.25


class MidTestbed(testbed.Testbed):
    """A Testbed whose scenario events fire on progress, not at their time: at ``at_fraction`` of
    the fetchers' bytes, or (an event on the worker) as soon as the fetchers hold every piece
    between them. Also watches, once they fired, how long surviving nodes keep links and upload
    slots to the gone hosts."""

    def __init__(self, sc: scenario.Scenario, seed: int, *, at_fraction: float, **kw: Any):
        super().__init__(sc, seed, **kw)
        self.at_fraction = at_fraction
        self.fired_at: float | None = None
        self.fired_info: dict[str, Any] = {}
        self.gone_ids: dict[str, str] = {}  # peer id -> host id of hosts the event took
        self.link_seen: dict[str, float] = {}  # peer id -> last time a survivor listed it
        self.slot_seen: dict[str, float] = {}
        self.polls = 0

    def schedule(self) -> list:
        """The arrivals only (as ``Testbed.schedule`` draws them); the events fire in ``_watch``."""
        plan: list = []
        for g in self.sc.groups:
            members = [h for h in self.hosts if h.group is g]
            times = g.arrival.times_for(len(members), random.Random(f"{self.seed}/arrivals/{g.name}"))
            for h, t in zip(members, times, strict=True):
                plan.append((t, len(plan), lambda h=h: self._arrive(h)))
        plan.sort(key=lambda x: (x[0], x[1]))
        if self.sc.events:
            threading.Thread(target=self._watch, daemon=True).start()
        return plan

    # -- the trigger --

    def _progress(self) -> float:
        last: dict[str, int] = {}
        with self.lock:
            for _t, ev, node, _peer, value in self.events:
                if ev == "piece" and value != "":
                    last[node] = int(value)
        fetchers = [h for h in self.hosts if h.group.role == "fetch"]
        total = len(fetchers) * self.sc.file_bytes
        done = sum(last.get(h.id, 0) for h in fetchers) + sum(
            self.sc.file_bytes for h in fetchers if h.completed_at is not None and h.id not in last
        )
        return done / max(1, total)

    def _worker_up(self) -> float:
        from swarm import client

        ups = []
        for h in self.hosts:
            if h.group.role == "seed" and h.online:
                try:
                    ups.append(int(client.status(h.home).get("bytes_up") or 0))
                except Exception:
                    pass
        return max(ups, default=0) / self.sc.file_bytes

    def _pieces_of_files(self) -> list[tuple[str, int, int]]:
        """(blob hex, size, piece size) of each model file, as the manifest names them."""
        if not hasattr(self, "_files"):
            import blake3

            from swarm.manifest.rules import piece_size_for

            assert self.model_dir is not None
            self._files = [
                (
                    blake3.blake3((self.model_dir / f.path).read_bytes()).hexdigest(),
                    f.size,
                    piece_size_for(f.size),
                )
                for f in self.sc.files
            ]
        return self._files

    def _covered(self) -> tuple[int, int]:
        """(pieces the fetching hosts hold between them, pieces in all), read from their caches:
        a finished blob holds every piece, an ``.incomplete`` the pieces its written ranges cover
        (the store preallocates it: a never-written range is a hole, SEEK_DATA / SEEK_HOLE)."""
        from swarm.store.fileio import data_extents

        held: set[tuple[int, int]] = set()
        total = 0
        for k, (hex_, size, ps) in enumerate(self._pieces_of_files()):
            n = max(1, -(-size // ps))
            total += n
            for h in self.hosts:
                if h.group.role != "fetch" or not h.online:
                    continue
                blobs = list(h.cache.glob(f"models--*/blobs/{hex_}"))
                if blobs:
                    held.update((k, j) for j in range(n))
                    continue
                for part in h.cache.glob(f"models--*/blobs/{hex_}.incomplete"):
                    try:
                        fd = os.open(part, os.O_RDONLY)
                    except OSError:
                        continue
                    try:
                        ext = data_extents(fd, size) or []
                    finally:
                        os.close(fd)
                    for j in range(n):
                        lo, hi = j * ps, min(size, (j + 1) * ps)
                        if any(a <= lo and hi <= b for a, b in ext):
                            held.add((k, j))
        return len(held), total

    def _watch(self) -> None:
        while self.t0 == 0.0 and not self._stopping:
            time.sleep(0.05)
        worker_event = any(
            h.group.role == "seed" for h in self.hosts if h.group.name == self.sc.events[0].group
        )
        while not self._stopping:
            prog = self._progress()
            cover = self._covered() if worker_event else None
            if (worker_event and cover is not None and cover[0] >= cover[1]) or (
                not worker_event and prog >= self.at_fraction
            ):
                up = self._worker_up() if worker_event else None
                before = {h.id for h in self.hosts if h.online}
                self.fired_at = self.now()
                for i in range(len(self.sc.events)):
                    self._event(i)
                gone = [h for h in self.hosts if h.id in before and not h.online]
                self.gone_ids = {h.peer_id: h.id for h in gone}
                self.fired_info = {"at": self.fired_at, "progress": prog, "worker_up_x": up, "covered": cover}
                self.say(
                    f"event fired at {self.fired_at:.2f} s: progress {prog:.2f}"
                    + (f", worker up {up:.2f} x" if up is not None else "")
                    + f"; gone {sorted(self.gone_ids.values())}"
                )
                break
            time.sleep(0.1)
        self._watch_holds()

    # -- what survivors hold --

    def _watch_holds(self) -> None:
        from swarm import client

        while not self._stopping:
            for h in self.hosts:
                if not h.online or h.proc is None or h.vanished:
                    continue
                try:
                    st = client.status(h.home)
                except Exception:
                    continue
                now = self.now()
                for m in st.get("models") or []:
                    for pid in m.get("peers") or []:
                        if pid in self.gone_ids:
                            self.link_seen[pid] = now
                    for pid in m.get("unchoked") or []:
                        if pid in self.gone_ids:
                            self.slot_seen[pid] = now
            self.polls += 1
            time.sleep(POLL)

    def teardown(self) -> None:
        """Keep each live node's last status (its transfers' peers, slots and counters)."""
        from swarm import client

        self.final_status: dict[str, Any] = {}
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None and not h.vanished:
                try:
                    st = client.status(h.home)
                except Exception:
                    continue
                self.final_status[h.id] = {
                    "peers": st.get("peers"),
                    "models": [
                        {k: m.get(k) for k in ("have_bytes", "bytes", "peers", "unchoked", "timeouts")}
                        for m in st.get("models") or []
                    ],
                }
        super().teardown()

    def holds(self, end: float) -> dict[str, Any]:
        if self.fired_at is None:
            return {}
        out = {}
        for pid, hid in self.gone_ids.items():
            link = self.link_seen.get(pid)
            slot = self.slot_seen.get(pid)
            out[hid] = {
                "link_s": None if link is None else round(link - self.fired_at, 2),
                "slot_s": None if slot is None else round(slot - self.fired_at, 2),
                "link_at_end": link is not None and end - link < 2 * POLL + 0.5,
            }
        return out


def run_one(name: str, seed: int, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    path = scenario.SCENARIO_DIR / f"{name}.toml"
    sc = scenario.load(path)
    b = bounds_mod.for_scenario(sc)
    say = (
        (lambda m: None)
        if a.quiet
        else (lambda m: print(f"  [{name} s{seed}] {m}", file=sys.stderr, flush=True))
    )
    tb = MidTestbed(
        sc,
        seed,
        at_fraction=a.at,
        lane=a.lane,
        progress=say,
        keep=out / "logs" / f"{name}_s{seed}" if a.keep_logs else None,
    )
    t0 = time.perf_counter()
    res = tb.run()
    wall = time.perf_counter() - t0
    report.write_events(res, out / f"events_{name}_s{seed}.csv")
    (out / f"final_status_{name}_s{seed}.json").write_text(json.dumps(tb.final_status, indent=1))
    gone_hosts = set(tb.gone_ids.values())
    fetch = [n for n in res.nodes if n.role == "fetch"]
    survivors = [n for n in fetch if n.id not in gone_hosts]
    times = [n.completion_time for n in survivors if n.completion_time is not None]
    workers_up = sum(n.bytes_up for n in res.nodes if n.role == "seed")
    st = res.stats
    doc = {
        "scenario": name,
        "seed": seed,
        "T_min": b["T_min"],
        "fired": tb.fired_info,
        "gone": sorted(gone_hosts),
        "survivors": len(survivors),
        "finished": len(times),
        "last": max(times) if len(times) == len(survivors) and times else None,
        "median": statistics.median(times) if times else None,
        "times": {n.id: n.completion_time for n in survivors},
        "worker_up_x": workers_up / sc.file_bytes,
        "holds": tb.holds(res.end_time),
        "timeouts": sum(st["request_timeouts"].values()),
        "wasted_mb": sum(st["wasted_bytes"].values()) / 1e6,
        "fetch_errors": st["fetch_errors"],
        "machine_busy": st["machine_busy"],
        "cpu_bound": st["cpu_bound"],
        "loadavg": st["loadavg"],
        "wall": wall,
    }
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed0", type=int, default=1)
    ap.add_argument("--variants", default="vanish,kill,worker")
    ap.add_argument("--at", type=float, default=0.3, help="fraction of the crowd's bytes (default 0.3)")
    ap.add_argument("--lane", default="plaintext", choices=("plaintext", "encrypted", "off"))
    ap.add_argument("--out", default="out/vanish_mid")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    why = testbed.available()
    if why is not None:
        print(f"bench_vanish_midtransfer: {why}", file=sys.stderr)
        return 3
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (one of {', '.join(VARIANTS)})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    testbed.cleanup_stale()
    docs: list[dict[str, Any]] = []
    with testbed.signals_raise(), open(out / "runs.jsonl", "a") as log:
        for r in range(a.reps):
            seed = a.seed0 + r
            for name in [NOFAULT] + [VARIANTS[v] for v in variants]:
                d = run_one(name, seed, a, out)
                docs.append(d)
                line = json.dumps(d, sort_keys=True)
                print(line, flush=True)
                log.write(line + "\n")
                log.flush()
    print()
    print(table(docs, variants))
    return 0


def table(docs: list[dict[str, Any]], variants: list[str]) -> str:
    base = {d["seed"]: d for d in docs if d["scenario"] == NOFAULT}
    rows = [
        "| variant | seed | no fault: last (s) | fault: last (s) | ratio | fired at | survivors done "
        "| link hold (s) | slot hold (s) | worker up (x model) | timeouts | machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        for d in (d for d in docs if d["scenario"] == VARIANTS[v]):
            b = base.get(d["seed"])
            bl = b["last"] if b else None
            ratio = f"{d['last'] / bl:.2f}" if d["last"] and bl else "-"
            holds = d["holds"].values()
            link = [h["link_s"] for h in holds if h["link_s"] is not None]
            slot = [h["slot_s"] for h in holds if h["slot_s"] is not None]
            fired = d["fired"]
            fired_s = (
                f"{fired['at']:.1f} s ({fired['progress'] * 100:.0f}%"
                + (f", worker {fired['worker_up_x']:.2f}x" if fired.get("worker_up_x") is not None else "")
                + ")"
                if fired
                else "never"
            )
            rows.append(
                f"| {v} | {d['seed']} | {_f(bl)} | {_f(d['last'])} | {ratio} | {fired_s} | "
                f"{d['finished']}/{d['survivors']} | {_span(link)} | {_span(slot)} | "
                f"{d['worker_up_x']:.2f} | {d['timeouts']} | {d['machine_busy'] * 100:.0f}% |"
            )
    return "\n".join(rows)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _span(xs: list[float]) -> str:
    if not xs:
        return "0"
    return f"{min(xs):.1f}-{max(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


if __name__ == "__main__":
    sys.exit(main())
