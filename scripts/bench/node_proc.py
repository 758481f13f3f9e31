#!/usr/bin/env python3
"""One swarm node in its own process, driven by ``run.py`` over stdin/stdout (one JSON object per
line each way).

Commands: ``start`` (home, cache, lane, serve [[model, dir]], bootstrap [addr], direct_io),
``fetch`` (model; optional ``at``: wall-clock time to start at), ``status``, ``quit``.
Every answer carries ``rss_peak_kib`` (this process's peak resident set, VmHWM).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio


def _rss() -> dict:
    out = {"rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                k, v = line.split(":", 1)
                out[k.lower() + "_kib"] = int(v.split()[0])
    except OSError:
        pass
    return out


def dump_tasks() -> None:
    """Every trio task and where it waits, to stderr (SIGUSR1: run.py sends it on a timeout)."""
    out = [f"--- trio tasks of pid {os.getpid()} at {time.strftime('%X')}"]

    def walk(task, depth: int) -> None:
        out.append("  " * depth + task.name)
        coro = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is None:
                break
            out.append(
                "  " * depth + f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
            )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()


async def dump_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            dump_tasks()


def reply(**kw) -> None:
    kw.update(_rss())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


async def main() -> None:
    from swarm.net import quiet_libp2p_logs
    from swarm.node import Node, NodeConfig
    from swarm.sources import FetchRequest

    quiet_libp2p_logs()
    node = None
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        stop = trio.Event()
        holder: dict = {}
        nursery.start_soon(dump_on_signal)

        async def run_node(cfg: NodeConfig) -> None:
            n = Node(cfg)
            async with n.running():
                holder["node"] = n
                ready.set()
                await stop.wait()

        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            c = cmd["cmd"]
            try:
                if c == "start":
                    t0 = time.time()
                    cfg = NodeConfig(
                        home=Path(cmd["home"]),
                        cache_dir=Path(cmd["cache"]),
                        serve=tuple((m, Path(d)) for m, d in cmd.get("serve", ())),
                        bootstrap=tuple(cmd.get("bootstrap", ())),
                        serve_hf_cache=False,
                        lane=cmd.get("lane", "encrypted"),
                        direct_io=cmd.get("direct_io", True),
                    )
                    nursery.start_soon(run_node, cfg)
                    await ready.wait()
                    node = holder["node"]
                    # Warm: wait until connected to every bootstrap peer (DHT routing filled).
                    with trio.move_on_after(10):
                        while len(node.host.connected_peers()) < len(cfg.bootstrap):
                            await trio.sleep(0.01)
                    reply(ok=True, addrs=node.host.addrs, peer_id=node.peer_id, start_s=time.time() - t0)
                elif c == "fetch":
                    assert node is not None
                    at = cmd.get("at")
                    if at:
                        await trio.sleep(max(0.0, at - time.time()))
                    events: dict[str, float] = {}
                    t0 = time.time()

                    def on_event(e: dict, t0: float = t0, events: dict = events) -> None:
                        ev = e.get("event")
                        if ev in ("manifest", "configs_ready", "done"):
                            events[ev] = time.time() - t0
                        elif ev == "progress":
                            events.setdefault("first_piece", time.time() - t0)
                            if e.get("have") == e.get("total"):
                                events["last_piece"] = time.time() - t0

                    path = await node.fetch(
                        FetchRequest(cmd["model"], cache_dir=node.config.cache_dir), on_event=on_event
                    )
                    t1 = time.time()
                    st = node.status()
                    lanes = sum(
                        1
                        for sh in node.shared.values()
                        for p in sh.transfer.peers.values()
                        if type(p.link).__name__ == "LaneLink"
                    )
                    reply(
                        ok=True,
                        t0=t0,
                        t1=t1,
                        seconds=t1 - t0,
                        path=str(path),
                        events=events,
                        bytes_down=st["bytes_down"],
                        bytes_up=st["bytes_up"],
                        lane_links=lanes,
                    )
                elif c == "status":
                    st = node.status() if node else {}
                    reply(ok=True, bytes_up=st.get("bytes_up", 0), bytes_down=st.get("bytes_down", 0))
                elif c == "quit":
                    reply(ok=True)
                    break
                else:
                    reply(ok=False, error=f"unknown command {c}")
            except Exception as e:  # report, keep the process alive for the orchestrator
                logging.exception("command %s failed", c)
                reply(ok=False, error=repr(e))
        stop.set()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("BENCH_LOG", "WARNING"),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    trio.run(main)
