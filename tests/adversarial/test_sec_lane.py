"""Security issue #18, findings 3 and 11: data-lane connections that pass the proof and never send
their Hello, records and frames that claim more memory than the manifest allows.

Hostile lane peers here are real libp2p peers (a ``SwarmHost``) that do the lane setup by hand
(offer over ``/swarm/lane/1.0.0``, TCP connect, proof) so they hold the right keys, then send
whatever the test asks for. The seeder is an unmodified ``Node``.
"""

from __future__ import annotations

import os
import socket
import threading
from contextlib import AsyncExitStack

import attrs
import pytest
import trio
from advkit import ENGINE, MODEL, assert_honest_alive, record, start_node, weight_pieces

from swarm import wire
from swarm.net import lane as lane_mod
from swarm.net import lane_crypto as lc
from swarm.net import requests as requests_mod
from swarm.net.host import PeerAddr, SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import ACCEPT, MAGIC, OFFER, LaneLink, _decode_frame, _read_exactly
from swarm.sources import FetchRequest

MiB = 1 << 20
PER_PEER = 4
"""lane.MAX_SETUPS_PER_PEER (checked at the end of the test that relies on it)."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def lane_threads() -> int:
    """Lane receiver threads in this process (the attackers here hold none of their own)."""
    return sum(t.name.startswith("lane-rx-") for t in threading.enumerate())


def target_of(node) -> PeerAddr:
    return PeerAddr(node.peer_id, (node.host.addrs[0].rsplit("/p2p/", 1)[0],))


async def prove_lane(ah: SwarmHost, target: PeerAddr, port: int):
    """A proven lane to ``target`` done by hand: (trio socket, keys), or None if refused or
    closed before the acceptor's proof."""
    s = await ah.open_lane_stream(target)
    try:
        nonce = os.urandom(lc.NONCE_BYTES)
        await s.write(OFFER.pack(MAGIC, lc.MODE_ENCRYPTED, nonce))
        _m, status, mode, aport, nonce_a = ACCEPT.unpack(await _read_exactly(s, ACCEPT.size))
        if status != lane_mod.STATUS_OK:
            return None
        assert aport == port
        keys = lc.derive_keys(nonce, nonce_a, ah.peer_id, target.peer_id, mode, port)
        tsock = trio.socket.socket()
        await tsock.connect(("127.0.0.1", port))
        await lane_mod._send_all(tsock, keys.lane_id + lc.make_proof(keys, True))
        proof = b""
        while len(proof) < lc.PROOF_BYTES:
            chunk = await tsock.recv(lc.PROOF_BYTES - len(proof))
            if not chunk:
                tsock.close()
                return None
            proof += chunk
        assert lc.check_proof(keys, False, proof)
        return tsock, keys
    finally:
        await lane_mod._close_stream(s)


def still_open(tsock) -> bool:
    """The seeder has not closed this connection: reads (and drops) what it sent, then
    no end of stream and no reset."""
    dup = socket.socket(fileno=os.dup(tsock.fileno()))
    try:
        while dup.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        dup.close()


async def read_to_end(tsock) -> bytes:
    data = b""
    while True:
        try:
            chunk = await tsock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk


def open_records(data: bytes, keys: lc.LaneKeys) -> list[wire.Message]:
    """The acceptor's FRAME records in ``data`` (as the dialer would open them)."""
    opener = lc.Opener(keys.acceptor_to_dialer)
    out, at, hs = [], 0, lc.HEADER.size
    while at + hs <= len(data):
        kind, _i, n = lc.HEADER.unpack_from(data, at)
        assert kind == lc.KIND_FRAME, kind
        end = at + hs + n + lc.TAG
        if end > len(data):
            break
        out.append(_decode_frame(opener.open_frame(data[at : at + hs], data[at + hs : end])))
        at = end
    return out


def seal_frames(sealer: lc.Sealer, *msgs: wire.Message) -> bytes:
    return b"".join(sealer.seal_frame(wire.encode(m)) for m in msgs)


# --------------------------------------------------------------------------- finding 3


