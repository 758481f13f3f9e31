"""Security issue #18, finding 7: serving must not follow links out of the served tree, and must not
send bytes that no longer match the manifest.

A co-tenant who can write to a shared HF cache planted ``snapshots/<rev>/config.json ->
<node home>/identity.key``; a remote fetch of that "model" returned the node's private identity key
byte for byte. A file rewritten after its manifest was built was served unverified.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from advkit import ENGINE, MODEL, record, start_node

from swarm.manifest import ManifestError, build_manifest
from swarm.node import Node, NodeConfig
from swarm.sources import FetchRequest, ModelNotFound
from swarm.store import PieceNotAvailable, SnapshotReader
from swarm.testmodel import make_hf_snapshot, make_model_dir

REV = "0123456789abcdef0123456789abcdef01234567"
MiB = 1 << 20


def _plant(cache: Path, name: str, link_for) -> str:
    """A one-file "snapshot" ``acme/<name>`` whose config.json is the link ``link_for(snap)``."""
    repo = cache / f"models--acme--{name}"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    (snap / "config.json").symlink_to(link_for(repo, snap))
    return f"acme/{name}"


async def _fetch_config(node, model: str) -> bytes | None:
    try:
        with trio.fail_after(30):
            snap = await node.fetch(FetchRequest(model, cache_dir=node.config.cache_dir))
    except ModelNotFound:
        return None
    return (snap / "config.json").read_bytes()


@pytest.mark.timeout(90)
async def test_cache_links_out_of_the_repo_are_not_served(tmp_path, error_log):
    """Three plantings in the victim's HF cache (absolute link, relative link climbing out, link
    into blobs/ whose blob links out); the victim serves its cache; a remote peer asks for each.
    An honest snapshot in the same cache is the control: it must still be served."""
    async with AsyncExitStack() as stack:
        victim = Node(
            NodeConfig(
                home=tmp_path / "victim" / "home",
                engine=ENGINE,
                cache_dir=tmp_path / "victim" / "cache",
                serve_hf_cache=True,
            )
        )
        await stack.enter_async_context(victim.running())
        secret_path = Path(victim.config.home) / "identity.key"
        secret = secret_path.read_bytes()
        cache = Path(victim.config.cache_dir)
        make_hf_snapshot(cache, "acme/honest", REV, weights_bytes=1 * MiB, n_weight_files=1)

        def blob_out(repo: Path, snap: Path) -> str:
            (repo / "blobs" / "c0ffee").symlink_to(secret_path)
            return "../../blobs/c0ffee"

        planted = [
            _plant(cache, "leak-abs", lambda repo, snap: str(secret_path)),
            _plant(cache, "leak-rel", lambda repo, snap: os.path.relpath(secret_path, snap)),
            _plant(cache, "leak-blob", blob_out),
        ]
        await victim.serve_cache()  # what a start finds (the snapshots were planted after it)
        thief = await start_node(stack, tmp_path, "thief", bootstrap=tuple(victim.host.addrs[:1]))
        got: dict[str, bytes | None] = {}

        async def one(model: str) -> None:
            got[model] = await _fetch_config(thief, model)

        async with trio.open_nursery() as n:
            for model in [*planted, "acme/honest"]:
                n.start_soon(one, model)
        assert got["acme/honest"] is not None, "the control snapshot was not served"
        leaked = {
            m: "identity.key byte for byte" if got[m] == secret else repr(got[m])[:40]
            for m in planted
            if got[m] is not None
        }
        assert leaked == {}, f"served through links out of the repo: {leaked}"
        record(
            "serving: HF-cache links out of the repo (#18 f7)",
            planted=len(planted),
            served=len(leaked),
            control="served",
        )


def test_serve_directory_link_out_is_refused(tmp_path):
    """A ``--serve`` directory whose file links outside it: building its manifest refuses the
    link (naming it), and a reader of a manifest built before the swap does not serve it."""
    secret = tmp_path / "home" / "identity.key"
    secret.parent.mkdir()
    secret.write_bytes(os.urandom(68))
    served = make_model_dir(tmp_path / "served", weights_bytes=1 * MiB, n_weight_files=1)
    (served / "notes.txt").write_bytes(b"x" * 68)  # same size as the secret
    m = build_manifest(served, MODEL, "local")
    (served / "notes.txt").unlink()
    (served / "notes.txt").symlink_to(secret)
    with pytest.raises(ManifestError, match=r"notes\.txt"):
        build_manifest(served, MODEL, "local")
    fi = m.file_index("notes.txt")
    (index,) = m.file_piece_range(fi)
    with SnapshotReader(served, m) as reader:
        try:
            data = reader.read_piece(index)
        except PieceNotAvailable:
            data = None
        assert data != secret.read_bytes(), "the reader followed the link out of the directory"
        assert index not in reader.have
        # The rest of the directory is still served.
        assert reader.read_piece(m.file_piece_range(m.file_index("config.json"))[0])


def test_file_changed_after_hashing_is_not_sent(tmp_path):
    """Bytes rewritten in place after the manifest was built are refused, on the copying path and
    on the zero-copy (sendfile) path; a file replaced by another one is refused at open."""
    served = make_model_dir(tmp_path / "served", weights_bytes=8 * MiB, n_weight_files=2)
    m = build_manifest(served, MODEL, "local")
    name = "model-00001-of-00002.safetensors"
    fi = m.file_index(name)
    first = m.file_piece_range(fi)[0]
    with SnapshotReader(served, m) as reader:
        good = reader.read_piece(first)
        with reader.piece_span(first) as span:
            assert span is not None  # checked once: zero-copy from now on
        path = served / name
        with open(path, "r+b") as fh:
            fh.write(bytes(b ^ 0xFF for b in good[:4096]))
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later edit
        with reader.piece_span(first) as span:
            assert span is None, "sendfile offered for bytes not checked since the file changed"
        with pytest.raises(PieceNotAvailable, match="does not match"):
            reader.read_piece(first)
        buf = bytearray(m.pieces[first].length)
        with pytest.raises(PieceNotAvailable):
            reader.read_piece_into(first, memoryview(buf))

    other = "model-00002-of-00002.safetensors"
    oi = m.file_index(other)
    with SnapshotReader(served, m) as reader:
        # Replaced (same bytes even) between the reader's scan and its first open.
        tmp = served / "swap.tmp"
        tmp.write_bytes((served / other).read_bytes())
        os.replace(tmp, served / other)
        with pytest.raises(PieceNotAvailable, match="replaced"):
            reader.read_piece(m.file_piece_range(oi)[0])
