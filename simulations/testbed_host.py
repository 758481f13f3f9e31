"""One testbed host's node process: start, stop (keeping its counters), readiness, and what it
measured (bytes, CPU, waste); plus the machine-wide CPU reading the run uses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.netns import HostNet, TestbedError

NODE_PORT = 4001
READY_TIMEOUT = 60.0
"""Seconds a node may take to start (import, listen, hash a served model) on a busy machine."""
STOP_GRACE = 15.0
"""Seconds a node gets after SIGTERM before SIGKILL: more than its drain (the node keeps sending
the pieces peers already asked of it for up to ``drain_timeout``, 10 s by default); a shorter
grace cut a leaving worker's drain short (it used to be 5 s)."""


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (``ip netns exec`` execs the node, so it is that pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return float(sum(vals) - idle), float(sum(vals))


def set_nice(pid: int, nice: int) -> bool:
    """Set a process's nice value (0: this thread); False where not allowed (not root)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError:
        return False
    return True


def _later(delay: float, fn: Callable[..., Any], *args: Any) -> None:
    t = threading.Timer(delay, fn, args=args)
    t.daemon = True
    t.start()


class Host:
    """One host: its namespace, its node process (restartable) and what it measured."""

    def __init__(self, nid: str, group: Any, net: HostNet, root: Path):
        self.id = nid
        self.group = group
        self.net = net
        self.home = root / nid / "home"
        self.cache = root / nid / "hf-cache"
        self.log = root / nid / "node.log"
        self.home.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.stopping: threading.Thread | None = None  # a stop under way (see Testbed._depart)
        self.peer_id = ""
        self.online = False
        self.gone = False
        self.vanished = False
        self.session = 0
        self.first_arrival: float | None = None
        self.completed_at: float | None = None
        self.configs_at: float | None = None
        self.manifest_at: float | None = None  # the node chose the manifest (since t = 0)
        self.first_piece_at: float | None = None
        self.wasted = 0  # piece bytes received twice or late (of finished processes)
        self.cur_wasted = 0
        self.got_from: dict[str, int] = {}  # piece bytes received per sender's peer id (finished)
        self.cur_got_from: dict[str, int] = {}
        self.timeouts = 0
        self.cur_timeouts = 0
        self.departures = 0
        self.bytes_up = 0  # of finished processes
        self.bytes_down = 0
        self.cur_up = 0  # of the running process, last seen
        self.cur_down = 0
        self.cpu = 0.0  # seconds, of finished processes
        self.cpu_start: float | None = None
        self.fetch_error: str | None = None

    def start(self, cmd: list[str], env: dict[str, str], nice: int | None = None) -> None:
        """Start the node; ``nice``: its scheduling priority (see testbed.NODE_NICE), set while
        the process is still ``ip netns exec`` (one thread: every thread the node makes inherits
        it)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        if nice is not None:
            set_nice(self.proc.pid, nice)
        self.session += 1
        self.cur_up = self.cur_down = self.cur_wasted = self.cur_timeouts = 0

    def cpu_now(self) -> float:
        c = _cpu_seconds(self.proc.pid) if self.proc is not None else None
        return self.cpu + (c or 0.0)

    def poll_bytes(self) -> None:
        from swarm import client

        if self.proc is None or self.proc.poll() is not None or self.vanished:
            return
        with contextlib.suppress(Exception):
            st = client.status(self.home)
            self.cur_up, self.cur_down = int(st.get("bytes_up") or 0), int(st.get("bytes_down") or 0)
            ms = st.get("models") or []
            self.cur_wasted = sum(int(m.get("wasted_bytes") or 0) for m in ms)
            self.cur_timeouts = sum(int(m.get("timeouts") or 0) for m in ms)
        with contextlib.suppress(Exception):  # per-peer counters (GET /v1/models peer_stats)
            got: dict[str, int] = {}
            for m in client.models(self.home):
                for pid, b in (m.get("peer_stats") or {}).items():
                    got[pid] = got.get(pid, 0) + int(b.get("bytes_down") or 0)
            self.cur_got_from = got

    def stop(self, sig: int) -> None:
        """End the process with ``sig`` (SIGKILL after STOP_GRACE), keeping its counters."""
        p = self.proc
        if p is None:
            return
        if sig != signal.SIGKILL:
            self.poll_bytes()
        c = _cpu_seconds(p.pid)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            deadline = time.monotonic() + STOP_GRACE
            while p.poll() is None and time.monotonic() < deadline:  # a draining node's counters
                c = _cpu_seconds(p.pid) or c
                if sig != signal.SIGKILL:
                    self.poll_bytes()
                time.sleep(0.1)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        self.cpu += c or 0.0
        self.bytes_up += self.cur_up
        self.bytes_down += self.cur_down
        self.wasted += self.cur_wasted
        for pid, b in self.cur_got_from.items():
            self.got_from[pid] = self.got_from.get(pid, 0) + b
        self.cur_got_from = {}
        self.timeouts += self.cur_timeouts
        self.cur_up = self.cur_down = self.cur_wasted = self.cur_timeouts = 0
        self.proc = None

    def wait_ready(self, deadline: float, *, serving: bool = False) -> None:
        from swarm import client

        while True:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-6:]
                raise TestbedError(f"{self.id}: node exited:\n  " + "\n  ".join(tail))
            try:
                st = client.status(self.home)
            except client.NodeUnavailable:
                st = None
            if st is not None and (not serving or any(m.get("complete") for m in st["models"])):
                self.peer_id = st["peer_id"]
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"{self.id}: not ready after {READY_TIMEOUT:g} s (see {self.log})")
            time.sleep(0.1)

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{self.net.addr}/tcp/{NODE_PORT}/p2p/{self.peer_id}"
