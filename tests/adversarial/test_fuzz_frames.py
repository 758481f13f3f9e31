"""Malformed, oversized and truncated frames on every protocol: hypothesis-generated inputs against
the decoders, then against a live node over real libp2p streams and its data-lane listener.

Decoders (pure): ``wire.FrameDecoder`` on both protocols' type sets, ``wire.decode_body`` of every
type, the lane's frame decoder and record opener, ``Manifest.decode``, ``trust.verify_signature``
and ``wire.unpack_bitfield``. Each may only return a value or raise its own error type; whatever
decodes re-encodes to the same bytes.

Live: one node serving a model, in a trio loop of its own (so hypothesis' sync examples can drive
it), and four attacker hosts connected to it. Each example sends a batch of inputs at once, each on
its own fresh stream: /swarm/pieces/1.0.0 (raw bytes, frames of any type, and mutated sessions
that start with a real handshake and go on with requests, pieces, bad indices...),
/swarm/manifest/1.0.0, /swarm/lane/1.0.0 offers, raw bytes on the lane's TCP port, the DHT's
/ipfs/kad/1.0.0 and py-libp2p's other handlers (identify, identify push, ping: the node must
survive them too), and raw bytes on the libp2p TCP port before noise. After each
input the attacker half-closes and waits for the node to close the stream; a node that kept a
stream open after that (or crashed, or logged an internal error) fails the test. Afterwards the
node must still serve an honest fetch. The counts go to docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from advkit import MODEL, TrioThread, record, start_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm import wire
from swarm.manifest import Manifest, ManifestError
from swarm.net import lane_crypto as lc
from swarm.net.host import PeerAddr, SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import ACCEPT, MAGIC, _decode_frame
from swarm.sources import FetchRequest
from swarm.trust import TrustError, sign_manifest, verify_signature

TRIED: Counter[str] = Counter()
"""Inputs tried per target in this run."""

FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)

u32 = st.integers(0, 2**32 - 1)


def frame(type_: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, type_) + body


any_frame = st.builds(frame, st.integers(0, 255), st.binary(max_size=200))
oversized = st.builds(
    lambda t, extra: struct.pack(">IB", wire.frame_limit(t) + extra, t),
    st.integers(0, 255),
    st.integers(1, 2**20),
)


# --------------------------------------------------------------------------- decoders


def _drain(dec: wire.FrameDecoder, data: bytes, chunk: int) -> list:
    out = []
    for k in range(0, len(data), chunk):
        dec.feed(data[k : k + chunk])
        while (m := dec.next_message()) is not None:
            out.append(m)
    return out


@settings(FAST, max_examples=2500)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.lists(st.one_of(any_frame, oversized, st.binary(max_size=16)), max_size=8).map(b"".join),
    ),
    st.sampled_from([wire.PIECES_TYPES, wire.MANIFEST_TYPES, None]),
    st.integers(1, 64),
)
def test_frame_decoder(data, allowed, chunk):
    TRIED["wire.FrameDecoder"] += 1
    dec = wire.FrameDecoder(allowed)
    try:
        msgs = _drain(dec, data, chunk)
    except wire.ProtocolError:
        return
    for m in msgs:
        assert allowed is None or m.TYPE in allowed
        _check_reencodes(m)
    consumed = len(data) - dec.buffered
    if not any(isinstance(m, wire.Hello) for m in msgs):
        assert b"".join(wire.encode(m) for m in msgs) == data[:consumed]


def _check_reencodes(m) -> None:
    """Whatever decoded re-encodes to a frame that decodes to the same message (and to the very
    same bytes, except a Hello's flag byte, whose unknown bits are ignored by design)."""
    f = wire.encode(m)
    assert wire.decode_body(f[4], memoryview(f)[5:]) == m


@settings(FAST, max_examples=1500)
@given(st.integers(0, 255), st.binary(max_size=300))
def test_decode_body_of_every_type(type_, body):
    TRIED["wire.decode_body"] += 1
    try:
        m = wire.decode_body(type_, memoryview(body))
    except wire.ProtocolError:
        return
    _check_reencodes(m)
    if type_ != wire.Hello.TYPE:
        assert wire.encode(m) == frame(type_, body)


@settings(FAST, max_examples=700)
@given(st.one_of(st.binary(max_size=300), any_frame, oversized))
def test_lane_frame_decoder(data):
    TRIED["lane frame decoder"] += 1
    try:
        m = _decode_frame(data)
    except wire.ProtocolError:
        return
    assert m.TYPE in wire.PIECES_TYPES and m.TYPE != wire.PieceData.TYPE


@settings(FAST, max_examples=300)
@given(st.binary(min_size=lc.HEADER.size, max_size=lc.HEADER.size), st.binary(max_size=300))
def test_lane_record_opener(header, sealed):
    TRIED["lane record opener"] += 1
    opener = lc.Opener(b"k" * 32)
    with pytest.raises((lc.InvalidTag, ValueError)):
        opener.open_frame(header, sealed)


@pytest.fixture(scope="module")
def manifest_bytes(adv_model) -> bytes:
    return adv_model[1].encode()


@settings(FAST, max_examples=1500)
@given(st.data())
def test_manifest_decode(manifest_bytes, data):
    TRIED["Manifest.decode"] += 1
    good = manifest_bytes
    how = data.draw(st.sampled_from(["random", "flip", "truncate", "insert", "splice"]))
    if how == "random":
        raw = data.draw(st.binary(max_size=400))
    elif how == "flip":
        raw = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        raw = bytes(raw)
    elif how == "truncate":
        raw = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "insert":
        i = data.draw(st.integers(0, len(good)))
        raw = good[:i] + data.draw(st.binary(min_size=1, max_size=8)) + good[i:]
    else:  # a header with counts and sizes from hypothesis, then the real body
        i = data.draw(st.integers(0, min(len(good), 120)))
        raw = good[:i] + data.draw(st.binary(max_size=24)) + good[i + 8 :]
    try:
        m = Manifest.decode(raw)
    except ManifestError:
        return
    assert m.encode() == raw  # anything accepted is canonical


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return load_or_create_identity(tmp_path_factory.mktemp("sig") / "pub.key")


@settings(FAST, max_examples=800)
@given(st.data())
def test_verify_signature(signer, data):
    TRIED["trust.verify_signature"] += 1
    h = data.draw(st.binary(min_size=32, max_size=32))
    blob = bytearray(sign_manifest(signer, h))
    how = data.draw(st.sampled_from(["random", "flip", "truncate", "other-hash"]))
    if how == "random":
        blob = bytearray(data.draw(st.binary(max_size=200)))
    elif how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        h = bytes(x ^ 0xFF for x in h)
    with pytest.raises(TrustError):
        verify_signature(bytes(blob), h)


@settings(FAST, max_examples=400)
@given(st.binary(max_size=40), st.integers(0, 330))
def test_unpack_bitfield(bits, n):
    TRIED["wire.unpack_bitfield"] += 1
    try:
        have = wire.unpack_bitfield(bits, n)
    except wire.ProtocolError:
        return
    assert all(0 <= i < n for i in have)
    assert wire.pack_bitfield(have, n) == bits


# --------------------------------------------------------------------------- a live node


class Live:
    """The node under attack and the attackers, on a trio loop in a thread."""

    ATTACKERS = 4
    STREAM_TIMEOUT = 8.0
    """Seconds the node may take to close a stream after the attacker half-closed it."""

    def __init__(self, tmp: Path, src: Path, manifest: Manifest):
        self.tmp, self.src, self.manifest = tmp, src, manifest
        self.hello = wire.encode(wire.Hello(manifest.manifest_hash, manifest.num_pieces))
        self.node = None
        self.attackers: list[SwarmHost] = []
        self.target: PeerAddr | None = None
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0

    async def main(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            self.node = await start_node(stack, self.tmp, "target", serve=((MODEL, self.src),))
            addr = self.node.host.addrs[0]
            self.target = PeerAddr(self.node.peer_id, (addr.rsplit("/p2p/", 1)[0],))
            for k in range(self.ATTACKERS):
                a = SwarmHost(load_or_create_identity(self.tmp / f"attacker{k}.key"))
                await stack.enter_async_context(a.run())
                await a.connect(self.target)
                self.attackers.append(a)
            task_status.started(self)
            await trio.sleep_forever()

    async def batch(self, protocol: str, inputs: list[bytes]) -> None:
        async with trio.open_nursery() as n:
            for k, data in enumerate(inputs):
                n.start_soon(self._one, self.attackers[k % len(self.attackers)], protocol, data)

    async def _one(self, attacker: SwarmHost, protocol: str, data: bytes) -> None:
        t0 = trio.current_time()
        try:
            stream = await attacker._open_stream(self.target, protocol, 10)
        except Exception as e:
            print(
                "OPEN FAILED",
                repr(e)[:200],
                "node sees",
                self.node.host.connected_peers(),
                "attacker sees",
                attacker.connected_peers(),
                self.outcomes,
            )
            raise
        got = pieces = 0
        dec = wire.FrameDecoder()
        try:
            try:
                if data:
                    await stream.write(data)
                if data.startswith(self.hello):
                    await trio.sleep(0.03)  # a session: let the node answer requests first
                await stream.close()  # half-close: the node sees the end of our input
            except Exception:
                self.outcomes["closed before all was written"] += 1
            with trio.move_on_after(self.STREAM_TIMEOUT) as scope:
                while True:
                    try:
                        chunk = await stream.read(1 << 16)
                    except Exception:
                        break
                    if not chunk:
                        break
                    got += len(chunk)
                    if protocol == wire.PIECES_PROTOCOL and dec is not None:
                        try:
                            dec.feed(chunk)
                            while (msg := dec.next_message()) is not None:
                                pieces += isinstance(msg, wire.PieceData)
                        except wire.ProtocolError:
                            dec = None
                    if protocol == wire.LANE_PROTOCOL and got >= ACCEPT.size:
                        break  # an accepted offer waits for a TCP connection we never open
            if scope.cancelled_caught:
                self.outcomes["stream left open by the node"] += 1
            else:
                self.outcomes[
                    "answered with pieces" if pieces else "answered" if got else "closed silently"
                ] += 1
        finally:
            with trio.move_on_after(2):
                try:
                    await stream.reset()
                except Exception:
                    pass
        self.slowest = max(self.slowest, trio.current_time() - t0)

    async def tcp_batch(self, inputs: list[bytes], port: int | None = None, label: str = "lane tcp") -> None:
        """Each input on its own TCP connection to ``port`` (the lane's by default)."""

        async def one(data: bytes) -> None:
            with trio.move_on_after(self.STREAM_TIMEOUT) as scope:
                s = await trio.open_tcp_stream("127.0.0.1", port or self.node.lane.port)
                async with s:
                    try:
                        await s.send_all(data)
                        await s.send_eof()
                        while await s.receive_some(1 << 16):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            self.outcomes[f"{label} left open" if scope.cancelled_caught else f"{label} closed"] += 1

        async with trio.open_nursery() as n:
            for data in inputs:
                n.start_soon(one, data)

    async def honest_fetch(self) -> Path:
        async with AsyncExitStack() as stack:
            front = await start_node(stack, self.tmp, "after-fuzz", bootstrap=tuple(self.node.host.addrs[:1]))
            with trio.fail_after(60):
                return await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory, adv_model):
    src, m, _ = adv_model
    errors = _Errors()
    logging.getLogger("swarm").addHandler(errors)
    holder = Live(tmp_path_factory.mktemp("live-fuzz"), src, m)
    runner = TrioThread(holder.main)
    runner.start()
    holder.runner = runner
    holder.errors = errors.records
    holder.fds_before = len(os.listdir("/proc/self/fd"))
    try:
        yield holder
    finally:
        runner.stop()
        logging.getLogger("swarm").removeHandler(errors)


# pieces-protocol inputs: raw bytes, frames of any kind, or a session that starts with a real
# handshake (possibly bent) and goes on with messages of every type, good and bad


def pieces_inputs(m: Manifest):
    n = m.num_pieces
    h = m.manifest_hash
    index = st.one_of(st.integers(0, n + 2), u32)
    message = st.one_of(
        st.builds(lambda i: wire.encode(wire.Have(i)), index),
        st.builds(lambda i: wire.encode(wire.Request(i)), index),
        st.builds(lambda i: wire.encode(wire.Cancel(i)), index),
        st.builds(lambda i: wire.encode(wire.Reject(i)), index),
        st.sampled_from(
            [wire.encode(x) for x in (wire.Interested(), wire.NotInterested(), wire.Choke(), wire.Unchoke())]
        ),
        st.builds(lambda i, d: wire.encode(wire.PieceData(i, d)), index, st.binary(max_size=4096)),
        st.builds(lambda s: wire.encode(wire.Error(s)), st.text(max_size=40)),
        st.builds(
            lambda hh, k: wire.encode(wire.Hello(hh, k)),
            st.one_of(st.just(h), st.binary(min_size=32, max_size=32)),
            u32,
        ),
        any_frame,
        oversized,
        st.binary(max_size=12),
    )
    hello = st.one_of(
        st.just(wire.encode(wire.Hello(h, n))),
        st.builds(lambda k: wire.encode(wire.Hello(h, k)), u32),
        st.builds(lambda hh: wire.encode(wire.Hello(hh, n)), st.binary(min_size=32, max_size=32)),
    )
    bitfield = st.one_of(
        st.builds(
            lambda s: wire.encode(wire.Bitfield(wire.pack_bitfield(s, n))), st.sets(st.integers(0, n - 1))
        ),
        st.builds(lambda b: wire.encode(wire.Bitfield(b)), st.binary(max_size=8)),
    )
    session = st.tuples(hello, bitfield, st.lists(message, max_size=12)).map(
        lambda t: t[0] + t[1] + b"".join(t[2])
    )
    cut = st.tuples(session, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    # a well-behaved start (so the node unchokes and serves), then anything
    polite_start = b"".join(
        wire.encode(x)
        for x in (wire.Hello(h, n), wire.Bitfield(wire.pack_bitfield([], n)), wire.Interested())
    )
    polite = st.lists(
        st.one_of(st.builds(lambda i: wire.encode(wire.Request(i)), st.integers(0, n - 1)), message),
        max_size=8,
    ).map(lambda msgs: polite_start + b"".join(msgs))
    return st.one_of(
        st.binary(max_size=300), st.lists(message, max_size=6).map(b"".join), session, polite, cut
    )


def manifest_inputs():
    text = st.one_of(st.just(MODEL), st.text(max_size=30), st.text(min_size=200, max_size=300))
    req = st.builds(
        lambda mo, rv, hh: _req(mo, rv, hh),
        text,
        st.one_of(st.just(""), text),
        st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    )
    return st.one_of(
        st.binary(max_size=300),
        any_frame,
        oversized,
        req,
        st.tuples(req, st.binary(min_size=1, max_size=40)).map(b"".join),
        st.tuples(req, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
        st.builds(
            lambda b, k: frame(wire.ManifestRequest.TYPE, b[:k]), st.binary(max_size=80), st.integers(0, 80)
        ),
    )


def _req(model: str, revision: str, h: bytes) -> bytes:
    try:
        return wire.encode(wire.ManifestRequest(model, revision, h))
    except ValueError:  # longer than a name may be: send the frame anyway
        body = (
            struct.pack(">H", len(model.encode()))
            + model.encode()
            + struct.pack(">H", len(revision.encode()))
            + revision.encode()
            + bytes([len(h)])
            + h
        )
        return frame(wire.ManifestRequest.TYPE, body)


lane_offers = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda mode, nonce: struct.pack(">4sB32s", MAGIC, mode, nonce),
        st.integers(0, 255),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(lambda magic, rest: magic + rest, st.binary(min_size=4, max_size=4), st.binary(max_size=33)),
)
BATCH = 8


@pytest.mark.timeout(120)
def test_live_pieces_protocol(live, adv_model):
    m = adv_model[1]

    @settings(FAST, max_examples=120)  # 960 inputs; 200 took 20 s of the suite
    @given(st.lists(pieces_inputs(m), min_size=BATCH, max_size=BATCH))
    def run(inputs):
        TRIED["live /swarm/pieces/1.0.0"] += len(inputs)
        live.runner.call(live.batch, wire.PIECES_PROTOCOL, inputs)

    run()
    assert live.outcomes["stream left open by the node"] == 0, live.outcomes


@pytest.mark.timeout(120)
def test_live_manifest_protocol(live):
    @settings(FAST, max_examples=80)
    @given(st.lists(manifest_inputs(), min_size=BATCH, max_size=BATCH))
    def run(inputs):
        TRIED["live /swarm/manifest/1.0.0"] += len(inputs)
        live.runner.call(live.batch, wire.MANIFEST_PROTOCOL, inputs)

    run()
    assert live.outcomes["stream left open by the node"] == 0, live.outcomes


@pytest.mark.timeout(120)
def test_live_lane_setup(live):
    @settings(FAST, max_examples=40)
    @given(
        st.lists(lane_offers, min_size=BATCH, max_size=BATCH),
        st.lists(st.binary(max_size=120), min_size=BATCH, max_size=BATCH),
    )
    def run(offers, raw):
        TRIED["live /swarm/lane/1.0.0 offers"] += len(offers)
        TRIED["live lane TCP port"] += len(raw)
        live.runner.call(live.batch, wire.LANE_PROTOCOL, offers)
        live.runner.call(live.tcp_batch, raw)

    run()
    assert live.outcomes["stream left open by the node"] == 0, live.outcomes
    assert live.outcomes["lane tcp left open"] == 0, live.outcomes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# The DHT's /ipfs/kad/1.0.0 (py-libp2p's handler, on the same connection): varint-length-prefixed
# protobuf-ish messages (field tags and lengths from hypothesis), raw bytes, absurd lengths.
kad_inputs = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda body: _varint(len(body)) + body, st.binary(max_size=300)),
    st.builds(lambda n, body: _varint(n) + body, st.integers(0, 2**40), st.binary(max_size=64)),
    st.builds(
        lambda fields: (lambda b: _varint(len(b)) + b)(
            b"".join(_varint(tag) + _varint(len(v)) + v for tag, v in fields)
        ),
        st.lists(st.tuples(st.integers(0, 120), st.binary(max_size=40)), max_size=6),
    ),
)
KAD_PROTOCOL = "/ipfs/kad/1.0.0"


