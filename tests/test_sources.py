"""The fallback chain (swarm/sources/) with real clients against loopback servers.

huggingface_hub talks HTTP to tests/fakehub.py (selected with HF_ENDPOINT); the ModelExpress client
talks gRPC to tests/fake_modelexpress.py.  Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import filecmp
import importlib
import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import blake3
import grpc
import pytest
import trio
from fake_modelexpress import MX_WEIGHT_SUFFIXES, FakeModelExpress
from fakehub import FakeHub
from modelgen import CARRIED_CONFIGS, make_hf_snapshot, make_model_dir

from swarm.manifest import build_manifest, classify, should_skip
from swarm.sources import (
    Attempt,
    FetchError,
    FetchRequest,
    FetchTimeout,
    ModelNotFound,
    SourceEnv,
    SourceSkipped,
    VerificationFailed,
    fetch_chain,
    from_hub,
    local_snapshot,
)

REPO = "test-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
WEIGHTS = 4 << 20


SERVED = {
    "weights_bytes": WEIGHTS,
    "n_weight_files": 2,
    "seed": 3,
    "extra_files": {"empty.txt": b"", "tokenizer/vocab.json": b'{"a": 1}\n'},
}


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake Hub and the fake ModelExpress serve: ~5 MB, two shards, an empty file."""
    return make_model_dir(tmp_path_factory.mktemp("served"), **SERVED)


@pytest.fixture
def hub(served_dir: Path):
    with FakeHub() as h:
        h.add_repo(REPO, served_dir, COMMIT)
        yield h


@pytest.fixture
def mx(served_dir: Path):
    with FakeModelExpress() as m:
        m.add_model(REPO, served_dir, COMMIT)
        yield m


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub):
    """A clean environment pointing huggingface_hub at the fake Hub; restores its constants."""
    from huggingface_hub import constants

    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE)
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "MODEL_EXPRESS_URL",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield monkeypatch
    constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE = saved


def req(cache: Path, **kw) -> FetchRequest:
    kw.setdefault("timeout", 30.0)
    return FetchRequest(REPO, cache_dir=cache, **kw)


def never_swarm(_req: FetchRequest):
    raise AssertionError("the swarm must not be asked")


async def no_providers(r: FetchRequest) -> Path:
    raise ModelNotFound(f"no providers for {r.repo_id} in the DHT")


def outcomes(result_or_error) -> list[tuple[str, str]]:
    return [(a.source, a.outcome) for a in result_or_error.attempts]


def assert_same_files(snapshot: Path, served: Path, paths) -> None:
    for p in paths:
        assert filecmp.cmp(snapshot / p, served / p, shallow=False), p


def files_under(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, fs in os.walk(root)
        for f in fs
    )


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- step 1: the local cache --------------------------------------------------------------------


async def test_local_cache_hit_uses_no_network(cache: Path, hub: FakeHub, mx: FakeModelExpress, env):
    snap = make_hf_snapshot(cache, REPO, COMMIT, weights_bytes=1 << 20)
    env.setenv("MODEL_EXPRESS_URL", mx.url)
    result = await fetch_chain(req(cache), swarm=never_swarm)
    assert result.source == "local-cache"
    assert result.path == snap
    assert result.revision == COMMIT
    assert outcomes(result) == [("local-cache", "ok")]
    assert hub.model_requests == []
    assert mx.total_calls == 0


async def test_local_cache_resolves_commit_and_refs(cache: Path):
    make_hf_snapshot(cache, REPO, COMMIT, weights_bytes=1 << 20)
    assert local_snapshot(req(cache, revision=COMMIT)) is not None
    assert local_snapshot(req(cache, revision="main")) is not None
    assert local_snapshot(req(cache, revision="v1.0")) is None  # no refs/v1.0
    assert local_snapshot(req(cache, revision=OTHER_COMMIT)) is None


async def test_local_cache_rejects_incomplete_snapshots(cache: Path, hub: FakeHub):
    snap = make_hf_snapshot(cache, REPO, COMMIT, **SERVED)  # the served files, in the HF layout
    shard = snap / "model-00002-of-00002.safetensors"
    blob = shard.resolve()
    partial = Path(str(blob) + ".incomplete")
    os.rename(blob, partial)  # the link now dangles
    assert local_snapshot(req(cache)) is None
    assert local_snapshot(req(cache, allow_patterns=["*.json"])) is None  # a leftover *.incomplete blob
    partial.unlink()
    assert local_snapshot(req(cache, configs_only=True)) is not None  # every config is there
    assert local_snapshot(req(cache)) is None
    partial.write_bytes(b"partial")
    os.symlink(os.readlink(shard) + ".incomplete", str(shard) + ".tmp")
    os.replace(str(shard) + ".tmp", shard)  # the link points at an *.incomplete blob
    assert local_snapshot(req(cache)) is None
    partial.unlink()
    shard.unlink()  # a shard named by the index is missing
    assert local_snapshot(req(cache, configs_only=True)) is not None
    assert local_snapshot(req(cache)) is None
    assert local_snapshot(req(cache, allow_patterns=["*.safetensors"])) is None

    # The chain falls through to the Hub, which repairs the snapshot.
    result = await fetch_chain(req(cache), swarm=None)
    assert result.source == "hub"
    assert "missing" in result.attempts[0].reason
    assert local_snapshot(req(cache)) == result.path


