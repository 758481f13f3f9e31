"""Regressions for what the adversarial scenarios found in the libp2p layer (docs/reliability.md,
"Bugs the suite found"): a stopped host leaves no socket behind; a peer restarted on a new port is
reachable at once; a flash crowd of fetchers looking up one worker in the DHT all find it."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

import pytest
import trio
from advkit import MODEL, record, start_node

from swarm.net.host import SwarmHost, model_key
from swarm.net.identity import load_or_create_identity


def open_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


@pytest.mark.timeout(60)
async def test_stopped_hosts_leave_no_socket(tmp_path):
    """20 hosts connect to one and stop: it no longer sees them, and no socket of theirs (their
    connections, their listeners) stays open in this process."""
    b = SwarmHost(load_or_create_identity(tmp_path / "b.key"))
    async with b.run():
        await trio.sleep(0.2)
        before = open_sockets()
        for k in range(20):
            a = SwarmHost(load_or_create_identity(tmp_path / f"a{k}.key"))
            async with a.run():
                await a.connect(b.addrs[0])
        with trio.move_on_after(5):
            while b.connected_peers() or open_sockets() > before:
                await trio.sleep(0.05)
        after = open_sockets()
        assert b.connected_peers() == []
        assert after <= before, (before, after)
    record(
        "hygiene: 20 hosts connect and stop",
        sockets_before=before,
        sockets_after=after,
        peers_still_seen=0,
        outcome="nothing left open",
    )


@pytest.mark.timeout(60)
async def test_peer_restarted_on_a_new_port_is_reachable_at_once(tmp_path):
    key = tmp_path / "restarting.key"
    a = SwarmHost(load_or_create_identity(tmp_path / "a.key"), connect_timeout=3.0)
    async with a.run():
        b1 = SwarmHost(load_or_create_identity(key))
        async with b1.run():
            old = b1.addrs[0]
            await a.connect(old)
        with pytest.raises(SwarmHost.NetError):  # gone: the dial fails (and py-libp2p caches it)
            await a.connect(old)
        b2 = SwarmHost(load_or_create_identity(key))  # same peer id, new port
        async with b2.run():
            assert b2.addrs[0] != old and b2.peer_id == b1.peer_id
            t0 = trio.current_time()
            with trio.fail_after(5):
                assert await a.connect(b2.addrs[0]) == b2.peer_id
            took = trio.current_time() - t0
    record(
        "hygiene: peer restarted on a new port",
        reconnect_s=round(took, 2),
        outcome="reachable at once (was: refused 60 s, then stale address for 24 h)",
    )


@pytest.mark.timeout(90)
async def test_flash_crowd_of_lookups_finds_the_worker(tmp_path, adv_model):
    """16 nodes look the model up in the DHT at the same moment, all through one worker (which
    resets DHT requests beyond 12 at once): every one finds it."""
    src, _m, _ = adv_model
    async with AsyncExitStack() as stack:
        worker = await start_node(stack, tmp_path, "worker", serve=((MODEL, src),))
        fronts = [
            await start_node(stack, tmp_path, f"f{k}", bootstrap=tuple(worker.host.addrs[:1]))
            for k in range(16)
        ]
        found: dict[int, tuple[int, float]] = {}

        async def look(k: int) -> None:
            t0 = trio.current_time()
            providers = await fronts[k].host.find_providers(model_key(MODEL), timeout=10)
            found[k] = (len(providers), trio.current_time() - t0)

        async with trio.open_nursery() as n:
            for k in range(16):
                n.start_soon(look, k)
        missed = [k for k, (count, _) in found.items() if count == 0]
        slowest = max(t for _, t in found.values())
        assert not missed, found
    record(
        "hygiene: 16 simultaneous DHT lookups through one worker",
        lookups=16,
        found=16 - len(missed),
        slowest_s=round(slowest, 2),
        outcome="all found",
    )
