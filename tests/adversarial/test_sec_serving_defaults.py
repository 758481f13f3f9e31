"""Security issue #18, finding 10: a node's defaults exposed its HF cache.

Serving the cache was on by default, on every interface, with no swarm key and trust ``open``:
anyone who could reach the port and guess a name fetched any complete snapshot, gated or private
repos pulled with HF_TOKEN among them. Now a node without a private swarm key serves only what it
was told to serve (``--serve`` directories) and what it fetched through the swarm, and says so.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from advkit import ENGINE, record
from fakehub import FakeHub

from swarm.config import resolve_run
from swarm.node import Node, NodeConfig
from swarm.sources import FetchRequest, ModelNotFound
from swarm.testmodel import make_hf_snapshot, make_model_dir

REV = "0123456789abcdef0123456789abcdef01234567"
MiB = 1 << 20
KEY = "c3" * 32


async def _node(stack: AsyncExitStack, tmp: Path, name: str, **kw) -> Node:
    kw.setdefault("cache_dir", tmp / name / "cache")
    node = Node(NodeConfig(home=tmp / name / "home", engine=ENGINE, lookup_timeout=3.0, **kw))
    node.host.connect_timeout = 3.0
    await stack.enter_async_context(node.running())
    return node


async def _served_to(node: Node, model: str) -> bool:
    try:
        with trio.fail_after(30):
            await node.fetch(FetchRequest(model, cache_dir=node.config.cache_dir))
    except ModelNotFound:
        return False
    return True


def test_run_defaults_do_not_serve_the_hf_cache():
    assert resolve_run(env={}).serve_hf_cache is False, "the HF cache is served by default"
    assert resolve_run(env={}, psk=KEY).serve_hf_cache is True
    assert resolve_run(env={}, serve_hf_cache=True).serve_hf_cache is True
    assert resolve_run(env={}, psk=KEY, no_serve_hf_cache=True).serve_hf_cache is False
    assert resolve_run(env={"SWARM_SERVE_HF_CACHE": "1"}).serve_hf_cache is True


@pytest.mark.timeout(90)
async def test_default_node_does_not_serve_its_hf_cache(tmp_path, caplog):
    """A node with default options and a gated snapshot in its cache: an outsider asking for it by
    name gets nothing. Controls: inside a private swarm (same key) the cache is served by default,
    and an explicit serve_hf_cache=True opens it deliberately."""
    caplog.set_level(logging.INFO, logger="swarm")
    async with AsyncExitStack() as stack:
        victim_cache = tmp_path / "victim" / "cache"
        make_hf_snapshot(victim_cache, "acme/gated", REV, weights_bytes=1 * MiB, n_weight_files=1)
        victim = await _node(stack, tmp_path, "victim", cache_dir=victim_cache)
        outsider = await _node(stack, tmp_path, "outsider", bootstrap=tuple(victim.host.addrs[:1]))
        served = await _served_to(outsider, "acme/gated")
        assert not served, "a default node served its HF cache to an outsider"
        st = victim.status()["serving"]
        assert st["hf_cache"] is False and st["private_swarm"] is False
        assert any("no swarm key: serving only --serve directories" in r.getMessage() for r in caplog.records)

        # Controls: a private swarm serves its members by default; opening it is deliberate.
        member_src = await _node(stack, tmp_path, "psk-src", cache_dir=victim_cache, psk=KEY)
        member = await _node(
            stack, tmp_path, "psk-member", psk=KEY, bootstrap=tuple(member_src.host.addrs[:1])
        )
        assert await _served_to(member, "acme/gated"), "a private swarm does not serve its cache"
        opened = await _node(stack, tmp_path, "opened", cache_dir=victim_cache, serve_hf_cache=True)
        asker = await _node(stack, tmp_path, "asker", bootstrap=tuple(opened.host.addrs[:1]))
        assert await _served_to(asker, "acme/gated"), "--serve-hf-cache did not open the cache"
        assert any("--serve-hf-cache: every complete snapshot" in r.getMessage() for r in caplog.records)
        record(
            "defaults: HF cache exposure (#18 f10)",
            outsider="ModelNotFound",
            private_swarm_member="served",
            explicit_serve_hf_cache="served",
        )


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A token-gated fake Hub holding acme/gated, with huggingface_hub pointed at it."""
    from huggingface_hub import constants

    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE)
    src = make_model_dir(tmp_path / "hub-src", weights_bytes=1 * MiB, n_weight_files=1)
    with FakeHub(token="hf_secret") as hub:
        hub.add_repo("acme/gated", src, REV)
        for var in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "MODEL_EXPRESS_URL",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
        ):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        yield hub
    constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE = saved


@pytest.mark.timeout(90)
async def test_gated_hub_download_is_not_seeded_without_a_swarm_key(tmp_path, hub_env):
    async with AsyncExitStack() as stack:
        victim = await _node(stack, tmp_path, "victim")
        with trio.fail_after(60):
            result = await victim.fetch_with_fallback(
                FetchRequest("acme/gated", cache_dir=victim.config.cache_dir, timeout=30.0)
            )
        assert result.source == "hub"
        outsider = await _node(stack, tmp_path, "outsider", bootstrap=tuple(victim.host.addrs[:1]))
        served = await _served_to(outsider, "acme/gated")
        assert not served, "a gated repo pulled with HF_TOKEN was seeded to an outsider"
        record("defaults: gated Hub download seeding (#18 f10)", outsider="ModelNotFound")
