"""Origin once (swarm/origin.py, docs/protocol.md "Origin once"): nodes in one process over real
libp2p on 127.0.0.1 and the loopback fake Hub. A cold flash crowd pulls each file from the origin
once; a dead or stalled puller is replaced; bytes that do not match the Hub's listing are refused
before anyone serves them."""

from __future__ import annotations

import filecmp
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from fakehub import FakeHub
from modelgen import make_model_dir

from swarm import origin
from swarm.engine import EngineConfig
from swarm.net.host import NetError
from swarm.node import Node, NodeConfig
from swarm.origin import ORIGIN_PROTOCOL, OriginState, distance, origin_key
from swarm.sources import FetchRequest, SourceEnv, VerificationFailed, from_hub

REPO = "test-org/origin-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ENGINE = EngineConfig(tick=0.05, rechoke_interval=0.25)
WEIGHTS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("origin"), weights_bytes=8 << 20, n_weight_files=2, seed=5)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No Hub settings from the environment; huggingface_hub's constants restored afterwards."""
    from huggingface_hub import constants

    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE)
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "MODEL_EXPRESS_URL",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE = saved


def weights_size(served: Path) -> int:
    return sum((served / w).stat().st_size for w in WEIGHTS)


def request(node: Node, hub: FakeHub) -> FetchRequest:
    return FetchRequest(
        REPO, cache_dir=node.config.cache_dir, timeout=60.0, env=SourceEnv(hf_endpoint=hub.url)
    )


