"""Peers announcing manifests with wrong sizes, wrong hashes, traversal paths, absurd piece counts,
a different model's files, or that are not manifests at all; under each trust policy.

What each policy guarantees, and what this file checks:

- every policy: a manifest that does not decode (bad structure, unsafe path, absurd counts) or is
  for another model or revision is ignored; pieces are verified against the manifest taken, so no
  file that differs from it ever reaches a final path;
- ``open``: a fetch by name takes the manifest most providers announce. With an honest majority
  that is the honest one. With a colluding majority it is the liars': if they serve pieces that
  match their lie, the fetch completes *with their content* (consistent with their manifest; the
  limitation of ``open``, documented in docs/reliability.md); if their pieces do not match their
  own manifest they are banned and the fetch fails with VerificationFailed;
- a fetch pinned to a manifest hash accepts nothing else, whoever the majority is;
- ``trusted-publishers``: only manifests signed by a listed publisher, whoever relays them.
"""

from __future__ import annotations

import struct
import tracemalloc
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import blake3
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
from modelgen import make_model_dir

from swarm.manifest import FileEntry, Manifest, ManifestError
from swarm.net.host import manifest_key, model_key
from swarm.sources import FetchRequest, ModelNotFound, VerificationFailed
from swarm.trust import TrustPolicy, sign_manifest

_U16 = struct.Struct(">H")


def raw_manifest(
    model: str,
    revision: str,
    files: list[tuple],
    *,
    magic: bytes = b"SWMF",
    version: int = 1,
    count: int | None = None,
) -> bytes:
    """Canonical-format bytes with no validation: files are (path bytes, size, digest, log2 piece
    size, piece count, piece hashes blob)."""
    out = [magic, bytes([version])]
    for s in (model.encode(), revision.encode()):
        out += [_U16.pack(len(s)), s]
    out.append(struct.pack(">I", len(files) if count is None else count))
    for path, size, digest, log2, npieces, hashes in files:
        out += [
            _U16.pack(len(path)),
            path,
            struct.pack(">Q", size),
            digest,
            bytes([log2]),
            struct.pack(">I", npieces),
            hashes,
        ]
    return b"".join(out)