async def test_configs_only_snapshot_does_not_pass_for_the_whole_model(cache: Path, mx: FakeModelExpress):
    await fetch_chain(req(cache, configs_only=True), swarm=None, modelexpress_url=mx.url)
    assert local_snapshot(req(cache, configs_only=True)) is not None
    assert local_snapshot(req(cache)) is None
    result = await fetch_chain(req(cache), swarm=None, modelexpress_url=mx.url)
    assert result.source == "modelexpress"
    assert "no weight files" in result.attempts[0].reason


async def test_local_cache_checks_the_stored_manifest(cache: Path, env):
    from swarm.store import Store

    snap = make_hf_snapshot(cache, REPO, COMMIT, weights_bytes=1 << 20)
    manifest = build_manifest(snap, REPO, COMMIT)
    Store(cache).save_manifest(manifest)
    assert local_snapshot(req(cache, verify=True)) == snap

    # Same size, different bytes: only the blake3 check sees it.
    cfg = (snap / "config.json").resolve()
    data = bytearray(cfg.read_bytes())
    data[10] ^= 1
    cfg.write_bytes(bytes(data))
    assert local_snapshot(req(cache)) == snap
    assert local_snapshot(req(cache, verify=True)) is None

    # A size mismatch is a verification failure; with nothing else around the chain reports it,
    # and the bad file is removed so that the next fetch gets it again.
    with open(cfg, "ab") as fh:
        fh.write(b" ")
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VerificationFailed) as ei:
        await fetch_chain(req(cache), swarm=None)
    assert "config.json" in str(ei.value) and "removed it" in str(ei.value)
    assert outcomes(ei.value)[0] == ("local-cache", "failed")
    assert not (snap / "config.json").exists() and not cfg.exists()

    async def swarm(r: FetchRequest) -> Path:  # puts the file back
        return make_hf_snapshot(r.cache_dir, r.repo_id, COMMIT, weights_bytes=1 << 20)

    result = await fetch_chain(req(cache, verify=True), swarm=swarm)
    assert result.source == "swarm"
    assert local_snapshot(req(cache, verify=True)) == snap


# --- step 2: ModelExpress -----------------------------------------------------------------------


async def test_modelexpress_unset_is_skipped_and_swarm_success_skips_the_hub(cache: Path, hub: FakeHub):
    called = []

    async def swarm(r: FetchRequest) -> Path:
        called.append(r)
        return make_hf_snapshot(r.cache_dir, r.repo_id, COMMIT, weights_bytes=1 << 20)

    result = await fetch_chain(req(cache), swarm=swarm)
    assert result.source == "swarm"
    assert len(called) == 1
    assert result.attempts[1] == Attempt("modelexpress", "skipped", "MODEL_EXPRESS_URL not set")
    assert outcomes(result) == [
        ("local-cache", "failed"),
        ("modelexpress", "skipped"),
        ("swarm", "ok"),
    ]
    assert hub.model_requests == []


async def test_modelexpress_lands_files_in_the_hf_layout(
    cache: Path, served_dir: Path, hub: FakeHub, mx: FakeModelExpress, env
):
    env.setenv("MODEL_EXPRESS_URL", mx.url)
    events: list[dict] = []
    result = await fetch_chain(req(cache), swarm=never_swarm, on_event=events.append)
    assert result.source == "modelexpress"
    assert result.revision == COMMIT
    repo = cache / "models--test-org--tiny-llama"
    assert result.path == repo / "snapshots" / COMMIT
    assert (repo / "refs" / "main").read_text() == COMMIT
    served = files_under(served_dir)
    assert_same_files(result.path, served_dir, served)
    for p in served:  # relative links into blobs/<blake3 hex>
        link = result.path / p
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo / "blobs").resolve()
        assert link.resolve().name == blake3.blake3(link.read_bytes()).hexdigest()
    assert not [n for n in os.listdir(repo / "blobs") if n.endswith(".incomplete")]
    assert mx.calls == {"EnsureModelDownloaded": 1, "ListModelFiles": 1, "StreamModelFiles": 1}
    assert hub.model_requests == []
    assert {
        "event": "modelexpress_status",
        "status": "DOWNLOADED",
        "message": "Model download completed successfully",
    } in events

    # huggingface_hub finds the snapshot offline ...
    from huggingface_hub import snapshot_download

    found = await trio.to_thread.run_sync(
        lambda: snapshot_download(REPO, cache_dir=str(cache), local_files_only=True)
    )
    assert Path(found) == result.path
    # ... and so does the next fetch, without asking anyone.
    again = await fetch_chain(req(cache), swarm=never_swarm)
    assert again.source == "local-cache"
    assert mx.total_calls == 3


async def test_modelexpress_configs_only_streams_only_configs(cache: Path, mx: FakeModelExpress):
    result = await fetch_chain(req(cache, configs_only=True), swarm=never_swarm, modelexpress_url=mx.url)
    assert result.source == "modelexpress"
    got = files_under(result.path)
    assert set(CARRIED_CONFIGS) <= set(got)
    assert all(classify(p) == "config" for p in got)
    method, ensure = mx.requests[0]
    assert method == "EnsureModelDownloaded" and ensure.ignore_weights
    stream = mx.requests[-1][1]
    assert sorted(stream.file_selector.paths) == got


