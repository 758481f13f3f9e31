"""Slow peers, silent peers, peers that connect and never read or write, peers that vanish
mid-piece. The honest fetch completes in bounded time; a node that only finds such peers fails
with a clear error; the honest nodes stay up and give back what the idle connections held."""

from __future__ import annotations

import contextlib
import os
from contextlib import AsyncExitStack

import pytest
import trio
from advkit import (
    MODEL,
    FinalPathWatcher,
    HostilePeer,
    assert_honest_alive,
    record,
    start_node,
)

from swarm import wire
from swarm.net import lane as lane_mod
from swarm.net import lane_crypto as lc
from swarm.net.host import PeerAddr, SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import ACCEPT, MAGIC, OFFER, LaneLink, LaneService, _read_exactly
from swarm.sources import FetchError, FetchRequest, VerificationFailed


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["silent", "mute", "slow", "vanish"])
async def test_unresponsive_seeder_then_an_honest_one(tmp_path, adv_model, error_log, mode):
    """silent: reads, never answers; mute: never reads or writes after the handshake; slow: 64 KiB/s;
    vanish: drops its connections halfway through a piece. The bad seeder is the only provider
    until it has misbehaved (so the fetch really depends on recovering from it); then an honest
    seeder appears."""
    src, manifest, pieces = adv_model
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest")  # serves nothing yet
        boot = tuple(honest.host.addrs[:1])
        bad = HostilePeer(
            tmp_path, f"bad-{mode}", manifest=manifest, pieces=pieces, pieces_mode=mode, bootstrap=boot
        )
        await stack.enter_async_context(bad.running())
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        t0 = trio.current_time()
        with FinalPathWatcher(front.config.cache_dir, [manifest]) as watch:
            async with trio.open_nursery() as n:
                n.start_soon(_fetch, front)
                with trio.fail_after(20):
                    key = "vanished" if mode == "vanish" else "links" if mode == "mute" else "requests"
                    while not bad.stats[key]:
                        await trio.sleep(0.02)
                    if mode in ("silent", "mute", "slow"):
                        await trio.sleep(0.5)  # requests outstanding, or a piece dribbling in
                    await honest.serve_directory(MODEL, src)
        elapsed = trio.current_time() - t0
        watch.assert_clean()
        (t,) = [sh.transfer for sh in front.shared.values()]
        if mode != "slow":  # a slow peer's pieces are right: those that arrive in time are kept
            assert t.peer_stats(bad.peer_id).pieces_down == 0
        assert_honest_alive([honest, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            f"slow: 1 {mode} seeder, then 1 honest",
            requests_to_bad_peer=bad.stats["requests"],
            timeouts=t.timeouts,
            vanished=bad.stats["vanished"],
            slow_bytes=bad.stats["slow_bytes"],
            fetch_s=round(elapsed, 2),
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            bytes_lost=0,
            outcome="complete",
        )


async def _fetch(node) -> None:
    with trio.fail_after(40):
        await node.fetch(FetchRequest(MODEL, cache_dir=node.config.cache_dir))


@pytest.mark.timeout(60)
async def test_only_unresponsive_seeders_fail_clearly(tmp_path, adv_model, error_log):
    _src, manifest, pieces = adv_model
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")
        boot = tuple(anchor.host.addrs[:1])
        bad = []
        for mode in ("silent", "mute"):
            p = HostilePeer(
                tmp_path, f"bad-{mode}", manifest=manifest, pieces=pieces, pieces_mode=mode, bootstrap=boot
            )
            await stack.enter_async_context(p.running())
            bad.append(p)
        front = await start_node(stack, tmp_path, "front", bootstrap=boot, stall_timeout=3.0)
        t0 = trio.current_time()
        with trio.fail_after(40), pytest.raises(FetchError) as ei:
            await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        elapsed = trio.current_time() - t0
        assert not isinstance(ei.value, VerificationFailed)
        assert "stopped answering" in str(ei.value), str(ei.value)
        assert front.shared == {}
        assert_honest_alive([anchor, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "slow: only silent + mute seeders",
            fails_after_s=round(elapsed, 2),
            error=str(ei.value)[:140],
            outcome="FetchError",
        )


async def _idle_tcp(host: str, port: int, n: int, keep: list) -> None:
    for _ in range(n):
        keep.append(await trio.open_tcp_stream(host, port))


@pytest.mark.timeout(90)
async def test_idle_connections_and_never_reading_leechers(tmp_path, adv_model, error_log):
    """Against one honest seeder at once: 40 TCP connections to its libp2p port and 40 to its data
    lane port that never send a byte; 16 pieces streams and 16 manifest streams that never send
    their first frame; 4 leechers (2 over libp2p streams, 2 over the data lane) that request pieces
    and never read. An honest fetcher still gets the model from that seeder; once the attackers
    leave, the seeder's file descriptors come back to where they were."""
    src, manifest, _pieces = adv_model
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        assert seeder.lane is not None and seeder.lane.port
        boot = tuple(seeder.host.addrs[:1])
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        await trio.sleep(0.2)
        fds_before = open_fds()
        target = PeerAddr(seeder.peer_id, (boot[0].rsplit("/p2p/", 1)[0],))
        tcp: list = []
        streams: list = []
        h, n = manifest.manifest_hash, manifest.num_pieces
        attackers_done = trio.Event()
        lanes_up = []

        async with trio.open_nursery() as nursery, AsyncExitStack() as attack:
            hosts = []
            for k in range(4):
                ah = SwarmHost(load_or_create_identity(tmp_path / f"att{k}.key"))
                await attack.enter_async_context(ah.run())
                await ah.connect(target)
                hosts.append(ah)
            for k in range(16):
                ah = hosts[k % 4]
                streams.append(await ah._open_stream(target, wire.PIECES_PROTOCOL, 5))
                streams.append(await ah._open_stream(target, wire.MANIFEST_PROTOCOL, 5))
            # leechers that ask and never read
            for ah in hosts[:2]:
                s = await ah._open_stream(target, wire.PIECES_PROTOCOL, 5)
                await s.write(
                    b"".join(
                        wire.encode(m)
                        for m in [
                            wire.Hello(h, n),
                            wire.Bitfield(wire.pack_bitfield([], n)),
                            wire.Interested(),
                            *[wire.Request(i) for i in range(n)][:32],
                        ]
                    )
                )
                streams.append(s)

            async def lane_leecher(ah: SwarmHost) -> None:
                svc = LaneService("encrypted", ah.peer_id)
                link = await svc.dial(lambda: ah.open_lane_stream(target))
                lanes_up.append(link)
                for m in [
                    wire.Hello(h, n),
                    wire.Bitfield(wire.pack_bitfield([], n)),
                    wire.Interested(),
                    *[wire.Request(i) for i in range(n)][:32],
                ]:
                    await link.send(m)
                await attackers_done.wait()
                await link.aclose()

            for ah in hosts[2:]:
                nursery.start_soon(lane_leecher, ah)
            with trio.fail_after(10):
                while len(lanes_up) < 2:
                    await trio.sleep(0.02)
            # Then the idle TCP connections (more than the lane's MAX_HANDSHAKES = 32
            # unauthenticated connections it holds at once; with no lane offer pending they are
            # closed at once, and test_lane_port_flood_does_not_lock_honest_peers_out holds them
            # open while offers are pending).
            await _idle_tcp("127.0.0.1", int(boot[0].split("/")[4]), 40, tcp)
            await _idle_tcp("127.0.0.1", seeder.lane.port, 40, tcp)
            await trio.sleep(0.5)  # let the never-readers take upload slots first

            t0 = trio.current_time()
            with FinalPathWatcher(front.config.cache_dir, [manifest]) as watch:
                with trio.fail_after(45):
                    await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
            elapsed = trio.current_time() - t0
            watch.assert_clean()
            fds_attack = open_fds()
            front_lanes = front.lane.lanes_opened if front.lane else 0
            attackers_done.set()
            for s in streams:
                with trio.move_on_after(1):
                    try:
                        await s.reset()
                    except Exception:
                        pass
            for c in tcp:
                await c.aclose()
        # Attackers gone (their hosts stopped, sockets closed): the seeder lets go of what it held.
        fds_gone = open_fds()
        (t,) = [sh.transfer for sh in seeder.shared.values()]
        with trio.move_on_after(20):
            while set(t.peers) - {front.peer_id} or seeder.lane._handshakes or open_fds() > fds_before + 16:
                await trio.sleep(0.1)
        assert set(t.peers) <= {front.peer_id}, t.peers
        assert seeder.lane._handshakes == 0
        assert front_lanes >= 1, "idle connections to the lane port pushed the fetcher off it"
        fds_after = open_fds()
        assert fds_after <= fds_before + 16, (fds_before, fds_attack, fds_gone, fds_after)
        assert_honest_alive([seeder, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "slow: 80 idle TCP + 32 idle streams + 4 never-reading leechers vs 1 seeder",
            fetch_s=round(elapsed, 2),
            fds_before=fds_before,
            fds_during_attack=fds_attack,
            fds_when_attackers_left=fds_gone,
            fds_after=fds_after,
            fetcher_lanes=front_lanes,
            lane_proofs_rejected=seeder.lane.proofs_rejected,
            lane_connections_refused=seeder.lane.connections_refused,
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            outcome="complete",
        )


@pytest.mark.timeout(90)
async def test_lane_port_flood_does_not_lock_honest_peers_out(tmp_path, adv_model, error_log):
    """64 idle TCP connections held open on a seeder's data-lane port (each re-opened 0.1 s after
    the seeder closes it), while an attacker peer keeps lane offers pending (so the listener must
    take connections: someone could hold a valid lane id). An honest node still opens a data lane
    to the seeder and fetches the model over it: idle connections are evicted oldest first,
    honest dialers send their proof at once (lane.MAX_HANDSHAKES)."""
    src, manifest, _pieces = adv_model
    n_idle = 64
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        assert seeder.lane is not None and seeder.lane.port
        boot = tuple(seeder.host.addrs[:1])
        target = PeerAddr(seeder.peer_id, (boot[0].rsplit("/p2p/", 1)[0],))
        attacker = SwarmHost(load_or_create_identity(tmp_path / "lane-flooder.key"))
        await stack.enter_async_context(attacker.run())
        await attacker.connect(target)
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)  # fetches later
        stats = {"connects": 0, "offers_taken": 0, "offers_refused": 0}

        async def keep_offers_pending() -> None:
            while True:  # an offer is good for PROOF_TIMEOUT: keep some always pending
                with contextlib.suppress(Exception):
                    s = await attacker.open_lane_stream(target)
                    await s.write(OFFER.pack(MAGIC, lc.MODE_ENCRYPTED, os.urandom(32)))
                    status = ACCEPT.unpack(await _read_exactly(s, ACCEPT.size))[1]
                    stats["offers_taken" if status == 0 else "offers_refused"] += 1
                await trio.sleep(0.5)

        async def hold_idle_connection() -> None:
            while True:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    conn = await trio.open_tcp_stream("127.0.0.1", seeder.lane.port)
                    stats["connects"] += 1
                    async with conn:  # never sends a byte; waits until the seeder closes it
                        while await conn.receive_some(1024):
                            pass
                await trio.sleep(0.1)

        async with trio.open_nursery() as attack:
            attack.start_soon(keep_offers_pending)
            with trio.fail_after(10):
                while not seeder.lane._pending:
                    await trio.sleep(0.02)
            for _ in range(n_idle):
                attack.start_soon(hold_idle_connection)
            with trio.fail_after(10):
                while seeder.lane._handshakes < lane_mod.MAX_HANDSHAKES:
                    await trio.sleep(0.02)
            await trio.sleep(0.5)
            held = seeder.lane._handshakes
            evicted_before = seeder.lane.connections_evicted
            t0 = trio.current_time()
            with FinalPathWatcher(front.config.cache_dir, [manifest]) as watch:
                with trio.fail_after(45):
                    snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
            elapsed = trio.current_time() - t0
            t = front.shared[manifest.manifest_hash].transfer
            lane_links = [p for p in t.peers.values() if isinstance(p.link, LaneLink)]
            during = dict(
                stats, held=seeder.lane._handshakes, evicted=seeder.lane.connections_evicted - evicted_before
            )
            attack.cancel_scope.cancel()
        watch.assert_clean()
        for fe in manifest.files:
            assert (snap / fe.path).read_bytes() == (src / fe.path).read_bytes(), fe.path
        assert held == lane_mod.MAX_HANDSHAKES
        assert front.lane.lanes_opened >= 1, "the honest node fell back to libp2p streams"
        assert seeder.lane.lanes_accepted >= 1
        assert lane_links and t.bytes_down == manifest.total_size
        with trio.move_on_after(10):
            while seeder.lane._handshakes:
                await trio.sleep(0.1)
        assert seeder.lane._handshakes == 0
        assert_honest_alive([seeder, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "slow: 64 idle TCP on the lane port (re-opened when closed) + pending offers",
            idle_connections=n_idle,
            held_by_seeder=held,
            attacker_connects=during["connects"],
            evicted_during_fetch=during["evicted"],
            attacker_offers_taken=during["offers_taken"],
            attacker_offers_refused=during["offers_refused"],
            fetcher_lanes_opened=front.lane.lanes_opened,
            seeder_lanes_accepted=seeder.lane.lanes_accepted,
            fetch_s=round(elapsed, 2),
            bad_files_at_final_path=len(watch.violations),
            outcome="complete over the lane",
        )
