"""Issue #18, findings 4-6: whose signature a node serves, how a tie between manifests is settled,
what a lying manifest may do to the store, and rollback to an old signed release.

- finding 4 (signature laundering): a node that fetched an unsigned manifest served it, after a
  restart, signed with its own key; a frontend trusting that node then took the attacker's content;
- finding 5 (ties): under ``open`` a one-against-one tie went to the larger manifest hash, which a
  liar grinds in a few tries; a lie that won could relink the Hub client's snapshot of a real
  commit, delete or adopt (unhashed) a Hub blob whose name it claimed, and preallocate up to 4 TiB;
- finding 6 (freshness): under ``trusted-publishers`` every release a publisher ever signed stayed
  valid, so relaying an old one rolled nodes back.
"""

from __future__ import annotations

import os
import shutil
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import pytest
import trio
from advkit import ENGINE, MODEL, HostilePeer, assert_honest_alive, read_pieces, record, start_node
from modelgen import make_model_dir

from swarm.manifest import FileEntry, Manifest, build_manifest, piece_size_for
from swarm.node import Node, NodeConfig
from swarm.sources import FetchRequest, ModelNotFound
from swarm.store import DiskFull, SnapshotReader, Store, StoreError
from swarm.testmodel import make_hf_snapshot
from swarm.trust import TrustPolicy, sign_manifest, verify_signature

HUB_REV = "c0ffee" * 6 + "c0de"  # a "real Hub commit"


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Manifest, dict[int, bytes]]:
    """The attacker's content under the honest model's name (another model's files)."""
    root = make_model_dir(
        tmp_path_factory.mktemp("evil-src"), weights_bytes=8 << 20, n_weight_files=2, seed=1234
    )
    m = build_manifest(root, MODEL, "evil")
    return root, m, read_pieces(m, root)


def _node(tmp: Path, name: str, **kw) -> Node:
    kw.setdefault("engine", ENGINE)
    kw.setdefault("lookup_timeout", 3.0)
    kw.setdefault("cache_dir", tmp / name / "cache")
    kw.setdefault("serve_hf_cache", False)
    return Node(NodeConfig(home=tmp / name / "home", **kw))


def _links(snap: Path) -> dict[str, str]:
    return {p.relative_to(snap).as_posix(): os.readlink(p) for p in snap.rglob("*") if p.is_symlink()}


# --------------------------------------------------------------------------- finding 4


@pytest.mark.timeout(90)
async def test_fetched_unsigned_manifest_is_never_signed_after_restart(tmp_path, evil, error_log):
    """A relay under ``open`` fetches the attacker's unsigned manifest, restarts (serving its HF
    cache), and must still serve it unsigned: a frontend trusting only the relay refuses it. A
    node with another home sharing that cache (no provenance record) serves it unsigned too. A
    snapshot the Hub client made in the relay's cache is the relay's to sign (it hashed it)."""
    _esrc, em, epieces = evil
    cache = tmp_path / "relay" / "cache"
    hub_snap = make_hf_snapshot(cache, "acme/from-the-hub", HUB_REV, weights_bytes=1 << 20, n_weight_files=1)
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")
        boot = tuple(anchor.host.addrs[:1])
        attacker = HostilePeer(tmp_path, "attacker", manifest=em, pieces=epieces, bootstrap=boot)
        await stack.enter_async_context(attacker.running())
        relay = _node(tmp_path, "relay", bootstrap=boot)
        async with relay.running():
            with trio.fail_after(30):
                snap = await relay.fetch(FetchRequest(MODEL, cache_dir=cache))
            assert snap.name == em.revision
            assert relay.shared[em.manifest_hash].signature == b""
        relay_id = relay.peer_id

        restarted = _node(tmp_path, "relay", bootstrap=boot, serve_hf_cache=True)
        await stack.enter_async_context(restarted.running())
        assert restarted.peer_id == relay_id
        front = await start_node(
            stack,
            tmp_path,
            "front",
            bootstrap=boot,
            trust=TrustPolicy("trusted-publishers", frozenset({relay_id})),
        )
        with trio.fail_after(30), pytest.raises(ModelNotFound) as ei:
            await front.fetch(FetchRequest(MODEL, cache_dir=front.config.cache_dir))
        assert not list(Path(front.config.cache_dir).rglob("snapshots/*"))
        served = restarted.shared[em.manifest_hash]
        assert served.signature == b"" and served.origin == "fetched"

        # Same cache, another home: the snapshot is swarm-made, its provenance unknown here.
        other = _node(tmp_path, "other", cache_dir=cache, bootstrap=boot, serve_hf_cache=True)
        await stack.enter_async_context(other.running())
        assert other.shared[em.manifest_hash].signature == b""
        assert other.shared[em.manifest_hash].origin == "unknown"

        # What "built itself" means for the HF cache: the Hub client's snapshot, hashed here.
        (hub_h,) = [h for h, sh in restarted.shared.items() if sh.path == hub_snap]
        assert verify_signature(restarted.shared[hub_h].signature, hub_h) == relay_id
        assert_honest_alive([anchor, restarted, front, other])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "finding 4: unsigned manifest fetched by a relay, relay restarted",
            relay_serves="unsigned",
            frontend_trusting_relay=str(ei.value)[:90],
            other_home_same_cache="unsigned",
            hub_client_snapshot="signed by the relay",
        )