@pytest.mark.timeout(90)
async def test_proven_lanes_without_hello_are_capped_per_peer_and_in_all(
    tmp_path, adv_model, error_log, monkeypatch
):
    """Three attacker peers each open 24 proven lanes (right keys, right proof; one peer alone,
    then two at once) and never send a Hello, keeping every connection open. The seeder
    (max_peers = 8) holds at most MAX_SETUPS_PER_PEER of one peer's and 8 in all, with no
    receiver thread for any of them; an honest node still opens a lane to it and fetches the
    model over it meanwhile. Before the fix every one of the 72 lanes was accepted, each with a
    thread, for HELLO_TIMEOUT."""
    monkeypatch.setattr(lane_mod, "HELLO_TIMEOUT", 6.0)
    src, manifest, _pieces = adv_model
    max_peers, per_attacker, n_attackers = 8, 24, 3
    async with AsyncExitStack() as stack:
        seeder = await start_node(
            stack, tmp_path, "seeder", serve=((MODEL, src),), engine=attrs.evolve(ENGINE, max_peers=max_peers)
        )
        assert seeder.lane is not None and seeder.lane.port
        boot = tuple(seeder.host.addrs[:1])
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        target = target_of(seeder)
        attackers = []
        for k in range(n_attackers):
            ah = SwarmHost(load_or_create_identity(tmp_path / f"hello-less{k}.key"))
            await stack.enter_async_context(ah.run())
            await ah.connect(target)
            attackers.append(ah)
        fds_before, threads_before = open_fds(), threading.active_count()
        held: dict[str, list] = {ah.peer_id: [] for ah in attackers}
        refused = 0
        t0 = trio.current_time()

        async def attempt(ah: SwarmHost) -> None:
            nonlocal refused
            got = await prove_lane(ah, target, seeder.lane.port)
            if got is None:
                refused += 1
            else:
                held[ah.peer_id].append(got[0])

        with trio.fail_after(30):
            for _ in range(per_attacker):  # one peer alone: the per-peer cap
                await attempt(attackers[0])
            for _ in range(per_attacker):  # two more at once: the cap in all (max_peers)
                for ah in attackers[1:]:
                    await attempt(ah)
        attack_s = trio.current_time() - t0
        await trio.sleep(0.3)  # the seeder acts on what it accepted
        threads = lane_threads()
        open_now = {pid: sum(still_open(s) for s in socks) for pid, socks in held.items()}
        fds_attack, threads_attack = open_fds(), threading.active_count()

        # No thread for a lane that has not said Hello; at most PER_PEER per peer, max_peers in
        # all (the rest refused at the offer, or evicted oldest first by newer setups).
        assert threads == 0, f"{threads} receiver threads for lanes that never said Hello"
        assert all(n <= PER_PEER for n in open_now.values()), open_now
        assert sum(open_now.values()) <= max_peers, open_now
        assert seeder.lane.setups <= max_peers
        assert refused >= per_attacker - PER_PEER and seeder.lane.setups_refused == refused
        assert seeder.lane.setups_evicted > 0

        # An honest node still gets a lane (its setup evicts the oldest hello-less one).
        with trio.fail_after(45):
            snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        for fe in manifest.files:
            assert (snap / fe.path).read_bytes() == (src / fe.path).read_bytes(), fe.path
        assert front.lane is not None and front.lane.lanes_opened >= 1
        t = front.shared[manifest.manifest_hash].transfer
        assert any(isinstance(p.link, LaneLink) for p in t.peers.values()) or t.bytes_down

        # Within HELLO_TIMEOUT every hello-less lane is closed by the seeder.
        with trio.fail_after(20):
            while any(still_open(s) for socks in held.values() for s in socks):
                await trio.sleep(0.1)
            while seeder.lane.setups:
                await trio.sleep(0.1)
        for socks in held.values():
            for s in socks:
                s.close()
        assert_honest_alive([seeder, front])
        assert not error_log, [r.getMessage() for r in error_log]
        assert lane_mod.MAX_SETUPS_PER_PEER == PER_PEER
        record(
            "lane: 3 peers x 24 proven lanes that never send Hello (max_peers 8)",
            attempts=n_attackers * per_attacker,
            attack_s=round(attack_s, 2),
            proven=sum(len(v) for v in held.values()),
            refused_at_offer=refused,
            held_by_seeder=sum(open_now.values()),
            evicted=seeder.lane.setups_evicted,
            rx_threads=threads,
            threads_before=threads_before,
            threads_during=threads_attack,
            fds_before=fds_before,
            fds_during=fds_attack,
            hellos_missing=seeder.lane.hellos_missing,
            honest_fetch="complete over the lane",
        )