async def test_modelexpress_down_falls_through_to_the_swarm(cache: Path, env):
    env.setenv("MODEL_EXPRESS_URL", f"http://127.0.0.1:{free_port()}")

    async def swarm(r: FetchRequest) -> Path:
        return make_hf_snapshot(r.cache_dir, r.repo_id, COMMIT, weights_bytes=1 << 20)

    t0 = time.monotonic()
    result = await fetch_chain(req(cache), swarm=swarm)
    assert time.monotonic() - t0 < 10
    assert result.source == "swarm"
    mx_attempt = result.attempts[1]
    assert mx_attempt.source == "modelexpress" and mx_attempt.outcome == "failed"
    assert "cannot reach ModelExpress" in mx_attempt.reason


async def test_modelexpress_unsafe_path_is_rejected(cache: Path, tmp_path: Path, mx: FakeModelExpress, env):
    mx.evil_path = "../../../evil.txt"
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VerificationFailed) as ei:
        await fetch_chain(req(cache), swarm=None, modelexpress_url=mx.url)
    assert "unsafe file name '../../../evil.txt'" in str(ei.value)
    assert not list(tmp_path.rglob("evil.txt"))
    repo = cache / "models--test-org--tiny-llama"
    assert not (repo / "snapshots").exists()
    assert not [n for n in os.listdir(repo / "blobs") if n.endswith(".incomplete")]


async def test_modelexpress_ignoring_the_selector_and_sending_no_commit(cache: Path, mx: FakeModelExpress):
    mx.pre_revisions = True  # a server from before pinned revisions: names no resolved commit,
    mx.ignore_selector = True  # streams everything
    mx.send_commit = False  # and does not say which commit
    result = await fetch_chain(
        req(cache, allow_patterns=["*.json", "*.txt"]), swarm=never_swarm, modelexpress_url=mx.url
    )
    assert result.source == "modelexpress"
    got = set(files_under(result.path))
    assert got and all(p.endswith((".json", ".txt")) for p in got)
    assert "empty.txt" in got and (result.path / "empty.txt").stat().st_size == 0  # sent no chunk
    assert len(result.revision) == 40 and result.revision != COMMIT  # derived from the content
    again = await fetch_chain(req(cache / "other"), swarm=never_swarm, modelexpress_url=mx.url)
    assert again.revision != result.revision  # different selection, different content


async def test_modelexpress_with_shared_storage_does_not_stream(cache: Path, mx: FakeModelExpress):
    # The server downloads into storage we share: the snapshot appears in our cache meanwhile.
    mx.on_ensure = lambda name: make_hf_snapshot(cache, name, COMMIT, weights_bytes=1 << 20)
    result = await fetch_chain(req(cache), swarm=never_swarm, modelexpress_url=mx.url)
    assert result.source == "modelexpress"
    assert result.revision == COMMIT
    assert mx.calls["StreamModelFiles"] == 0


async def test_modelexpress_names_a_commit_we_already_hold(cache: Path, mx: FakeModelExpress):
    """Held by commit only (no refs/main): the server's resolved commit finds it, nothing is streamed,
    and refs/main is written so that the next fetch (and huggingface_hub offline) finds it."""
    snap = make_hf_snapshot(cache, REPO, COMMIT, ref=None, weights_bytes=1 << 20)
    result = await fetch_chain(req(cache), swarm=never_swarm, modelexpress_url=mx.url)
    assert result.source == "modelexpress" and result.path == snap
    assert mx.calls == {"EnsureModelDownloaded": 1}
    assert (cache / "models--test-org--tiny-llama" / "refs" / "main").read_text() == COMMIT
    assert (await fetch_chain(req(cache), swarm=never_swarm)).source == "local-cache"


def test_modelexpress_client_rpcs_as_the_server_answers(mx: FakeModelExpress):
    from swarm.modelexpress import ModelExpressClient, ModelExpressNotFound

    with ModelExpressClient(mx.url, timeout=30) as client:
        assert client.ensure_downloaded(REPO) == COMMIT  # resolved_revision
        listed = {f.path for f in client.list_files(REPO, revision=COMMIT, ignore_weights=True)}
        assert listed and not any(p.endswith(MX_WEIGHT_SUFFIXES) for p in listed)
        chunks = list(client.stream_files(REPO, ["empty.txt"], revision="main"))
        assert [(c.relative_path, c.data, c.is_last_chunk, c.commit_hash) for c in chunks] == [
            ("empty.txt", b"", True, COMMIT)
        ]  # an empty file is one empty chunk
        with pytest.raises(ModelExpressNotFound, match="Selected file not found in model directory"):
            list(client.stream_files(REPO, ["config.json", "missing.json"]))
        with pytest.raises(ModelExpressNotFound, match="Failed to resolve revision"):
            client.ensure_downloaded("test-org/nope")


