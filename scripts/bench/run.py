#!/usr/bin/env python3
"""swarm's transfer benchmarks, in one invocation; regenerates docs/benchmarks.md.

Scenarios, on the same generated data and machine, each node in its own OS process:

- (a) one ``--size`` model (default 1 GiB), one seeder -> one leecher;
- (b) the same model, one seeder -> four leechers that also trade (all start at once);
- (c) a 20 MB config set of 8 files, one seeder -> one leecher, warm nodes (the leecher is up and
  connected; a warm-up fetch of another set first); ours includes the DHT lookup and the manifest
  fetch;
- (r) ours (encrypted) at ``--size``/4, ``--size`` and 4 x ``--size``: peak RSS as the model grows.

Variants: ours over the data lane encrypted and plaintext, ours over libp2p streams (lane off),
libtorrent with its default settings and with ``high_performance_seed`` (the ``bench`` extra;
skipped if not installed), and a plain Python TCP transfer (the ceiling). Every leecher writes fresh
files. Each (variant, scenario) runs ``--repeat`` times: median and min-max are reported, with
ratios against libtorrent's default settings, and the peak RSS of every node process (VmHWM).
With py-spy installed, one extra run each of (a) and (b) encrypted is profiled (``--no-profile``
to skip).

Usage: ``.venv/bin/python scripts/bench/run.py [--quick] [--size 1G] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    HERE,
    PY,
    REPO,
    Child,
    Load,
    data_files,
    human,
    machine,
    make_config_dir,
    make_weights_dir,
    parse_size,
    wait_quiet,
)

VARIANTS = {
    "ours-enc": "ours, data lane, encrypted (AES-256-GCM)",
    "ours-plain": "ours, data lane, plaintext (trusted network)",
    "ours-libp2p": "ours, libp2p streams only (lane off)",
    "lt-default": "libtorrent, default settings",
    "lt-hps": "libtorrent, high_performance_seed",
    "tcp": "plain Python TCP (ceiling)",
}
LANE = {"ours-enc": "encrypted", "ours-plain": "plaintext", "ours-libp2p": "off"}
WEIGHTS_MODEL = "bench/weights"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data = self.work / "data"
        self.runs = self.work / "runs"
        self.results: dict = {"a": {}, "b": {}, "c": {}, "r": [], "errors": []}
        try:
            import libtorrent  # noqa: F401

            self.have_lt = True
        except ImportError:
            self.have_lt = False
        self.variants = [v for v in args.variants.split(",") if v]
        if not self.have_lt:
            self.variants = [v for v in self.variants if not v.startswith("lt-")]
        self._n = 0

    # -- processes --

    def _child(self, script: str, name: str) -> Child:
        self._n += 1
        return Child([PY, str(HERE / script)], self.logs / f"{self._n:03d}-{name}.log")

    def node(
        self,
        name: str,
        lane: str,
        *,
        serve=(),
        bootstrap=(),
        home: Path | None = None,
        send_only: bool = False,
    ) -> Child:
        c = self._child("node_proc.py", name)
        d = self.runs / name
        c.send(
            cmd="start",
            home=str(home or d / "home"),
            cache=str(d / "cache"),
            lane=lane,
            serve=[[m, str(p)] for m, p in serve],
            bootstrap=list(bootstrap),
        )
        if not send_only:
            c.started = c.recv(120)
        return c

    def fresh(self) -> None:
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True)

    # -- data --

    def prepare(self) -> None:
        a = self.args
        t = time.time()
        self.weights = make_weights_dir(self.data / f"weights-{a.size}", a.size, "weights")
        # One set per timed fetch (a retry needs a set the leecher does not hold yet) + a warm-up.
        n_sets = a.repeat * (a.retries + 1) + 1
        self.configs = [
            make_config_dir(self.data / f"configs-{a.config_size}-{i}", a.config_size, f"configs-{i}")
            for i in range(n_sets)
        ]
        self.config_models = [f"bench/configs-{i}" for i in range(n_sets)]
        self.torrents: dict[Path, Path] = {}
        if self.have_lt and any(v.startswith("lt-") for v in self.variants):
            for d in [self.weights, *self.configs]:
                self.torrents[d] = self._torrent(d)
        print(f"data ready in {time.time() - t:.1f} s", flush=True)

    def _torrent(self, root: Path) -> Path:
        import warnings

        import libtorrent as lt

        warnings.filterwarnings("ignore", category=DeprecationWarning)

        out = root.with_name(root.name + ".torrent")
        if out.exists():
            return out
        fs = lt.file_storage()
        lt.add_files(fs, str(root))
        ct = lt.create_torrent(fs)
        lt.set_piece_hashes(ct, str(root.parent))
        out.write_bytes(lt.bencode(ct.generate()))
        return out

    # -- scenario (a) and (b): fresh processes per repeat --

    def run_transfer(self, scen: str, variant: str, leechers: int) -> list[dict]:
        runs = []
        for r in range(self.args.repeat):
            try:
                for attempt in range(self.args.retries + 1):
                    self.fresh()
                    warm_cache(self.weights)
                    busy = wait_quiet(self.args.quiet_wait)
                    run = self._transfer_once(scen, variant, leechers, r)
                    run["busy_before"], run["attempt"] = busy, attempt
                    if not self.disturbed(run) or attempt == self.args.retries:
                        break
                    self.results["redone"] = self.results.get("redone", 0) + 1
                    print("    (disturbed by other load: again)", flush=True)
                runs.append(run)
            except Exception as e:
                msg = f"{scen}/{variant} repeat {r}: {e!r}"
                print("  FAILED", msg, flush=True)
                self.results["errors"].append(msg)
                traceback.print_exc()
            finally:
                self.fresh()
        return runs

    def _transfer_once(self, scen: str, variant: str, n: int, r: int) -> dict:
        size = sum(p.stat().st_size for p in data_files(self.weights))
        procs: list[Child] = []
        try:
            if variant in LANE:
                seed = self.node(
                    f"{scen}-{variant}-{r}-seed",
                    LANE[variant],
                    serve=[(WEIGHTS_MODEL, self.weights)],
                    home=self.work / "seed-home",
                )
                procs.append(seed)
                boot = seed.started["addrs"][:1]
                ls = [
                    self.node(f"{scen}-{variant}-{r}-leech{i}", LANE[variant], bootstrap=boot, send_only=True)
                    for i in range(n)
                ]
                procs += ls
                for c in ls:
                    c.started = c.recv(120)
                load = Load([c.p.pid for c in procs])
                at = time.time() + 0.2
                for c in ls:
                    c.send(cmd="fetch", model=WEIGHTS_MODEL, at=at)
            elif variant.startswith("lt-"):
                preset = variant[3:]
                seed = self._child("lt_proc.py", f"{scen}-{variant}-{r}-seed")
                procs.append(seed)
                sport = seed.call(cmd="start", preset=preset)["port"]
                seed.call(
                    cmd="seed", torrent=str(self.torrents[self.weights]), save_path=str(self.weights.parent)
                )
                ls = [self._child("lt_proc.py", f"{scen}-{variant}-{r}-leech{i}") for i in range(n)]
                procs += ls
                ports = [c.call(cmd="start", preset=preset)["port"] for c in ls]
                load = Load([c.p.pid for c in procs])
                at = time.time() + 0.2
                for i, c in enumerate(ls):
                    c.send(
                        cmd="fetch",
                        torrent=str(self.torrents[self.weights]),
                        save_path=str(self.runs / f"lt-leech{i}"),
                        peers=[sport, *ports[:i]],
                        at=at,
                    )
            else:  # tcp
                seed = self._child("tcp_proc.py", f"{scen}-tcp-{r}-seed")
                procs.append(seed)
                files = data_files(self.weights)
                port = seed.call(cmd="serve", files=[str(p) for p in files])["port"]
                ls = [self._child("tcp_proc.py", f"{scen}-tcp-{r}-leech{i}") for i in range(n)]
                procs += ls
                load = Load([c.p.pid for c in procs])
                at = time.time() + 0.2
                for i, c in enumerate(ls):
                    c.send(
                        cmd="fetch",
                        port=port,
                        sizes=[p.stat().st_size for p in files],
                        dest=str(self.runs / f"tcp-leech{i}"),
                        at=at,
                    )
            # A stuck fetch (seen once over libp2p streams in (b)) fails this repeat, not the run.
            done = [c.recv(self.args.fetch_timeout) for c in ls]
            ld = load.stop()
            t0 = min(d["t0"] for d in done)
            t1 = max(d["t1"] for d in done)
            up = None
            if variant in LANE or variant.startswith("lt-"):
                up = seed.call(cmd="status").get("bytes_up")
            seed_rss = seed.call(cmd="status")["rss_peak_kib"]
            run = {
                "seconds": t1 - t0,
                "per_leecher": [d["seconds"] for d in done],
                "bytes": size,
                "seeder_up": up,
                "rss_kib": {"seeder": seed_rss, "leechers": [d["rss_peak_kib"] for d in done]},
                "events": [d.get("events") for d in done],
                "lane_links": [d.get("lane_links") for d in done],
                "load": ld,
            }
            print(
                f"  {scen} {variant:12s} #{r}: {run['seconds']:.2f} s "
                f"({size / run['seconds'] / 1e6 * n:.0f} MB/s aggregate) "
                f"seed up {human(up) if up else '-'} rss {max(run['rss_kib']['leechers']) // 1024} MiB"
                f" other-cpu {ld['other_cpu_s']:.1f}s steal {ld['steal_s']:.1f}s",
                flush=True,
            )
            return run
        finally:
            for c in procs:
                c.close()

    def disturbed(self, run: dict) -> bool:
        """Other processes used more than --max-other of one CPU during the run (and more than
        half a CPU-second: kernel threads serving our own disk I/O count as "other" too)."""
        ld = run.get("load") or {}
        return ld.get("other_cpu_s", 0) > max(0.5, self.args.max_other * run["seconds"])

    # -- scenario (c): warm nodes, one process pair for all repeats --

    def run_configs(self, variant: str) -> list[dict]:
        self.fresh()
        runs: list[dict] = []
        procs: list[Child] = []
        try:
            if variant in LANE:
                seed = self.node(
                    f"c-{variant}-seed",
                    LANE[variant],
                    serve=list(zip(self.config_models, self.configs, strict=True)),
                    home=self.work / "seed-home-c",
                )
                leech = self.node(f"c-{variant}-leech", LANE[variant], bootstrap=seed.started["addrs"][:1])
                procs += [seed, leech]
                leech.call(cmd="fetch", model=self.config_models[-1])  # warm-up, not timed

                def fetch(i: int) -> dict:
                    return leech.call(cmd="fetch", model=self.config_models[i])
            elif variant.startswith("lt-"):
                preset = variant[3:]
                seed = self._child("lt_proc.py", f"c-{variant}-seed")
                leech = self._child("lt_proc.py", f"c-{variant}-leech")
                procs += [seed, leech]
                sport = seed.call(cmd="start", preset=preset)["port"]
                for d in self.configs:
                    seed.call(cmd="seed", torrent=str(self.torrents[d]), save_path=str(d.parent))
                leech.call(cmd="start", preset=preset)

                def fetch(i: int) -> dict:
                    d = self.configs[i]
                    return leech.call(
                        cmd="fetch",
                        torrent=str(self.torrents[d]),
                        save_path=str(self.runs / f"lt-c{i}"),
                        peers=[sport],
                    )

                fetch(len(self.configs) - 1)
            else:
                seed = self._child("tcp_proc.py", "c-tcp-seed")
                leech = self._child("tcp_proc.py", "c-tcp-leech")
                procs += [seed, leech]
                ports = [
                    seed.call(cmd="serve", files=[str(p) for p in data_files(d)])["port"]
                    for d in self.configs
                ]

                def fetch(i: int) -> dict:
                    files = data_files(self.configs[i])
                    return leech.call(
                        cmd="fetch",
                        port=ports[i],
                        sizes=[p.stat().st_size for p in files],
                        dest=str(self.runs / f"tcp-c{i}"),
                    )

                fetch(len(self.configs) - 1)
            next_set = iter(range(len(self.configs) - 1))
            for i in range(self.args.repeat):
                for attempt in range(self.args.retries + 1):
                    busy = wait_quiet(self.args.quiet_wait)
                    load = Load([c.p.pid for c in procs])
                    d = fetch(next(next_set))
                    ld = load.stop()
                    if attempt == self.args.retries or not self.disturbed(
                        {"seconds": d["seconds"], "load": ld}
                    ):
                        break
                    self.results["redone"] = self.results.get("redone", 0) + 1
                    print("    (disturbed by other load: again)", flush=True)
                runs.append(
                    {
                        "seconds": d["seconds"],
                        "events": d.get("events"),
                        "load": ld,
                        "busy_before": busy,
                        "attempt": attempt,
                        "bytes": self.args.config_size,
                        "lane_links": d.get("lane_links"),
                        "rss_kib": {"leechers": [d["rss_peak_kib"]]},
                    }
                )
                print(
                    f"  c {variant:12s} #{i}: {d['seconds'] * 1000:.0f} ms {d.get('events', '')}", flush=True
                )
            seed_rss = seed.call(cmd="status")["rss_peak_kib"]
            for r in runs:
                r["rss_kib"]["seeder"] = seed_rss
        except Exception as e:
            msg = f"c/{variant}: {e!r}"
            print("  FAILED", msg, flush=True)
            self.results["errors"].append(msg)
            traceback.print_exc()
        finally:
            for c in procs:
                c.close()
            self.fresh()
        return runs

    # -- (r): RSS as the model grows --

    def run_rss(self) -> None:
        for size in (self.args.size // 4, self.args.size, self.args.size * 4):
            self.fresh()
            w = make_weights_dir(self.data / f"weights-{size}", size, "weights")
            procs = []
            try:
                seed = self.node(
                    f"r-{size}-seed",
                    "encrypted",
                    serve=[(WEIGHTS_MODEL, w)],
                    home=self.work / f"seed-home-r{size}",
                )
                leech = self.node(f"r-{size}-leech", "encrypted", bootstrap=seed.started["addrs"][:1])
                procs = [seed, leech]
                d = leech.call(cmd="fetch", model=WEIGHTS_MODEL, timeout=900)
                s = seed.call(cmd="status")
                self.results["r"].append(
                    {
                        "size": size,
                        "seconds": d["seconds"],
                        "leecher_kib": d["rss_peak_kib"],
                        "seeder_kib": s["rss_peak_kib"],
                    }
                )
                print(
                    f"  r {human(size)}: {d['seconds']:.2f} s leecher {d['rss_peak_kib'] // 1024} "
                    f"MiB seeder {s['rss_peak_kib'] // 1024} MiB",
                    flush=True,
                )
            except Exception as e:
                self.results["errors"].append(f"r/{size}: {e!r}")
                traceback.print_exc()
            finally:
                for c in procs:
                    c.close()
                self.fresh()
            if size != self.args.size:
                shutil.rmtree(w, ignore_errors=True)
                w.with_name(w.name + ".complete").unlink(missing_ok=True)

    # -- profile --

    def run_profile(self, leechers: int = 1) -> None:
        """(a) with one leecher, or (b) with four (the seeder and the first leecher profiled)."""
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            print("py-spy not installed: no profile", flush=True)
            return
        key = "profile" if leechers == 1 else "profile_b"
        self.fresh()
        procs, spies = [], []
        try:
            seed = self.node(
                "p-seed", "encrypted", serve=[(WEIGHTS_MODEL, self.weights)], home=self.work / "seed-home"
            )
            ls = [
                self.node(f"p-leech{i}", "encrypted", bootstrap=seed.started["addrs"][:1])
                for i in range(leechers)
            ]
            procs = [seed, *ls]
            outs = {}
            for name, c in (("seeder", seed), ("leecher", ls[0])):
                outs[name] = self.work / f"{key}-{name}.txt"
                spies.append(
                    subprocess.Popen(
                        [
                            spy,
                            "record",
                            "-p",
                            str(c.p.pid),
                            "-o",
                            str(outs[name]),
                            "-f",
                            "raw",
                            "--threads",
                            "--idle",
                            "-r",
                            "200",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)
            at = time.time() + 0.2
            for c in ls:
                c.send(cmd="fetch", model=WEIGHTS_MODEL, at=at)
            done = [c.recv(self.args.fetch_timeout) for c in ls]
            d = done[0]
            for s in spies:
                s.send_signal(2)
            for s in spies:
                s.wait(30)
            spies = []
            self.results[key] = {
                "seconds": max(x["seconds"] for x in done),
                "events": d["events"],
                **{k: summarize_profile(v) for k, v in outs.items()},
            }
        except Exception as e:
            self.results["errors"].append(f"{key}: {e!r}")
            traceback.print_exc()
        finally:
            for s in spies:
                s.kill()
            for c in procs:
                c.close()
            self.fresh()

    # -- all --

    def run(self) -> dict:
        self.prepare()
        only = set(self.args.only.split(","))
        for scen, n in (("a", 1), ("b", 4)):
            if scen not in only:
                continue
            print(f"== ({scen}) {human(self.args.size)}, 1 seeder -> {n} leecher(s)", flush=True)
            for v in self.variants:
                self.results[scen][v] = self.run_transfer(scen, v, n)
        if "c" in only:
            print(f"== (c) {human(self.args.config_size)} config set, warm", flush=True)
            for v in self.variants:
                self.results["c"][v] = self.run_configs(v)
        if "r" in only:
            print("== (r) RSS as the model grows (ours, encrypted)", flush=True)
            self.run_rss()
        if "p" in only and self.args.profile:
            print("== profile of (a) ours-enc", flush=True)
            self.run_profile()
        if "pb" in only and self.args.profile:
            print("== profile of (b) ours-enc", flush=True)
            self.run_profile(leechers=4)
        return self.results


def warm_cache(root: Path) -> None:
    """Read the seeder's files once so they are in the page cache (other load on the VM can evict
    them, and a cold read costs ~2.3 CPU-s per GiB here)."""
    buf = bytearray(16 << 20)
    for p in data_files(root):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def summarize_profile(path: Path, top: int = 14) -> dict:
    """py-spy raw output -> seconds per thread kind and the top leaf functions (200 Hz)."""
    leaves: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2:
            continue
        th = frames[0].split(": ", 1)[-1].strip()
        kind = (
            "receiver thread (lane-rx)"
            if th.startswith("lane-rx")
            else "trio event loop"
            if th == "MainThread"
            else "stdin reader"
            if "readline" in th
            else "worker threads (to_thread)"
        )
        if kind == "stdin reader":
            continue
        threads[kind] += int(n)
        leaf = frames[-1].split(" (")[0]
        where = frames[-1].rsplit("/", 1)[-1].rstrip(")")
        leaves[(kind, f"{leaf} ({where})")] += int(n)
    return {
        "threads": {k: v / 200 for k, v in threads.items()},
        "top": [(k[0], k[1], v / 200) for k, v in leaves.most_common(top)],
    }


# --------------------------------------------------------------------------- the report


def stats(runs: list[dict]) -> dict | None:
    secs = [r["seconds"] for r in runs]
    if not secs:
        return None
    return {"median": statistics.median(secs), "min": min(secs), "max": max(secs), "n": len(secs)}


def fmt_s(st: dict | None, ms: bool = False) -> str:
    if not st:
        return "failed"
    f = (lambda x: f"{x * 1000:.0f}") if ms else (lambda x: f"{x:.2f}")
    unit = " ms" if ms else " s"
    return f"{f(st['median'])}{unit} [{f(st['min'])}-{f(st['max'])}]"


def rss_of(runs: list[dict]) -> tuple[int | None, int | None]:
    seed = [r["rss_kib"].get("seeder") for r in runs if r["rss_kib"].get("seeder")]
    leech = [x for r in runs for x in r["rss_kib"].get("leechers", []) if x]
    return (max(seed) // 1024 if seed else None, max(leech) // 1024 if leech else None)


def report(meta: dict, res: dict, mach: dict) -> str:
    size, config_size, repeat = meta["size"], meta["config_size"], meta["repeat"]
    variants, elapsed = meta["variants"], meta["elapsed"]
    L: list[str] = []
    w = L.append
    w("# Benchmarks")
    w("")
    w(
        "Generated by `scripts/bench/run.py` "
        f"({meta.get('argv_md') or '`' + (meta['argv'] or '(defaults)') + '`'}, "
        f"{elapsed / 60:.1f} min) on {mach['date']}. "
        "Do not edit by hand: rerun the script."
    )
    w("")
    w("## Machine")
    w("")
    v = mach["versions"]
    w(
        f"- {mach['nproc']} vCPU ({mach['cpu']}), {mach['mem_gib']} GiB RAM, Linux {mach['kernel']}, "
        f"{mach['fs']} on a virtio disk; Python {mach['python']}"
    )
    w(
        f"- trio {v['trio']}, py-libp2p {v['libp2p']}, cryptography {v['cryptography']}, "
        f"blake3 {v['blake3']}, libtorrent {v['libtorrent']}"
    )
    w("")
    w("## Method")
    w("")
    w(
        f"- Data: one model of {human(size)} (`model.safetensors` + `config.json`, pseudo-random bytes; "
        f"swarm pieces of 4 MiB up to 4 GiB), and distinct 8-file config sets of "
        f"{human(config_size)} (one per timed fetch), generated once. "
        + (
            "The seeder's files are read once before each (a)/(b) run, so they are in the page cache."
            if meta.get("warm_cache")
            else "The seeder's files were not re-read before each run: other load on the VM may have "
            "evicted them from the page cache (a cold read costs ~2.3 CPU-s per GiB here)."
        )
    )
    w(
        "- Every node is its own OS process (`node_proc.py`, `lt_proc.py`, `tcp_proc.py`) on "
        "127.0.0.1. Every leecher writes fresh files. (a) and (b) start new processes for every "
        "repeat (leechers are up and connected to the seeder before the clock starts); (c) keeps one "
        "warm seeder and one warm leecher (connected, and one untimed fetch of another config set "
        "first)."
    )
    w(
        "- Ours: `Node.fetch` timed inside the leecher, from the call to its return: DHT lookup, "
        "manifest fetch, lane setup, pieces (blake3-verified, written), then per file fsync, a "
        "whole-file blake3 re-read from disk and the atomic rename into the HF cache layout. "
        "libtorrent: from `add_torrent` (metadata given, no DHT) to `torrent_finished`; it neither "
        "fsyncs nor re-reads. TCP ceiling: `os.sendfile` -> `recv_into` -> O_DIRECT `pwrite`, no "
        "hashing, no encryption, fsync per file."
    )
    w(
        "- libtorrent settings: its defaults (or `high_performance_seed`), plus DHT/LSD/UPnP/NAT-PMP "
        "off, uTP off (TCP only), encryption disabled, `allow_multiple_connections_per_ip`; peers "
        "connected with `connect_peer`; in (b) every pair of leechers is connected."
    )
    w(
        f"- {repeat} repeats per cell: median [min-max]. Ratios are computed on medians against "
        "libtorrent with default settings. RSS: peak resident set (VmHWM) of each node process, "
        "the largest over repeats; libtorrent's includes the file pages it maps (it does disk I/O "
        "through mmap)."
    )
    w(
        "- Other load: this VM is shared with other work (test suites of other sessions ran during "
        "some runs). Before each run the script waits (up to `--quiet-wait` s) for the CPUs to be "
        "under 30% busy, records the CPU seconds used by processes other than the run's own during "
        "the run (`other CPU-s`, median), and redoes a run (up to `--retries` times) when they used "
        f"more than `--max-other` of one CPU; {res.get('redone', 0)} runs were redone this time, "
        "and a run still disturbed after its retries is kept."
    )
    w("")

    def table(scen: str, title: str, ms: bool = False, agg: int = 1) -> None:
        w(f"## {title}")
        w("")
        hdr = (
            "| variant | time | MB/s | vs libtorrent default | seeder RSS MiB | leecher RSS MiB "
            "| other CPU-s |"
        )
        if scen == "b":
            hdr += " seeder upload |"
        w(hdr)
        w("|" + "---|" * (hdr.count("|") - 1))
        lt = stats(res[scen].get("lt-default", []))
        for var in variants:
            runs = res[scen].get(var, [])
            st = stats(runs)
            sr, lr = rss_of(runs) if runs else (None, None)
            nbytes = runs[0]["bytes"] if runs else 0
            mbs = f"{nbytes * agg / st['median'] / 1e6:.0f}" if st else "-"
            ratio = "-"
            if st and lt:
                ratio = (
                    f"{lt['median'] / st['median']:.2f}x faster"
                    if scen != "b"
                    else f"{st['median'] / lt['median']:.2f}x the time"
                )
            others = [r["load"]["other_cpu_s"] for r in runs if r.get("load")]
            other = f"{statistics.median(others):.2f}" if others else "-"
            row = (
                f"| {VARIANTS[var]} | {fmt_s(st, ms)} | {mbs} | {ratio} | {sr or '-'} | "
                f"{lr or '-'} | {other} |"
            )
            if scen == "b":
                ups = [r["seeder_up"] for r in runs if r.get("seeder_up")]
                row += f" {statistics.median(ups) / nbytes:.2f}x the model |" if ups and nbytes else " - |"
            w(row)
        w("")

    if res["a"]:
        table("a", f"(a) {human(size)}, one seeder -> one leecher")
    if res["b"]:
        table(
            "b",
            f"(b) {human(size)}, one seeder -> four leechers that also trade (time until all four are done)",
            agg=4,
        )
        w("MB/s in (b) is aggregate (4 x the model / time).")
        w("")
    if res["c"]:
        table(
            "c",
            f"(c) {human(config_size)} config set (8 files), one seeder -> one leecher, warm nodes",
            ms=True,
        )
        ours = res["c"].get("ours-enc") or []
        if ours and ours[0].get("events"):
            ev = [r["events"] for r in ours if r.get("events")]
            man = statistics.median(e.get("manifest", 0) for e in ev)
            first = statistics.median(e.get("first_piece", 0) for e in ev)
            last = statistics.median(e.get("last_piece", 0) for e in ev)
            w(
                f"Ours (encrypted), median split: DHT lookup + manifest {man * 1000:.0f} ms; link "
                f"setup (lane, Hello/Bitfield, Interested/Unchoke, Requests) and the first piece "
                f"{(first - man) * 1000:.0f} ms; the other pieces {(last - first) * 1000:.0f} ms "
                f"(each single-piece file is fsynced and renamed inside the write of its piece; "
                f"its verified piece digest is its file digest, so it is not re-read); finalize "
                f"(snapshot symlinks, ref, directory fsyncs) "
                f"{(stats(ours)['median'] - last) * 1000:.0f} ms."
            )
            w("")
    if res["r"]:
        w("## (r) Peak RSS as the model grows (ours, encrypted lane, one run each)")
        w("")
        w("| model | time | leecher RSS MiB | seeder RSS MiB |")
        w("|---|---|---|---|")
        for r in res["r"]:
            w(
                f"| {human(r['size'])} | {r['seconds']:.2f} s | {r['leecher_kib'] // 1024} | "
                f"{r['seeder_kib'] // 1024} |"
            )
        w("")

    w("## Targets")
    w("")
    w("| target | measured | |")
    w("|---|---|---|")

    def med(scen: str, var: str) -> float | None:
        st = stats(res[scen].get(var, []))
        return st["median"] if st else None

    def check(name: str, value: float | None, ok: bool | None, shown: str) -> None:
        w(
            f"| {name} | {shown if value is not None else 'not run'} | "
            f"{'met' if ok else 'MISSED' if ok is not None else '-'} |"
        )

    lta, ltb = med("a", "lt-default"), med("b", "lt-default")
    for var, goal in (("ours-enc", 2.0), ("ours-plain", 3.0)):
        o = med("a", var)
        r = lta / o if (o and lta) else None
        check(
            f"(a) {var}: >= {goal:g}x libtorrent's MB/s",
            r,
            r >= goal if r else None,
            f"{r:.2f}x" if r else "",
        )
    for var in ("ours-enc", "ours-plain"):
        o = med("b", var)
        r = o / ltb if (o and ltb) else None
        check(f"(b) {var}: <= 0.6x libtorrent's time", r, r <= 0.6 if r else None, f"{r:.2f}x" if r else "")
        ups = [x["seeder_up"] for x in res["b"].get(var, []) if x.get("seeder_up")]
        u = statistics.median(ups) / size if ups else None
        check(
            f"(b) {var}: seeder upload <= 2x the model", u, u <= 2.0 if u else None, f"{u:.2f}x" if u else ""
        )
    for var in ("ours-enc", "ours-plain"):
        c = med("c", var)
        check(
            f"(c) {var}: <= 0.15 s end to end", c, c <= 0.15 if c else None, f"{c * 1000:.0f} ms" if c else ""
        )
    peaks = [
        x
        for s in ("a", "b", "c")
        for var in ("ours-enc", "ours-plain")
        for x in rss_of(res[s].get(var, []))
        if x
    ]
    peaks += [r["leecher_kib"] // 1024 for r in res["r"]] + [r["seeder_kib"] // 1024 for r in res["r"]]
    p = max(peaks) if peaks else None
    check(
        "peak RSS per node <= 200 MB (ours over the lane, all scenarios)",
        p,
        p * 1.048576 <= 200 if p else None,
        f"{p} MiB = {p * 1.048576:.0f} MB" if p else "",
    )
    lp = [x for s in ("a", "b", "c") for x in rss_of(res[s].get("ours-libp2p", [])) if x]
    if lp:
        check(
            "(for comparison) peak RSS, ours over libp2p streams",
            max(lp),
            max(lp) * 1.048576 <= 200,
            f"{max(lp)} MiB = {max(lp) * 1.048576:.0f} MB",
        )
    if res["r"]:
        ls = [r["leecher_kib"] for r in res["r"]]
        growth = (max(ls) - min(ls)) / 1024
        check(
            f"RSS flat from {human(res['r'][0]['size'])} to {human(res['r'][-1]['size'])}",
            growth,
            growth < 32,
            f"leecher peak varies by {growth:.0f} MiB",
        )
    w("")

    for key, title in (
        ("profile", "(a) ours, encrypted, one extra run under py-spy"),
        (
            "profile_b",
            "(b) ours, encrypted, one extra run under py-spy (the seeder and the first of the four leechers)",
        ),
    ):
        prof = res.get(key)
        if not prof:
            continue
        w(f"## Profile: {title}")
        w("")
        w(
            f"py-spy at 200 Hz, all threads, idle included (so waiting shows), over the whole process "
            f"lifetime of the run ({prof['seconds']:.2f} s fetch). Seconds by thread kind, then the "
            "functions threads were in most (leaf frames):"
        )
        w("")
        for who in ("leecher", "seeder"):
            pr = prof[who]
            w(
                f"**{who}**: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(pr["threads"].items(), key=lambda kv: -kv[1]))
            )
            w("")
            w("| thread | function | seconds |")
            w("|---|---|---|")
            for kind, fn, sec in pr["top"]:
                w(f"| {kind} | `{fn}` | {sec:.2f} |")
            w("")
    w(ANALYSIS)
    if res["errors"]:
        w("## Errors during this run")
        w("")
        for e in res["errors"]:
            w(f"- {e}")
        w("")
    return "\n".join(L) + "\n"


ANALYSIS = """## What limits us (read with the tables above)