@pytest.mark.timeout(120)
def test_live_dht_protocol(live):
    @settings(FAST, max_examples=40)
    @given(st.lists(kad_inputs, min_size=BATCH, max_size=BATCH))
    def run(inputs):
        TRIED["live /ipfs/kad/1.0.0"] += len(inputs)
        live.runner.call(live.batch, KAD_PROTOCOL, inputs)

    run()
    assert live.outcomes["stream left open by the node"] == 0, live.outcomes


def _ms(proto: bytes) -> bytes:
    """One multistream-select message (varint length, protocol, newline)."""
    return _varint(len(proto) + 1) + proto + b"\n"


MS = _ms(b"/multistream/1.0.0")
# The libp2p TCP port before any security: raw bytes, multistream-select with any protocol, and
# noise handshake messages of any announced length (the swarm key, when set, comes first).
libp2p_port_inputs = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda rest: MS + rest, st.binary(max_size=200)),
    st.builds(
        lambda proto, rest: MS + _ms(proto) + rest,
        st.one_of(
            st.sampled_from([b"/noise", b"/plaintext/2.0.0", b"/tls/1.0.0", b"/yamux/1.0.0"]),
            st.binary(max_size=40),
        ),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda n, body: MS + _ms(b"/noise") + struct.pack(">H", n) + body,
        st.integers(0, 65535),
        st.binary(max_size=200),
    ),
)
LIBP2P_BUILTINS = ("/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0")
"""py-libp2p's own handlers on every host (besides the DHT's)."""