@pytest.mark.timeout(60)
async def test_piece_record_before_hello_is_refused_from_its_header(
    tmp_path, adv_model, error_log, monkeypatch
):
    """A proven lane whose first record is a PIECE header announcing 64 MiB: the seeder answers
    with an Error and closes at once, without a thread or a piece buffer. Before the fix its
    receiver thread took a 64 MiB buffer and waited for the payload until HELLO_TIMEOUT."""
    monkeypatch.setattr(lane_mod, "HELLO_TIMEOUT", 60.0)  # the old code's only way out
    src, _manifest, _pieces = adv_model
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        assert seeder.lane is not None and seeder.lane.port
        ah = SwarmHost(load_or_create_identity(tmp_path / "piece-first.key"))
        await stack.enter_async_context(ah.run())
        target = target_of(seeder)
        await ah.connect(target)
        tsock, keys = await prove_lane(ah, target, seeder.lane.port)
        header = lc.HEADER.pack(lc.KIND_PIECE, 0, wire.MAX_PIECE_BYTES)
        await lane_mod._send_all(tsock, header + os.urandom(64 << 10))
        await trio.sleep(0.2)
        threads = lane_threads()
        with trio.fail_after(8):
            data = await read_to_end(tsock)
        tsock.close()
        msgs = open_records(data, keys)
        assert threads == 0
        assert len(msgs) == 1 and isinstance(msgs[0], wire.Error), msgs
        assert "before Hello" in msgs[0].reason, msgs[0]
        assert seeder.lane.hellos_missing == 1
        assert_honest_alive([seeder])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "lane: a 64 MiB PIECE record before Hello",
            answer=msgs[0].reason,
            rx_threads=threads,
            outcome="closed at its header",
        )


# --------------------------------------------------------------------------- finding 11


@pytest.mark.timeout(60)
async def test_lane_piece_longer_than_the_manifest_is_refused_from_its_header(tmp_path, adv_model, error_log):
    """After an honest-looking Hello and Bitfield, a PIECE record that names a weight piece (4 MiB
    in the manifest) with 64 MiB: the link is closed from the header, before a receive buffer is
    taken for it. Before the fix the receiver took a 64 MiB buffer and waited for the payload
    (STALL_TIMEOUT, 30 s)."""
    src, manifest, _pieces = adv_model
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        assert seeder.lane is not None and seeder.lane.port
        ah = SwarmHost(load_or_create_identity(tmp_path / "oversize.key"))
        await stack.enter_async_context(ah.run())
        target = target_of(seeder)
        await ah.connect(target)
        tsock, keys = await prove_lane(ah, target, seeder.lane.port)
        sealer = lc.Sealer(keys.dialer_to_acceptor)
        n = manifest.num_pieces
        await lane_mod._send_all(
            tsock,
            seal_frames(
                sealer, wire.Hello(manifest.manifest_hash, n), wire.Bitfield(wire.pack_bitfield([], n))
            ),
        )
        t = seeder.shared[manifest.manifest_hash].transfer
        with trio.fail_after(10):
            while ah.peer_id not in t.peers:
                await trio.sleep(0.02)
        w = weight_pieces(manifest)[0]
        piece_w = manifest.pieces[w].length
        header = lc.HEADER.pack(lc.KIND_PIECE, w, wire.MAX_PIECE_BYTES)
        await lane_mod._send_all(tsock, header + os.urandom(64 << 10))
        with trio.fail_after(8):
            data = await read_to_end(tsock)
        tsock.close()
        msgs = open_records(data, keys)
        assert isinstance(msgs[0], wire.Hello) and isinstance(msgs[1], wire.Bitfield), msgs
        errors = [m for m in msgs if isinstance(m, wire.Error)]
        assert (
            errors
            and f"piece {w} of {wire.MAX_PIECE_BYTES} bytes, manifest says {piece_w}" in errors[-1].reason
        ), msgs
        with trio.fail_after(5):
            while ah.peer_id in t.peers:
                await trio.sleep(0.02)
        assert t.internal_errors == 0
        assert_honest_alive([seeder])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "lane: a 64 MiB PIECE record for a 4 MiB piece after Hello",
            answer=errors[-1].reason,
            outcome="closed at its header",
        )


