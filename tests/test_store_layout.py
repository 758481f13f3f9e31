"""swarm.store.layout (the one owner of the HF cache layout) and the explicit per-file state of a
download (swarm.store.partfile.FileState: absent, partial, final)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from swarm.manifest import build_manifest
from swarm.store import FileState, RepoLayout, SnapshotReader, Store, StoreError, repo_folder_name
from swarm.store import layout as L
from swarm.testmodel import make_hf_snapshot

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def test_names() -> None:
    assert repo_folder_name("org/name") == "models--org--name"
    assert L.model_of_folder("models--org--name") == "org/name"
    assert L.model_of_folder("models--gpt2") == "gpt2"
    assert L.model_of_folder("datasets--org--name") is None
    assert L.model_of_folder("models--org--a--b") is None  # not what repo_folder_name makes
    with pytest.raises(StoreError):
        repo_folder_name("../etc")
    assert L.link_target("config.json", "ab") == "../../blobs/ab"
    assert L.link_target("a/b/c.json", "ab") == "../../../../blobs/ab"
    assert L.snapshot_parts("/c/models--o--n/snapshots/abc") == (Path("/c/models--o--n"), "abc")
    assert L.snapshot_parts("/c/models--o--n/blobs/abc") is None
    with pytest.raises(StoreError):
        L.check_ref("../main")


def test_links_refs_and_complete_snapshots(tmp_path: Path) -> None:
    repo = RepoLayout.of(tmp_path, "org/m")
    assert repo.root == tmp_path / "models--org--m"
    repo.blobs.mkdir(parents=True)
    (repo.blob("b1")).write_bytes(b"one")
    (repo.blob("b2")).write_bytes(b"two!")
    snap = repo.snapshot("r1")
    snap.mkdir(parents=True)
    assert repo.link(snap, "config.json", "b1")
    assert not repo.link(snap, "config.json", "b1")  # already so
    repo.link_all(snap, [("sub/w.bin", "b2"), ("config.json", "b2")])  # relinked
    assert (snap / "config.json").read_bytes() == b"two!"
    assert os.readlink(snap / "sub" / "w.bin") == "../../../blobs/b2"
    assert repo.snapshot_blobs("r1") == {"config.json": "b2", "sub/w.bin": "b2"}
    assert not [p for p in snap.rglob(".*")]  # no staging leftovers
    assert repo.read_ref("main") is None
    repo.write_ref("main", "r1")
    repo.write_ref("refs/pr/1", "r1")
    assert repo.read_ref("main") == "r1" and repo.refs_to("r1") == ["main", "refs/pr/1"]
    assert not [p for p in repo.refs.rglob(".*")]
    assert repo.revisions() == ["r1"]
    assert L.models(tmp_path) == ["org/m"]
    # Without a manifest: complete = non-empty, no broken link, the paths asked for present.
    assert repo.complete_snapshot("r1", None) == snap
    assert repo.complete_snapshot("r1", None, ["config.json"]) == snap
    assert repo.complete_snapshot("r1", None, ["nope.json"]) is None
    assert repo.complete_snapshot("r1", None, verify=True) is None
    repo.link(snap, "gone.bin", "b3")  # dangling
    assert repo.complete_snapshot("r1", None) is None
    assert repo.complete_snapshot("../x", None) is None
    assert repo.blob_bytes() == 7


def test_the_hub_layout_of_testmodel_is_the_layout(tmp_path: Path) -> None:
    snap = make_hf_snapshot(tmp_path, "org/tiny", weights_bytes=1 << 16)
    repo = RepoLayout.of(tmp_path, "org/tiny")
    assert snap.parent == repo.snapshots and repo.read_ref("main") == snap.name
    links = repo.snapshot_blobs(snap.name)
    assert links and all((repo.blobs / b).is_file() for b in links.values())
    assert repo.complete_snapshot(snap.name, None) == snap


def test_file_state_absent_partial_final(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    (src / "config.json").write_text("{}")
    (src / "w.safetensors").write_bytes(rng.randbytes(8 * MiB + 10))
    m = build_manifest(src, "org/states", "main")
    w = m.file_index("w.safetensors")
    pieces = list(m.file_piece_range(w))
    reader = SnapshotReader(src, m)
    store = Store(tmp_path / "cache")
    with store.open_download(m) as dl:
        assert dl.file_state(w) is FileState.ABSENT
        dl.write_piece(pieces[1], reader.read_piece(pieces[1]))
        assert dl.file_state(w) is FileState.PARTIAL
    with store.open_download(m) as dl:  # restored from the resume state
        assert dl.file_state(w) is FileState.PARTIAL
        # The restored piece rots on disk: its first read drops it, and the file is absent again.
        part = store.layout(m.model).incomplete(m.files[w].blake3.split(":", 1)[1])
        with open(part, "r+b") as fh:
            fh.seek(m.pieces[pieces[1]].offset)
            fh.write(b"\0\0\0\0")
        with pytest.raises(StoreError):
            dl.read_piece(pieces[1])
        assert dl.take_dropped() == {pieces[1]} and dl.take_dropped() == frozenset()
        assert dl.file_state(w) is FileState.ABSENT
        for i in range(m.num_pieces):
            dl.write_piece(i, reader.read_piece(i))
        assert dl.file_state(w) is FileState.FINAL
        assert dl.file_state(m.file_index("config.json")) is FileState.FINAL
        snap = dl.finalize()
    assert store.find_complete(m.model, m.revision, verify=True) == snap
