"""The fleet testbed: a scenario on real ``swarm-node`` processes, one per host, each host in its own
Linux network namespace, side by side with the simulator.

Network
-------
Every host is a namespace ``swtb-<pid>-h<i>`` with one interface ``eth0`` (address 10.77.x.y/16,
which exists only inside these namespaces) whose other end ``p<i>`` sits on a bridge ``br0`` in a
namespace of its own (``swtb-<pid>-br``). No interface is created in the caller's namespace and
nothing routes out. ``tc tbf`` (egress shaping) caps the host's upload on its ``eth0`` and its
download on the bridge-side ``p<i>``. This kernel has no ``netem``: latency is not emulated (the
veth + bridge path is tens of microseconds; tbf's queue adds up to ``TBF_LATENCY``), so ``--compare``
simulates the scenario with every group's latency set to ``TESTBED_LATENCY``.

Events
------
- ``leave``: SIGTERM (the node closes its connections); ``kill``: SIGKILL (the kernel closes the
  sockets: peers get a FIN or RST at once); ``vanish``: the host's bridge port goes down (no FIN, no
  RST: links hang until the peers' own timeouts fire; the process is SIGKILLed while cut off).
- ``rejoin_after`` (or a later ``join``): a new process on the same home and cache (resume), its
  port up again; a fetching host that had not finished fetches again.

Needs root (namespaces, veth, tc). ``available()`` says why it cannot run; the CLI and the tests
skip with that reason. Everything is torn down on exit, on SIGINT/SIGTERM and on failure;
namespaces left by a killed run (their pid is gone) are removed before each run.

Modules: ``simulations.netns`` (namespaces, bridge, tc, teardown), ``simulations.testbed_host``
(one host's node process and its measurements), this one (the run and its result).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.netns import (
    PREFIX,
    SUBNET,
    TBF_BURST_SECONDS,
    TBF_LATENCY,
    TBF_MIN_BURST,
    Fabric,
    HostNet,
    TestbedError,
    _delete_namespace,
    _our_namespaces,
    available,
    cleanup_stale,
    signals_raise,
)
from simulations.scenario import Scenario, ScenarioError
from simulations.sim import NodeResult, SimResult
from simulations.testbed_host import (
    NODE_PORT,
    READY_TIMEOUT,
    STOP_GRACE,
    Host,
    _later,
    _machine_busy,
    set_nice,
)

__all__ = [
    "CPU_BOUND_BUSY",
    "EXTRA_NODE_FLAGS",
    "NODE_NICE",
    "NODE_PORT",
    "PREFIX",
    "READY_TIMEOUT",
    "STOP_GRACE",
    "SUBNET",
    "TBF_BURST_SECONDS",
    "TBF_LATENCY",
    "TBF_MIN_BURST",
    "TESTBED_LATENCY",
    "Fabric",
    "Host",
    "HostNet",
    "Testbed",
    "TestbedError",
    "available",
    "check_supported",
    "cleanup_stale",
    "for_testbed",
    "node_command",
    "signals_raise",
    "write_model",
]
"""The network (``simulations.netns``) and the hosts (``simulations.testbed_host``) are re-exported
here: callers and tests use ``simulations.testbed`` for all of it."""

TESTBED_LATENCY = 0.0001
"""One-way latency (s) the simulator is given for a testbed host (veth + bridge, no netem)."""
TESTBED_PAYLOAD = 1448 / 1514
"""Payload over the bytes ``tc tbf`` counts: a full TCP segment is 1448 bytes of data in a 1514
byte Ethernet frame (TCP with timestamps 32, IP 20, Ethernet 14). The simulator's rates are
payload rates, so it is given each testbed cap times this. ``scripts/bench_tcp_share.py
--flows 1``: one 4 MiB flow through a 20 Mbit/s cap ends at 1.04 x 4 MiB / cap (1 / 0.956 =
1.046)."""
TESTBED_SHARE_SPREAD = 0.6
"""``network.share_spread`` the simulator is given for the testbed: TCP flows through one tbf
link do not share it evenly. ``scripts/bench_tcp_share.py`` (4 flows of 4 MiB, 20 Mbit/s, two
runs of 8 and 10 repetitions) fits 0.5 and 0.75 for one sender's upload shared by 4 receivers
(the case in which a seeder's rounds of pieces end), 0.85-0.9 for one receiver's download shared
by 4 senders; 0.6 is the sender's case over both runs."""
EXTRA_NODE_FLAGS: tuple[str, ...] = ()
"""Flags added to every ``swarm-node run`` (e.g. an opt-in to listen beyond loopback)."""
EVENT_ACTIONS = ("leave", "kill", "vanish", "join")
NODE_NICE = -5
"""Nice value of the node processes and of the testbed's own process (its fetch client threads
take the completion times) during a run; ``swarm-sim testbed --nice`` changes it, 0 turns it off.
On a machine shared with other jobs a node at nice 0 waits for a CPU behind them, and the testbed
measures the queue for the CPU instead of the swarm (docs/simulation.md, "What the testbed
found"). Needs root, as the testbed does; ignored where not allowed."""
QUIET_CORE_PER_HOST = 0.10
"""The run's clock starts once the nodes are quiet: every node connected to a peer and their CPU
over the last ``QUIET_WINDOW`` below this many cores per host (start-up, DHT bootstrap and the
workers' first announce are over), so none of that lands in a completion time."""
QUIET_WINDOW = 1.0
QUIET_MIN = 2.0
"""Seconds the nodes are left alone at least after the last one is ready."""
QUIET_TIMEOUT = 30.0
"""Seconds after which the run starts anyway (``stats.quiet_timeout`` says so)."""


# --------------------------------------------------------------------------- node command line


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SWARM_") and k not in ("MODEL_EXPRESS_URL",)
    }
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def node_command(
    addr: str, home: Path, cache: Path, *, lane: str, serve: str | None, bootstrap: list[str]
) -> list[str]:
    """The ``swarm-node run`` command line of one host (add a flag here or in EXTRA_NODE_FLAGS)."""
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
        f"/ip4/{addr}/tcp/{NODE_PORT}",
        "--no-serve-hf-cache",
        "--lane",
        lane,
        *EXTRA_NODE_FLAGS,
    ]
    if serve:
        cmd += ["--serve", serve]
    for b in bootstrap:
        cmd += ["--bootstrap", b]
    return cmd


