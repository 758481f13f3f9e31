"""The fallback chain (swarm/sources.py) with real clients against loopback servers.

huggingface_hub talks HTTP to tests/fakehub.py (selected with HF_ENDPOINT); the ModelExpress client
talks gRPC to tests/fake_modelexpress.py.  Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import filecmp
import os
import socket
import time
from pathlib import Path

import blake3
import pytest
import trio
from fake_modelexpress import FakeModelExpress
from fakehub import FakeHub
from modelgen import CARRIED_CONFIGS, make_hf_snapshot, make_model_dir

from swarm.manifest import build_manifest, classify
from swarm.sources import (
    Attempt,
    FetchError,
    FetchRequest,
    FetchTimeout,
    ModelNotFound,
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
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODEL_EXPRESS_URL", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
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
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, fs in os.walk(root) for f in fs)


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
    assert {"event": "modelexpress_status", "status": "DOWNLOADED",
            "message": "Model download completed successfully"} in events

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


async def test_modelexpress_pins_the_revision(cache: Path, served_dir: Path, tmp_path: Path,
                                              mx: FakeModelExpress, env):
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
