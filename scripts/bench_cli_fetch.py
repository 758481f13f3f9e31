#!/usr/bin/env python
"""How much a ``swarm-node fetch`` costs over the in-process ``Node.fetch`` it ends in (issue #12).

Real processes on 127.0.0.1: a seed (``swarm-node run --serve``, a generated model of ``--size-mb``
MiB) and a front node, bootstrapped to it. The front node runs in this process (a ``Node`` and its
``ControlServer`` on a trio thread, as ``swarm-node run`` runs them), so the same node is timed both
ways, alternately, its copy removed before every round:

* ``in-process``: ``Node.fetch`` called on the front node (in-process timer);
* ``chain``: ``Node.fetch_with_fallback`` (the fallback chain the control API runs, in-process);
* ``cli``: ``swarm-node fetch ORG/NAME --home FRONT --json``, a fresh process (wall time of the
  process, interpreter start included);
* ``cli start``: ``swarm-node status --json --home FRONT`` (wall: interpreter, imports, one request);
* ``cli - its Node.fetch``: each cli sample less the ``Node.fetch`` that served it (the chain's
  timer in the front node): the cli's own cost, paired within one run, so the transfer's noise
  (large on a shared machine) cancels out.

It prints every sample, the medians and ``cli - in-process``. ``--timeline`` also runs the fetch
from a fresh ``python -c`` through ``swarm.client.fetch_result`` and prints when each event arrived
(seconds since that process started), to see where the difference goes.

``--base DIR`` also times the ``swarm-node fetch`` of another source tree (e.g. a ``git worktree``
of an older commit) against the same front node, alternating with this tree's in every round
(``cli@base``, ``cli@base - its Node.fetch``), so both are measured under the same load.
``--configs-only`` fetches only the config and tokenizer files (both ways): the small-fetch case.

    PYTHONPATH=. .venv/bin/python scripts/bench_cli_fetch.py [--size-mb 1024] [--rounds 3] [--timeline]
        [--base DIR] [--configs-only]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = "bench/cli-fetch"

TIMELINE_CHILD = r"""
import time
t0 = time.perf_counter()
import json, sys
marks = []
def mark(kind, what=""):
    marks.append((round(time.perf_counter() - t0, 3), kind, what))
def on_event(e):
    kind = e.get("event")
    if kind != "progress" or not marks or marks[-1][1] != "progress":
        mark(kind, e.get("source") or e.get("outcome") or "")
import swarm.client as c
mark("imported")
try:
    import swarm.control_client as cc
except ImportError:
    cc = c
if hasattr(c, "fetch_via_node"):  # mark when the request is on its way
    fvn = c.fetch_via_node
    def fetch_via_node(body, home, emit, *a, after_send=None, **kw):
        def sent():
            mark("sent")
            if after_send is not None:
                after_send()
        return fvn(body, home, emit, *a, after_send=sent, **kw)
    c.fetch_via_node = fetch_via_node
def wrap(mod, name):
    fn = getattr(mod, name)
    def wrapped(*a, **kw):
        mark("call", name)
        try:
            return fn(*a, **kw)
        finally:
            mark("end", name)
    setattr(mod, name, wrapped)
opener = "open_socket" if hasattr(cc, "open_socket") else "connect" if cc is not c else "_connect"
for mod, name in ((c, "_request"), (c, "_fast_path"), (cc, opener)):
    wrap(mod, name)
