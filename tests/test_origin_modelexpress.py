"""Origin once with ModelExpress as the origin (issue #14 item 1; docs/protocol.md "Origin once"):
nodes in one process over real libp2p on 127.0.0.1 and the loopback fake ModelExpress server
(tests/fake_modelexpress.py, which plays the 0.7 server). A cold crowd gets the model from
ModelExpress about once in total; a puller that dies is replaced by its backup, which takes over the
files it had copied completely (ModelExpress cannot resume inside a file)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import trio
from fake_modelexpress import FakeModelExpress
from modelgen import make_model_dir
from test_origin import COMMIT, REPO, Crowd, assert_same_weights, clean_env, slow_election  # noqa: F401

from swarm.node import Node
from swarm.sources import FetchRequest, SourceEnv

WEIGHTS3 = tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def mx_request(node: Node, mx: FakeModelExpress) -> FetchRequest:
    # The Hub is off: every byte has to come from ModelExpress or from a peer.
    return FetchRequest(
        REPO,
        cache_dir=node.config.cache_dir,
        timeout=60.0,
        env=SourceEnv(modelexpress_url=mx.url, hub_offline=True),
    )


def model_bytes(served: Path) -> int:
    return sum(f.stat().st_size for f in served.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("mx-origin"), weights_bytes=8 << 20, n_weight_files=2, seed=7
    )


@pytest.fixture(scope="module")
def served3(tmp_path_factory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("mx-origin-3"), weights_bytes=48 << 20, n_weight_files=3, seed=8
    )


@pytest.mark.timeout(150)
async def test_cold_crowd_gets_the_model_from_modelexpress_once(tmp_path, served):
    with FakeModelExpress() as mx:
        mx.add_model(REPO, served, COMMIT)
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(4)
            done = trio.Event()
            with trio.fail_after(110):
                crowd.fetch_all(None, done, lambda node: mx_request(node, mx))
                await done.wait()
            n.cancel_scope.cancel()
        for i, r in crowd.results.items():
            assert not isinstance(r, BaseException), f"node {i}: {r!r}"
            assert_same_weights(served, r.path)
            skipped = {a.source: a for a in r.attempts}["modelexpress"]
            assert skipped.outcome == "skipped" and "origin once" in skipped.reason, r.attempts
        assert len(crowd.pulls) == 1, crowd.pulls
        files = sorted(str(f.relative_to(served)) for f in served.rglob("*") if f.is_file())
        assert sorted(mx.streamed) == files  # every file streamed once, no more
        assert mx.bytes_served == model_bytes(served)
        assert mx.calls["StreamModelFiles"] == 1, mx.calls
        assert sorted(r.source for r in crowd.results.values()) == ["swarm"] * 4


@pytest.mark.timeout(60)
async def test_a_lone_node_pulls_from_modelexpress_itself(tmp_path, served):
    # No fellow fetcher: the election names this node at once and it pulls (in-process timing of
    # this path, docs/protocol.md: ~0.5 s more than the plain ModelExpress step, as for the Hub).
    with FakeModelExpress() as mx:
        mx.add_model(REPO, served, COMMIT)
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(1)
            done = trio.Event()
            with trio.fail_after(40):
                crowd.fetch_all(None, done, lambda node: mx_request(node, mx))
                await done.wait()
            n.cancel_scope.cancel()
        r = crowd.results[0]
        assert not isinstance(r, BaseException), repr(r)
        assert_same_weights(served, r.path)
        assert crowd.pulls == [0]
        assert mx.bytes_served == model_bytes(served)


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("slow_election")
async def test_dead_modelexpress_puller_is_replaced(tmp_path, served3):
    served = served3
    size = sum((served / w).stat().st_size for w in WEIGHTS3)
    total = model_bytes(served)
    with FakeModelExpress() as mx:
        mx.add_model(REPO, served, COMMIT)
        mx.rate = size / 4  # ~4 s for the model: time to kill the puller midway
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(3)
            done = trio.Event()
            with trio.fail_after(110):
                crowd.fetch_all(None, done, lambda node: mx_request(node, mx))
                while not crowd.pulls or mx.bytes_served < 0.45 * size:
                    await trio.sleep(0.02)
                victim = crowd.pulls[0]
                crowd.kill(victim)
                await done.wait()
            n.cancel_scope.cancel()
        alive = [i for i in range(3) if i != victim]
        for i in alive:
            r = crowd.results[i]
            assert not isinstance(r, BaseException), f"node {i}: {r!r}"
            for w in WEIGHTS3:
                assert filecmp.cmp(served / w, r.path / w, shallow=False), w
        assert crowd.pulls[0] == victim and set(crowd.pulls[1:]) & set(alive), crowd.pulls
        # The replacement was the dead puller's backup: the first shard, complete in its copy, was
        # not streamed again; the shard in progress was (a stream cannot start inside a file).
        assert mx.streamed.count(WEIGHTS3[0]) == 1, mx.streamed
        # Without the copy: the whole model again on top of the 45% (or more) the dead one had.
        assert mx.bytes_served < total + 0.35 * size, (mx.bytes_served / total, mx.streamed)


# -- the puller's download itself (swarm/modelexpress/pull.py), without nodes --


def _pull(mx: FakeModelExpress, cache: Path, **kw) -> Path:
    import threading

    from swarm.modelexpress.client import ModelExpressClient
    from swarm.modelexpress.pull import pull_snapshot

    with ModelExpressClient(mx.url, timeout=30) as client:
        return pull_snapshot(client, REPO, cache, threading.Event(), **kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("take_copies", [True, False])
def test_pull_takes_complete_copies_and_streams_the_rest(tmp_path, served3, take_copies):
    from swarm.hubpull import PARTIAL_SUFFIX
    from swarm.modelexpress.pull import blob_name
    from swarm.store.layout import RepoLayout

    cache = tmp_path / "cache"
    blobs = RepoLayout.of(cache, REPO).blobs
    blobs.mkdir(parents=True)
    w1, w2, _w3 = WEIGHTS3
    for w, part in ((w1, 1.0), (w2, 0.5)):  # what a backup copied of a puller that died
        data = (served3 / w).read_bytes()
        name = blob_name(COMMIT, w, len(data))
        (blobs / (name + PARTIAL_SUFFIX)).write_bytes(data[: int(len(data) * part)])
    with FakeModelExpress() as mx:
        mx.add_model(REPO, served3, COMMIT)
        snap = _pull(mx, cache, take_copies=take_copies)
        streamed = list(mx.streamed)
    assert snap == RepoLayout.of(cache, REPO).snapshot(COMMIT)
    for f in served3.rglob("*"):
        if f.is_file():
            rel = str(f.relative_to(served3))
            assert (snap / rel).read_bytes() == f.read_bytes(), rel
    assert (w1 in streamed) is not take_copies, streamed  # complete copy: taken (open policy only)
    assert w2 in streamed  # half a file is no resume point: ModelExpress streams whole files
    assert not list(blobs.glob("*" + PARTIAL_SUFFIX))
    assert (cache / RepoLayout.of(cache, REPO).root.name / "refs" / "main").read_text() == COMMIT


@pytest.mark.timeout(60)
def test_pull_refuses_what_modelexpress_gets_wrong(tmp_path, served):
    from swarm.modelexpress.client import ModelExpressProtocolError, ModelExpressUnsupported

    with FakeModelExpress() as mx:
        mx.add_model(REPO, served, COMMIT)
        mx.evil_path = "../../escape"
        with pytest.raises(ModelExpressProtocolError, match="unsafe"):
            _pull(mx, tmp_path / "a")
        mx.evil_path = None
        mx.pre_revisions = True  # cannot pin: a pinned pull is refused, as by the plain step
        with pytest.raises(ModelExpressUnsupported):
            _pull(mx, tmp_path / "b", revision="v1")
    assert not list(tmp_path.rglob("escape"))