# --------------------------------------------------------------------------- the model


def write_model(sc: Scenario, root: Path, seed: int) -> Path:
    """The scenario's files with pseudo-random content (every piece distinct)."""
    rng = random.Random(f"{seed}/model")
    chunk = 1 << 20
    for f in sc.files:
        p = root / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            left = f.size
            while left:
                n = min(chunk, left)
                fh.write(rng.randbytes(n))
                left -= n
    return root


# --------------------------------------------------------------------------- a run


def check_supported(sc: Scenario) -> None:
    """Scenario features the testbed does not run (it says so rather than run something else)."""
    for g in sc.groups:
        if g.session.kind != "forever" or g.rejoin is not None:
            raise ScenarioError(
                f"testbed: groups.{g.name}: session/rejoin distributions are "
                "simulator-only; use [[events]] (leave, kill, vanish, rejoin_after)"
            )
        if g.corrupt or g.hash_rate:
            raise ScenarioError(f"testbed: groups.{g.name}: corrupt/hash_rate are simulator-only")
        if not g.serve:
            raise ScenarioError(f"testbed: groups.{g.name}: serve = false is simulator-only")
    if sc.engine or any(g.engine for g in sc.groups):
        raise ScenarioError("testbed: engine overrides are simulator-only (the node uses its own)")