r = c.fetch_result({repo!r}, home={home!r}, on_event=on_event, progress=False, configs_only={configs!r})
mark("returned", r.source)
print(json.dumps(marks))
"""


def swarm_node_cmd() -> list[str]:
    script = Path(sys.executable).with_name("swarm-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "swarm.cli"]


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWARM_", "HF_", "HUGGING"))}
    env.pop("MODEL_EXPRESS_URL", None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "hf-default-cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


class Front:
    """The front node and its control server, on a trio thread of this process."""

    def __init__(self, home: Path, cache: Path, bootstrap: str) -> None:
        self.home, self.cache, self.bootstrap = home, cache, bootstrap
        self.ready = threading.Event()
        self.swarm_seconds: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)

    def _thread(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except BaseException as e:  # reported by start()
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        import trio

        from swarm.control import ControlServer
        from swarm.net import quiet_libp2p_logs
        from swarm.node import Node, NodeConfig

        quiet_libp2p_logs()
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with trio.open_nursery() as nursery:
            server = ControlServer(self.home, fetcher=self._fetcher)
            await nursery.start(server.run)
            cfg = NodeConfig(
                home=self.home, cache_dir=self.cache, bootstrap=(self.bootstrap,), serve_hf_cache=False
            )
            self.node = Node(cfg)
            async with self.node.running():
                server.attach(self.node)
                with trio.move_on_after(10):
                    while not self.node.host.connected_peers():
                        await trio.sleep(0.01)
                self.ready.set()
                await self.stop.wait()
            nursery.cancel_scope.cancel()

    async def _fetcher(self, req, *, on_event):
        """What the control API runs (``Node.fetch_with_fallback``), noting how long the swarm step
        (``Node.fetch``) took, by the chain's own timer, for the request being served."""

        def tap(event: dict) -> None:
            if event.get("event") == "attempt" and event.get("source") == "swarm":
                self.swarm_seconds.append(float(event["seconds"]))
            on_event(event)

        return await self.node.fetch_with_fallback(req, on_event=tap)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(120)
        if self.error is not None or not self.ready.is_set():
            raise SystemExit(f"front node did not start: {self.error!r}")

    def call(self, fn, *args, **kw):
        import functools

        import trio

        return trio.from_thread.run(functools.partial(fn, *args, **kw), trio_token=self.token)

    def close(self) -> None:
        import trio

        with contextlib_suppress():
            trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(30)


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(Exception)


