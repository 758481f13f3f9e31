"""The testbed's network: one Linux network namespace per host, a bridge namespace, veth pairs and
``tc tbf`` shaping (see ``simulations.testbed`` for the layout), and their teardown.

Every host is a namespace ``swtb-<pid>-h<i>`` with one interface ``eth0`` (address 10.77.x.y/16,
which exists only inside these namespaces) whose other end ``p<i>`` sits on a bridge ``br0`` in a
namespace of its own (``swtb-<pid>-br``). ``tc tbf`` caps the host's upload on its ``eth0`` and its
download on the bridge-side ``p<i>``. Namespaces left by a killed run (their pid is gone) are
removed by ``cleanup_stale``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import attrs

PREFIX = "swtb"
"""Namespace names start with ``swtb-<pid>-``: cleanup finds leftovers of killed runs by it."""
SUBNET = "10.77"
"""Host addresses 10.77.x.y/16: only inside the namespaces this module creates."""
TBF_BURST_SECONDS = 0.004
"""tbf bucket: 4 ms of the rate (at least ``TBF_MIN_BURST``): small enough to shape, big enough
for one timer tick of a 250 Hz kernel."""
TBF_MIN_BURST = 32 * 1024
TBF_LATENCY = "20ms"
"""Longest a packet may wait in tbf's queue (sets the queue length): a short queue keeps control
messages from waiting behind seconds of piece data."""
CMD_TIMEOUT = 30.0
"""Seconds any one ``ip``/``tc`` command may take."""


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
