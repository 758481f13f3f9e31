"""What swarm writes is a Hugging Face hub cache: the Hub client finds it offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from modelgen import MODEL_NAME, MODEL_REVISION

from swarm.manifest import Manifest, build_manifest
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


def check_offline_subprocess(cache: Path, repo_id: str, revision: str, snap: Path,
                             src: Path, paths: list[str]) -> None:
    """With HF_HUB_OFFLINE=1 in a fresh interpreter (the variable is read at import time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cache.parent / "hf-home"), PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD, json.dumps([repo_id, revision, str(cache), paths])],
        capture_output=True, text=True, env=env, timeout=60,
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
    assert Path(snapshot_download(MODEL_NAME, revision=MODEL_REVISION, cache_dir=cache,
                                  local_files_only=True)) == snap
    assert Path(snapshot_download(MODEL_NAME, cache_dir=cache, local_files_only=True)) == snap
    for f in paths:
        p = hf_hub_download(MODEL_NAME, f, revision=MODEL_REVISION, cache_dir=cache,
                            local_files_only=True)
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
    assert Path(snapshot_download("acme/secret-model", revision=rev, cache_dir=cache,
                                  local_files_only=True)) == snap
    p = hf_hub_download("acme/secret-model", "nested/deeper/adapter.safetensors", cache_dir=cache,
                        local_files_only=True)
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
