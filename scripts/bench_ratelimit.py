#!/usr/bin/env python3
"""Do bandwidth limits hold? Real ``swarm-node run`` processes on 127.0.0.1, one seeder and one
fetcher, a model sized for ``--seconds`` at the limit, for each data lane mode:

- ``upload``: the seeder runs with ``--max-upload-rate RATE``, the fetcher unlimited;
- ``download``: the fetcher runs with ``--max-download-rate RATE``, the seeder unlimited;
- ``change`` (optional, ``--change``): the seeder starts at RATE and is set to RATE/2 halfway
  through with ``swarm-node limits`` (the control API).

For each run it prints the achieved rate three ways, as a share of the limit: the limited node's
own byte counter (``status``: bytes_up / bytes_down, sampled every 0.25 s) over the whole transfer,
the same counter over its worst (fastest) 5 s window, and the receiver's wall time (the fetch's
start to its end, manifest lookup included). The target is within 5% over a 30 s transfer.

    python scripts/bench_ratelimit.py --rate 20MB/s --seconds 30
    python scripts/bench_ratelimit.py --lanes off --modes upload --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "bench"))

from common import make_weights_dir  # noqa: E402

from swarm import client  # noqa: E402
from swarm.config import format_rate, parse_rate  # noqa: E402

MODEL = "bench/ratelimit"
SAMPLE = 0.25
"""Seconds between counter samples: fine enough for a 5 s window, cheap for the node."""
WINDOW = 5.0
"""Seconds of the sliding window whose fastest rate is reported (short bursts show up here)."""
READY_TIMEOUT = 60.0


class Node:
    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.home = root / name / "home"
        self.cache = root / name / "cache"
        self.log = root / name / "node.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SWARM_", "HF_"))}
        env.update(
            HF_HUB_OFFLINE="1",
            HF_ENDPOINT="http://127.0.0.1:9",
            PYTHONUNBUFFERED="1",
            HF_HOME=str(root / "hf-home"),
            SWARM_DRAIN_TIMEOUT="2",
            PYTHONPATH=str(REPO),
        )
        cmd = [
            sys.executable,
            "-m",
            "swarm.cli",
            "run",
            "--home",
            str(self.home),
            "--cache-dir",
            str(self.cache),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-serve-hf-cache",
            *args,
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        end = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited: {self.log.read_text()[-2000:]}")
            try:
                self.status = client.status(self.home)
                break
            except client.NodeUnavailable:
                if time.monotonic() > end:
                    raise SystemExit(f"{name} not ready: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _sample(node: Node, key: str, out: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.append((time.monotonic(), client.status(node.home)[key]))
        except client.NodeUnavailable:
            pass
        stop.wait(SAMPLE)


def _rates(samples: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(bytes/s over the transfer, bytes/s of the fastest WINDOW, seconds) from counter samples:
    from the last sample before bytes moved to the first that saw them all."""
    total = samples[-1][1]
    first = max(i for i, (_, b) in enumerate(samples) if b == samples[0][1])
    last = min(i for i, (_, b) in enumerate(samples) if b == total)
    s = samples[first : last + 1]
    t = s[-1][0] - s[0][0]
    peak, j = 0.0, 0
    for i in range(len(s)):
        while s[i][0] - s[j][0] > WINDOW:
            j += 1
        if s[i][0] - s[j][0] >= WINDOW * 0.9:
            peak = max(peak, (s[i][1] - s[j][1]) / (s[i][0] - s[j][0]))
    return (s[-1][1] - s[0][1]) / t, peak, t


def run_one(root: Path, src: Path, mode: str, lane: str, rate: float, size: int) -> dict:
    seed_args = ["--serve", f"{MODEL}={src}", "--lane", lane]
    fetch_args = ["--lane", lane]
    if mode in ("upload", "change"):
        seed_args += ["--max-upload-rate", str(rate)]
    else:
        fetch_args += ["--max-download-rate", str(rate)]
    run_dir = root / f"{mode}-{lane}"
    seeder = Node(run_dir, "seeder", *seed_args)
    fetcher = None
    try:
        fetcher = Node(run_dir, "fetcher", "--bootstrap", seeder.status["addrs"][0], *fetch_args)
        limited, key = (fetcher, "bytes_down") if mode == "download" else (seeder, "bytes_up")
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(limited, key, samples, stop))
        sampler.start()
        changer = None
        if mode == "change":

            def slow_down() -> None:
                if not stop.wait(size / rate / 2):
                    client.limits(seeder.home, upload=rate / 2)

            changer = threading.Thread(target=slow_down)
            changer.start()
        started = time.monotonic()
        try:
            client.fetch(MODEL, home=fetcher.home, timeout=size / rate * 4 + 60, progress=False)
            wall = time.monotonic() - started
            time.sleep(2 * SAMPLE)
        finally:
            stop.set()
            sampler.join()
            if changer is not None:
                changer.join()
        avg, peak, seconds = _rates(samples)
        out = {
            "mode": mode,
            "lane": lane,
            "limit": rate,
            "bytes": samples[-1][1],
            "seconds": round(seconds, 2),
            "counter_rate": avg,
            "peak_5s_rate": peak,
            "receiver_rate": size / wall,
            "receiver_seconds": round(wall, 2),
        }
        if mode == "change":  # the second half runs at rate / 2: expected mean is 2/3 of rate
            out["expected_rate"] = rate * 2 / 3
        return out
    finally:
        for n in (fetcher, seeder):
            if n is not None:
                n.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="20MB/s", help="the limit (default 20MB/s)")
    ap.add_argument("--seconds", type=float, default=30.0, help="transfer length at the limit")
    ap.add_argument("--lanes", default="encrypted,plaintext,off")
    ap.add_argument("--modes", default="upload,download", help="upload,download,change")
    ap.add_argument("--json", action="store_true", help="one JSON object per run")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the model there")
    args = ap.parse_args()
    rate = parse_rate(args.rate, "--rate")
    if rate is None:
        raise SystemExit("--rate: give a limit, not 0")
    size = int(rate * args.seconds)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    try:
        src = make_weights_dir(root / "model", size, "ratelimit")
        print(
            f"# limit {format_rate(rate)}, model {size / 1e6:.0f} MB (~{args.seconds:g} s), "
            f"loopback, {os.cpu_count()} CPUs",
            flush=True,
        )
        for mode in args.modes.split(","):
            for lane in args.lanes.split(","):
                r = run_one(root, src, mode, lane, rate, size)
                if args.json:
                    print(json.dumps(r), flush=True)
                    continue
                want = r.get("expected_rate", rate)
                print(
                    f"{mode:8} lane {lane:9}  {r['seconds']:6.1f} s  "
                    f"counter {format_rate(r['counter_rate']):>10} "
                    f"({r['counter_rate'] / want - 1:+.1%})  "
                    f"fastest {WINDOW:g} s {format_rate(r['peak_5s_rate']):>10} "
                    f"({r['peak_5s_rate'] / rate - 1:+.1%})  "
                    f"receiver {format_rate(r['receiver_rate']):>10} "
                    f"({r['receiver_rate'] / want - 1:+.1%})",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