def malformed_manifests(m: Manifest) -> dict[str, bytes]:
    """16 lies that must not decode (one manifest reply holds at most 16)."""
    d = b"\x11" * 32
    one = m.files[0]
    rev = m.revision
    honest = m.encode()

    def f(path: bytes, size: int = 5, log2: int = 14, n: int = 1, hashes: bytes | None = None):
        return (path, size, d, log2, n, d * n if hashes is None else hashes)

    return {
        "traversal ../": raw_manifest(MODEL, rev, [f(b"../../escape.txt")]),
        "traversal a/../../": raw_manifest(MODEL, rev, [f(b"a/../../escape.txt")]),
        "absolute path": raw_manifest(MODEL, rev, [f(b"/tmp/escape.txt")]),
        "backslash path": raw_manifest(MODEL, rev, [f(b"..\\..\\escape.txt")]),
        "control char path": raw_manifest(MODEL, rev, [f(b"con\x00fig.json")]),
        "absurd piece count": raw_manifest(MODEL, rev, [f(b"a.bin", n=0xFFFFFFFF, hashes=d)]),
        "piece count != size": raw_manifest(MODEL, rev, [f(b"a.bin", n=1000)]),
        "absurd size (2^64-1)": raw_manifest(MODEL, rev, [f(b"a.bin", size=2**64 - 1, log2=26)]),
        "piece size 2^40": raw_manifest(MODEL, rev, [f(b"a.bin", log2=40)]),
        "file count 2^32-1": raw_manifest(MODEL, rev, [f(b"a.bin")], count=0xFFFFFFFF),
        "truncated": honest[: len(honest) // 2],
        "trailing bytes": honest + b"\0",
        "bad magic": b"SWMX" + honest[4:],
        "version 2": honest[:4] + b"\x02" + honest[5:],
        "duplicate paths": raw_manifest(
            MODEL,
            rev,
            [
                (
                    one.path.encode(),
                    one.size,
                    one.digest,
                    one.piece_size.bit_length() - 1,
                    one.num_pieces,
                    b"".join(one.piece_hashes),
                )
            ]
            * 2,
        ),
        "empty": b"",
    }


def lie(m: Manifest, how: str) -> Manifest:
    """A manifest of valid structure that lies about the model's content."""
    files = list(m.files)
    k = max(range(len(files)), key=lambda i: files[i].num_pieces)  # a multi-piece weight file
    fe = files[k]
    if how == "wrong hashes":
        hashes = list(fe.piece_hashes)
        hashes[1] = blake3.blake3(b"not this piece").digest()
        files[k] = attrs.evolve(fe, piece_hashes=tuple(hashes))
    elif how == "wrong sizes":  # one byte off, in the last piece (same piece count)
        last = fe.size - (fe.num_pieces - 1) * fe.piece_size
        files[k] = attrs.evolve(fe, size=fe.size - 1 if last > 1 else fe.size + 1)
    elif how == "absurd size":  # 1 TiB in 16384 pieces of 64 MiB: valid, and huge
        size = 1 << 40
        files[k] = FileEntry(fe.path, size, fe.blake3, 64 << 20, (fe.piece_hashes[0],) * 16384)
    else:
        raise AssertionError(how)
    return Manifest(m.model, m.revision, tuple(files))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A different model's files (same layout, other bytes)."""
    return make_model_dir(
        tmp_path_factory.mktemp("other-src"), weights_bytes=8 << 20, n_weight_files=2, seed=99
    )


def test_every_malformed_manifest_is_refused_by_decode(adv_model):
    _src, m, _pieces = adv_model
    for name, raw in malformed_manifests(m).items():
        with pytest.raises(ManifestError):
            Manifest.decode(raw)
            raise AssertionError(f"{name} decoded")


@pytest.mark.timeout(60)
async def test_malformed_and_foreign_manifests_are_ignored(tmp_path, adv_model, other_model, error_log):
    """One honest node; one peer answering with 16 malformed manifests; one answering with a valid
    manifest of another model, one of another revision, and a manifest with a signature that is
    garbage. The fetch takes the honest manifest; nothing escapes the cache."""
    src, m, _pieces = adv_model
    from swarm.manifest import build_manifest

    foreign = build_manifest(other_model, "other/model", "main")
    other_rev = attrs.evolve(m, revision="some-other-revision")
    bad = malformed_manifests(m)
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        liars = [
            HostilePeer(
                tmp_path,
                "malformed",
                manifest_replies=[(b, b"") for b in bad.values()],
                announce=[model_key(MODEL)],
                bootstrap=boot,
            ),
            HostilePeer(
                tmp_path,
                "foreign",
                announce=[model_key(MODEL)],
                bootstrap=boot,
                manifest_replies=[
                    (foreign.encode(), b""),
                    (other_rev.encode(), b""),
                    (m.encode(), b"\x01garbage signature"),
                ],
            ),
        ]
        for liar in liars:
            await stack.enter_async_context(liar.running())
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        with FinalPathWatcher(front.config.cache_dir, [m]) as watch:
            with trio.fail_after(30):
                snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        watch.assert_clean()
        assert snap.name == m.revision
        assert set(front.shared) == {m.manifest_hash}
        assert all(liar.stats["manifest_requests"] >= 1 for liar in liars)
        assert not list(tmp_path.rglob("escape.txt")) and not Path("/tmp/escape.txt").exists()
        assert not list(Path(front.config.cache_dir).glob("models--other--model"))
        assert_honest_alive([honest, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: 1 honest + 16 malformed + foreign model/revision + bad signature",
            bad_manifests_offered=sum(liar.stats["manifests_sent"] for liar in liars),
            kinds=len(bad) + 3,
            taken="honest",
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            outcome="complete",
        )


@pytest.mark.timeout(60)
async def test_valid_lies_from_a_minority_lose_the_vote(tmp_path, adv_model, error_log):
    """Two honest providers; three liars with valid manifests for the same model (wrong piece
    hashes, wrong sizes, a 1 TiB file): the honest manifest has the most votes under ``open``."""
    src, m, pieces = adv_model
    lies = {how: lie(m, how) for how in ("wrong hashes", "wrong sizes", "absurd size")}
    async with AsyncExitStack() as stack:
        w0 = await start_node(stack, tmp_path, "w0", serve=((MODEL, src),))
        boot = tuple(w0.host.addrs[:1])
        w1 = await start_node(stack, tmp_path, "w1", serve=((MODEL, src),), bootstrap=boot)
        liars = []
        for how, lm in lies.items():
            p = HostilePeer(
                tmp_path,
                how.replace(" ", "-"),
                manifest=lm,
                pieces=pieces if how == "wrong hashes" else None,
                pieces_mode="honest",
                bootstrap=boot,
            )
            await stack.enter_async_context(p.running())
            liars.append(p)
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        with FinalPathWatcher(front.config.cache_dir, [m]) as watch:
            with trio.fail_after(30):
                snap = await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        watch.assert_clean()
        assert snap.name == m.revision and set(front.shared) == {m.manifest_hash}
        assert all(p.stats["manifest_requests"] for p in liars)
        assert_honest_alive([w0, w1, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: 2 honest + 3 valid lies (wrong hashes, wrong sizes, 1 TiB), open",
            bad_manifests_offered=len(liars),
            taken="honest (2 votes of 5)",
            files_hashed=watch.checked,
            bad_files_at_final_path=len(watch.violations),
            outcome="complete",
        )


@pytest.mark.timeout(90)
async def test_colluding_majority_under_each_policy(tmp_path, adv_model, other_model, error_log):
    """One honest publisher; two colluding nodes serving a different model's files under the same
    name (a valid, self-consistent manifest signed by themselves: two votes to one); one peer
    that announces the honest manifest's key but answers with the lie.

    open, by name: takes the liars' manifest (most votes) and completes with their content --
    consistent with the manifest it took, which is all open can promise. Pinned to the honest
    hash: the honest content. trusted-publishers (the honest publisher): the honest content."""
    src, m, _pieces = adv_model
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        liars = [
            await start_node(stack, tmp_path, f"liar{k}", serve=((MODEL, other_model),), bootstrap=boot)
            for k in range(2)
        ]
        (lm,) = {sh.manifest for sh in liars[0].shared.values()}
        assert lm.manifest_hash != m.manifest_hash
        relay = HostilePeer(
            tmp_path, "relay", bootstrap=boot, announce=[model_key(MODEL), manifest_key(m.manifest_hash)]
        )
        # The liars' manifest, with the honest publisher's signature of the honest one pasted on.
        relay.manifest_replies = [(lm.encode(), sign_manifest(honest.keypair, m.manifest_hash))]
        await stack.enter_async_context(relay.running())
        outcomes = {}

        # open, by name: the majority (the liars) wins
        f_open = await start_node(stack, tmp_path, "f-open", bootstrap=boot, lookup_timeout=3.0)
        with FinalPathWatcher(f_open.config.cache_dir, [lm]) as w_open:
            with trio.fail_after(30):
                snap = await f_open.fetch(FetchRequest(MODEL, cache_dir=f_open.config.cache_dir))
        w_open.assert_clean()
        assert snap.name == lm.revision, "open policy did not take the majority manifest"
        outcomes["open"] = "liars' manifest (majority), content consistent with it"

        # pinned to the honest hash: nothing else is accepted
        f_pin = await start_node(stack, tmp_path, "f-pin", bootstrap=boot)
        with FinalPathWatcher(f_pin.config.cache_dir, [m]) as w_pin:
            with trio.fail_after(30):
                snap = await f_pin.fetch(
                    FetchRequest(MODEL, cache_dir=f_pin.config.cache_dir), manifest_hash=m.manifest_hash
                )
        w_pin.assert_clean()
        assert snap.name == m.revision and set(f_pin.shared) == {m.manifest_hash}
        outcomes["pinned"] = "honest"

        # trusted-publishers: only the honest publisher's signature counts
        f_trust = await start_node(
            stack,
            tmp_path,
            "f-trust",
            bootstrap=boot,
            trust=TrustPolicy("trusted-publishers", frozenset({honest.peer_id})),
        )
        with FinalPathWatcher(f_trust.config.cache_dir, [m]) as w_trust:
            with trio.fail_after(30):
                snap = await f_trust.fetch(FetchRequest(MODEL, cache_dir=f_trust.config.cache_dir))
        w_trust.assert_clean()
        assert snap.name == m.revision and set(f_trust.shared) == {m.manifest_hash}
        outcomes["trusted-publishers"] = "honest"

        # trusted-publishers trusting only a liar's key refuses the honest manifest, and vice
        # versa a publisher nobody signed with gets nothing at all
        f_none = await start_node(
            stack,
            tmp_path,
            "f-none",
            bootstrap=boot,
            trust=TrustPolicy("trusted-publishers", frozenset({f_open.peer_id})),
        )
        with trio.fail_after(30), pytest.raises(ModelNotFound, match="not trusted"):
            await f_none.fetch(FetchRequest(MODEL, cache_dir=f_none.config.cache_dir))
        assert not list(Path(f_none.config.cache_dir).rglob("snapshots/*"))
        assert relay.stats["manifest_requests"] >= 1
        assert_honest_alive([honest, f_open, f_pin, f_trust, f_none])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: 1 honest vs 2 colluding liars (another model's files) + 1 relay",
            open=outcomes["open"],
            pinned=outcomes["pinned"],
            trusted_publishers=outcomes["trusted-publishers"],
            untrusted_publisher="ModelNotFound (not trusted)",
            bad_files_at_final_path=sum(len(w.violations) for w in (w_open, w_pin, w_trust)),
            outcome="as documented per policy",
        )


@pytest.mark.timeout(60)
async def test_colluding_majority_with_unservable_lie_fails_clearly(tmp_path, adv_model, error_log):
    """Two liars announce a manifest with wrong piece hashes and serve the honest bytes (which do
    not match it); one honest node. ``open`` takes the lie (two votes to one), bans both liars
    on their first piece, and fails with VerificationFailed; pinned to the honest hash, the same
    swarm delivers the honest model."""
    src, m, pieces = adv_model
    lm = lie(m, "wrong hashes")
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        liars = []
        for k in range(2):
            p = HostilePeer(
                tmp_path, f"liar{k}", manifest=lm, pieces=pieces, pieces_mode="honest", bootstrap=boot
            )
            await stack.enter_async_context(p.running())
            liars.append(p)
        front = await start_node(stack, tmp_path, "front", bootstrap=boot, stall_timeout=3.0)
        t0 = trio.current_time()
        with (
            FinalPathWatcher(front.config.cache_dir, [lm]) as watch,
            trio.fail_after(40),
            pytest.raises(VerificationFailed) as ei,
        ):
            await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        elapsed = trio.current_time() - t0
        watch.assert_clean()
        assert "banned" in str(ei.value)
        snaps = list(Path(front.config.cache_dir).rglob("snapshots/*"))
        assert not snaps, snaps
        with trio.fail_after(30):
            snap = await front.fetch(
                FetchRequest(MODEL, cache_dir=front.config.cache_dir), manifest_hash=m.manifest_hash
            )
        assert snap.name == m.revision
        assert_honest_alive([honest, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: 2 colluding liars (wrong hashes, unservable) vs 1 honest, open",
            open=f"VerificationFailed after {elapsed:.1f} s (stall_timeout 3 s)",
            pinned="honest",
            bad_files_at_final_path=len(watch.violations),
            outcome="clear error, then pinned fetch complete",
        )


@pytest.mark.timeout(60)
async def test_only_bad_manifests_fail_clearly(tmp_path, adv_model, error_log):
    _src, m, _pieces = adv_model
    bad = malformed_manifests(m)
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")
        boot = tuple(anchor.host.addrs[:1])
        liar = HostilePeer(
            tmp_path,
            "malformed",
            bootstrap=boot,
            announce=[model_key(MODEL)],
            manifest_replies=[(b, b"") for b in bad.values()],
        )
        await stack.enter_async_context(liar.running())
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        with trio.fail_after(30), pytest.raises(ModelNotFound) as ei:
            await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        assert "none gave a usable manifest" in str(ei.value) and "bad manifest" in str(ei.value)
        assert front.shared == {}
        assert_honest_alive([anchor, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: only malformed manifests",
            bad_manifests_offered=len(bad),
            error=str(ei.value)[:100],
            outcome="ModelNotFound",
        )


@pytest.mark.timeout(90)
async def test_manifest_flood(tmp_path, adv_model, error_log):
    """A peer answers every manifest request with 16 replies of 4 MiB of garbage each (64 MiB per
    request, over the MAX_MANIFEST_REPLY_BYTES = 32 MiB a reply may carry: the asker drops it as a
    protocol error once it holds more). The fetch still takes the honest manifest; the peak of
    Python allocations of the whole process (flooder included) is measured (docs/reliability.md)."""
    src, m, _pieces = adv_model
    junk = [(b"SWMF\x01" + bytes(4 << 20), b"") for _ in range(16)]
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        flood = HostilePeer(
            tmp_path, "flood", bootstrap=boot, announce=[model_key(MODEL)], manifest_replies=junk
        )
        await stack.enter_async_context(flood.running())
        front = await start_node(stack, tmp_path, "front", bootstrap=boot)
        t0 = trio.current_time()
        tracemalloc.start()
        try:
            with trio.fail_after(60):
                snap = await front.fetch(
                    FetchRequest(MODEL, configs_only=True, cache_dir=front.config.cache_dir)
                )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        elapsed = trio.current_time() - t0
        assert snap.name == m.revision
        assert flood.stats["manifest_requests"] >= 1
        assert_honest_alive([honest, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "manifests: 16 x 4 MiB garbage replies per request",
            fetch_s=round(elapsed, 2),
            python_heap_peak_mib=round(peak / (1 << 20)),
            junk_bytes_per_request=16 * (4 << 20),
            outcome="complete",
        )