class Testbed:
    """Runs one repetition of ``sc`` (arrival times and event choices from ``seed``, as the
    simulator draws them) on real nodes; ``run()`` returns a SimResult-shaped record."""

    def __init__(
        self,
        sc: Scenario,
        seed: int,
        *,
        lane: str = "plaintext",
        progress: Callable[[str], None] | None = None,
        keep: Path | None = None,
        timeout: float | None = None,
        queue: str = TBF_LATENCY,
        nice: int | None = NODE_NICE,
    ):
        check_supported(sc)
        self.queue = queue
        self.nice = nice
        self.sc = sc
        self.seed = seed
        self.lane = lane
        self.say = progress or (lambda _m: None)
        self.keep = keep
        self.timeout = timeout if timeout is not None else sc.stop_at
        self.env = _clean_env()
        self.events: list[tuple] = []
        self.samples: list[tuple] = []
        self.hosts: list[Host] = []
        self.lock = threading.Lock()
        self.t0 = 0.0
        self.finished = 0
        self.gone = 0
        self.fabric: Fabric | None = None
        self.tmp: Path | None = None
        self.threads: list[threading.Thread] = []
        self.model_dir: Path | None = None
        self.seeds: list[Host] = []
        self.quiet: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, event: str, node: str, peer: str = "", value: Any = "") -> None:
        with self.lock:
            self.events.append((self.now(), event, node, peer, value))

    def _node_cmd(self, h: Host) -> list[str]:
        serve = f"{self.sc.manifest.model}={self.model_dir}" if h.group.role == "seed" else None
        boots = [s.multiaddr for s in self.seeds if s is not h and s.peer_id]
        return node_command(h.net.addr, h.home, h.cache, lane=self.lane, serve=serve, bootstrap=boots)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        sc = self.sc
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{os.getpid()}-"))
        self.say(f"generating the model ({sc.file_bytes / 1e6:.1f} MB) in {self.tmp}")
        self.model_dir = write_model(sc, self.tmp / "model", self.seed)
        self.fabric = Fabric(tag=f"s{self.seed}", queue=self.queue)
        for g in sc.groups:
            for i in range(g.count):
                net = self.fabric.add_host(g.upload, g.download)
                self.hosts.append(Host(f"{g.name}-{i:04d}", g, net, self.tmp))
        self.say(f"{len(self.hosts)} hosts in namespaces {self.fabric.prefix}*; starting nodes")
        deadline = time.monotonic() + READY_TIMEOUT
        self.seeds = [h for h in self.hosts if h.group.role == "seed"]
        first, rest = self.seeds[0], [h for h in self.hosts if h is not self.seeds[0]]
        first.start(self._node_cmd(first), self.env, self.nice)
        first.wait_ready(deadline, serving=True)
        for h in rest:
            h.start(self._node_cmd(h), self.env, self.nice)
        for h in rest:
            h.wait_ready(time.monotonic() + READY_TIMEOUT, serving=h.group.role == "seed")
        self.settle()

    def settle(self) -> None:
        """Wait until every node has a peer and the nodes' CPU is quiet (``QUIET_*``): the
        clock starts after start-up, bootstrap and the workers' first announce."""
        t0 = time.monotonic()
        prev = (t0, sum(h.cpu_now() for h in self.hosts))
        rate = math.inf
        while True:
            time.sleep(QUIET_WINDOW / 2)
            now = time.monotonic()
            cpu = sum(h.cpu_now() for h in self.hosts)
            if now - prev[0] >= QUIET_WINDOW:
                rate = (cpu - prev[1]) / (now - prev[0]) / max(1, len(self.hosts))
                prev = (now, cpu)
            waited = now - t0
            if waited >= QUIET_TIMEOUT:
                self.quiet = {"seconds": waited, "core_per_host": rate, "timeout": True}
                break
            if waited < QUIET_MIN or rate > QUIET_CORE_PER_HOST:
                continue
            if all(self._has_peer(h) for h in self.hosts):
                self.quiet = {"seconds": waited, "core_per_host": rate, "timeout": False}
                break
        self.say(f"nodes quiet after {self.quiet['seconds']:.1f} s ({rate:.3f} core per host)")

    @staticmethod
    def _has_peer(h: Host) -> bool:
        from swarm import client

        try:
            return bool(client.status(h.home).get("peers"))
        except Exception:
            return False

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> list[tuple[float, int, Callable[[], None]]]:
        plan: list[tuple[float, int, Callable[[], None]]] = []
        for g in self.sc.groups:
            members = [h for h in self.hosts if h.group is g]
            times = g.arrival.times_for(len(members), random.Random(f"{self.seed}/arrivals/{g.name}"))
            for h, t in zip(members, times, strict=True):
                plan.append((t, len(plan), lambda h=h: self._arrive(h)))
        for i, ev in enumerate(self.sc.events):
            plan.append((ev.at, len(plan), lambda i=i: self._event(i)))
        plan.sort(key=lambda x: (x[0], x[1]))
        return plan

    def _arrive(self, h: Host) -> None:
        if h.online or h.gone:
            return
        h.online = True
        if h.first_arrival is None:
            h.first_arrival = self.now()
        if h.cpu_start is None:
            h.cpu_start = h.cpu_now()
        self.log("arrive", h.id, "", h.session)
        if h.group.role == "fetch" and h.completed_at is None:
            t = threading.Thread(target=self._fetch, args=(h, h.session), daemon=True)
            self.threads.append(t)
            t.start()

    def _fetch(self, h: Host, session: int) -> None:
        from swarm import client

        def on_event(e: dict) -> None:
            kind = e.get("event")
            since = f"{self.now() - (h.first_arrival or 0):.6f}"
            if kind == "manifest":  # the node resolved and chose the manifest
                if h.manifest_at is None:
                    h.manifest_at = self.now()
                self.log("manifest", h.id, "", since)
            elif kind == "progress":  # a piece is in and verified
                if h.first_piece_at is None:
                    h.first_piece_at = self.now()
                    self.log("first_piece", h.id, "", since)
                self.log("piece", h.id, "", e.get("have", ""))
            elif kind == "configs_ready" and h.configs_at is None:
                h.configs_at = self.now()
                self.log("configs_ready", h.id, "", since)

        try:
            client.fetch_result(
                self.sc.manifest.model,
                home=h.home,
                cache_dir=h.cache,
                progress=False,
                timeout=self.timeout,
                on_event=on_event,
            )
        except Exception as e:
            if session == h.session and h.online:
                h.fetch_error = f"{type(e).__name__}: {e}".splitlines()[0]
                self.log("fetch_failed", h.id, "", h.fetch_error)
            return
        if session != h.session or not h.online:
            return
        with self.lock:
            if h.completed_at is not None:
                return
            h.completed_at = self.now()
            self.finished += 1
        self.log("complete", h.id, "", f"{h.completed_at - (h.first_arrival or 0):.6f}")
        if h.group.after_finish is not None:
            linger = h.group.after_finish.sample(random.Random(f"{self.seed}/{h.id}/linger"))
            _later(linger, self._depart, h, "finished", signal.SIGTERM)

    def _depart(self, h: Host, why: str, how: int | str, rejoin_after: float | None = None) -> None:
        if not h.online:
            return
        h.online = False
        h.departures += 1
        if how == "vanish":
            self.fabric.set_port(h.net, up=False)  # type: ignore[union-attr]
            h.vanished = True
        else:
            # The host leaves when it is signalled; the process may take up to STOP_GRACE to
            # exit (a SIGTERMed node drains). That runs aside: the schedule keeps its times (a
            # draining worker once held every later event back by 5 s).
            h.stopping = threading.Thread(target=h.stop, args=(how,), daemon=True)
            h.stopping.start()
        self.log("depart", h.id, "", why)
        if rejoin_after is not None and rejoin_after < math.inf:
            _later(rejoin_after, self._rejoin, h)
        elif h.group.role == "fetch" and h.completed_at is None:
            with self.lock:
                h.gone = True
                self.gone += 1

    def _rejoin(self, h: Host) -> None:
        if h.online or h.gone or self._stopping:
            return
        try:
            if h.stopping is not None:  # the process signalled at departure has exited
                h.stopping.join()
                h.stopping = None
            if h.vanished:
                h.stop(signal.SIGKILL)
                self.fabric.set_port(h.net, up=True)  # type: ignore[union-attr]
                h.vanished = False
            if h.proc is None:
                began = self.now()
                h.start(self._node_cmd(h), self.env, self.nice)
                h.wait_ready(time.monotonic() + READY_TIMEOUT, serving=h.group.role == "seed")
                self.log("node_start", h.id, "", f"{self.now() - began:.6f}")  # startup.node_start
        except TestbedError as e:
            self.log("rejoin_failed", h.id, "", str(e).splitlines()[0])
            return
        self._arrive(h)

    def _event(self, i: int) -> None:
        ev = self.sc.events[i]
        rng = random.Random(f"{self.seed}/events/{i}")
        members = [h for h in self.hosts if h.group.name == ev.group]
        if ev.action == "join":
            pool = [h for h in members if not h.online and not h.gone and h.first_arrival is not None]
        else:
            pool = [h for h in members if h.online]
        if ev.count is not None:
            k = min(ev.count, len(pool))
        elif ev.fraction is not None:
            k = round(ev.fraction * len(pool))
        else:
            k = len(pool)
        chosen = rng.sample(pool, k) if k < len(pool) else pool
        self.log(f"event_{ev.action}", ev.group, "", k)
        for h in chosen:
            if ev.action == "join":
                threading.Thread(target=self._rejoin, args=(h,), daemon=True).start()
                continue
            after = ev.rejoin_after.sample(rng) if ev.rejoin_after is not None else math.inf
            how: int | str = {"leave": signal.SIGTERM, "kill": signal.SIGKILL, "vanish": "vanish"}[ev.action]
            self._depart(h, "event", how, after)

    def _sample(self) -> None:
        up: dict[str, float] = {g.name: 0.0 for g in self.sc.groups}
        for h in self.hosts:
            h.poll_bytes()
            up[h.group.name] += h.bytes_up + h.cur_up
        self.samples.append((self.now(), self.finished, up))

    # ------------------------------------------------------------------ run

    _stopping = False

    def run(self) -> SimResult:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        if self.nice is not None and not set_nice(0, self.nice):
            self.say(f"could not set nice {self.nice} (not root?): the nodes run at {before}")
            self.nice = None
        try:
            self.setup()
            return self._go()
        finally:
            self.teardown()
            set_nice(0, before)

    def _go(self) -> SimResult:
        plan = self.schedule()
        fetchers = sum(1 for h in self.hosts if h.group.role == "fetch")
        busy0 = _machine_busy()
        cpu0 = {h.id: h.cpu_now() for h in self.hosts}
        self.t0 = time.monotonic()
        self.say(f"running: {fetchers} fetching host(s), {len(self.sc.events)} event(s)")
        next_sample = 0.0
        stopped_by = "stop_at"
        while True:
            now = self.now()
            while plan and plan[0][0] <= now:
                plan.pop(0)[2]()
            if now >= next_sample:
                self._sample()
                next_sample += self.sc.sample_interval
            if self.finished + self.gone >= fetchers and not plan:
                stopped_by = "done"
                break
            if now >= self.timeout:
                break
            nxt = min([next_sample] + ([plan[0][0]] if plan else []))
            time.sleep(max(0.0, min(0.05, nxt - self.now())))
        end = self.now()
        self._stopping = True
        self._sample()
        self.log("stop", "", "", stopped_by)
        busy1 = _machine_busy()
        cpu = {h.id: h.cpu_now() - cpu0[h.id] for h in self.hosts}
        for h in self.hosts:  # collect counters before teardown
            h.poll_bytes()
        machine = (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1])
        moved = {h.id: h.bytes_up + h.cur_up + h.bytes_down + h.cur_down for h in self.hosts}
        nodes = tuple(
            NodeResult(
                h.id,
                h.group.name,
                h.group.role,
                h.first_arrival,
                h.completed_at,
                h.configs_at,
                h.departures,
                h.bytes_up + h.cur_up,
                h.bytes_down + h.cur_down,
            )
            for h in self.hosts
        )
        stats = {
            "testbed": True,
            "lane": self.lane,
            "nice": self.nice if self.nice is not None else os.getpriority(os.PRIO_PROCESS, 0),
            "fetchers": fetchers,
            "finished": self.finished,
            "gone": self.gone,
            "fetch_errors": {h.id: h.fetch_error for h in self.hosts if h.fetch_error},
            "cpu_seconds": cpu,
            "cpu_seconds_per_mb": {  # CPU per MB the host moved (up + down), during the run
                h.id: cpu[h.id] / mb for h in self.hosts if (mb := (moved[h.id]) / 1e6) > 0
            },
            "mb_moved": {h.id: moved[h.id] / 1e6 for h in self.hosts},
            "wasted_bytes": {h.id: h.wasted + h.cur_wasted for h in self.hosts},
            "bytes_from": _bytes_from(self.hosts),
            "request_timeouts": {h.id: h.timeouts + h.cur_timeouts for h in self.hosts},
            "start_of_fetch": _start_of_fetch(self.hosts),
            "quiet": self.quiet,
            "cpu_per_host_mean": sum(cpu.values()) / max(1, len(cpu)) / max(end, 1e-9),
            "cpu_per_host_max": max(cpu.values(), default=0.0) / max(end, 1e-9),
            "machine_busy": machine,
            "cpus": os.cpu_count(),
            "cpu_bound": machine > CPU_BOUND_BUSY,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
        return SimResult(self.sc.name, self.seed, end, stopped_by, nodes, self.events, self.samples, stats)

    def teardown(self) -> None:
        self._stopping = True
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    h.proc.kill()
        for h in self.hosts:
            if h.proc is not None:
                with contextlib.suppress(Exception):
                    h.proc.wait(timeout=STOP_GRACE)
        if self.fabric is not None:
            self.fabric.teardown()
        prefix = f"{PREFIX}-{os.getpid()}-s{self.seed}-"  # also one interrupted while being made
        for ns in _our_namespaces():
            if ns.startswith(prefix):
                _delete_namespace(ns)
        if self.tmp is not None:
            if self.keep is not None:
                self.keep.mkdir(parents=True, exist_ok=True)
                for h in self.hosts:
                    with contextlib.suppress(OSError):
                        shutil.copy(h.log, self.keep / f"{h.id}_seed{self.seed}.log")
            shutil.rmtree(self.tmp, ignore_errors=True)


def _start_of_fetch(hosts: list[Host]) -> dict[str, Any]:
    """Seconds from a fetching host's first arrival to its manifest and to its first piece:
    mean, min and max over the hosts that got there."""

    def stat(vals: list[float]) -> dict[str, float] | None:
        if not vals:
            return None
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}

    out: dict[str, Any] = {}
    for key in ("manifest_at", "first_piece_at"):
        vals = [
            getattr(h, key) - h.first_arrival
            for h in hosts
            if h.group.role == "fetch" and h.first_arrival is not None and getattr(h, key) is not None
        ]
        out[key.removesuffix("_at")] = stat(vals)
    return out