async def test_modelexpress_pins_the_revision(
    cache: Path, served_dir: Path, tmp_path: Path, mx: FakeModelExpress, env
):
    """The revision goes to the server; its resolved commit pins the listing and the stream."""
    v2 = make_model_dir(tmp_path / "v2", weights_bytes=1 << 20, seed=9)
    mx.add_model(REPO, v2, OTHER_COMMIT, refs=("v2",))
    env.setenv("HF_HUB_OFFLINE", "1")

    tag = await fetch_chain(req(cache, revision="v2"), swarm=never_swarm, modelexpress_url=mx.url)
    assert tag.source == "modelexpress" and tag.revision == OTHER_COMMIT
    assert_same_files(tag.path, v2, files_under(v2))
    repo = cache / "models--test-org--tiny-llama"
    assert (repo / "refs" / "v2").read_text() == OTHER_COMMIT
    assert not (repo / "refs" / "main").exists()  # a pinned fetch leaves the default branch alone
    sent = {method: r for method, r in mx.requests}
    assert sent["EnsureModelDownloaded"].revision == "v2"
    assert sent["ListModelFiles"].revision == OTHER_COMMIT
    assert sent["StreamModelFiles"].revision == OTHER_COMMIT
    assert local_snapshot(req(cache, revision="v2")) == tag.path

    commit = await fetch_chain(req(cache, revision=COMMIT), swarm=never_swarm, modelexpress_url=mx.url)
    assert commit.revision == COMMIT
    assert_same_files(commit.path, served_dir, files_under(served_dir))
    assert sorted(os.listdir(repo / "refs")) == ["v2"]  # a commit needs no ref

    default = await fetch_chain(req(cache / "b"), swarm=never_swarm, modelexpress_url=mx.url)
    assert default.revision == COMMIT
    assert not mx.requests[-3][1].HasField("revision")  # the default branch: no pin
    assert mx.requests[-1][1].revision == COMMIT  # ... until the server named its commit


async def test_modelexpress_unknown_revision_downloads_nothing(cache: Path, mx: FakeModelExpress, env):
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as ei:
        await fetch_chain(req(cache, revision=OTHER_COMMIT), swarm=None, modelexpress_url=mx.url)
    reason = ei.value.attempts[1].reason
    assert "Failed to resolve revision" in reason and OTHER_COMMIT in reason
    assert mx.calls == {"EnsureModelDownloaded": 1}  # refused before any download or stream
    assert mx.requests[0][1].revision == OTHER_COMMIT
    with pytest.raises(ModelNotFound):
        await fetch_chain(req(cache, revision="no-such-branch"), swarm=None, modelexpress_url=mx.url)


async def test_modelexpress_server_without_pinned_revisions(cache: Path, mx: FakeModelExpress, env):
    """A server that ignores the pin holds its default revision: refused, nothing streamed."""
    mx.pre_revisions = True
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as ei:
        await fetch_chain(req(cache, revision=COMMIT), swarm=None, modelexpress_url=mx.url)
    assert "did not confirm revision" in ei.value.attempts[1].reason
    assert mx.calls == {"EnsureModelDownloaded": 1}
    # The default branch still works with it.
    result = await fetch_chain(req(cache), swarm=never_swarm, modelexpress_url=mx.url)
    assert result.source == "modelexpress" and result.revision == COMMIT


async def test_modelexpress_commit_must_resolve_to_itself(cache: Path, mx: FakeModelExpress, env):
    mx._commit = lambda repo, revision: COMMIT  # a server that answers every pin with its default
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VerificationFailed) as ei:
        await fetch_chain(req(cache, revision=OTHER_COMMIT), swarm=None, modelexpress_url=mx.url)
    assert f"resolved commit {OTHER_COMMIT}" in ei.value.attempts[1].reason
    assert "StreamModelFiles" not in mx.calls


# --- steps 3 and 4: the swarm and the Hub --------------------------------------------------------


async def test_swarm_fails_then_hub_succeeds(cache: Path, served_dir: Path, hub: FakeHub):
    result = await fetch_chain(req(cache), swarm=no_providers)
    assert result.source == "hub"
    assert result.revision == COMMIT
    assert result.attempts[2] == Attempt("swarm", "failed", f"no providers for {REPO} in the DHT")
    assert outcomes(result)[-1] == ("hub", "ok")
    assert_same_files(result.path, served_dir, files_under(served_dir))
    assert hub.model_requests
    assert local_snapshot(req(cache)) == result.path  # complete by the Hub's own tree listing


async def test_configs_only_from_the_hub_downloads_only_configs(cache: Path, hub: FakeHub):
    result = await fetch_chain(req(cache, configs_only=True), swarm=None)
    assert result.source == "hub"
    got = files_under(result.path)
    assert set(CARRIED_CONFIGS) <= set(got)
    assert "tokenizer/vocab.json" in got
    assert all(classify(p) == "config" for p in got), got
    downloaded = hub.downloaded_files()
    assert downloaded and not [p for p in downloaded if p.endswith(".safetensors")]
    assert local_snapshot(req(cache, configs_only=True)) == result.path
    assert local_snapshot(req(cache)) is None


async def test_hub_env_is_read_at_call_time(cache: Path, hub: FakeHub, env):
    hub.token = "hf_secret"
    with pytest.raises(ModelNotFound) as ei:
        await from_hub(req(cache))
    assert "HTTP 401" in str(ei.value)
    env.setenv("HF_TOKEN", "hf_secret")
    path = await from_hub(req(cache))
    assert path.name == COMMIT
    assert {r.authorization for r in hub.model_requests[-3:]} == {"Bearer hf_secret"}

    # A second hub, chosen by changing HF_ENDPOINT now.
    with FakeHub() as other:
        other.add_repo("test-org/other", path, OTHER_COMMIT)
        env.setenv("HF_ENDPOINT", other.url)
        got = await from_hub(FetchRequest("test-org/other", cache_dir=cache))
        assert got.name == OTHER_COMMIT
        assert other.model_requests

    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceSkipped, match="HF_HUB_OFFLINE is set"):
        await from_hub(req(cache))


