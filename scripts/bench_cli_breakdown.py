#!/usr/bin/env python
"""Where the time of a ``swarm-node fetch`` goes, beyond the ``Node.fetch`` it ends in (issue #12
item 5): the setting of scripts/bench_cli_fetch.py (a seed process, the front node in this process),
with every ``swarm-node fetch ORG/NAME --json`` child timestamped on both sides of the control
socket (``time.time()``, one host): spawn -> the child's first line (interpreter start, site) ->
``swarm.cli`` imported -> connect -> request sent -> the node's job starts -> its Node.fetch starts
and ends -> job returns -> result event sent -> result read by the child -> the child's exit ->
the parent sees it exit. Wall times of real processes; prints every round and the medians, and
which heavy modules the child had loaded (attrs, http.client, swarm.manifest, swarm.config, ...).

``--tree DIR``: time the CLI of another source tree (e.g. a ``git worktree`` of an older commit)
against this tree's front node.

    PYTHONPATH=. .venv/bin/python scripts/bench_cli_breakdown.py [--tree DIR] [--size-mb 1024]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_cli_fetch as b  # noqa: E402

CHILD = r"""
import time, sys, os
T0 = time.time()
marks = [("main", T0)]
def mark(k): marks.append((k, time.time()))
done = []
def _out():
    if done: return
    done.append(1)
    mark("atexit")
    heavy = ("attrs", "http.client", "swarm.manifest", "swarm.config", "logging", "swarm.fetchapi")
    marks.append(("mods", sorted(m for m in heavy if m in sys.modules)))
    with open(os.environ["PROBE_OUT"], "w") as f:
        import json; json.dump(marks, f)
import atexit
atexit.register(_out)
_orig_exit = os._exit
def _exit(code):
    _out(); _orig_exit(code)
os._exit = _exit
import swarm.cli as cli
mark("imported cli")
import swarm.control_client as cc
opener = "open_socket" if hasattr(cc, "open_socket") else "connect"
orig_open = getattr(cc, opener)
def opn(*a, **k):
    mark("connect")
    return orig_open(*a, **k)
setattr(cc, opener, opn)
import swarm.client as c
fvn = c.fetch_via_node
def fetch_via_node(body, home, emit, *a, after_send=None, **kw):
    def sent():
        mark("sent")
        if after_send is not None:
            after_send()
    return fvn(body, home, emit, *a, after_send=sent, **kw)
c.fetch_via_node = fetch_via_node
orig_hl = cc._handle_line
def hl(*a):
    r = orig_hl(*a)
    if r is not None: mark("result decoded")
    return r
cc._handle_line = hl
sys.argv = ["swarm-node"] + sys.argv[1:]
rc = cli.main()
mark("main returned")
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(HERE.parent), help="source tree whose CLI is timed")
    ap.add_argument("--size-mb", type=int, default=1024, help="model weights, MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args = ap.parse_args()
    wt, size, rounds = str(Path(args.tree).resolve()), args.size_mb, args.rounds

    import swarm.control_jobs as cj
    from swarm.fetchapi import FetchRequest
    from swarm.testmodel import make_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="probe-"))
    env = b.base_env(tmp)
    env["PYTHONPATH"] = wt
    os.environ.update({k: v for k, v in env.items() if k.startswith("HF_")})
    src = make_model_dir(tmp / "src", weights_bytes=size << 20, n_weight_files=2, seed=7)
    shome = tmp / "seed" / "home"
    shome.parent.mkdir(parents=True)
    log = open(tmp / "seed" / "node.log", "wb")  # noqa: SIM115 (closed with the process)
    seed = subprocess.Popen(
        [
            *b.swarm_node_cmd(),
            "run",
            "--home",
            str(shome),
            "--cache-dir",
            str(tmp / "seed" / "cache"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-serve-hf-cache",
            "--serve",
            f"{b.REPO}={src}",
        ],
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    front = None
    try:
        st = b.wait_seed(seed, shome, 300)
        front = b.Front(tmp / "front" / "home", tmp / "front" / "cache", st["addrs"][0])
        nodemarks = []
        orig_fetcher = front._fetcher

        async def fetcher(req, *, on_event):
            nodemarks.append(("job start", time.time()))

            def tap(e):
                k = e.get("event")
                if k == "source" and e.get("source") == "swarm":
                    nodemarks.append(("swarm start", time.time()))
                if k == "attempt" and e.get("source") == "swarm":
                    nodemarks.append(("swarm end", time.time()))
                    nodemarks.append(("swarm seconds", float(e["seconds"])))
                on_event(e)

            r = await orig_fetcher(req, on_event=tap)
            nodemarks.append(("job return", time.time()))
            return r

        front._fetcher = fetcher
        orig_send = cj.send

        async def send(stream, conn, ev):
            data = getattr(ev, "data", b"")
            await orig_send(stream, conn, ev)
            if b'"event": "result"' in bytes(data):
                nodemarks.append(("result sent", time.time()))

        cj.send = send
        front.start()
        node = front.node

        def drop():
            front.call(node.remove_cached, b.REPO, None, force=True)

        def in_process():
            req = FetchRequest(b.REPO, cache_dir=node.config.cache_dir)
            t0 = time.perf_counter()
            front.call(node.fetch, req)
            return time.perf_counter() - t0

        in_process()
        drop()
        rows = []
        out = tmp / "marks.json"
        for r in range(rounds):
            ip = in_process()
            drop()
            nodemarks.clear()
            cenv = dict(env, PROBE_OUT=str(out))
            t_spawn = time.time()
            p = subprocess.run(
                [sys.executable, "-c", CHILD, "fetch", b.REPO, "--home", str(front.home), "--json"],
                env=cenv,
                capture_output=True,
                text=True,
                timeout=600,
            )
            t_exit = time.time()
            drop()
            if p.returncode:
                print(p.stderr)
                return 1
            loaded = json.loads(out.read_text())
            cm = dict((k, v) for k, v in loaded if k != "mods")
            mods = next(v for k, v in loaded if k == "mods")
            cm.setdefault("main returned", cm["atexit"])
            nm = dict(nodemarks)
            row = {
                "in-process": ip,
                "wall": t_exit - t_spawn,
                "swarm s": nm["swarm seconds"],
                "gap": t_exit - t_spawn - nm["swarm seconds"],
                "spawn->main": cm["main"] - t_spawn,
                "main->imported": cm["imported cli"] - cm["main"],
                "imported->connect": cm["connect"] - cm["imported cli"],
                "connect->sent": cm["sent"] - cm["connect"],
                "sent->job start": nm["job start"] - cm["sent"],
                "job->swarm start": nm["swarm start"] - nm["job start"],
                "swarm end->job return": nm["job return"] - nm["swarm end"],
                "job return->result sent": nm["result sent"] - nm["job return"],
                "result sent->decoded": cm["result decoded"] - nm["result sent"],
                "decoded->main returned": cm["main returned"] - cm["result decoded"],
                "main returned->atexit": cm["atexit"] - cm["main returned"],
                "atexit->parent sees exit": t_exit - cm["atexit"],
            }
            rows.append(row)
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v * 1000:.0f}" for k, v in row.items())
                + f" mods {mods}",
                flush=True,
            )
        print("\nmedians (ms):")
        for k in rows[0]:
            vals = [r[k] for r in rows]
            print(
                f"  {k:<28} {statistics.median(vals) * 1000:8.1f}  "
                f"(min {min(vals) * 1000:.1f}, max {max(vals) * 1000:.1f})"
            )
    finally:
        if front is not None:
            front.close()
        seed.send_signal(signal.SIGTERM)
        seed.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