# --------------------------------------------------------------------------- finding 5


def _ground_lie(m: Manifest, evil_m: Manifest) -> tuple[Manifest, int]:
    """The attacker's manifest, re-labelled until its hash is larger than the honest one's (the
    old tie-break); returns it and the number of tries."""
    for tries in range(1, 1000):
        lm = attrs.evolve(evil_m, revision=f"grind-{tries}")
        if lm.manifest_hash > m.manifest_hash:
            return lm, tries
    raise AssertionError("no luck in 1000 tries")


@pytest.mark.timeout(120)
async def test_a_tie_never_goes_to_a_ground_hash(tmp_path, adv_model, evil, error_log):
    """One honest node (it signs what it serves) against one liar whose manifest hash was ground
    larger, one vote each. Liar self-signed: no majority, no manifest taken (ModelNotFound naming
    both, so the chain goes on to the Hub). Liar unsigned: the signed manifest is taken. Then the
    liar self-signs again: a node that holds the honest manifest keeps it."""
    src, m, _pieces = adv_model
    esrc, em, _ = evil
    lm, tries = _ground_lie(m, em)
    lpieces = read_pieces(lm, esrc)
    async with AsyncExitStack() as stack:
        honest = await start_node(stack, tmp_path, "honest", serve=((MODEL, src),))
        boot = tuple(honest.host.addrs[:1])
        liar = HostilePeer(tmp_path, "grinder", manifest=lm, pieces=lpieces, bootstrap=boot)
        signed_lie = [(lm.encode(), sign_manifest(liar.keypair, lm.manifest_hash))]
        liar.manifest_replies = signed_lie
        await stack.enter_async_context(liar.running())

        f_tie = await start_node(stack, tmp_path, "f-tie", bootstrap=boot)
        with trio.fail_after(30), pytest.raises(ModelNotFound, match="no majority") as ei:
            await f_tie.fetch(FetchRequest(MODEL, cache_dir=f_tie.config.cache_dir))
        assert m.hash_str[:20] in str(ei.value) and lm.hash_str[:20] in str(ei.value)
        assert not list(Path(f_tie.config.cache_dir).rglob("snapshots/*"))
        assert not list(Path(f_tie.config.cache_dir).rglob("refs/*"))

        liar.manifest_replies = [(lm.encode(), b"")]
        f_held = await start_node(stack, tmp_path, "f-held", bootstrap=boot)
        with trio.fail_after(30):
            snap = await f_held.fetch(FetchRequest(MODEL, cache_dir=f_held.config.cache_dir))
        assert snap.name == m.revision, "the unsigned, ground manifest won the tie"

        liar.manifest_replies = signed_lie
        with trio.fail_after(30):
            snap = await f_held.fetch(FetchRequest(MODEL, cache_dir=f_held.config.cache_dir))
        assert snap.name == m.revision
        assert set(f_held.shared) == {m.manifest_hash}
        assert_honest_alive([honest, f_tie, f_held])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "finding 5: one honest vs one liar with a ground hash, open",
            grind_tries=tries,
            self_signed_liar="ModelNotFound (no majority)",
            unsigned_liar="honest taken",
            node_holding_honest="keeps honest",
        )


def _fill(dl, pieces: dict[int, bytes]) -> None:
    for i in sorted(dl.missing):
        dl.write_piece(i, pieces[i])


