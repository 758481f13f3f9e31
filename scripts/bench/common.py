"""Shared helpers of the benchmark scripts: test data, child processes speaking JSON lines, and
the machine description."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable

CONFIG_SET = (  # (name, share of the config set's bytes): 8 files, a tokenizer-heavy repo
    ("tokenizer.json", 0.40),
    ("vocab.json", 0.20),
    ("merges.txt", 0.15),
    ("tokenizer.model", 0.12),
    ("config.json", 0.04),
    ("tokenizer_config.json", 0.04),
    ("generation_config.json", 0.03),
    ("special_tokens_map.json", 0.02),
)


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    if s.endswith("B") and s[-2] in mult:
        return int(float(s[:-2]) * mult[s[-2]])
    return int(s)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def write_random(path: Path, size: int, seed: str) -> None:
    """``size`` pseudo-random bytes (blake3 XOF of ``seed``), written in 16 MiB chunks."""
    h = blake3.blake3(seed.encode())
    chunk = 16 << 20
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        off = 0
        while off < size:
            n = min(chunk, size - off)
            f.write(h.digest(length=n, seek=off))
            off += n


def make_weights_dir(root: Path, size: int, seed: str) -> Path:
    """A model directory: a small config.json and one ``size``-byte model.safetensors."""
    marker = root.with_name(root.name + ".complete")
    if marker.exists() and marker.read_text() == f"{size} {seed}" and root.is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "bench", "seed": seed}))
    write_random(root / "model.safetensors", size, seed)
    marker.write_text(f"{size} {seed}")
    return root


def make_config_dir(root: Path, total: int, seed: str) -> Path:
    """An 8-file config set of ``total`` bytes."""
    marker = root.with_name(root.name + ".complete")
    if marker.exists() and marker.read_text() == f"{total} {seed}" and root.is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for name, share in CONFIG_SET:
        write_random(root / name, int(total * share), f"{seed}/{name}")
    marker.write_text(f"{total} {seed}")
    return root


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


class Child:
    """A child process answering one JSON line per JSON line we send."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = open(log, "ab")  # noqa: SIM115 (closed in close())
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, **(env or {})},
            cwd=str(REPO),
        )

    def send(self, **cmd) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write((json.dumps(cmd) + "\n").encode())
        self.p.stdin.flush()

    def recv(self, timeout: float = 600.0) -> dict:
        assert self.p.stdout is not None
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            self.stuck = True
            if self.p.poll() is None:  # node_proc.py dumps its trio tasks into its log
                with contextlib.suppress(OSError):
                    self.p.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
            raise TimeoutError(
                f"no answer from {self.p.args[1:3]} within {timeout:g} s (see {self.log.name})"
            )
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.p.args[1:3]} exited (rc={self.p.poll()}); see {self.log.name}")
        out = json.loads(line)
        if not out.get("ok", True):
            raise RuntimeError(f"child {self.p.args[1:3]} failed: {out.get('error')}")
        return out

    def call(self, timeout: float = 600.0, **cmd) -> dict:
        self.send(**cmd)
        return self.recv(timeout)

    def close(self) -> dict | None:
        out = None
        if getattr(self, "stuck", False) and self.p.poll() is None:
            self.p.kill()
        if self.p.poll() is None:
            try:
                out = self.call(cmd="quit", timeout=20)
            except Exception:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return out


def machine() -> dict:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (int(ln.split()[1]) for ln in read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), 0
    )
    versions = {}
    for mod in ("trio", "libp2p", "cryptography", "blake3", "libtorrent"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:
            versions[mod] = "not installed"
    try:
        from importlib.metadata import version

        versions["libp2p"] = version("libp2p")
    except Exception:
        pass
    df = subprocess.run(["df", "-hT", str(REPO)], capture_output=True, text=True).stdout.splitlines()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fs": df[-1].split()[1] if len(df) > 1 else "?",
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# --------------------------------------------------------------------------- other load on the machine

HZ = os.sysconf("SC_CLK_TCK")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of all CPUs since boot, from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq, steal


def proc_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads), 0 if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(f[11]) + int(f[12])


class Load:
    """CPU seconds used on the machine by processes other than ``pids`` between start and stop
    (other sessions' tests skew timings on a 2-vCPU VM), and the hypervisor's steal time."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.b0, self.s0 = cpu_jiffies()
        self.c0 = sum(proc_jiffies(p) for p in pids)
        self.t0 = time.time()

    def stop(self) -> dict:
        b1, s1 = cpu_jiffies()
        c1 = sum(proc_jiffies(p) for p in self.pids)
        wall = max(time.time() - self.t0, 1e-6)
        other = max(0, (b1 - self.b0) - (c1 - self.c0)) / HZ
        return {
            "other_cpu_s": other,
            "steal_s": (s1 - self.s0) / HZ,
            "wall_s": wall,
            "ours_cpu_s": (c1 - self.c0) / HZ,
        }


def wait_quiet(max_wait: float, busy_below: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until the machine's CPUs are less than ``busy_below`` busy
    over half a second; returns the last busy fraction seen."""
    deadline = time.time() + max_wait
    ncpu = os.cpu_count() or 1
    while True:
        b0, _ = cpu_jiffies()
        time.sleep(0.5)
        b1, _ = cpu_jiffies()
        busy = (b1 - b0) / HZ / 0.5 / ncpu
        if busy < busy_below or time.time() >= deadline:
            return busy