- **What changed on 2026-11-27 (afternoon)**: the figures above are from a tree with changes that
  removed the two limits the morning's run identified. (1) The store no longer re-reads a
  whole file before publishing it: pieces that arrive in file order are fed, verified, to the
  file's whole-file hasher on a hash thread while they are written, a few early pieces (the
  picker's random first ones) are read back to keep that frontier moving, and only what arrived
  out of order is read back at completion; a single-piece file is never hashed twice (its piece
  digest is its file digest). The check itself stays: a manifest whose file digest disagrees with
  its pieces is still refused. (2) The picker breaks ties between equally rare pieces by file
  order instead of at random, so a single-source transfer arrives in order. (3) The engine verifies
  and writes two pieces per link at once (piece k+1 is hashed while piece k goes to disk). (4) For
  (c): stored manifests are no longer fsynced (a validated cache), the blobs/ directory is fsynced
  once per download instead of once per file, and the whole pages of a file's last piece go to
  disk with O_DIRECT (only the partial page through the page cache); the store's part of a 20 MB
  config fetch went from ~30 to ~21 ms (of which ~11 ms are the per-file fsyncs, kept). Same
  machine, same day, morning tree -> this tree: (a) encrypted 2.13 -> ~1.1-1.3 s, plaintext 1.78 ->
  ~1.0-1.1 s; (c) 226 -> ~115-170 ms encrypted. Ties in file order also changed (b): 6.8-7.0 s
  encrypted (0.59x libtorrent), seeder upload 1.4-1.5x the model, but over libp2p streams (lane
  off) four leechers asking one slow seeder for the same pieces made it upload 3.6x the model
  (1.45x with random ties). So the picker now takes ties in file order only until a peer rejects a
  request (contention) and at random after that: the (b) rows above (~0.63x, 1.8x) are with that
  rule, and the lane-off upload is back to 1.5x. The store alone (scripts-free micro-benchmark: 256
  pieces of 4 MiB from page-aligned buffers, one writer, in order): 1.36 s -> 0.65-0.73 s per GiB.
