"""What swarm writes is a Hugging Face hub cache: the Hub client finds it offline."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fake_modelexpress import FakeModelExpress
from fakehub import FakeHub
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from modelgen import MODEL_NAME, MODEL_REVISION
from procs import NodeProc, base_env

import swarm
from swarm import client
from swarm.manifest import Manifest, build_manifest
from swarm.sources import Attempt, ModelNotFound
from swarm.store import SnapshotReader, Store, private_revision

REPO_ROOT = Path(__file__).resolve().parents[1]


def fetch_into(cache: Path, src: Path, manifest: Manifest, files=None, ref: str | None = "main") -> Path:
    """Store every wanted piece of ``manifest`` (read from ``src``) in random order; finalize."""
    store = Store(cache)
    with SnapshotReader(src, manifest) as reader, store.open_download(manifest, files) as dl:
        order = sorted(dl.missing)
        random.Random(0).shuffle(order)
        for i in order:
            dl.write_piece(i, reader.read_piece(i))
        return dl.finalize(ref)


OFFLINE_CHILD = r"""
import json, sys
from huggingface_hub import constants, hf_hub_download, snapshot_download
assert constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE=1 was not picked up"
repo_id, revision, cache, files = json.loads(sys.argv[1])
out = {
    "with_revision": snapshot_download(repo_id, revision=revision, cache_dir=cache),
    "via_refs_main": snapshot_download(repo_id, cache_dir=cache),
    "files": {f: hf_hub_download(repo_id, f, revision=revision, cache_dir=cache) for f in files},
    "files_main": {f: hf_hub_download(repo_id, f, cache_dir=cache) for f in files},
}
print(json.dumps(out))
"""


def check_offline_subprocess(
    cache: Path, repo_id: str, revision: str, snap: Path, src: Path, paths: list[str]
) -> None:
    """With HF_HUB_OFFLINE=1 in a fresh interpreter (the variable is read at import time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cache.parent / "hf-home"), PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD, json.dumps([repo_id, revision, str(cache), paths])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["with_revision"]) == snap
    assert Path(out["via_refs_main"]) == snap
    for f in paths:
        for key in ("files", "files_main"):
            p = Path(out[key][f])
            assert p == snap / f
            assert p.read_bytes() == (src / f).read_bytes()


def test_hub_client_finds_snapshot_offline(tmp_path: Path, model_dir: Path, model_manifest: Manifest) -> None:
    cache = tmp_path / "hub"
    snap = fetch_into(cache, model_dir, model_manifest)
    paths = [f.path for f in model_manifest.files]
    # In-process, local_files_only=True.
    assert (
        Path(snapshot_download(MODEL_NAME, revision=MODEL_REVISION, cache_dir=cache, local_files_only=True))
        == snap
    )
    assert Path(snapshot_download(MODEL_NAME, cache_dir=cache, local_files_only=True)) == snap
    for f in paths:
        p = hf_hub_download(MODEL_NAME, f, revision=MODEL_REVISION, cache_dir=cache, local_files_only=True)
        assert Path(p).read_bytes() == (model_dir / f).read_bytes()
    # The snapshot holds exactly the carried files (README.md / .gitattributes are not carried).
    listed = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if not p.is_dir())
    assert listed == sorted(paths)
    # The Hub's own cache scanner sees one healthy repo with one revision and ref main.
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == MODEL_NAME and repo.nb_files == len(paths)
    (rev,) = repo.revisions
    assert rev.commit_hash == MODEL_REVISION and rev.refs == frozenset({"main"})
    check_offline_subprocess(cache, MODEL_NAME, MODEL_REVISION, snap, model_dir, paths)


def test_private_model_revision(tmp_path: Path) -> None:
    """A model with no Hub commit: its revision is derived from the manifest hash."""
    rng = random.Random(9)
    src = tmp_path / "private"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}\n')
    (src / "nested" / "deeper" / "adapter.safetensors").write_bytes(rng.randbytes(5 << 20))
    (src / "nested" / "tokenizer.json").write_bytes(rng.randbytes(1000))
    draft = build_manifest(src, "acme/secret-model", "local")
    rev = private_revision(draft.manifest_hash)
    m = Manifest(draft.model, rev, draft.files)
    cache = tmp_path / "hub"
    snap = fetch_into(cache, src, m)
    assert snap.name == rev and len(rev) == 40
    paths = [f.path for f in m.files]
    assert (
        Path(snapshot_download("acme/secret-model", revision=rev, cache_dir=cache, local_files_only=True))
        == snap
    )
    p = hf_hub_download(
        "acme/secret-model", "nested/deeper/adapter.safetensors", cache_dir=cache, local_files_only=True
    )
    assert Path(p).read_bytes() == (src / "nested/deeper/adapter.safetensors").read_bytes()
    check_offline_subprocess(cache, "acme/secret-model", rev, snap, src, paths)


