"""Nodes in one process over real libp2p on 127.0.0.1: serve, find through the DHT, fetch."""

import filecmp
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from modelgen import make_model_dir

from swarm.engine import EngineConfig
from swarm.node import Node, NodeConfig
from swarm.node.util import NodeStopped
from swarm.sources import FetchRequest, ModelNotFound

ENGINE = EngineConfig(tick=0.05, rechoke_interval=0.25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("src"), weights_bytes=24 << 20, n_weight_files=2)


def same_tree(src: Path, snap: Path, names) -> None:
    for name in names:
        assert filecmp.cmp(src / name, snap / name, shallow=False), name


async def start(stack, tmp_path, name, **kw):
    node = Node(
        NodeConfig(
            home=tmp_path / name / "home",
            cache_dir=tmp_path / name / "cache",
            serve_hf_cache=False,
            engine=ENGINE,
            lookup_timeout=3.0,
            **kw,
        )
    )
    await stack.enter_async_context(node.running())
    return node


@pytest.mark.timeout(60)
async def test_worker_serves_two_frontends_fetch(tmp_path, model_dir):
    async with AsyncExitStack() as stack:
        worker = await start(stack, tmp_path, "w", serve=(("org/private", model_dir),))
        boot = tuple(worker.host.addrs[:1])
        fronts = [await start(stack, tmp_path, f"f{i}", bootstrap=boot) for i in range(2)]
        paths = {}

        async def fetch(i, node):
            paths[i] = await node.fetch(FetchRequest("org/private", cache_dir=node.config.cache_dir))

        with trio.fail_after(40):
            async with trio.open_nursery() as n:
                for i, f in enumerate(fronts):
                    n.start_soon(fetch, i, f)
        served = worker.shared[next(iter(worker.shared))].manifest
        names = [fe.path for fe in served.files]
        for p in paths.values():
            same_tree(model_dir, p, names)
        st = worker.status()
        assert st["models"][0]["complete"] and st["bytes_up"] > 0
        for f in fronts:
            assert f.status()["models"][0]["complete"]


@pytest.mark.timeout(60)
async def test_configs_only_and_hf_offline_lookup(tmp_path, model_dir):
    from huggingface_hub import snapshot_download

    async with AsyncExitStack() as stack:
        worker = await start(stack, tmp_path, "w", serve=(("org/private", model_dir),))
        front = await start(stack, tmp_path, "f", bootstrap=tuple(worker.host.addrs[:1]))
        with trio.fail_after(30):
            snap = await front.fetch(
                FetchRequest("org/private", configs_only=True, cache_dir=front.config.cache_dir)
            )
        assert (snap / "config.json").is_file()
        assert not list(snap.glob("*.safetensors"))
        found = await trio.to_thread.run_sync(
            lambda: snapshot_download("org/private", cache_dir=front.config.cache_dir, local_files_only=True)
        )
        assert Path(found) == snap


@pytest.mark.timeout(60)
async def test_connected_holder_is_asked_when_the_dht_misses_it(tmp_path, model_dir):
    """The DHT names no provider (the worker's record is gone: as when a busy worker resets a
    flash crowd's GET_PROVIDERS), but the frontend is connected to the worker: the fetch asks the
    peers it is connected to (vote.CONNECTED_FALLBACK) instead of failing with ModelNotFound."""
    from swarm.net.host import model_key

    async with AsyncExitStack() as stack:
        worker = await start(stack, tmp_path, "w", serve=(("org/private", model_dir),))
        worker.host.stop_providing(model_key("org/private"))
        front = await start(stack, tmp_path, "f", bootstrap=tuple(worker.host.addrs[:1]))
        assert worker.host.peer_id in front.host.connected_peers()
        assert not await front.host.find_providers(model_key("org/private"), timeout=2.0)
        with trio.fail_after(40):
            snap = await front.fetch(FetchRequest("org/private", cache_dir=front.config.cache_dir))
        served = worker.shared[next(iter(worker.shared))].manifest
        same_tree(model_dir, snap, [fe.path for fe in served.files])


@pytest.mark.timeout(30)
async def test_no_provider_fails_clearly_within_timeout(tmp_path):
    async with AsyncExitStack() as stack:
        a = await start(stack, tmp_path, "a")
        b = await start(stack, tmp_path, "b", bootstrap=tuple(a.host.addrs[:1]))
        t0 = trio.current_time()
        with pytest.raises(ModelNotFound, match=r"no providers .* none of the 1 peers connected to has it"):
            await b.fetch(FetchRequest("org/nobody-has-this", cache_dir=b.config.cache_dir))
        assert trio.current_time() - t0 < 10


@pytest.mark.timeout(60)
async def test_trusted_publishers_policy(tmp_path, model_dir):
    from swarm.trust import TrustPolicy

    async with AsyncExitStack() as stack:
        worker = await start(stack, tmp_path, "w", serve=(("org/private", model_dir),))
        boot = tuple(worker.host.addrs[:1])
        trusting = await start(
            stack,
            tmp_path,
            "t",
            bootstrap=boot,
            trust=TrustPolicy("trusted-publishers", frozenset({worker.peer_id})),
        )
        other = await start(
            stack,
            tmp_path,
            "o",
            bootstrap=boot,
            trust=TrustPolicy("trusted-publishers", frozenset({trusting.peer_id})),
        )
        with trio.fail_after(30):
            snap = await trusting.fetch(
                FetchRequest("org/private", configs_only=True, cache_dir=trusting.config.cache_dir)
            )
        assert (snap / "config.json").is_file()
        with pytest.raises(ModelNotFound, match="not trusted"):
            await other.fetch(
                FetchRequest("org/private", configs_only=True, cache_dir=other.config.cache_dir)
            )
        assert not list(Path(other.config.cache_dir).rglob("config.json"))


@pytest.mark.timeout(60)
async def test_a_stopped_node_refuses_new_background_tasks_clearly(tmp_path):
    # A fetch still unwinding when the node stops (CI: a cancelled origin follower that went on to
    # dial providers) gets NodeStopped, a FetchError, not trio's "Nursery is closed".
    async with AsyncExitStack() as stack:
        a = await start(stack, tmp_path, "a")
    with pytest.raises(NodeStopped, match="stopped"):
        a._spawn(trio.sleep, 0)