- **(a) now**: the receiver's pipeline (recv into pooled buffers, decrypt, blake3 of the piece,
  blake3 into the file hash, O_DIRECT pwrite) runs on both cores against the sender's read and
  encrypt; the TCP ceiling (plain sockets, no hashing, no disk) is the bound. Plaintext saves the
  encryption on one side and the decryption on the other, which is ~10-20% here, not 3x.
- **(b) now (missed by 0.02-0.08x)**: five processes on two cores: every byte a leecher receives
  is encrypted once, decrypted once, hashed twice and written once, and every byte a leecher
  serves is read back from its disk (O_DIRECT); pieces from other leechers arrive out of file
  order, so part of each file is still read back at completion (`_hash_fd_direct` and its reads,
  ~2.2 s of the profiled leecher's thread time above, against 1.5 s in `pwrite`). libtorrent does
  no whole-file hashing and no fsync. The tie-break rule was measured three ways in (b), same day,
  3 repeats each (run-to-run noise in (b) is ~10%, libtorrent itself ranged 10.0-12.8 s):
  file order always: 6.8-7.0 s encrypted (0.59x), seeder upload 1.4-1.5x, but 3.6-3.8x over
  libp2p streams; random as soon as a second fetcher links: 7.2-7.9 s (0.70x), 1.9x; file order
  until a peer rejects a request (kept): 7.0-7.7 s (0.66-0.68x), 1.8x, 1.5x over libp2p streams.
  The kept rule trades a few percent of (b) for a bounded seeder upload on every path.
- **(c) now**: latency-bound (20 MB would take ~35 ms over plain TCP): DHT lookup + manifest
  ~20-35 ms, the lane's setup (libp2p stream, offer/answer, TCP connect, both proofs) 5-10 ms, the
  engine's handshake (Hello/Bitfield, Interested/Unchoke: two round trips, each a thread hop on
  both sides), then one round of requests; each file is fsynced before its rename. The run-to-run
  spread (repeats from 75 to 190 ms in one run; one plaintext repeat at 400 ms in a trial run)
  comes from DHT and yamux work on a shared 2-core VM: a repeat whose DHT lookup + manifest took
  65-95 ms instead of ~20 ms lands above 150 ms.