def test_filtered_snapshot_offline(tmp_path: Path, model_dir: Path, model_manifest: Manifest) -> None:
    """A configs-only fetch is a filtered snapshot: configs resolve, weights are simply absent."""
    cache = tmp_path / "hub"
    configs = model_manifest.select(configs_only=True)
    snap = fetch_into(cache, model_dir, model_manifest, configs)
    p = hf_hub_download(MODEL_NAME, "config.json", cache_dir=cache, local_files_only=True)
    assert Path(p).read_bytes() == (model_dir / "config.json").read_bytes()
    weight = next(f.path for f in model_manifest.files if f.kind == "weight")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(MODEL_NAME, weight, cache_dir=cache, local_files_only=True)
    # Completing it later adds the weights to the same snapshot directory.
    assert fetch_into(cache, model_dir, model_manifest) == snap
    p = hf_hub_download(MODEL_NAME, weight, cache_dir=cache, local_files_only=True)
    assert Path(p).read_bytes() == (model_dir / weight).read_bytes()


SECRET = "hf_caller_token_5e3f9a"


def test_the_callers_environment_travels_to_the_node(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT and MODEL_EXPRESS_URL are the calling process's, not
    the node's: a node started online, pointed at a closed port and without ModelExpress, does what
    each caller's environment says.  The token reaches the Hub and never the node's (debug) log."""
    with FakeHub(token=SECRET) as hub, FakeModelExpress() as mx:
        hub.add_repo(MODEL_NAME, model_dir, MODEL_REVISION)
        mx.add_model("test-org/mx-only", model_dir, MODEL_REVISION)
        node_env = base_env(tmp_path)
        del node_env["HF_HUB_OFFLINE"]  # the node is online; its HF_ENDPOINT is a closed port
        node = NodeProc(tmp_path, "node", "-v", env=node_env).start()
        try:
            node.wait_ready()
            for k in list(os.environ):
                if k.startswith(("HF_", "HUGGING", "MODEL_EXPRESS", "SWARM_")):
                    monkeypatch.delenv(k)
            monkeypatch.setenv("HF_HOME", str(tmp_path / "caller-hf-home"))
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")

            with pytest.raises(ModelNotFound) as ei:  # an offline caller: the node skips the Hub
                swarm.fetch(MODEL_NAME, home=node.home, progress=False, timeout=60)
            assert ei.value.attempts[-1] == Attempt("hub", "skipped", "HF_HUB_OFFLINE is set")
            assert hub.model_requests == []

            monkeypatch.delenv("HF_HUB_OFFLINE")
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("HF_TOKEN", SECRET)
            got = client.fetch_result(
                MODEL_NAME, home=node.home, configs_only=True, progress=False, timeout=60
            )
            assert got.source == "hub" and got.path.is_relative_to(node.cache)
            assert (got.path / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
            assert {r.authorization for r in hub.model_requests} == {f"Bearer {SECRET}"}

            monkeypatch.setenv("MODEL_EXPRESS_URL", mx.url)
            got = client.fetch_result("test-org/mx-only", home=node.home, progress=False, timeout=60)
            assert got.source == "modelexpress"
            assert mx.calls["EnsureModelDownloaded"] == 1
            sock = node.home / "control.sock"
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        finally:
            node.stop()
        log = node.log.read_text(errors="replace")
        assert f"GET {hub.url}/api/models/{MODEL_NAME}/" in log  # the debug log saw the requests
        assert SECRET not in log


def test_the_control_api_checks_the_env_and_never_echoes_it(tmp_path: Path) -> None:
    from swarm.control import ControlServer, _BadRequest

    server = ControlServer(tmp_path / "h")

    def parse(env: object):
        return server._parse_fetch(json.dumps({"repo_id": "gpt2", "env": env}).encode())

    req, _timeout = parse(
        {
            "hf_token": SECRET,
            "hub_offline": True,
            "hf_endpoint": "http://m:1",
            "modelexpress_url": "mx:8001",
            "modelexpress_cache": "/srv/mx",
        }
    )
    assert req.repo_id == "gpt2" and req.env.hf_token == SECRET and req.env.hub_offline is True
    assert SECRET not in repr(req)
    assert parse({})[0].env == parse(None)[0].env
    for bad in (
        {"hf_token": SECRET + "\r\nX-Evil: 1"},
        {"hf_token": 7},
        {"hub_offline": "yes"},
        {"hf_endpoint": f"file:///{SECRET}"},
        {"modelexpress_cache": "relative"},
        {"hf_token": SECRET * 200},
        {"unknown": SECRET},
        [SECRET],
    ):
        with pytest.raises(_BadRequest) as ei:
            parse(bad)
        assert ei.value.status == 400 and "env" in str(ei.value)
        assert SECRET not in str(ei.value)