@pytest.mark.parametrize("lie", ["relink", "delete", "adopt"])
def test_lie_naming_a_hub_commit_leaves_its_snapshot_and_blobs_alone(tmp_path, evil, lie):
    """The Hub client's snapshot of a real commit is in the cache. A lie that won the vote must
    not: relink files of that commit (a manifest with the commit as its revision), delete a Hub
    blob whose sha256 name a manifest claims as a blake3 with another size, or adopt it unhashed
    with the same size (then link it under a digest it does not have)."""
    esrc, em, _ = evil
    cache = tmp_path / "cache"
    hub = make_hf_snapshot(cache, MODEL, HUB_REV, weights_bytes=4 << 20, n_weight_files=1)
    before = _links(hub)
    weight = next(p for p in before if p.endswith(".safetensors"))
    blob = (hub / weight).resolve()
    blob_bytes = blob.read_bytes()
    store = Store(cache)
    if lie == "relink":  # the Hub's commit as revision, the attacker's files
        lm = attrs.evolve(em, revision=HUB_REV)
    else:  # a file claiming the Hub blob's sha256 name as its blake3
        size = len(blob_bytes) + (1 if lie == "delete" else 0)
        ps = piece_size_for(size)
        lm = Manifest(
            MODEL, lie, (FileEntry(weight, size, "blake3:" + blob.name, ps, (bytes(32),) * -(-size // ps)),)
        )
    try:
        with store.open_download(lm) as dl:
            if lie == "relink":
                with SnapshotReader(esrc, lm) as r:
                    _fill(dl, {p.index: r.read_piece(p.index) for p in lm.pieces})
            if dl.complete:
                dl.finalize()
        outcome = "went ahead"
    except StoreError as e:
        outcome = f"refused: {type(e).__name__}"
    assert _links(hub) == before, "the Hub's snapshot was relinked"
    assert blob.is_file(), "the Hub blob was deleted"
    assert blob.read_bytes() == blob_bytes
    assert not (hub.parent / lie).exists(), "a snapshot links the Hub blob under a wrong digest"
    record(f"finding 5: a lie naming a Hub commit / blob ({lie})", outcome=outcome)


def test_manifest_larger_than_free_space_is_refused_before_preallocation(tmp_path):
    """A (winning) manifest naming a file larger than the free space: refused at open with
    DiskFull, before any byte is reserved (it was preallocated, or created sparse, at the first
    piece)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    vfs = os.statvfs(cache)
    free = vfs.f_bavail * vfs.f_frsize
    size = min(free + (1 << 30), 4 << 40)
    if size <= free:
        pytest.skip(f"{free} bytes free: more than a manifest may hold")
    ps = 64 << 20
    fe = FileEntry("model.safetensors", size, "blake3:" + "ab" * 32, ps, (bytes(32),) * -(-size // ps))
    huge = Manifest(MODEL, "huge", (fe,))
    store = Store(cache)
    with pytest.raises(DiskFull, match="free") as ei:
        dl = store.open_download(huge)
        dl.close()
    assert not list(cache.rglob("*.incomplete"))
    record(
        "finding 5: manifest larger than the free space",
        manifest_bytes=size,
        free_bytes=free,
        outcome=str(ei.value)[:80],
    )


# --------------------------------------------------------------------------- finding 6


@pytest.mark.timeout(120)
async def test_old_signed_release_cannot_roll_a_node_back(tmp_path, adv_model, error_log):
    """A publisher serves release A, then (restarted, the directory changed) release B. A frontend
    trusting it fetches A, then B. The publisher goes away; a relay answers with release A and
    the publisher's genuine record of it. The frontend (restarted too: the floor is persisted)
    refuses it. A fresh frontend offered both A and B takes B, the newer."""
    src, _m, _pieces = adv_model
    dir_b = tmp_path / "release-b"
    shutil.copytree(src, dir_b)
    (dir_b / "config.json").write_text('{"release": "B"}\n')
    configs = dict(configs_only=True)
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")
        boot = tuple(anchor.host.addrs[:1])
        async with AsyncExitStack() as s:  # release A
            pub = await start_node(s, tmp_path, "publisher", serve=((MODEL, src),), bootstrap=boot)
            (ma,) = [sh.manifest for sh in pub.shared.values()]
            record_a = pub.shared[ma.manifest_hash].signature
            trust = TrustPolicy("trusted-publishers", frozenset({pub.peer_id}))
            front = await start_node(s, tmp_path, "front", bootstrap=boot, trust=trust)
            with trio.fail_after(30):
                snap = await front.fetch(FetchRequest(MODEL, **configs, cache_dir=front.config.cache_dir))
            assert snap.name == ma.revision
        async with AsyncExitStack() as s:  # release B: the publisher restarted, directory changed
            pub = await start_node(s, tmp_path, "publisher", serve=((MODEL, dir_b),), bootstrap=boot)
            (mb,) = [sh.manifest for sh in pub.shared.values()]
            front = await start_node(s, tmp_path, "front", bootstrap=boot, trust=trust)
            with trio.fail_after(30):
                snap = await front.fetch(FetchRequest(MODEL, **configs, cache_dir=front.config.cache_dir))
            assert snap.name == mb.revision
            # Offered both (the publisher with B, a relay with A): the newer release wins.
            relay = HostilePeer(
                tmp_path,
                "relay",
                bootstrap=boot,
                announce=_model_keys(),
                manifest_replies=[(ma.encode(), record_a)],
            )
            await s.enter_async_context(relay.running())
            fresh = await start_node(s, tmp_path, "fresh", bootstrap=boot, trust=trust)
            with trio.fail_after(30):
                snap = await fresh.fetch(FetchRequest(MODEL, **configs, cache_dir=fresh.config.cache_dir))
            assert snap.name == mb.revision, "an older release beat the newer one"
            assert relay.stats["manifest_requests"] >= 1
        # The publisher is gone; a relay answers with release A and its genuine record. The
        # frontend, restarted again, remembers it saw B.
        relay2 = HostilePeer(
            tmp_path,
            "relay2",
            bootstrap=boot,
            announce=_model_keys(),
            manifest_replies=[(ma.encode(), record_a)],
        )
        await stack.enter_async_context(relay2.running())
        front = await start_node(stack, tmp_path, "front", bootstrap=boot, trust=trust)
        with trio.fail_after(30), pytest.raises(ModelNotFound, match="older") as ei:
            await front.fetch(FetchRequest(MODEL, **configs, cache_dir=front.config.cache_dir))
        assert relay2.stats["manifest_requests"] >= 1
        assert_honest_alive([anchor, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "finding 6: old signed release relayed after a newer one",
            fresh_node="newer (B)",
            node_that_saw_B=str(ei.value)[:100],
        )


def _model_keys() -> list[bytes]:
    from swarm.net.host import model_key

    return [model_key(MODEL)]


@pytest.mark.timeout(90)
async def test_expired_release_is_refused_by_name_but_not_when_pinned(tmp_path, adv_model, error_log):
    """A relay offers the publisher's genuine manifest with a genuine record that has expired (the
    publisher is gone): refused by name under ``trusted-publishers``; a fetch pinned to its hash
    still takes it (the hash is the authority)."""
    import time

    from swarm.trust import EXPIRY_GRACE, sign_release  # new with release records

    src, m, pieces = adv_model
    async with AsyncExitStack() as stack:
        anchor = await start_node(stack, tmp_path, "anchor")
        boot = tuple(anchor.host.addrs[:1])
        async with AsyncExitStack() as s:  # the publisher, to get its key and peer id
            pub = await start_node(s, tmp_path, "publisher", serve=((MODEL, src),), bootstrap=boot)
            key, pub_id = pub.keypair, pub.peer_id
        old = sign_release(key, m.manifest_hash, 7, int(time.time()) - EXPIRY_GRACE - 60)
        relay = HostilePeer(
            tmp_path, "relay", manifest=m, pieces=pieces, bootstrap=boot, manifest_replies=[(m.encode(), old)]
        )
        await stack.enter_async_context(relay.running())
        trust = TrustPolicy("trusted-publishers", frozenset({pub_id}))
        front = await start_node(stack, tmp_path, "front", bootstrap=boot, trust=trust)
        req = FetchRequest(MODEL, configs_only=True, cache_dir=front.config.cache_dir)
        with trio.fail_after(30), pytest.raises(ModelNotFound, match="expired") as ei:
            await front.fetch(req)
        with trio.fail_after(30):
            snap = await front.fetch(req, manifest_hash=m.manifest_hash)
        assert snap.name == m.revision
        assert_honest_alive([anchor, front])
        assert not error_log, [r.getMessage() for r in error_log]
        record("finding 6: expired genuine release relayed", by_name=str(ei.value)[:90], pinned="taken")
