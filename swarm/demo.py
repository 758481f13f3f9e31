"""``swarm-node demo``: a whole swarm on 127.0.0.1, for a look at what swarm does.

One worker serves a generated Llama-style model (real config and tokenizer file names, a few
hundred MB of safetensors weights) as a private model; N frontends, bootstrapped to the worker,
fetch it concurrently, each through its own node's control socket; the frontends trade pieces with
each other as soon as they hold them. Then a table: time to the config files, time to the whole
model, where the bytes came from, and what each node sent and received; and a check that every
frontend's files are byte-identical to the worker's.

Every node is a ``swarm-node run`` subprocess with its own home and cache in one temporary
directory; nothing listens beyond 127.0.0.1 and nothing reaches the Internet (HF_HUB_OFFLINE=1).
Everything is killed and removed at the end, also on errors, on Ctrl-C and on ``--timeout``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from swarm import client

__all__ = ["DemoError", "run"]

MODEL = "demo/llama-swarm"
STOP_GRACE = 5.0
"""Seconds a node gets to shut down after SIGTERM before it is killed."""
SHARD_MB = 100
"""Roughly one safetensors shard per this many MB of weights (at most 8 shards)."""


class DemoError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: int | None) -> str:
    if not n:
        return "0 MB"
    return f"{n / 1e6:.1f} MB"


class _Proc:
    def __init__(
        self, name: str, role: str, home: Path, cache: Path, log: Path, popen: subprocess.Popen
    ) -> None:
        self.name = name
        self.role = role
        self.home = home
        self.cache = cache
        self.log = log
        self.popen = popen
        self.peer_id = ""
        self.addrs: list[str] = []

    def log_tail(self, n: int = 8) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])


class Demo:
    def __init__(
        self, size_mb: int, frontends: int, timeout: float, keep: bool, lane: str = "encrypted"
    ) -> None:
        self.size_mb = size_mb
        self.n_frontends = frontends
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.keep = keep
        self.lane = lane
        self.tmp = Path(tempfile.mkdtemp(prefix="swarm-demo-"))
        self.procs: list[_Proc] = []
        self.sources: dict[str, int] = {}
        self.env = dict(os.environ)
        for var in (
            "SWARM_HOME",
            "SWARM_CONFIG",
            "SWARM_LISTEN",
            "SWARM_BOOTSTRAP",
            "SWARM_SERVE",
            "SWARM_CACHE_DIR",
            "SWARM_NO_SERVE_HF_CACHE",
            "SWARM_PSK",
            "SWARM_TRUST",
            "SWARM_TRUSTED_PUBLISHERS",
            "SWARM_LANE",
            "SWARM_NO_DIRECT_IO",
            "MODEL_EXPRESS_URL",
        ):
            self.env.pop(var, None)
        self.env.update(
            HF_HUB_OFFLINE="1",
            HF_ENDPOINT="http://127.0.0.1:9",
            HF_HUB_DISABLE_TELEMETRY="1",
            PYTHONUNBUFFERED="1",
        )

    # -- helpers --

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoError(f"the demo did not finish within --timeout {self.timeout:g} s")
        return left

    def start_node(self, name: str, role: str, extra: list[str]) -> _Proc:
        home = self.tmp / name / "home"
        cache = self.tmp / name / "hf-cache"
        log = self.tmp / name / "node.log"
        home.parent.mkdir(parents=True)
        env = dict(self.env, HF_HUB_CACHE=str(cache))
        cmd = [
            sys.executable,
            "-m",
            "swarm.cli",
            "run",
            "--home",
            str(home),
            "--cache-dir",
            str(cache),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-serve-hf-cache",
            "--lane",
            self.lane,
            *extra,
        ]
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
            )
        p = _Proc(name, role, home, cache, log, popen)
        self.procs.append(p)
        return p

    def wait_ready(self, p: _Proc, *, serving: bool = False) -> None:
        while True:
            if p.popen.poll() is not None:
                raise DemoError(f"{p.name} exited with code {p.popen.returncode}:\n{p.log_tail()}")
            try:
                st = client.status(p.home)
            except client.NodeUnavailable:
                st = None
            if st is not None and (not serving or any(m.get("complete") for m in st["models"])):
                p.peer_id = st["peer_id"]
                p.addrs = st["addrs"]
                return
            if self.deadline - time.monotonic() <= 0:
                raise DemoError(f"{p.name} did not become ready in time:\n{p.log_tail()}")
            time.sleep(0.1)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait()

    def cleanup(self) -> None:
        self.stop_all()
        if self.keep:
            _say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the run --

    def generate(self) -> Path:
        from swarm.testmodel import make_model_dir

        shards = max(1, min(8, round(self.size_mb / SHARD_MB)))
        _say(
            f"generating {MODEL}: {self.size_mb} MB of weights in {shards} safetensors shard(s), "
            "configs and a tokenizer ..."
        )
        return make_model_dir(
            self.tmp / "model", weights_bytes=self.size_mb * 1_000_000, n_weight_files=shards, seed=7
        )

    def fetch_all(self, frontends: list[_Proc]) -> dict[str, dict]:
        results: dict[str, dict] = {p.name: {} for p in frontends}
        bars: dict[str, Any] = {}
        show = client.progress_wanted()
        lock = threading.Lock()
        start = time.monotonic()

        def on_event(name: str, pos: int, event: dict) -> None:
            r = results[name]
            kind = event.get("event")
            if kind == "configs_ready" and "configs" not in r:
                r["configs"] = time.monotonic() - start
            if show and kind == "progress" and isinstance(event.get("total"), int):
                with lock:
                    bar = bars.get(name)
                    if bar is None:
                        from tqdm.auto import tqdm

                        bar = bars[name] = tqdm(
                            total=event["total"],
                            desc=name,
                            unit="B",
                            unit_scale=True,
                            position=pos,
                            leave=False,
                            file=sys.stderr,
                        )
                    bar.update(max(0, event.get("have", 0) - bar.n))

        def one(pos: int, p: _Proc) -> None:
            r = results[p.name]
            try:
                res = client.fetch_result(
                    MODEL,
                    home=p.home,
                    cache_dir=p.cache,
                    progress=False,
                    timeout=self.remaining(),
                    on_event=lambda e: on_event(p.name, pos, e),
                )
                r["complete"] = time.monotonic() - start
                r["result"] = res
            except Exception as e:
                r["error"] = e

        _say(f"{len(frontends)} frontends fetch {MODEL} at once ...")
        threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(frontends)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.1, self.deadline - time.monotonic()))
        for bar in bars.values():
            bar.close()
        if any(t.is_alive() for t in threads):
            raise DemoError(f"the fetches did not finish within --timeout {self.timeout:g} s")
        for name, r in results.items():
            if "error" in r:
                msg = "; ".join(line.strip() for line in str(r["error"]).splitlines() if line.strip())
                raise DemoError(f"{name}: {type(r['error']).__name__}: {msg}")
        return results

    def verify(self, model_dir: Path, results: dict[str, dict]) -> int:
        """Every frontend's files equal the worker's, byte for byte; the number of files."""
        import blake3

        def digest(path: Path) -> bytes:
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with open(path, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    h.update(chunk)
            return h.digest()

        want = {}
        for f in sorted(model_dir.rglob("*")):
            if f.is_file() and f.name not in ("README.md", ".gitattributes"):
                want[f.relative_to(model_dir).as_posix()] = digest(f)
        for name, r in results.items():
            snap = Path(r["result"].path)
            got = {f.relative_to(snap).as_posix(): f for f in snap.rglob("*") if f.is_file()}
            if set(got) != set(want):
                raise DemoError(
                    f"{name}: files differ from the worker's: missing "
                    f"{sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
                )
            for rel, d in want.items():
                if digest(got[rel]) != d:
                    raise DemoError(f"{name}: {rel} is not byte-identical to the worker's")
        return len(want)

    def table(self, worker: _Proc, frontends: list[_Proc], results: dict[str, dict]) -> str:
        names = {p.peer_id: p.name for p in self.procs}
        rows = [("node", "role", "peer id", "configs", "complete", "source", "sent", "received")]
        for p in [worker, *frontends]:
            st = client.status(p.home)
            models = client.models(p.home)
            r = results.get(p.name, {})
            if p is worker:
                source = f"serves {MODEL}"
                configs = complete = "-"
            else:
                res = r["result"]
                got: dict[str, int] = {}
                for m in models:
                    if m.get("model") == MODEL:
                        for pid, s in (m.get("peer_stats") or {}).items():
                            if s.get("bytes_down"):
                                got[pid] = got.get(pid, 0) + s["bytes_down"]
                total = sum(got.values()) or 1
                for pid, n in got.items():
                    key = "from_worker" if pid == worker.peer_id else "from_frontends"
                    self.sources[key] = self.sources.get(key, 0) + n
                parts = [
                    f"{names.get(pid, pid[:10])} {100 * n / total:.0f}%"
                    for pid, n in sorted(got.items(), key=lambda kv: -kv[1])
                ]
                source = res.source + (f" ({', '.join(parts)})" if parts else "")
                configs = f"{r['configs']:.2f} s" if "configs" in r else "-"
                complete = f"{r['complete']:.2f} s"
            rows.append(
                (
                    p.name,
                    p.role,
                    p.peer_id[-8:],
                    configs,
                    complete,
                    source,
                    _mb(st.get("bytes_up")),
                    _mb(st.get("bytes_down")),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {3, 4, 6, 7}
        lines = []
        for k, row in enumerate(rows):
            cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def run(self) -> int:
        t0 = time.monotonic()
        model_dir = self.generate()
        self.remaining()
        _say(f"starting the worker (data lane: {self.lane}) ...")
        worker = self.start_node("worker", "worker", ["--serve", f"{MODEL}={model_dir}"])
        self.wait_ready(worker, serving=True)
        addr = next((a for a in worker.addrs if "/127.0.0.1/" in a), worker.addrs[0])
        _say(f"worker {worker.peer_id} serves {MODEL} on {addr}")
        _say(f"starting {self.n_frontends} frontends bootstrapped to it ...")
        frontends = [
            self.start_node(f"frontend-{i + 1}", "frontend", ["--bootstrap", addr])
            for i in range(self.n_frontends)
        ]
        for p in frontends:
            self.wait_ready(p)
        results = self.fetch_all(frontends)
        n_files = self.verify(model_dir, results)
        print(self.table(worker, frontends, results), flush=True)
        from_worker = self.sources.get("from_worker", 0)
        from_frontends = self.sources.get("from_frontends", 0)
        delivered = from_worker + from_frontends
        share = 100 * from_frontends / delivered if delivered else 0.0
        print(
            f"\n{len(frontends)} frontends received {_mb(delivered)} of verified pieces: "
            f"{_mb(from_worker)} from the worker and {_mb(from_frontends)} ({share:.0f}%) from "
            f"each other. {n_files} files on every frontend are byte-identical to the worker's. "
            f"{time.monotonic() - t0:.1f} s in all.",
            flush=True,
        )
        return 0


def run(
    *,
    size_mb: int = 300,
    frontends: int = 3,
    timeout: float = 300.0,
    keep: bool = False,
    lane: str = "encrypted",
) -> int:
    """Run the demo; its exit code. Raises DemoError (one-line reason) on failure. ``lane``: the
    data lane mode of every node (``swarm-node run --lane``)."""
    if size_mb < 1 or frontends < 1:
        raise DemoError("--size-mb and --frontends must be at least 1")
    from swarm.config import LANE_MODES

    if lane not in LANE_MODES:
        raise DemoError(f"--lane must be one of {', '.join(LANE_MODES)}, not {lane!r}")
    demo = Demo(size_mb, frontends, timeout, keep, lane)
    # SIGTERM ends the demo like Ctrl-C does, through the cleanup below.
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not in the main thread: leave it
        signal.signal(signal.SIGTERM, on_term)
    try:
        return demo.run()
    finally:
        _say("stopping the nodes and removing the temporary directory ...")
        demo.cleanup()
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, old)