@pytest.mark.timeout(120)
def test_live_libp2p_builtins_and_port(live):
    """The rest of what a node answers: py-libp2p's identify, identify push and ping handlers
    (varint-framed protobuf-ish messages, raw bytes) and its libp2p TCP port before noise."""
    port = int(live.node.host.addrs[0].split("/")[4])

    @settings(FAST, max_examples=40)
    @given(
        st.sampled_from(LIBP2P_BUILTINS),
        st.lists(kad_inputs, min_size=BATCH, max_size=BATCH),
        st.lists(libp2p_port_inputs, min_size=BATCH, max_size=BATCH),
    )
    def run(proto, inputs, raw):
        TRIED[f"live {proto}"] += len(inputs)
        TRIED["live libp2p TCP port"] += len(raw)
        live.runner.call(live.batch, proto, inputs)
        live.runner.call(live.tcp_batch, raw, port, "libp2p tcp")

    run()
    assert live.outcomes["stream left open by the node"] == 0, live.outcomes
    assert live.outcomes["libp2p tcp left open"] == 0, live.outcomes


@pytest.mark.timeout(120)
def test_live_node_still_serves_and_holds_nothing(live, adv_model):
    """After the fuzzing: no internal error, the node still serves an honest fetch, it holds no
    link for the attackers, and its file descriptors are back near where they were."""
    m = adv_model[1]
    snap = live.runner.call(live.honest_fetch)
    assert snap.name == m.revision
    (t,) = [sh.transfer for sh in live.node.shared.values()]
    assert t.internal_errors == 0

    async def settle():
        with trio.move_on_after(15):
            while set(t.peers) & {a.peer_id for a in live.attackers} or live.node.lane._handshakes:
                await trio.sleep(0.1)
        return sorted(t.peers), live.node.lane._handshakes

    peers, handshakes = live.runner.call(settle)
    assert not set(peers) & {a.peer_id for a in live.attackers}, peers
    assert handshakes == 0
    assert not live.errors, [r.getMessage() for r in live.errors][:5]
    fds_after = len(os.listdir("/proc/self/fd"))
    live_total = sum(v for k, v in TRIED.items() if k.startswith("live"))
    record(
        "fuzz: live node (pieces, manifest, lane offers, lane TCP, DHT, identify, ping, libp2p TCP)",
        inputs=live_total,
        **{k.replace("live ", ""): v for k, v in TRIED.items() if k.startswith("live")},
        outcomes=dict(live.outcomes),
        slowest_stream_s=round(live.slowest, 2),
        node_internal_errors=t.internal_errors,
        node_error_logs=len(live.errors),
        fds_before=live.fds_before,
        fds_after=fds_after,
        honest_fetch_after="complete",
    )
    assert fds_after <= live.fds_before + 24, (live.fds_before, fds_after)


def test_zz_at_least_10000_inputs(request):
    mine = [i for i in request.session.items if i.module is request.module]
    if len(mine) != len([n for n in dir(request.module) if n.startswith("test_")]):
        pytest.skip("only part of the fuzz module ran")
    total = sum(TRIED.values())
    decoders = {k: v for k, v in TRIED.items() if not k.startswith("live")}
    record("fuzz: decoders", inputs=sum(decoders.values()), **decoders)
    record("fuzz: total hypothesis inputs this run", inputs=total)
    assert total >= 10_000, TRIED
    assert sum(v for k, v in TRIED.items() if k.startswith("live")) >= 3000, TRIED