async def test_hub_does_not_use_the_import_time_endpoint(cache: Path, hub: FakeHub):
    """huggingface_hub read HF_ENDPOINT at import; a request must still go to the endpoint set now."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    dead = f"http://127.0.0.1:{free_port()}"  # stands in for the import-time default (huggingface.co)
    constants.ENDPOINT = dead
    constants.HUGGINGFACE_CO_URL_TEMPLATE = dead + "/{repo_id}/resolve/{revision}/{filename}"
    _detect_agent._registry = None  # forget the once-per-process user-agent registry lookup
    path = await from_hub(req(cache, configs_only=True))
    assert path.name == COMMIT
    assert hub.url == constants.ENDPOINT
    if not constants.HF_HUB_DISABLE_TELEMETRY and not os.path.exists(constants.AGENT_HARNESSES_PATH):
        assert any(r.path == "/api/agent-harnesses" for r in hub.requests)


# --- whole-chain failures -----------------------------------------------------------------------


async def test_offline_with_nothing_anywhere(cache: Path, hub: FakeHub, env):
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as ei:
        await fetch_chain(req(cache), swarm=no_providers)
    err = ei.value
    assert outcomes(err) == [
        ("local-cache", "failed"),
        ("modelexpress", "skipped"),
        ("swarm", "failed"),
        ("hub", "skipped"),
    ]
    msg = str(err)
    for source, reason in [
        ("local-cache", f"no snapshot of {REPO} in {cache}"),
        ("modelexpress", "MODEL_EXPRESS_URL not set"),
        ("swarm", f"no providers for {REPO} in the DHT"),
        ("hub", "HF_HUB_OFFLINE is set"),
    ]:
        assert f"{source}: " in msg and reason in msg
    assert hub.model_requests == []


async def test_unknown_repo_everywhere(tmp_path: Path, hub: FakeHub, mx: FakeModelExpress, env):
    env.setenv("MODEL_EXPRESS_URL", mx.url)
    with pytest.raises(ModelNotFound) as ei:
        await fetch_chain(FetchRequest("test-org/nope", cache_dir=tmp_path, timeout=30), swarm=no_providers)
    err = ei.value
    assert [a.outcome for a in err.attempts] == ["failed"] * 4
    assert "404 Not Found" in err.attempts[1].reason
    assert "HTTP 404" in err.attempts[3].reason and "not found" in err.attempts[3].reason
    assert mx.calls["EnsureModelDownloaded"] == 1
    assert any("/api/models/test-org/nope" in r.path for r in hub.model_requests)


async def test_a_source_error_is_not_model_not_found(cache: Path, env):
    env.setenv("HF_HUB_OFFLINE", "1")

    async def broken(_r: FetchRequest) -> Path:
        raise RuntimeError("control socket closed")

    with pytest.raises(FetchError) as ei:
        await fetch_chain(req(cache), swarm=broken, modelexpress_url=f"127.0.0.1:{free_port()}")
    assert type(ei.value) is FetchError
    assert "control socket closed" in str(ei.value)


async def test_timeout(cache: Path, hub: FakeHub):
    async def stuck(_r: FetchRequest) -> Path:
        await trio.sleep_forever()
        raise AssertionError

    t0 = trio.current_time()
    with pytest.raises(FetchTimeout) as ei:
        await fetch_chain(req(cache, timeout=0.5), swarm=stuck)
    assert trio.current_time() - t0 < 3
    assert outcomes(ei.value) == [
        ("local-cache", "failed"),
        ("modelexpress", "skipped"),
        ("swarm", "failed"),
        ("hub", "skipped"),
    ]
    assert "timed out" in ei.value.attempts[2].reason
    assert "not tried" in ei.value.attempts[3].reason
    assert hub.model_requests == []


async def test_timeout_cancels_a_stalled_modelexpress(cache: Path, mx: FakeModelExpress):
    mx.stall = 30.0
    t0 = trio.current_time()
    with pytest.raises(FetchTimeout) as ei:
        await fetch_chain(req(cache, timeout=1.0), swarm=never_swarm, modelexpress_url=mx.url)
    assert trio.current_time() - t0 < 5
    assert ei.value.attempts[1].source == "modelexpress"
    assert "timed out" in ei.value.attempts[1].reason
    await trio.to_thread.run_sync(mx.cancelled.wait, 5)
    assert mx.cancelled.is_set()  # the server saw the call go away


# --- the local cache's configs rule, config patterns, single-part names, the ModelExpress root ---


def keep_only(snap: Path, keep: set[str]) -> None:
    for p in files_under(snap):
        if p not in keep:
            (snap / p).unlink()


async def test_config_json_alone_is_not_a_configs_set(cache: Path, hub: FakeHub):
    """What AutoConfig.from_pretrained leaves behind (config.json, no tree listing) is no configs set:
    the fetch goes on to a source that has the tokenizer."""
    snap = make_hf_snapshot(cache, REPO, COMMIT, **SERVED)
    keep_only(snap, {"config.json"})
    assert local_snapshot(req(cache, configs_only=True)) is None
    assert local_snapshot(req(cache, allow_patterns=["config.json"])) == snap  # asked for by name
    result = await fetch_chain(req(cache, configs_only=True), swarm=None)
    assert result.source == "hub"
    assert "no tokenizer file" in result.attempts[0].reason
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files_under(result.path))

    other = make_hf_snapshot(cache / "b", REPO, COMMIT, **SERVED)
    keep_only(other, {"config.json", "tokenizer.json"})
    assert local_snapshot(req(cache / "b", configs_only=True)) == other
    keep_only(other, {"tokenizer.json"})
    assert local_snapshot(req(cache / "b", configs_only=True)) is None  # no config.json


ODD_CONFIGS = {
    "tokenizer.model.v3": b"\x0a\x05mistral",
    "vocab.bpe": b"#version: 0.2\nh e\n",
    "source.spm": b"spm",
    "model.ckpt.index": b"tf-index",
}


async def test_every_source_picks_configs_with_classify(cache: Path, tmp_path: Path, env):
    """tokenizer.model.v3 and vocab.bpe are configs for classify(), so for the Hub and ModelExpress
    too; model.ckpt.index (what ModelExpress's ignore_weights drops) is a weight everywhere."""
    served = make_model_dir(tmp_path / "odd", weights_bytes=1 << 20, extra_files=ODD_CONFIGS)
    expected = sorted(
        p
        for p in files_under(served)
        if classify(p, (served / p).stat().st_size) == "config" and p not in (".gitattributes", "README.md")
    )
    assert {"tokenizer.model.v3", "vocab.bpe", "source.spm"} <= set(expected)
    assert "model.ckpt.index" not in expected
    with FakeHub() as hub, FakeModelExpress() as mx:
        hub.add_repo(REPO, served, COMMIT)
        mx.add_model(REPO, served, COMMIT)
        env.setenv("HF_ENDPOINT", hub.url)
        from_hub_ = await fetch_chain(req(cache / "hub", configs_only=True), swarm=None)
        assert from_hub_.source == "hub"
        assert files_under(from_hub_.path) == expected
        from_mx = await fetch_chain(
            req(cache / "mx", configs_only=True), swarm=never_swarm, modelexpress_url=mx.url
        )
        assert from_mx.source == "modelexpress"
        assert files_under(from_mx.path) == expected
        assert mx.requests[-1][1].ignore_weights and mx.requests[1][1].ignore_weights
    for root in ("hub", "mx"):
        assert local_snapshot(req(cache / root, configs_only=True)) is not None


async def test_single_part_names(tmp_path: Path, served_dir: Path, hub: FakeHub, mx: FakeModelExpress):
    hub.add_repo("gpt2", served_dir, COMMIT)
    mx.add_model("gpt2", served_dir, COMMIT)
    r = FetchRequest("gpt2", cache_dir=tmp_path / "hub", timeout=30)
    assert r.repo_dir == tmp_path / "hub" / "models--gpt2"
    result = await fetch_chain(r, swarm=None)
    assert result.source == "hub"
    assert result.path == tmp_path / "hub" / "models--gpt2" / "snapshots" / COMMIT
    assert (await fetch_chain(r, swarm=never_swarm)).source == "local-cache"
    from huggingface_hub import snapshot_download

    found = await trio.to_thread.run_sync(
        lambda: snapshot_download("gpt2", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    )
    assert Path(found) == result.path
    via_mx = await fetch_chain(
        FetchRequest("gpt2", cache_dir=tmp_path / "mx", timeout=30),
        swarm=never_swarm,
        modelexpress_url=mx.url,
    )
    assert via_mx.path == tmp_path / "mx" / "models--gpt2" / "snapshots" / COMMIT
    assert mx.requests[0][1].model_name == "gpt2"


async def test_modelexpress_cache_path_is_a_cache_root(
    cache: Path, tmp_path: Path, mx: FakeModelExpress, env
):
    shared = tmp_path / "mx-shared"
    env.setenv("MODEL_EXPRESS_CACHE_PATH", str(shared))
    env.setenv("HF_HUB_OFFLINE", "1")
    # The ModelExpress server downloads into the shared root while we wait: nothing is streamed.
    mx.on_ensure = lambda name: make_hf_snapshot(shared, name, COMMIT, weights_bytes=1 << 20)
    result = await fetch_chain(req(cache), swarm=never_swarm, modelexpress_url=mx.url)
    assert result.source == "modelexpress"
    assert result.path == shared / "models--test-org--tiny-llama" / "snapshots" / COMMIT
    assert mx.calls["StreamModelFiles"] == 0
    # Next time the local-cache step finds it there, with no network.
    again = await fetch_chain(req(cache), swarm=never_swarm, modelexpress_url=mx.url)
    assert again.source == "local-cache" and again.path == result.path
    assert mx.calls["EnsureModelDownloaded"] == 1
    # ModelExpress's current name for it works too; unset, the root is not looked at.
    env.delenv("MODEL_EXPRESS_CACHE_PATH")
    assert local_snapshot(req(cache)) is None
    env.setenv("MODEL_EXPRESS_CACHE_DIRECTORY", str(shared))
    assert local_snapshot(req(cache)) == result.path
    # A request carrying the caller's root decides over this process's environment.
    env.delenv("MODEL_EXPRESS_CACHE_DIRECTORY")
    assert local_snapshot(req(cache, env=SourceEnv(modelexpress_cache=str(shared)))) == result.path


# --- the caller's environment (SourceEnv) ------------------------------------------------------


def test_source_env_from_environ_and_over():
    env = SourceEnv.from_environ(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_TOKEN": "hf_x",
            "HF_ENDPOINT": "http://m/",
            "MODEL_EXPRESS_URL": "mx:8001",
            "MODEL_EXPRESS_CACHE_PATH": "/c",
        }
    )
    assert env == SourceEnv(True, "hf_x", "http://m/", "mx:8001", "/c")
    assert "hf_x" not in repr(env) and "hf_x" not in repr(FetchRequest(REPO, env=env))
    assert SourceEnv.from_environ({}) == SourceEnv()
    assert SourceEnv.from_environ({"HF_HUB_OFFLINE": "0"}).hub_offline is False  # set: online
    assert SourceEnv.from_environ({"TRANSFORMERS_OFFLINE": "yes"}).hub_offline is True
    assert SourceEnv.from_environ({"HF_TOKEN": ""}).hf_token is None  # empty is unset
    node = SourceEnv(hub_offline=True, hf_token="node", modelexpress_url="node:1")
    assert SourceEnv(hub_offline=False).over(node) == SourceEnv(False, "node", None, "node:1")
    assert SourceEnv.from_json(env.to_json()) == env
    assert SourceEnv().to_json() == {}
    for bad in (
        {"hf_endpoint": "ftp://x"},
        {"hf_token": "a\nb"},
        {"hub_offline": "1"},
        {"modelexpress_cache": "rel/dir"},
        {"hf_token": "x" * 5000},
        {"other": "x"},
        ["x"],
    ):
        with pytest.raises((TypeError, ValueError)):
            SourceEnv.from_json(bad)


async def test_the_requests_environment_decides(cache: Path, hub: FakeHub, mx: FakeModelExpress, env):
    """Offline mode, token, endpoint and ModelExpress URL come from FetchRequest.env (the caller's)
    before this process's environment."""
    env.setenv("HF_HUB_OFFLINE", "1")  # this process (the node) is offline ...
    env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # ... and points at nothing
    hub.token = "hf_caller"
    caller = SourceEnv(hub_offline=False, hf_token="hf_caller", hf_endpoint=hub.url)
    result = await fetch_chain(req(cache, env=caller), swarm=None)
    assert result.source == "hub"
    assert {r.authorization for r in hub.model_requests} == {"Bearer hf_caller"}

    # The caller offline: the Hub is never asked, whatever this process says.
    env.delenv("HF_HUB_OFFLINE")
    env.setenv("HF_ENDPOINT", hub.url)
    hub.reset()
    with pytest.raises(ModelNotFound) as ei:
        await fetch_chain(req(cache / "b", env=SourceEnv(hub_offline=True)), swarm=None)
    assert ei.value.attempts[-1] == Attempt("hub", "skipped", "HF_HUB_OFFLINE is set")
    assert hub.model_requests == []

    # The caller's ModelExpress wins over the node's.
    result = await fetch_chain(
        req(cache / "c", env=SourceEnv(modelexpress_url=mx.url)),
        swarm=never_swarm,
        modelexpress_url=f"127.0.0.1:{free_port()}",
    )
    assert result.source == "modelexpress"


# --- the real modelexpress client package against the fake server --------------------------------

MODELEXPRESS_VERSION = "0.7.0"


def real_model_client():
    """``modelexpress.model_client`` of the installed ``modelexpress`` package, loaded without the
    package's ``__init__`` (which imports torch and the GPU transfer stack): a stand-in parent
    package points at the installed directory, so only the client's own modules load."""
    if "modelexpress.model_client" in sys.modules:
        return sys.modules["modelexpress.model_client"]
    spec = importlib.util.find_spec("modelexpress")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"modelexpress {MODELEXPRESS_VERSION} is not installed (scripts/install --test)")
    assert importlib.metadata.version("modelexpress") == MODELEXPRESS_VERSION
    parent = types.ModuleType("modelexpress")
    parent.__path__ = list(spec.submodule_search_locations)
    parent.__spec__ = spec
    sys.modules.setdefault("modelexpress", parent)
    module = importlib.import_module("modelexpress.model_client")
    assert "torch" not in sys.modules
    return module