def wait_seed(p: subprocess.Popen, home: Path, timeout: float) -> dict:
    from swarm import client

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise SystemExit(f"seed exited with {p.returncode}; see its log")
        try:
            st = client.status(home)
            if any(m.get("model") == REPO and m.get("complete") for m in st.get("models") or ()):
                return st
        except client.NodeUnavailable:
            pass
        time.sleep(0.1)
    raise SystemExit(f"seed not ready after {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="model weights, MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="samples of each way (default 3)")
    ap.add_argument("--timeline", action="store_true", help="also print one client's event timeline")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--base", metavar="DIR", help="also time the cli of this source tree, alternately")
    ap.add_argument("--configs-only", action="store_true", help="fetch only config/tokenizer files")
    args = ap.parse_args()

    try:
        from swarm.fetchapi import FetchRequest
    except ImportError:  # before issue #13's split
        from swarm.sources import FetchRequest
    from swarm.testmodel import make_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-cli-"))
    env = base_env(tmp)
    os.environ.update({k: v for k, v in env.items() if k.startswith("HF_")})
    seed = front = None
    try:
        t = time.perf_counter()
        src = make_model_dir(tmp / "src", weights_bytes=args.size_mb << 20, n_weight_files=2, seed=7)
        print(f"generated {args.size_mb} MiB in {time.perf_counter() - t:.1f} s", flush=True)
        shome = tmp / "seed" / "home"
        shome.parent.mkdir(parents=True)
        log = open(tmp / "seed" / "node.log", "wb")  # noqa: SIM115 (closed with the process)
        seed = subprocess.Popen(
            [
                *swarm_node_cmd(),
                "run",
                "--home",
                str(shome),
                "--cache-dir",
                str(tmp / "seed" / "cache"),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-serve-hf-cache",
                "--serve",
                f"{REPO}={src}",
            ],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        st = wait_seed(seed, shome, 300)
        front = Front(tmp / "front" / "home", tmp / "front" / "cache", st["addrs"][0])
        front.start()
        node = front.node
        print(f"seed {st['peer_id'][:16]}... serves {REPO}; front node up in this process\n", flush=True)

        def drop() -> None:
            front.call(node.remove_cached, REPO, None, force=True)

        configs = args.configs_only
        flags = ["--configs-only"] if configs else []
        trees = {"cli": env}
        if args.base:
            trees["cli@base"] = dict(env, PYTHONPATH=str(Path(args.base).resolve()))

        def in_process() -> float:
            req = FetchRequest(REPO, cache_dir=node.config.cache_dir, configs_only=configs)
            t0 = time.perf_counter()
            front.call(node.fetch, req)
            return time.perf_counter() - t0

        def chain() -> float:
            req = FetchRequest(REPO, cache_dir=node.config.cache_dir, configs_only=configs)
            t0 = time.perf_counter()
            r = front.call(node.fetch_with_fallback, req)
            assert r.source == "swarm", r
            return time.perf_counter() - t0

        def cli(name: str = "cli") -> float:
            t0 = time.perf_counter()
            out = subprocess.run(
                [*swarm_node_cmd(), "fetch", REPO, *flags, "--home", str(front.home), "--json"],
                env=trees[name],
                capture_output=True,
                text=True,
                timeout=600,
            )
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(f"swarm-node fetch ({name}) failed: {out.stderr}")
            r = json.loads(out.stdout)
            assert r["source"] == "swarm", r
            samples[f"{name} - its Node.fetch"].append(wall - front.swarm_seconds[-1])
            return wall

        def cli_start() -> float:
            t0 = time.perf_counter()
            subprocess.run(
                [*swarm_node_cmd(), "status", "--json", "--home", str(front.home)],
                env=env,
                capture_output=True,
                check=True,
                timeout=60,
            )
            return time.perf_counter() - t0

        in_process()  # warm: connections, DHT, page cache of the seed's files
        drop()
        samples: dict[str, list[float]] = {"in-process": [], "chain": [], "cli start": []}
        for name in trees:
            samples[name] = []
            samples[f"{name} - its Node.fetch"] = []
        ways = [("in-process", in_process), ("cli", cli), ("chain", chain)]
        if args.base:
            ways.append(("cli@base", functools.partial(cli, "cli@base")))
        for r in range(args.rounds):
            for name, fn in ways if r % 2 == 0 else [*ways[:1], *reversed(ways[1:])]:
                samples[name].append(fn())
                drop()
            samples["cli start"].append(cli_start())
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in samples.items() if v),
                flush=True,
            )
        if args.timeline:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    TIMELINE_CHILD.format(repo=REPO, home=str(front.home), configs=configs),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            drop()
            if out.returncode == 0:
                print("\ntimeline of one client process (s since start, event):")
                for at, kind, what in json.loads(out.stdout.strip().splitlines()[-1]):
                    print(f"  {at:7.3f}  {kind} {what}")
            else:
                print(f"timeline child failed: {out.stderr[-2000:]}")
        med = {k: statistics.median(v) for k, v in samples.items()}
        low = {k: min(v) for k, v in samples.items()}
        high = {k: max(v) for k, v in samples.items()}
        what = "config files" if configs else "the whole model"
        print(f"\n{args.rounds} rounds, {args.size_mb} MiB model, {what} (cli: wall of real processes;")
        print("in-process, chain: in-process timer; cli - its Node.fetch: the cli's wall less the")
        print("Node.fetch that served it)")
        print(f"  {'':<26} {'median':>8} {'min':>8} {'max':>8}")
        for k in samples:
            print(f"  {k:<26} {med[k]:>7.3f}s {low[k]:>7.3f}s {high[k]:>7.3f}s")
        for name in trees:
            print(
                f"  {name + ' - in-process':<26} {med[name] - med['in-process']:>+7.3f}s "
                f"{low[name] - low['in-process']:>+7.3f}s"
            )
        print(
            f"  {'chain - in-process':<21} {med['chain'] - med['in-process']:>+7.3f}s "
            f"{low['chain'] - low['in-process']:>+7.3f}s"
        )
        return 0
    finally:
        if front is not None:
            front.close()
        if seed is not None and seed.poll() is None:
            seed.send_signal(signal.SIGTERM)
            try:
                seed.wait(timeout=15)
            except subprocess.TimeoutExpired:
                seed.kill()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
