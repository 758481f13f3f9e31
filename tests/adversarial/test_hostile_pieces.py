"""Peers that send corrupted, truncated, mislabelled, out-of-range, unrequested or oversized pieces,
up to half the providers of a model; and providers that are all liars.

Every scenario: real libp2p peers on 127.0.0.1 in one trio process (honest ``Node``s, hostile
``HostilePeer``s announcing the same model in the DHT), one fetcher. The fetch completes from the
honest peers, or fails with a clear error when none is left; no file that differs from the manifest
ever appears at a final path (a watcher thread hashes everything that appears there during the
fetch); the honest nodes keep running without internal errors.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import attrs
import pytest
import trio
from advkit import (
    ENGINE,
    MODEL,
    FinalPathWatcher,
    HostilePeer,
    assert_honest_alive,
    final_files,
    make_liar,
    record,
    start_node,
)

from swarm.sources import FetchRequest, VerificationFailed

BANNED_MODES = ("corrupt", "truncate", "mislabel")
"""Modes whose first bad piece gets the peer banned for the manifest."""
DROPPED_MODES = ("out-of-range", "oversized")
"""Modes that break the protocol: the link is dropped at once."""


async def _swarm(stack, tmp, src, manifest, pieces, honest: int, modes: list[str], **kw):
    worker = await start_node(stack, tmp, "w0", serve=((MODEL, src),), **kw)
    boot = tuple(worker.host.addrs[:1])
    honest_nodes = [worker] + [
        await start_node(stack, tmp, f"w{k}", serve=((MODEL, src),), bootstrap=boot, **kw)
        for k in range(1, honest)
    ]
    liars = []
    for k, mode in enumerate(modes):
        liar = HostilePeer(
            tmp, f"liar{k}-{mode}", manifest=manifest, pieces=pieces, pieces_mode=mode, bootstrap=boot
        )
        await stack.enter_async_context(liar.running())
        liars.append(liar)
    return honest_nodes, liars, boot


async def _fetch_and_check(stack, tmp, manifest, honest_nodes, liars, boot, error_log, scenario, **kw):
    # One request per peer at a time: the honest peers cannot take every piece before the liars'
    # links are up, so every liar gets asked.
    front = await start_node(
        stack, tmp, "front", bootstrap=boot, engine=attrs.evolve(ENGINE, pipeline_depth=1), **kw
    )
    t0 = trio.current_time()
    with FinalPathWatcher(front.config.cache_dir, [manifest]) as watch:
        with trio.fail_after(60):
            snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
    elapsed = trio.current_time() - t0
    watch.assert_clean()
    for f in manifest.files:  # complete and right (the watcher hashed each file)
        assert (snap / f.path).stat().st_size == f.size
    (sh,) = front.shared.values()
    t = sh.transfer
    asked = sum(liar.stats["requests"] for liar in liars)
    bad = sum(liar.stats["bad_answers"] for liar in liars)
    assert all(liar.stats["requests"] for liar in liars), "a liar was never asked for a piece"
    for liar in liars:
        # Nothing a liar sent was ever taken; a bad piece that arrived in time got it banned (one
        # that came after its request was cancelled is dropped unread, like any late copy).
        assert t.peer_stats(liar.peer_id).pieces_down == 0, liar.mode
        if liar.mode in BANNED_MODES:
            assert liar.peer_id in t.banned or liar.peer_id not in t.peers, liar.mode
        if liar.mode in DROPPED_MODES:
            assert liar.peer_id not in t.peers, liar.mode
    if any(liar.mode in BANNED_MODES for liar in liars):
        assert t.banned, "no liar was banned: their bad pieces all came too late to be checked"
    assert not t.banned & {n.peer_id for n in honest_nodes}
    assert t.internal_errors == 0
    assert_honest_alive([*honest_nodes, front])
    assert not error_log, [r.getMessage() for r in error_log]
    record(
        scenario,
        honest=len(honest_nodes),
        hostile=len(liars),
        modes="+".join(liar.mode for liar in liars),
        requests_to_liars=asked,
        bad_pieces_sent=bad,
        banned=len(t.banned),
        fetch_s=round(elapsed, 2),
        files_hashed=watch.checked,
        bad_files_at_final_path=len(watch.violations),
        bytes_lost=0,
        outcome="complete",
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [*BANNED_MODES, *DROPPED_MODES, "unrequested"])
async def test_one_liar_one_honest(tmp_path, adv_model, error_log, mode):
    """Half the providers lie, one way each run."""
    src, manifest, pieces = adv_model
    async with AsyncExitStack() as stack:
        honest, liars, boot = await _swarm(stack, tmp_path, src, manifest, pieces, 1, [mode])
        await _fetch_and_check(
            stack, tmp_path, manifest, honest, liars, boot, error_log, f"pieces: 1 honest + 1 {mode}"
        )


@pytest.mark.timeout(60)
async def test_three_liars_three_honest(tmp_path, adv_model, error_log):
    """Half of six providers lie, each differently, at once."""
    src, manifest, pieces = adv_model
    async with AsyncExitStack() as stack:
        # Libp2p streams only (no data lane): honest and hostile links are equally fast to open.
        honest, liars, boot = await _swarm(
            stack, tmp_path, src, manifest, pieces, 3, ["corrupt", "truncate", "mislabel"], lane="off"
        )
        await _fetch_and_check(
            stack,
            tmp_path,
            manifest,
            honest,
            liars,
            boot,
            error_log,
            "pieces: 3 honest + 3 liars (corrupt, truncate, mislabel)",
            lane="off",
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
async def test_lying_node_over_the_data_lane(tmp_path, adv_model, error_log, mode):
    """A real node whose store lies, so its bad pieces travel the encrypted data lane (the
    receiver thread, AES-GCM, pooled buffers) rather than a libp2p stream."""
    src, manifest, _pieces = adv_model
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        liar = await start_node(stack, tmp_path, "liar", serve=((MODEL, src),), bootstrap=boot)
        lies = make_liar(liar, mode)
        front = await start_node(
            stack, tmp_path, "front", bootstrap=boot, engine=attrs.evolve(ENGINE, pipeline_depth=1)
        )
        with FinalPathWatcher(front.config.cache_dir, [manifest]) as watch:
            with trio.fail_after(60):
                await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        watch.assert_clean()
        (t,) = [sh.transfer for sh in front.shared.values()]
        assert front.lane is not None and front.lane.lanes_opened >= 2
        assert lies.served >= 1 and liar.peer_id in t.banned, (lies.served, t.banned)
        assert t.peer_stats(liar.peer_id).pieces_down == 0
        assert_honest_alive([honest, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            f"pieces: 1 honest + 1 {mode} node over the data lane",
            honest=1,
            hostile=1,
            bad_pieces_sent=lies.served,
            banned=len(t.banned),
            lanes=front.lane.lanes_opened,
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            bytes_lost=0,
            outcome="complete",
        )


@pytest.mark.timeout(60)
async def test_only_liars_fail_clearly(tmp_path, adv_model, error_log):
    """Every provider lies: the fetch fails with VerificationFailed naming the banned peers, in
    bounded time, with nothing at a final path."""
    _src, manifest, pieces = adv_model
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")  # a DHT node holding nothing
        boot = tuple(anchor.host.addrs[:1])
        liars = []
        for k, mode in enumerate(("corrupt", "truncate")):
            liar = HostilePeer(
                tmp_path, f"liar{k}", manifest=manifest, pieces=pieces, pieces_mode=mode, bootstrap=boot
            )
            await stack.enter_async_context(liar.running())
            liars.append(liar)
        front = await start_node(stack, tmp_path, "front", bootstrap=boot, stall_timeout=3.0)
        t0 = trio.current_time()
        with (
            FinalPathWatcher(front.config.cache_dir, [manifest]) as watch,
            trio.fail_after(30),
            pytest.raises(VerificationFailed) as ei,
        ):
            await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        elapsed = trio.current_time() - t0
        msg = str(ei.value)
        assert "banned" in msg and all(liar.peer_id[:12] in msg for liar in liars), msg
        watch.assert_clean()
        assert not [
            p for p in final_files(front.config.cache_dir) if "snapshots" in p.parts or p.stat().st_size
        ], final_files(front.config.cache_dir)
        assert front.shared == {}
        assert_honest_alive([anchor, front])
        record(
            "pieces: only liars (corrupt, truncate)",
            honest=0,
            hostile=2,
            bad_pieces_sent=sum(liar.stats["bad_answers"] for liar in liars),
            fails_after_s=round(elapsed, 2),
            error=msg[:120],
            bad_files_at_final_path=0,
            outcome="VerificationFailed",
        )
