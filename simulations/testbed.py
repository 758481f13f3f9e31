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
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from simulations.scenario import Scenario, ScenarioError
from simulations.sim import NodeResult, SimResult

PREFIX = "swtb"
"""Namespace names start with ``swtb-<pid>-``: cleanup finds leftovers of killed runs by it."""
SUBNET = "10.77"
"""Host addresses 10.77.x.y/16: only inside the namespaces this module creates."""
NODE_PORT = 4001
TBF_BURST_SECONDS = 0.004
"""tbf bucket: 4 ms of the rate (at least ``TBF_MIN_BURST``): small enough to shape, big enough
for one timer tick of a 250 Hz kernel."""
TBF_MIN_BURST = 32 * 1024
TBF_LATENCY = "20ms"
"""Longest a packet may wait in tbf's queue (sets the queue length): a short queue keeps control
messages from waiting behind seconds of piece data."""
TESTBED_LATENCY = 0.0001
"""One-way latency (s) the simulator is given for a testbed host (veth + bridge, no netem)."""
READY_TIMEOUT = 60.0
"""Seconds a node may take to start (import, listen, hash a served model) on a busy machine."""
STOP_GRACE = 15.0
"""Seconds a node gets after SIGTERM before SIGKILL: more than its drain (the node keeps sending
the pieces peers already asked of it for up to ``drain_timeout``, 10 s by default); a shorter
grace cut a leaving worker's drain short (it used to be 5 s)."""
CMD_TIMEOUT = 30.0
"""Seconds any one ``ip``/``tc`` command may take."""
EXTRA_NODE_FLAGS: tuple[str, ...] = ()
"""Flags added to every ``swarm-node run`` (e.g. an opt-in to listen beyond loopback)."""
EVENT_ACTIONS = ("leave", "kill", "vanish", "join")
QUIET_CORE_PER_HOST = 0.10
"""The run's clock starts once the nodes are quiet: every node connected to a peer and their CPU
over the last ``QUIET_WINDOW`` below this many cores per host (start-up, DHT bootstrap and the
workers' first announce are over), so none of that lands in a completion time."""
QUIET_WINDOW = 1.0
QUIET_MIN = 2.0
"""Seconds the nodes are left alone at least after the last one is ready."""
QUIET_TIMEOUT = 30.0
"""Seconds after which the run starts anyway (``stats.quiet_timeout`` says so)."""


class TestbedError(RuntimeError):
    pass


# --------------------------------------------------------------------------- commands


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", "netns", "exec", ns, *cmd], check=check)


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return "the testbed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the testbed needs `{tool}` (iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _ns(probe, "ip", "link", "set", "lo", "up")
            _run(["ip", "-n", probe, "link", "add", "t0", "type", "veth", "peer", "name", "t1"])
            _run(
                [
                    "tc",
                    "-n",
                    probe,
                    "qdisc",
                    "replace",
                    "dev",
                    "t0",
                    "root",
                    "tbf",
                    "rate",
                    "100mbit",
                    "burst",
                    "32kb",
                    "latency",
                    TBF_LATENCY,
                ]
            )
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    except (OSError, subprocess.SubprocessError, TestbedError) as e:
        return f"cannot make network namespaces here: {e}"
    return None


def _our_namespaces() -> list[str]:
    p = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX + "-")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill every process in ``ns``, then delete it (its veth ends go with it)."""
    p = _run(["ip", "netns", "pids", ns], check=False)
    for tok in p.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)
    _run(["ip", "netns", "del", ns], check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces (and their processes) left by testbed runs whose process is gone."""
    removed = []
    for ns in _our_namespaces():
        m = re.match(rf"{PREFIX}-(\d+)-", ns)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue  # not named by us, ours, or a run that is still going
        _delete_namespace(ns)
        removed.append(ns)
    return removed


# --------------------------------------------------------------------------- the network


@attrs.frozen
class HostNet:
    index: int
    ns: str
    addr: str
    port: str  # the bridge-side interface
    upload: float  # bytes/s
    download: float


def _tbf(ns: str, dev: str, rate: float, queue: str) -> None:
    bits = int(rate * 8)
    burst = max(TBF_MIN_BURST, int(rate * TBF_BURST_SECONDS))
    _run(
        [
            "tc",
            "-n",
            ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{bits}bit",
            "burst",
            str(burst),
            "latency",
            queue,
        ]
    )


class Fabric:
    """The bridge namespace and one namespace per host; ``teardown`` removes all of them."""

    def __init__(self, tag: str | None = None, queue: str = TBF_LATENCY):
        self.queue = queue
        self.prefix = f"{PREFIX}-{os.getpid()}-{tag + '-' if tag else ''}"
        self.bridge = self.prefix + "br"
        self.hosts: list[HostNet] = []
        self.namespaces: list[str] = []
        self._add_ns(self.bridge)
        _run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])

    def _add_ns(self, ns: str) -> None:
        self.namespaces.append(ns)  # first: an interrupt during `add` still gets it deleted
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def add_host(self, upload: float, download: float) -> HostNet:
        i = len(self.hosts)
        ns = f"{self.prefix}h{i}"
        port = f"p{i}"
        addr = f"{SUBNET}.{i // 250}.{i % 250 + 1}"
        self._add_ns(ns)
        _run(
            [
                "ip",
                "-n",
                self.bridge,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        _run(["ip", "-n", self.bridge, "link", "set", port, "master", "br0"])
        _run(["ip", "-n", self.bridge, "link", "set", port, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _tbf(ns, "eth0", upload, self.queue)  # egress of the host: its upload
        _tbf(self.bridge, port, download, self.queue)  # egress of the bridge port: its download
        h = HostNet(i, ns, addr, port, upload, download)
        self.hosts.append(h)
        return h

    def set_port(self, host: HostNet, up: bool) -> None:
        """Down: the host's link stops carrying packets; nothing is closed (a vanished host)."""
        _run(["ip", "-n", self.bridge, "link", "set", host.port, "up" if up else "down"])

    def teardown(self) -> None:
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        self.namespaces.clear()


# --------------------------------------------------------------------------- hosts


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

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
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
    ):
        check_supported(sc)
        self.queue = queue
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
        first.start(self._node_cmd(first), self.env)
        first.wait_ready(deadline, serving=True)
        for h in rest:
            h.start(self._node_cmd(h), self.env)
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
                h.start(self._node_cmd(h), self.env)
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
        try:
            self.setup()
            return self._go()
        finally:
            self.teardown()

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


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), so ``finally`` tears everything down."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def for_testbed(sc_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides that make the simulator model the testbed: latency of every group, and the start
    of a fetch measured on it (``simulations.startup.TESTBED``) unless the scenario or the caller
    set ``startup`` keys."""
    from simulations import scenario, startup

    sc = scenario.load(sc_path, overrides)
    out = dict(overrides)
    if "startup" not in sc.raw and not any(k.startswith("startup.") for k in overrides):
        out.update(startup.overrides(startup.TESTBED))
    for g in sc.groups:
        out[f"groups.{g.name}.latency"] = TESTBED_LATENCY
    return out
