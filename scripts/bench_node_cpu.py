#!/usr/bin/env python3
"""CPU of real ``swarm-node`` processes per MB moved on shaped links, and while idle (issue #12
item 3, #11).

For every rate (Mbit/s; 0 = loopback, no cap) it starts one seeder and ``--fetchers`` fetchers,
each a ``python -m swarm.cli run`` process: with a rate, every host in a network namespace of its
own behind ``tc tbf`` (``simulations.netns.Fabric``: the testbed's network, upload and download
capped at the rate); at rate 0, all of them in one namespace on 127.0.0.1 (loopback, no cap). The
model is one file of ``rate x --seconds`` (at rate 0: ``--loopback-mb``) pseudo-random bytes plus
a config.json. Once the nodes are joined and quiet:

1. idle, joined: every node's CPU over ``--idle`` seconds (no transfer yet);
2. the fetch: every fetcher fetches the model at once (``swarm.client.fetch_result``); each node's
   CPU seconds over the fetch and the bytes it moved (``bytes_up + bytes_down`` of its status);
3. idle, after: the same nodes, now linked and seeding, over ``--idle`` seconds.

CPU seconds are utime + stime from ``/proc/<pid>/stat`` (user and kernel time of every thread of
the process), not wall time; context switches are summed over the process's live threads
(``/proc/<pid>/task/*/status``). Each configuration holds ``/tmp/swarm-testbed.lock`` (flock) from
the first namespace to the teardown; the machine's busy fraction (``/proc/stat``, other jobs
included) and load average during the fetch are reported with it.

``--tree DIR`` (repeatable) runs the nodes from other source trees (PYTHONPATH), alternating
with each configuration, so before and after are measured in one run: e.g. ``git archive
<commit> | tar -x -C /tmp/base`` then ``--tree /tmp/base --tree .``. ``--profile DIR`` records
every node with py-spy (``--py-spy PATH``) during the fetch and the second idle window (a
profiling run: its CPU figures include py-spy's pauses; do not quote them).

Needs root (namespaces, tc). Example::

    sudo .venv/bin/python scripts/bench_node_cpu.py --rates 20,50,100,0 --fetchers 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulations import netns  # noqa: E402
from simulations.testbed_host import _machine_busy  # noqa: E402

LOCK = "/tmp/swarm-testbed.lock"
MODEL = "bench/nodecpu"
PORT = 4001
READY_TIMEOUT = 90.0
QUIET_CORE = 0.10
"""Nodes are quiet (the measurement starts) when their CPU over a second is below this many
cores each (at least QUIET_MIN s, at most QUIET_MAX s after the last one is ready)."""
QUIET_MIN = 3.0
QUIET_MAX = 40.0


CPROFILE_HOOK = """
import cProfile, os, signal, time
_out = os.environ.get("NODECPU_CPROFILE")
if _out:
    _prof = [None]

    def _start(signum, frame):
        _prof[0] = cProfile.Profile(time.thread_time)  # CPU time of the thread it runs in
        _prof[0].enable()

    def _stop(signum, frame):
        if _prof[0] is not None:
            _prof[0].disable()
            _prof[0].dump_stats(_out)
            _prof[0] = None

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
"""
"""``--cprofile``: a sitecustomize for the nodes: SIGUSR1 starts cProfile on the main thread (the
trio event loop) with a CPU-time clock, SIGUSR2 stops it and writes the stats."""


def _ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the live threads of ``pid``."""
    vol = invol = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
    return vol, invol