- **Page cache vs direct I/O, measured**: writing fresh file pages through the page cache costs
  ~2.3 CPU-s per GiB on this VM (memory handed back to the host: every new page faults to it;
  first-touching 1 GiB of anonymous memory costs the same), and reading a file that is not cached
  costs the same again. A 1 GiB run with buffered writes took 6.7 s against 2.2-4.0 s with
  O_DIRECT, so the store writes whole aligned pieces that arrive in page-aligned buffers (the
  lane's pools) with O_DIRECT, and everything else (the unaligned last piece of a file, bytes from
  libp2p streams) through the page cache; files written that way are re-read with O_DIRECT too.
- **Crypto is not the limit**: AES-256-GCM `encrypt_into` ~4.6 GB/s and `decrypt_into` ~10 GB/s
  per core here, in place; blake3 ~5 GB/s on one thread (1.7-2x slower per piece with
  `max_threads=AUTO` while the other core is busy, so piece verification uses one thread).
- **Memory**: a node imports py-libp2p (~86 MB before any work); a lane holds at most
  `POOL_BUFFERS` = 3 receive buffers and one send buffer of one piece each (4 MiB pieces: ~20 MiB
  per link), allocated on first use and reused (fresh pages are expensive here), so RSS depends on
  the number of links and the piece size, not on the model size (table (r)). The libp2p-streams
  variant (lane off) peaks higher in (b); it was not profiled (each StreamLink holds a whole
  4 MiB frame while decoding it, on top of py-libp2p's own stream buffers).
- **Ours over libp2p streams (lane off) can hang in (b)**: seen in 2 of ~7 runs of that variant.
  Task dump of a stuck leecher (`run.py` sends SIGUSR1 on a timeout; `node_proc.py` prints every
  trio task): the engine's writer holds yamux's connection-wide `_write_lock` inside
  `secured_conn.write` (the TCP send buffer is full: the peer is not reading), and the fetch's DHT
  re-lookup waits for the same lock in `new_stream` -> `reset` -> `_write_frame`, so the fetch's
  nursery never finishes; the peer is presumably stuck the same way. A py-libp2p yamux hazard
  under bulk traffic in both directions; piece bytes over the lane never take that lock. Such a
  repeat is reported under "Errors" and left out of the medians.
- **(b) seeder upload** depends on how fast leechers find and trade with each other (DHT
  re-lookups, the engine's choking and seeding policy, which other sessions are tuning); it varies
  between repeats (median shown).
- **Run-to-run noise**: this is a 2-vCPU VM on a shared host, also running other sessions' test
  suites; see the `other CPU-s` column. libtorrent's (a) figures here are slower than the
  reference 3.1-4.4 s measured on a quiet machine.

## Why the lane is built the way it is

- Set up over an authenticated libp2p stream (`/swarm/lane/1.0.0`): both sides send 32 random
  bytes inside Noise; HKDF-SHA256 binds them to both peer ids, the mode and the port, and yields
  the lane id, two proof keys and one AES-256-GCM key per direction. The listener reads exactly 48
  bytes (lane id + HMAC proof) from a new TCP connection and closes it on a wrong proof, an
  unknown or used lane id, or silence; the dialer checks the listener's proof in turn. Nonces are
  a per-direction record counter (never sent, never reused: keys are fresh per lane, and the lane
  refuses more than 2^32 records); the record header (kind, piece index, length) is the AEAD's
  associated data. See `swarm/net/lane.py` and `swarm/net/lane_crypto.py`.
- All pieces-protocol messages of a lane link travel on the TCP connection, encrypted in both
  modes; only piece payloads are left unencrypted in plaintext mode (and still blake3-verified
  before they are written). One ordered channel keeps a Choke behind the pieces sent before it.
- Each piece is encrypted once per receiver, with that lane's key. Encrypting once for several
  receivers would need a key shared by all of them, so any receiver could forge records to the
  others and nonces would have to be coordinated across connections; the cipher costs ~1 ms per
  4 MiB piece here, far from the limits above, so it is not done.
- Blocking sockets in plain threads (recv, AES-GCM, blake3 and pwrite release the GIL), bounded
  with SO_RCVTIMEO / SO_SNDTIMEO; a bounded pool of page-aligned receive buffers per link; the
  engine (trio) still decides what to fetch from whom and gets completion, failure (LinkClosed,
  ProtocolError on a bad tag) and byte counts back through the PeerLink interface.

## What would move the numbers

1. Store: check the whole-file blake3 without any read-back, from per-piece subtree chaining values
   (pieces are power-of-two aligned subtrees of blake3's tree), which needs a blake3 binding
   exposing the hazmat API (the Rust crate's `hazmat` module; the Python package 1.0 has none).
   That would make out-of-order arrival free, which matters for (b).
2. Seeder/leecher: serve pieces a leecher just wrote from the buffers it still holds instead of
   reading them back with O_DIRECT (b).
3. (c): fewer round trips before the first request (send Interested with the Bitfield; ask for
   the manifest and open the lane in parallel).
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="model size for (a), (b) and (r) (default 1G)")
    ap.add_argument("--config-size", default="20M", help="config set size for (c) (default 20M)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB model, 2 MiB config sets, 1 repeat, no profile",
    )
    ap.add_argument("--only", default="a,b,c,r,p,pb", help="scenarios (a,b,c,r, p/pb = profile of (a)/(b))")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default="/tmp/swarm-bench")
    ap.add_argument(
        "--out", default=None, help="report path (default docs/benchmarks.md; with --quick, in --workdir)"
    )
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument(
        "--fetch-timeout",
        type=float,
        default=150.0,
        help="seconds a transfer may take before the repeat counts as failed",
    )
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.25,
        help="redo a run when other processes used more than this share of one CPU",
    )
    ap.add_argument("--retries", type=int, default=2, help="redos per disturbed run (default 2)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait, before each run, for other load to drop (default 60)",
    )
    ap.add_argument(
        "--merge", action="store_true", help="replace only the cells run now in --workdir/results.json"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from --workdir/results.json without running",
    )
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((Path(args.workdir) / "results.json").read_text())
        out = args.out or str(REPO / "docs" / "benchmarks.md")
        Path(out).write_text(report(saved["meta"], saved["results"], saved["machine"]))
        print(f"wrote {out} from {args.workdir}/results.json")
        return 0
    if args.quick:
        args.size, args.config_size, args.repeat, args.profile = "64M", "2M", 1, False
    if args.out is None:
        args.out = (
            str(Path(args.workdir) / "benchmarks-quick.md")
            if args.quick
            else str(REPO / "docs" / "benchmarks.md")
        )
    args.size = parse_size(args.size)
    args.config_size = parse_size(args.config_size)
    t = time.time()
    b = Bench(args)
    res = b.run()
    elapsed = time.time() - t
    mach = machine()
    meta = {
        "size": sum(p.stat().st_size for p in data_files(b.weights)),
        "config_size": args.config_size,
        "repeat": args.repeat,
        "variants": b.variants,
        "argv": " ".join(sys.argv[1:]),
        "elapsed": elapsed,
        "warm_cache": True,
    }
    saved_path = b.work / "results.json"
    if args.merge and saved_path.exists():  # redo some cells of an earlier run, keep the rest
        saved = json.loads(saved_path.read_text())
        old, meta0 = saved["results"], saved["meta"]
        for scen in ("a", "b", "c"):
            old[scen].update(res[scen])
        for key in ("r", "profile", "profile_b"):
            if res.get(key):
                old[key] = res[key]
        old["errors"] = old.get("errors", []) + [f"(merged run) {e}" for e in res["errors"]]
        old["redone"] = old.get("redone", 0) + res.get("redone", 0)
        cells = ", ".join(f"{s_}/{v}" for s_ in ("a", "b", "c") for v in res[s_])
        meta0["argv_md"] = (
            meta0.get("argv_md") or f"`{meta0['argv'] or '(defaults)'}`"
        ) + f"; then `{meta['argv']}` redid {cells}"
        meta0["elapsed"] += elapsed
        res, meta = old, meta0
    (b.work / "results.json").write_text(
        json.dumps({"machine": mach, "meta": meta, "results": res}, indent=1, default=str)
    )
    Path(args.out).write_text(report(meta, res, mach))
    print(f"wrote {args.out} ({elapsed / 60:.1f} min); raw results in {b.work / 'results.json'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
