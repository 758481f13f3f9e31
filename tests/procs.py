"""Node subprocesses for end-to-end tests: start ``swarm-node run``, wait for its control socket,
stop it. Every subprocess gets HF_HUB_OFFLINE=1 and an HF_ENDPOINT on a closed 127.0.0.1 port, so
nothing ever reaches the Internet."""

from __future__ import annotations

import contextlib
import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from swarm import client

PY = sys.executable
PRIVATE = "acme/private-model"
"""Served by the worker from a plain directory: never on any Hub."""
NODE_READY_TIMEOUT = 30.0


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
        # Stopping a node mid-transfer waits this long for promised pieces (default 10 s).
        SWARM_DRAIN_TIMEOUT="2",
    )
    return env


class NodeProc:
    """One ``swarm-node run`` subprocess with its own home and cache."""

    def __init__(self, tmp: Path, name: str, *extra: str, env: dict | None = None) -> None:
        self.name = name
        self.home = tmp / name / "home"
        self.cache = tmp / name / "cache"
        self.log = tmp / name / "node.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.env = env or base_env(tmp)
        self.cmd = [
            PY,
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
            *extra,
        ]
        self.popen: subprocess.Popen | None = None
        self.status: dict = {}

    def start(self) -> NodeProc:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )
        return self

    def wait_ready(self, timeout: float = NODE_READY_TIMEOUT) -> dict:
        assert self.popen is not None
        end = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}:\n"
                    f"{self.log.read_text(errors='replace')[-3000:]}"
                )
            with contextlib.suppress(client.NodeUnavailable):
                self.status = client.status(self.home)
                return self.status
            if time.monotonic() > end:
                raise AssertionError(
                    f"{self.name} not ready after {timeout} s:\n"
                    f"{self.log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.05)

    @property
    def addr(self) -> str:
        return self.status["addrs"][0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode


def swarm_node(*args: str, env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "swarm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def same_files(src: Path, snap: Path, names) -> None:
    for name in names:
        assert filecmp.cmp(src / name, snap / name, shallow=False), name