def _cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds: user and kernel CPU of all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def _main_thread_cpu(pid: int) -> float:
    """utime + stime of the process's main thread (the trio event loop) alone."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class Node:
    def __init__(self, name: str, root: Path, ns: str, addr: str, port: int):
        self.name = name
        self.ns = ns
        self.addr = addr
        self.port = port
        self.home = root / name / "home"
        self.cache = root / name / "hf-cache"
        self.log = root / name / "node.log"
        self.home.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.peer_id = ""

    def start(
        self, tree: Path, lane: str, serve: str | None, bootstrap: list[str], cprofile: Path | None = None
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
        path = str(tree)
        if cprofile is not None:
            hook = self.home.parent / "hook"
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(CPROFILE_HOOK)
            path += os.pathsep + str(hook)
            env["NODECPU_CPROFILE"] = str(cprofile.resolve() / f"{self.name}.prof")
        env.update(
            PYTHONPATH=path,
            HF_HUB_OFFLINE="1",
            HF_ENDPOINT="http://127.0.0.1:9",
            HF_HUB_DISABLE_TELEMETRY="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("MODEL_EXPRESS_URL", None)
        cmd = [
            sys.executable,
            "-m",
            "swarm.cli",
            "run",
            "--home",
            str(self.home),
            "--cache-dir",
            str(self.cache),
        ]
        cmd += ["--listen", f"/ip4/{self.addr}/tcp/{self.port}", "--no-serve-hf-cache", "--lane", lane]
        if serve:
            cmd += ["--serve", serve]
        for b in bootstrap:
            cmd += ["--bootstrap", b]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd],
                cwd=str(tree),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )

    def cpu(self) -> float:
        return sum(self.times())

    def times(self) -> tuple[float, float]:
        assert self.proc is not None
        return _cpu_times(self.proc.pid)

    def status(self) -> dict[str, Any]:
        from swarm import client

        return client.status(self.home)

    def wait_ready(self, serving: bool) -> None:
        from swarm import client

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-8:]
                raise RuntimeError(f"{self.name}: node exited:\n  " + "\n  ".join(tail))
            try:
                st = client.status(self.home)
            except client.NodeUnavailable:
                st = None
            if st is not None and (not serving or any(m.get("complete") for m in st["models"])):
                self.peer_id = st["peer_id"]
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not ready after {READY_TIMEOUT:g} s (see {self.log})")
            time.sleep(0.1)

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.addr}/tcp/{self.port}/p2p/{self.peer_id}"

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def write_model(root: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "bench", "seed": seed}))
    with open(root / "model.safetensors", "wb") as fh:
        left = size
        while left:
            n = min(1 << 20, left)
            fh.write(rng.randbytes(n))
            left -= n
    return root


def _window(nodes: list[Node], seconds: float) -> dict[str, Any]:
    """Every node's CPU over ``seconds`` of nothing asked of it."""
    c0 = {n.name: n.cpu() for n in nodes}
    s0 = {n.name: _ctx_switches(n.proc.pid) for n in nodes}  # type: ignore[union-attr]
    b0, t0 = _machine_busy()
    w0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - w0
    b1, t1 = _machine_busy()
    out: dict[str, Any] = {"seconds": wall, "machine_busy": (b1 - b0) / max(1.0, t1 - t0), "load": _loadavg()}
    for n in nodes:
        s1 = _ctx_switches(n.proc.pid)  # type: ignore[union-attr]
        out[n.name] = {
            "cpu_s": n.cpu() - c0[n.name],
            "core": (n.cpu() - c0[n.name]) / wall,
            "ctx_per_s": (s1[0] - s0[n.name][0] + s1[1] - s0[n.name][1]) / wall,
        }
    return out


def _settle(nodes: list[Node]) -> float:
    t0 = time.monotonic()
    prev = (t0, sum(n.cpu() for n in nodes))
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        cpu = sum(n.cpu() for n in nodes)
        rate = (cpu - prev[1]) / (now - prev[0]) / len(nodes)
        prev = (now, cpu)
        waited = now - t0
        if waited >= QUIET_MAX or (waited >= QUIET_MIN and rate < QUIET_CORE):
            return waited