class Crowd:
    """Nodes that each run in their own cancel scope, so a test can kill one mid-fetch."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp_path, self.nursery = tmp_path, nursery
        self.nodes: list[Node] = []
        self.scopes: list[list[trio.CancelScope]] = []  # per node: its host's, its fetch's
        self.results: dict[int, object] = {}
        self.pulls: list[int] = []  # node indices, in the order they started an origin pull

    async def start(self, n: int) -> None:
        for i in range(n):
            boot = tuple(self.nodes[0].host.addrs[:1]) if self.nodes else ()
            node = Node(
                NodeConfig(
                    home=self.tmp_path / f"n{i}" / "home",
                    cache_dir=self.tmp_path / f"n{i}" / "cache",
                    serve_hf_cache=True,
                    engine=ENGINE,
                    lookup_timeout=3.0,
                    bootstrap=boot,
                )
            )
            self.nodes.append(node)
            scope = trio.CancelScope()
            self.scopes.append([scope])
            started = trio.Event()
            self.nursery.start_soon(self._run, node, scope, started)
            await started.wait()

    async def _run(self, node: Node, scope: trio.CancelScope, started: trio.Event) -> None:
        with scope:
            async with node.running():
                started.set()
                await trio.sleep_forever()

    def kill(self, i: int) -> None:
        """Stop node ``i`` at once: its fetch and its host (connections close, queries fail)."""
        for scope in self.scopes[i]:
            scope.cancel()

    def fetch_all(self, hub: FakeHub | None, done: trio.Event, make_request=None) -> None:
        """Every node fetches at once (``make_request(node)``, default: from ``hub``)."""
        make_request = make_request or (lambda node: request(node, hub))
        left = [len(self.nodes)]

        async def one(i: int, node: Node) -> None:
            def on_event(e: dict) -> None:
                if e.get("event") == "origin_pull":
                    self.pulls.append(i)

            scope = trio.CancelScope()
            self.scopes[i].append(scope)
            with scope:
                try:
                    self.results[i] = await node.fetch_with_fallback(make_request(node), on_event=on_event)
                except Exception as e:  # kept for the test to look at
                    self.results[i] = e
            left[0] -= 1
            if not left[0]:
                done.set()

        for i, node in enumerate(self.nodes):
            self.nursery.start_soon(one, i, node)


def assert_same_weights(served: Path, snap: Path) -> None:
    for w in WEIGHTS:
        assert filecmp.cmp(served / w, snap / w, shallow=False), w


@pytest.mark.timeout(150)
async def test_cold_crowd_pulls_each_file_from_the_origin_once(tmp_path, served):
    with FakeHub() as hub:
        hub.add_repo(REPO, served, COMMIT)
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(4)
            done = trio.Event()
            with trio.fail_after(110):  # a follower is at times slow (~60 s; issue #14, open)
                crowd.fetch_all(hub, done)
                await done.wait()
            n.cancel_scope.cancel()
        for i, r in crowd.results.items():
            assert not isinstance(r, BaseException), f"node {i}: {r!r}"
            assert_same_weights(served, r.path)
        assert len(crowd.pulls) == 1, crowd.pulls
        got = hub.downloaded_files()
        for w in WEIGHTS:
            assert got.count(w) == 1, got
        total = sum(f.stat().st_size for f in served.rglob("*") if f.is_file())
        assert hub.bytes_served == total  # every file once, no more
        sources = sorted(r.source for r in crowd.results.values())
        assert sources == ["swarm"] * 4  # the origin step runs inside the swarm step


async def _kill_when(crowd: Crowd, hub: FakeHub, fraction: float, model_bytes: int) -> int:
    """Cancel the first puller once the hub has served ``fraction`` of the weights; its index."""
    while not crowd.pulls or hub.bytes_served < fraction * model_bytes:
        await trio.sleep(0.02)
    victim = crowd.pulls[0]
    crowd.kill(victim)
    return victim


@pytest.fixture(scope="module")
def served_big(tmp_path_factory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("origin-big"), weights_bytes=32 << 20, n_weight_files=2, seed=6
    )


@pytest.fixture
def slow_election(monkeypatch):
    """A longer settle before the election: these tests are about replacing the puller, and one
    process running every node on a loaded machine spreads provider records slowly."""
    monkeypatch.setattr(origin, "ELECTION_SETTLE", 1.5)


@pytest.mark.timeout(150)
async def test_dead_puller_is_replaced(tmp_path, served_big, slow_election):
    served = served_big
    size = weights_size(served)
    total = sum(f.stat().st_size for f in served.rglob("*") if f.is_file())
    with FakeHub(rate=size / 4) as hub:  # ~4 s for the model: time to kill the puller midway
        hub.add_repo(REPO, served, COMMIT)
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(3)
            done = trio.Event()
            with trio.fail_after(110):  # a follower is at times slow (~60 s; issue #14, open)
                crowd.fetch_all(hub, done)
                victim = await _kill_when(crowd, hub, 0.5, size)
                await done.wait()
            n.cancel_scope.cancel()
        alive = [i for i in range(3) if i != victim]
        for i in alive:
            r = crowd.results[i]
            assert not isinstance(r, BaseException), f"node {i}: {r!r}"
            assert_same_weights(served, r.path)
        assert crowd.pulls[0] == victim and set(crowd.pulls[1:]) & set(alive), crowd.pulls
        # The replacement was the dead puller's backup: it resumed from its copy of the partial
        # files (HTTP Range) instead of pulling all again (1.5 x the weights without the copy).
        ranged = [r for r in hub.requests if r.range]
        assert ranged, "the replacement did not resume"
        # Without the copy: the whole model again on top of the half (or more) the dead one had.
        # With it: only what the copy lagged behind (~1 s of pull here, every node in one busy
        # process) plus what sat in the dead connection's socket buffers.
        assert hub.bytes_served < total + 0.45 * size, (
            hub.bytes_served / total,
            crowd.pulls,
            [
                (r.path[-40:], r.range)
                for r in hub.requests
                if r.method == "GET" and "resolve" in r.path and "model-" in r.path
            ],
        )


@pytest.mark.timeout(150)
async def test_stalled_puller_is_replaced(tmp_path, served, slow_election):
    # The first download to pass 1 MiB hangs (its connection stays open, nothing more comes):
    # the puller is alive and answers queries but its progress stops. Without replacement the
    # others would wait on it; with it, a second node pulls and everyone but the stalled puller
    # finishes (the test ends without waiting for that one).
    with FakeHub(hang_after=1 << 20) as hub:
        hub.add_repo(REPO, served, COMMIT)
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(3)
            never = trio.Event()
            crowd.fetch_all(hub, never)
            with trio.fail_after(110):  # a follower is at times slow (~60 s; issue #14, open)
                while len(crowd.results) < 2 or any(
                    i not in crowd.results for i in range(3) if crowd.pulls[:1] != [i]
                ):
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
        stalled = crowd.pulls[0]
        assert len(crowd.pulls) >= 2 and crowd.pulls[1] != stalled, crowd.pulls
        for i in range(3):
            if i != stalled:
                r = crowd.results[i]
                assert not isinstance(r, BaseException), f"node {i}: {r!r}"
                assert_same_weights(served, r.path)


@pytest.mark.timeout(150)
async def test_lying_origin_is_refused_before_anyone_serves_it(tmp_path, served):
    with FakeHub() as hub:
        hub.add_repo(REPO, served, COMMIT)
        hub.corrupt(REPO, WEIGHTS[1])  # LFS file: its sha256 (lfs.oid, X-Linked-Etag) stays true
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(3)
            done = trio.Event()
            with trio.fail_after(110):  # a follower is at times slow (~60 s; issue #14, open)
                crowd.fetch_all(hub, done)
                await done.wait()
            for node in crowd.nodes:
                assert not node.shared, "a node serves bytes that failed the Hub's sha256"
            n.cancel_scope.cancel()
        for i, r in crowd.results.items():
            assert isinstance(r, VerificationFailed), f"node {i}: {r!r}"
            assert "sha256" in str(r) and WEIGHTS[1] in str(r)
        for node in crowd.nodes:  # the bad file is gone from every cache
            snap = node.config.cache_dir / f"models--{REPO.replace('/', '--')}" / "snapshots"
            left = [p for p in snap.rglob(WEIGHTS[1])]
            assert not left, left


@pytest.mark.timeout(150)
async def test_origin_sending_more_than_its_listed_size_is_refused(tmp_path, served):
    # The origin sends one byte more of a weight file than its own listing says (hashes and
    # listed size true): each puller refuses it as it arrives, nobody serves it, no node keeps it.
    with FakeHub() as hub:
        hub.add_repo(REPO, served, COMMIT)
        hub.pad(REPO, WEIGHTS[0])
        async with trio.open_nursery() as n:
            crowd = Crowd(tmp_path, n)
            await crowd.start(3)
            done = trio.Event()
            with trio.fail_after(110):
                crowd.fetch_all(hub, done)
                await done.wait()
            for node in crowd.nodes:
                assert not node.shared, "a node serves bytes that do not match the Hub's size"
            n.cancel_scope.cancel()
        for i, r in crowd.results.items():
            assert isinstance(r, Exception), f"node {i}: {r!r}"
        for node in crowd.nodes:
            snap = node.config.cache_dir / f"models--{REPO.replace('/', '--')}" / "snapshots"
            left = [p for p in snap.rglob(WEIGHTS[0])]
            assert not left, left


async def test_non_lfs_file_checked_against_its_git_blob_sha1(tmp_path, served):
    with FakeHub() as hub:
        hub.add_repo(REPO, served, COMMIT)
        hub.corrupt(REPO, "config.json")  # not LFS: the tree's oid (git blob sha1) is the check
        req = FetchRequest(
            REPO, cache_dir=tmp_path / "cache", timeout=30.0, env=SourceEnv(hf_endpoint=hub.url)
        )
        with pytest.raises(VerificationFailed, match=r"config\.json: git blob sha1"):
            await from_hub(req)
        assert not (req.repo_dir / "snapshots" / COMMIT / "config.json").exists()


def test_origin_state_decoding_refuses_garbage():
    assert OriginState.decode(OriginState("pulling", 5, "x").encode()) == OriginState("pulling", 5, "x")
    for raw in (
        b"",
        b"[]",
        b'{"state": "lord", "progress": 0, "leader": ""}',
        b'{"state": "waiting", "progress": -1, "leader": ""}',
        b'{"state": "waiting", "progress": true, "leader": ""}',
        b"\xff",
    ):
        with pytest.raises(ValueError):
            OriginState.decode(raw)


def test_election_order_is_the_same_everywhere():
    key = origin_key(REPO, "main")
    assert len(key) == 34 and origin_key(REPO, "v2") != key
    peers = [f"peer{i}" for i in range(8)]
    assert sorted(peers, key=lambda p: distance(p, key)) == sorted(
        reversed(peers), key=lambda p: distance(p, key)
    )


@pytest.mark.timeout(60)
async def test_garbage_origin_query_does_not_hurt_the_host(tmp_path):
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(2):
            boot = tuple(nodes[0].host.addrs[:1]) if nodes else ()
            node = Node(
                NodeConfig(
                    home=tmp_path / f"g{i}" / "home",
                    cache_dir=tmp_path / f"g{i}" / "cache",
                    engine=ENGINE,
                    bootstrap=boot,
                )
            )
            await stack.enter_async_context(node.running())
            nodes.append(node)
        a, b = nodes
        for junk in (b"not json", b'{"key": "zz"}', b"{}", b"x" * 4096):
            try:  # the stream is reset: no reply (or NetError), never a hang
                reply = await a.host.query(b.peer_id, ORIGIN_PROTOCOL, junk, timeout=5)
            except NetError:
                reply = b""
            assert reply == b"", reply
        st = await a.origin.ask(b.peer_id, origin_key(REPO, "main"))
        assert st == OriginState("none")


async def _size_when(path: Path, size: int) -> None:
    while not path.exists() or path.stat().st_size != size:
        await trio.sleep(0.02)


@pytest.mark.timeout(90)
async def test_backup_copy_follows_the_pull_as_it_grows(tmp_path):
    # The backup's copy is one stream the puller feeds as its pull writes (a query per 16 MiB
    # before: on the loaded testbed the copy held 1.6-9.8 MB of ~135 MB when the puller died).
    # A file that grows, is renamed when verified, and a second file all reach the copy; a
    # second backup is refused while the first copies; the stream ends with the pull.
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(2):
            boot = tuple(nodes[0].host.addrs[:1]) if nodes else ()
            node = Node(
                NodeConfig(
                    home=tmp_path / f"m{i}" / "home",
                    cache_dir=tmp_path / f"m{i}" / "cache",
                    engine=ENGINE,
                    bootstrap=boot,
                )
            )
            await stack.enter_async_context(node.running())
            nodes.append(node)
        puller, backup = nodes
        key = origin_key(REPO, "main")
        theirs, ours = tmp_path / "puller-blobs", tmp_path / "backup-blobs"
        theirs.mkdir()
        first, second = "ab" * 32, "cd" * 20  # an LFS sha256 and a git blob sha1
        data = bytes(range(256)) * (24 << 10)  # 6 MiB
        (theirs / (first + origin.PARTIAL_SUFFIX)).write_bytes(data[: 3 << 20])
        pulling = origin._Interest(state="pulling", leader=puller.peer_id, blobs=theirs)
        puller.origin.interests[key] = pulling
        copy = origin._Interest()
        async with trio.open_nursery() as n:
            n.start_soon(backup.origin._mirror, key, puller.peer_id, ours, copy)
            with trio.fail_after(60):
                await _size_when(ours / (first + origin.PARTIAL_SUFFIX), 3 << 20)
                with open(theirs / (first + origin.PARTIAL_SUFFIX), "ab") as fh:
                    fh.write(data[3 << 20 :])
                (theirs / (first + origin.PARTIAL_SUFFIX)).rename(theirs / first)  # verified
                (theirs / (second + origin.PARTIAL_SUFFIX)).write_bytes(data[:1000])
                await _size_when(ours / (first + origin.PARTIAL_SUFFIX), len(data))
                await _size_when(ours / (second + origin.PARTIAL_SUFFIX), 1000)
                # Another backup (views differ on a loaded host) gets no stream of its own.
                other = origin._Interest()
                with pytest.raises(Exception):  # noqa: B017 (closed by the puller: EOF or reset)
                    await backup.origin._mirror_stream(key, puller.peer_id, tmp_path / "other", other)
                assert other.have == 0
            n.cancel_scope.cancel()
        assert (ours / (first + origin.PARTIAL_SUFFIX)).read_bytes() == data
        assert (ours / (second + origin.PARTIAL_SUFFIX)).read_bytes() == data[:1000]
        assert copy.have == len(data) + 1000
        # The backup acknowledged what it wrote: the puller's gate reads it.
        assert pulling.copied == {first: len(data), second: 1000}
        # The puller's side ends with its pull: the stream closes, no task is left serving.
        pulling.state = "seeded"
        with trio.fail_after(30):
            while pulling.mirrors:
                await trio.sleep(0.02)


@pytest.mark.timeout(60)
def test_the_download_waits_for_the_backups_copy_but_not_on_a_stuck_one(monkeypatch):
    # hubpull calls the gate after every chunk: it returns at once while the download is at most
    # MIRROR_MAX_LAG ahead of the backup's acknowledged copy (or no backup copies), waits while
    # the copy moves, and stops waiting on a copy that does not move at all (the followers would
    # drop a puller whose download shows no progress).
    import threading

    monkeypatch.setattr(origin, "MIRROR_GATE_WAIT", 20.0)  # no stop while the copy moves
    it = origin._Interest(state="pulling")
    gate = origin.OriginCoordinator(None, "me")._gate(it)
    stop = threading.Event()
    name = "ab" * 32
    gate(name, 1 << 40, 0, stop)  # no backup copying: no wait
    it.copied = {name: 0}
    gate(name, origin.MIRROR_MAX_LAG, 0, stop)  # within the lag
    gate(name, 1 << 40, (1 << 40) - 1, stop)  # resumed from a copy: only what came since counts
    done = threading.Event()

    def ahead() -> None:
        gate(name, origin.MIRROR_MAX_LAG + (4 << 20), 0, stop)
        done.set()

    t = threading.Thread(target=ahead)
    t.start()
    for step in range(1, 5):  # the copy moves: the download waits for it
        assert not done.wait(0.1)
        it.copied[name] = step << 20
    assert done.wait(10)
    t.join()
    assert not it.gate_off
    monkeypatch.setattr(origin, "MIRROR_GATE_WAIT", 0.3)
    gate(name, 1 << 40, 0, stop)  # the copy stops moving: after MIRROR_GATE_WAIT, no more waiting
    assert it.gate_off
    gate(name, 1 << 41, 0, stop)