CPU_BOUND_BUSY = 0.9
"""Machine CPU busy fraction over a run above which its result is flagged as CPU-bound."""


def _bytes_from(hosts: list[Any]) -> dict[str, dict[str, int]]:
    """Piece bytes each host received from each other host (``receiver -> {sender: bytes}``), from
    the nodes' per-peer counters (``GET /v1/models``, ``peer_stats``); who relayed to whom."""
    by_pid = {h.peer_id: h.id for h in hosts if h.peer_id}
    out: dict[str, dict[str, int]] = {}
    for h in hosts:
        got: dict[str, int] = {}
        for src in (h.got_from, h.cur_got_from):
            for pid, b in src.items():
                name = by_pid.get(pid, pid[:12])
                got[name] = got.get(name, 0) + b
        if got:
            out[h.id] = got
    return out


def for_testbed(sc_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides that make the simulator model the testbed: latency of every group, its caps as
    payload rates (``TESTBED_PAYLOAD``), TCP's uneven share of a link (``TESTBED_SHARE_SPREAD``),
    and the start of a fetch measured on it (``simulations.startup.TESTBED``) unless the
    scenario or the caller set ``startup`` keys."""
    from simulations import scenario, startup

    sc = scenario.load(sc_path, overrides)
    out = dict(overrides)
    if "startup" not in sc.raw and not any(k.startswith("startup.") for k in overrides):
        out.update(startup.overrides(startup.TESTBED))
    for g in sc.groups:
        out[f"groups.{g.name}.latency"] = TESTBED_LATENCY
        out[f"groups.{g.name}.upload"] = g.upload * TESTBED_PAYLOAD
        out[f"groups.{g.name}.download"] = g.download * TESTBED_PAYLOAD
    if "share_spread" not in sc.raw.get("network", {}) and "network.share_spread" not in overrides:
        out["network.share_spread"] = TESTBED_SHARE_SPREAD
    return out