def test_the_real_modelexpress_client_accepts_the_fake(
    tmp_path: Path, served_dir: Path, mx: FakeModelExpress
):
    """ModelExpress 0.7's own ModelCacheClient installs metadata, weights and a tagged revision from
    the fake server, and sees NOT_FOUND where the real server answers it."""
    mc = real_model_client()
    v2 = make_model_dir(tmp_path / "v2", weights_bytes=1 << 20, seed=9)
    mx.add_model(REPO, v2, OTHER_COMMIT, refs=("v2",))
    cache = tmp_path / "mx-client-cache"
    repo = cache / "models--test-org--tiny-llama"
    with mc.ModelCacheClient(server_url=f"127.0.0.1:{mx.port}", cache_directory=cache) as client:
        snap = client.install_metadata_snapshot(REPO)
        assert snap == repo / "snapshots" / COMMIT
        metadata = [p for p in files_under(served_dir) if not p.endswith(MX_WEIGHT_SUFFIXES)]
        assert files_under(snap) == metadata
        assert (snap / "empty.txt").stat().st_size == 0  # one empty chunk
        assert (repo / "refs" / "main").read_text() == COMMIT
        client.install_weight_files(REPO, snap)
        assert files_under(snap) == files_under(served_dir)
        assert_same_files(snap, served_dir, files_under(served_dir))

        tag = client.install_metadata_snapshot(REPO, requested_revision="v2")
        assert tag == repo / "snapshots" / OTHER_COMMIT
        assert (repo / "refs" / "v2").read_text() == OTHER_COMMIT
        pinned = client.install_metadata_snapshot(REPO, requested_revision=COMMIT)
        assert pinned == snap

        for call in (
            lambda: client.ensure_downloaded("test-org/nope"),
            lambda: client.ensure_downloaded(REPO, revision="no-such-tag"),
            lambda: client.list_files(REPO, revision=OTHER_COMMIT[::-1]),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        missing = mc.model_pb2.ModelFilesRequest(
            model_name=REPO, file_selector=mc.model_pb2.ModelFileSelector(paths=["config.json", "nope"])
        )
        with pytest.raises(grpc.RpcError) as ei:
            list(client.stub.StreamModelFiles(missing))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Selected file not found in model directory: nope" in ei.value.details()


def test_the_real_modelexpress_client_refuses_a_server_from_before_2026(tmp_path: Path, mx: FakeModelExpress):
    """``pre_revisions`` plays the server the fake used to be: the real client refuses it as it
    would the real one (no resolved_revision; no chunk for an empty file)."""
    mc = real_model_client()
    mx.pre_revisions = True
    with mc.ModelCacheClient(server_url=f"127.0.0.1:{mx.port}", cache_directory=tmp_path) as client:
        with pytest.raises(mc.ModelCacheError, match="did not confirm revision"):
            client.install_metadata_snapshot(REPO, requested_revision=COMMIT)
        with pytest.raises(mc.ModelCacheError, match=r"missing files: \['empty.txt'\]"):
            client.install_metadata_snapshot(REPO)


COEXIST = r"""
import importlib, importlib.util, sys, types

def real():
    spec = importlib.util.find_spec("modelexpress")
    parent = types.ModuleType("modelexpress")
    parent.__path__ = list(spec.submodule_search_locations)
    sys.modules["modelexpress"] = parent
    importlib.import_module("modelexpress.model_client")
    return importlib.import_module("modelexpress.model_pb2")

def ours():
    import swarm.sources
    from swarm.modelexpress import client, model_pb2
    return model_pb2

if sys.argv[1] == "real-first":
    theirs = real(); mine = ours()
else:
    mine = ours(); theirs = real()
a = mine.ModelFilesRequest(model_name="gpt2", revision="v1", ignore_weights=True)
b = theirs.ModelFilesRequest.FromString(a.SerializeToString())
assert (b.model_name, b.revision, b.ignore_weights) == ("gpt2", "v1", True)
u = theirs.ModelStatusUpdate(status=theirs.DOWNLOADED, resolved_revision="a" * 40)
assert mine.ModelStatusUpdate.FromString(u.SerializeToString()).resolved_revision == "a" * 40
assert mine.DESCRIPTOR.pool is not theirs.DESCRIPTOR.pool
print("ok")
"""


@pytest.mark.parametrize("order", ["real-first", "ours-first"])
@pytest.mark.parametrize("protobuf", ["upb", "python"])
def test_our_stubs_and_the_real_package_load_in_one_process(order: str, protobuf: str):
    real_model_client()  # installed?
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    if protobuf == "python":
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    r = subprocess.run(
        [sys.executable, "-c", COEXIST, order], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.timeout(60)
async def test_single_part_name_through_the_swarm(tmp_path: Path):
    """A worker serving its HF cache finds models--gpt2 (the manifest, the DHT key and the wire carry
    the single-part name); a frontend fetches it into models--gpt2."""
    from contextlib import AsyncExitStack

    from swarm.engine import EngineConfig
    from swarm.node import Node, NodeConfig

    engine = EngineConfig(tick=0.05, rechoke_interval=0.25)
    worker_cache = tmp_path / "w" / "cache"
    snap = make_hf_snapshot(worker_cache, "gpt2", COMMIT, weights_bytes=1 << 20)
    async with AsyncExitStack() as stack:
        worker = Node(
            NodeConfig(
                home=tmp_path / "w" / "home",
                cache_dir=worker_cache,
                serve_hf_cache=True,
                engine=engine,
                lookup_timeout=3.0,
            )
        )
        await stack.enter_async_context(worker.running())
        with trio.fail_after(20):
            while not worker.shared:
                await trio.sleep(0.05)
        front = Node(
            NodeConfig(
                home=tmp_path / "f" / "home",
                cache_dir=tmp_path / "f" / "cache",
                serve_hf_cache=False,
                engine=engine,
                lookup_timeout=3.0,
                bootstrap=tuple(worker.host.addrs[:1]),
            )
        )
        await stack.enter_async_context(front.running())
        with trio.fail_after(30):
            got = await front.fetch(FetchRequest("gpt2", cache_dir=front.config.cache_dir))
    assert got == tmp_path / "f" / "cache" / "models--gpt2" / "snapshots" / COMMIT
    carried = [p for p in files_under(snap) if not should_skip(p)]
    assert files_under(got) == carried
    assert_same_files(got, snap, carried)