async def _pieces_stream_answer(
    ah: SwarmHost, target: PeerAddr, first: bytes, then: bytes = b""
) -> list[wire.Message]:
    """Open a pieces stream, write ``first``; once the seeder's first two frames are in (if
    ``then``), write ``then``; return every frame the seeder sends until it closes."""
    s = await ah._open_stream(target, wire.PIECES_PROTOCOL, 5)
    dec = wire.FrameDecoder(wire.PIECES_TYPES)
    out: list[wire.Message] = []
    try:
        await s.write(first)
        sent_then = not then
        while True:
            try:
                data = await s.read(1 << 16)
            except Exception:  # reset
                return out
            if not data:
                return out
            dec.feed(data)
            while (m := dec.next_message()) is not None:
                out.append(m)
            if not sent_then and len(out) >= 2:
                sent_then = True
                await s.write(then)
    finally:
        await lane_mod._close_stream(s)


@pytest.mark.timeout(60)
async def test_pieces_stream_refuses_oversized_pieces_from_their_header(
    tmp_path, adv_model, error_log, monkeypatch
):
    """/swarm/pieces/1.0.0: a PIECE frame of 64 MiB as the first frame, and after a Hello a
    PIECE frame of 64 MiB for a 4 MiB weight piece, are both refused from their
    header (an Error, then the stream ends). Before the fix the seeder buffered up to 64 MiB of
    either before looking at it."""
    monkeypatch.setattr(requests_mod, "HELLO_TIMEOUT", 60.0)
    src, manifest, _pieces = adv_model
    async with AsyncExitStack() as stack:
        seeder = await start_node(stack, tmp_path, "seeder", serve=((MODEL, src),))
        ah = SwarmHost(load_or_create_identity(tmp_path / "stream-oversize.key"))
        await stack.enter_async_context(ah.run())
        target = target_of(seeder)
        await ah.connect(target)
        big = wire.MAX_PIECE_BYTES
        chunk = os.urandom(256 << 10)
        # 1. a piece as the first frame
        with trio.fail_after(8):
            first = await _pieces_stream_answer(ah, target, wire.piece_header(0, big) + chunk)
        assert len(first) == 1 and isinstance(first[0], wire.Error), first
        assert "before Hello" in first[0].reason, first
        # 2. after Hello and Bitfield, a piece longer than its piece in the manifest
        n = manifest.num_pieces
        hello = wire.encode(wire.Hello(manifest.manifest_hash, n))
        bitfield = wire.encode(wire.Bitfield(wire.pack_bitfield([], n)))
        w = weight_pieces(manifest)[0]
        with trio.fail_after(8):
            second = await _pieces_stream_answer(
                ah, target, hello + bitfield, wire.piece_header(w, big) + chunk
            )
        errors = [m for m in second if isinstance(m, wire.Error)]
        piece_w = manifest.pieces[w].length
        assert errors and f"piece {w} of {big} bytes, manifest says {piece_w}" in errors[-1].reason, second
        (t,) = [sh.transfer for sh in seeder.shared.values()]
        assert t.internal_errors == 0 and ah.peer_id not in t.peers
        assert_honest_alive([seeder])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "pieces stream: 64 MiB PIECE first, and 64 MiB for a 4 MiB piece after Hello",
            first_answer=first[0].reason,
            second_answer=errors[-1].reason,
            outcome="refused from the header",
        )