def _py_spy(args: argparse.Namespace, nodes: list[Node], out: Path, tag: str, seconds: float) -> list:
    procs = []
    for n in nodes:
        f = out / f"{tag}-{n.name}.txt"
        cmd = [args.py_spy, "record", "-p", str(n.proc.pid), "-r", "250", "-t", "--nonblocking"]  # type: ignore[union-attr]
        cmd += ["-f", "raw", "-o", str(f), "-d", str(max(1, int(seconds)))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def run_one(args: argparse.Namespace, tree: Path, rate: float, tmp: Path, rep: int) -> dict[str, Any]:
    """One configuration (tree, rate): set up, measure, tear down; holds the testbed lock."""
    loop = rate == 0
    mb = args.loopback_mb if loop else rate / 8 * args.seconds
    size = int(mb * 1e6)
    model = write_model(tmp / f"model-{rate:g}-{rep}", size, seed=int(rate * 1000) + rep)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fabric = netns.Fabric(tag=f"cpu{rep}")
        nodes: list[Node] = []
        try:
            count = 1 + args.fetchers
            for i in range(count):
                name = "seed" if i == 0 else f"fetch{i}"
                if loop:
                    nodes.append(Node(name, root, fabric.bridge, "127.0.0.1", PORT + i))
                else:
                    bps = rate * 1e6 / 8
                    h = fabric.add_host(bps, bps)
                    nodes.append(Node(name, root, h.ns, h.addr, PORT))
            seed, fetchers = nodes[0], nodes[1:]
            seed.start(tree, args.lane, f"{MODEL}={model}", [], args.cprofile)
            seed.wait_ready(serving=True)
            for n in fetchers:
                n.start(tree, args.lane, None, [seed.multiaddr], args.cprofile)
            for n in fetchers:
                n.wait_ready(serving=False)
            quiet = _settle(nodes)
            res: dict[str, Any] = {
                "tree": str(tree),
                "rate_mbit": rate,
                "model_mb": size / 1e6,
                "rep": rep,
                "settle_s": quiet,
                "pids": {n.name: n.proc.pid for n in nodes},  # type: ignore[union-attr]
            }
            res["idle_joined"] = _window(nodes, args.idle)
            # the fetch
            st0 = {n.name: n.status() for n in nodes}
            c0 = {n.name: n.times() for n in nodes}
            m0 = {n.name: _main_thread_cpu(n.proc.pid) for n in nodes}  # type: ignore[union-attr]
            s0 = {n.name: _ctx_switches(n.proc.pid) for n in nodes}  # type: ignore[union-attr]
            b0, t0 = _machine_busy()
            errors: list[str] = []
            spies = (
                _py_spy(args, nodes, args.profile, f"fetch-{rate:g}", args.seconds * 1.2)
                if args.profile
                else []
            )

            def fetch(n: Node) -> None:
                from swarm import client

                try:
                    client.fetch_result(MODEL, home=n.home, cache_dir=n.cache, progress=False, timeout=600)
                except Exception as e:
                    errors.append(f"{n.name}: {type(e).__name__}: {e}")

            if args.cprofile:
                for n in nodes:
                    os.kill(n.proc.pid, signal.SIGUSR1)  # type: ignore[union-attr]
            w0 = time.monotonic()
            threads = [threading.Thread(target=fetch, args=(n,), daemon=True) for n in fetchers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - w0
            time.sleep(0.5)  # the last Haves and writes settle; counted in the fetch's CPU
            if args.cprofile:
                for n in nodes:
                    os.kill(n.proc.pid, signal.SIGUSR2)  # type: ignore[union-attr]
            b1, t1 = _machine_busy()
            for p in spies:
                p.wait()
            fetch_res: dict[str, Any] = {
                "wall_s": wall,
                "errors": errors,
                "machine_busy": (b1 - b0) / max(1.0, t1 - t0),
                "load": _loadavg(),
            }
            ours = 0.0
            for n in nodes:
                st = n.status()
                up = int(st.get("bytes_up") or 0) - int(st0[n.name].get("bytes_up") or 0)
                down = int(st.get("bytes_down") or 0) - int(st0[n.name].get("bytes_down") or 0)
                ut, st_ = n.times()
                cpu = ut + st_ - sum(c0[n.name])
                ours += cpu
                s1 = _ctx_switches(n.proc.pid)  # type: ignore[union-attr]
                fetch_main = _main_thread_cpu(n.proc.pid) - m0[n.name]  # type: ignore[union-attr]
                moved = (up + down) / 1e6
                fetch_res[n.name] = {
                    "cpu_s": cpu,
                    "user_s": ut - c0[n.name][0],
                    "main_s": fetch_main,
                    "sys_s": st_ - c0[n.name][1],
                    "mb_up": up / 1e6,
                    "mb_down": down / 1e6,
                    "ms_per_mb": 1000 * cpu / moved if moved else None,
                    "thread_ms_per_mb": 1000 * (cpu - fetch_main) / moved if moved else None,
                    "loop_core": fetch_main / wall,
                    "ctx_per_mb": (s1[0] - s0[n.name][0] + s1[1] - s0[n.name][1]) / moved if moved else None,
                }
            fetch_res["other_cpu_s"] = max(0.0, (b1 - b0) / os.sysconf("SC_CLK_TCK") - ours)
            res["fetch"] = fetch_res
            spies = _py_spy(args, nodes, args.profile, f"idle-{rate:g}", args.idle) if args.profile else []
            res["idle_after"] = _window(nodes, args.idle)
            for p in spies:
                p.wait()
            return res
        finally:
            for n in nodes:
                n.stop()
            fabric.teardown()
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(model, ignore_errors=True)


def _row(r: dict[str, Any]) -> str:
    f = r["fetch"]
    names = [k for k in r["pids"]]
    parts = []
    for k in names:
        d = f[k]
        mpm = f"{d['ms_per_mb']:.1f}" if d["ms_per_mb"] is not None else "-"
        ij, ia = r["idle_joined"][k]["core"], r["idle_after"][k]["core"]
        parts.append(
            f"{k}: {d['cpu_s']:.2f} CPU-s (user {d['user_s']:.2f}, event loop {d['main_s']:.2f}), "
            f"up {d['mb_up']:.0f} down {d['mb_down']:.0f} MB, {mpm} ms/MB (other threads "
            f"{d['thread_ms_per_mb'] or 0:.1f}), event loop {d['loop_core']:.3f} core, "
            f"ctx/MB {d['ctx_per_mb'] or 0:.0f}; idle {ij:.4f} / {ia:.4f} core"
        )
    rate = "loopback" if r["rate_mbit"] == 0 else f"{r['rate_mbit']:g} Mbit/s"
    head = (
        f"[{Path(r['tree']).name}] {rate}, {r['model_mb']:.0f} MB: wall {f['wall_s']:.1f} s, machine busy "
        f"{f['machine_busy']:.0%}, load {f['load']:.1f}, other CPU {f['other_cpu_s']:.1f} s"
    )
    if f["errors"]:
        head += f" ERRORS {f['errors']}"
    return head + "\n    " + "\n    ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="20,50,100,0", help="Mbit/s, comma-separated; 0 = loopback, no cap")
    ap.add_argument("--fetchers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0, help="model size = rate x this (capped runs)")
    ap.add_argument("--loopback-mb", type=float, default=512.0)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of each idle window")
    ap.add_argument("--lane", default="plaintext", choices=["plaintext", "encrypted", "off"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--tree", action="append", type=Path, help="source tree to run the nodes from (repeatable)"
    )
    ap.add_argument("--profile", type=Path, help="record py-spy profiles into this directory")
    ap.add_argument(
        "--cprofile",
        type=Path,
        help="cProfile (CPU clock) each node's event loop during the fetch into this directory",
    )
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args()
    why = netns.available()
    if why:
        print(why, file=sys.stderr)
        return 3
    netns.cleanup_stale()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    rates = [float(x) for x in args.rates.split(",")]
    if args.cprofile:
        args.cprofile.mkdir(parents=True, exist_ok=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="swarm-nodecpu-"))
    try:
        with netns.signals_raise():
            for rep in range(args.repeat):
                for rate in rates:
                    for tree in trees:
                        r = run_one(args, tree, rate, tmp, rep)
                        results.append(r)
                        print(_row(r), flush=True)
                        if args.json:
                            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
