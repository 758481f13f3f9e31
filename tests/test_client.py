"""``swarm.fetch`` / ``swarm.afetch`` against running nodes (subprocesses on 127.0.0.1), and the
control API's answers to bad requests."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from modelgen import carried_files, make_model_dir
from procs import PY, NodeProc, base_env, same_files

import swarm
from swarm import client, control
from swarm.control import ControlServer, HomeBusy
from swarm.sources import (
    Attempt,
    FetchResult,
    FetchTimeout,
    ModelNotFound,
    VerificationFailed,
)

SHARED = "acme/shared-model"
"""Fetched by two processes at once."""
OTHER = "acme/other-model"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client")


@pytest.fixture(scope="module")
def sources(tmp) -> dict[str, Path]:
    return {
        SHARED: make_model_dir(tmp / "src-shared", weights_bytes=16 << 20, n_weight_files=2, seed=11),
        OTHER: make_model_dir(tmp / "src-other", weights_bytes=4 << 20, n_weight_files=1, seed=12),
    }


@pytest.fixture(scope="module")
def nodes(tmp, sources):
    worker = NodeProc(
        tmp, "worker", "--serve", f"{SHARED}={sources[SHARED]}", "--serve", f"{OTHER}={sources[OTHER]}"
    ).start()
    front = None
    try:
        worker.wait_ready()
        front = NodeProc(tmp, "front", "--bootstrap", worker.addr).start()
        front.wait_ready()
        yield worker, front
    finally:
        for n in (front, worker):
            if n is not None:
                n.stop()


@pytest.fixture
def offline(monkeypatch, tmp):
    """In-process calls: should anything fall back to the Hub, it must not reach the Internet."""
    for k, v in base_env(tmp).items():
        if k.startswith("HF_"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("SWARM_HOME", raising=False)


def run_py(code: str, env: dict, timeout: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def finish(p: subprocess.Popen, timeout: float = 60.0) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


FETCH_SCRIPT = """
    import json, sys, time
    start_at = {start_at!r}
    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.perf_counter()
    import swarm
    from swarm.client import fetch_result
    r = fetch_result({repo!r}, home={home!r}, configs_only={configs_only!r}, cache_dir={cache!r})
    print(json.dumps({{"path": str(r.path), "source": r.source, "seconds": time.perf_counter() - t0,
                      "libp2p": any(m == "libp2p" or m.startswith("libp2p.") for m in sys.modules),
                      "httpx": "httpx" in sys.modules}}))
"""


@pytest.mark.timeout(60)
def test_two_processes_fetch_at_once_one_download(nodes, tmp, sources):
    worker, front = nodes
    env = base_env(tmp)
    start_at = time.time() + 1.0  # both call swarm.fetch at the same moment
    procs = [
        run_py(
            FETCH_SCRIPT.format(
                start_at=start_at,
                repo=SHARED,
                home=str(front.home),
                configs_only=False,
                cache=str(front.cache),
            ),
            env,
        )
        for _ in range(2)
    ]
    try:
        a, b = (finish(p) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert a["path"] == b["path"]
    assert a["source"] == b["source"] == "swarm"
    assert not a["libp2p"] and not b["libp2p"]
    same_files(sources[SHARED], Path(a["path"]), carried_files(2))
    # One download: the worker sent the model once (plus at most a little endgame duplication).
    [wm] = [m for m in client.models(worker.home) if m["model"] == SHARED]
    assert wm["bytes"] <= wm["bytes_up"] <= wm["bytes"] * 1.25
    [fm] = [m for m in client.models(front.home) if m["model"] == SHARED]
    assert fm["complete"]


@pytest.mark.timeout(60)
def test_fresh_process_configs_fetch_skips_libp2p(nodes, tmp):
    _worker, front = nodes
    env = base_env(tmp)
    cache = tmp / "configs-cache"  # not the node's: the snapshot is laid out here too
    r = finish(
        run_py(
            FETCH_SCRIPT.format(
                start_at=0, repo=OTHER, home=str(front.home), configs_only=True, cache=str(cache)
            ),
            env,
        )
    )
    assert r["source"] == "swarm" and not r["libp2p"]
    assert r["seconds"] < 5.0  # ~0.3 s on a quiet machine; scripts/bench_client.py measures it
    path = Path(r["path"])
    assert path.is_relative_to(cache)
    names = sorted(p.name for p in path.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith(".safetensors") for n in names)
    # Complete in the local cache now: no node, no network, not even httpx.
    r2 = finish(
        run_py(
            FETCH_SCRIPT.format(
                start_at=0, repo=OTHER, home=str(tmp / "no-node"), configs_only=True, cache=str(cache)
            ),
            env,
        )
    )
    assert r2["path"] == r["path"] and r2["source"] == "local-cache"
    assert not r2["libp2p"] and not r2["httpx"]


@pytest.mark.timeout(60)
def test_errors_are_typed_and_list_the_sources(nodes, tmp, offline):
    _worker, front = nodes
    cache = tmp / "err-cache"
    t0 = time.monotonic()
    with pytest.raises(FetchTimeout) as ei:
        swarm.fetch("acme/missing", home=front.home, cache_dir=cache, timeout=1.0)
    assert time.monotonic() - t0 < 10
    tried = {a.source: a for a in ei.value.attempts}
    assert tried["local-cache"].outcome == "failed"
    assert tried["swarm"].outcome == "failed" and "still running" in tried["swarm"].reason
    # Without a timeout the same request (it joins the fetch still running on the node) ends in
    # ModelNotFound: no provider in the DHT, and the Hub is off.
    with pytest.raises(ModelNotFound) as ei:
        swarm.fetch("acme/missing", home=front.home, cache_dir=cache)
    msg = str(ei.value)
    assert msg.startswith("cannot fetch acme/missing@main: no source has it")
    tried = {a.source: a for a in ei.value.attempts}
    assert list(tried) == ["local-cache", "modelexpress", "swarm", "hub"]
    assert "no providers" in tried["swarm"].reason
    assert tried["hub"].outcome == "skipped" and "HF_HUB_OFFLINE" in tried["hub"].reason


async def test_afetch_in_trio_with_cache_dir_and_local_dir(nodes, tmp, sources, offline):
    _worker, front = nodes
    cache = tmp / "async-cache"
    local = tmp / "async-local"
    events = []
    path = await swarm.afetch(
        OTHER, home=front.home, cache_dir=cache, local_dir=local, on_event=events.append
    )
    assert path == local
    same_files(sources[OTHER], local, carried_files(1))
    snaps = list((cache / "models--acme--other-model" / "snapshots").iterdir())
    assert len(snaps) == 1
    same_files(sources[OTHER], snaps[0], carried_files(1))
    assert (cache / "models--acme--other-model" / "refs" / "main").read_text() == snaps[0].name
    assert any(e.get("event") == "attempt" for e in events)


def _raw(sock_path: Path, data: bytes) -> tuple[int, dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(str(sock_path))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.strip() else {}


@pytest.mark.timeout(60)
def test_control_api_answers_bad_requests_and_keeps_running(nodes):
    worker, _front = nodes
    sock = worker.home / "control.sock"
    assert _raw(sock, b"garbage\r\n\r\n")[0] == 400
    assert _raw(sock, b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n")[0] == 404
    assert _raw(sock, b"POST /v1/status HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")[0] == 405

    def post(body: bytes, length: int | None = None) -> tuple[int, dict]:
        n = len(body) if length is None else length
        return _raw(
            sock,
            b"POST /v1/fetch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % n + body,
        )

    status, body = post(b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, body = post(b'{"repo_id": "acme/x", "colour": 1}')
    assert status == 400 and "colour" in body["error"]
    status, body = post(b'{"repo_id": "not a name"}')
    assert status == 400
    status, body = post(b'{"repo_id": "acme/x", "timeout": -1}')
    assert status == 400 and "timeout" in body["error"]
    assert post(b"", length=10 << 20)[0] == 413
    assert (
        _raw(sock, b"GET /v1/status HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 40000 + b"\r\n\r\n")[0]
        == 431
    )
    # Still serving, and the other read routes answer.
    assert client.status(worker.home)["peer_id"] == worker.status["peer_id"]
    assert isinstance(client.peers(worker.home), list)
    models = client.models(worker.home)
    assert {m["model"] for m in models} >= {SHARED, OTHER}
    assert all("peer_stats" in m for m in models)


def test_import_swarm_is_cheap():
    code = (
        "import sys, swarm, swarm.client, swarm.config; "
        "print(sorted(m for m in ('libp2p', 'trio', 'httpx', 'huggingface_hub', 'swarm.node') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(60)
def test_the_client_side_of_the_socket_stays_light():
    """What a fetch through a running node loads (issue #13): no trio, httpx, h11 nor libp2p, and
    neither side of the control socket imports the other."""
    code = (
        "import sys, swarm.client, swarm.control_client, swarm.delivery, swarm.fetchapi, swarm.home, "
        "swarm.selection, swarm.sources.local; "
        "print(sorted(m for m in ('libp2p', 'trio', 'httpx', 'h11', 'swarm.control', 'swarm.node') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, swarm.control; print('swarm.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the control server in process, with a stand-in node (no libp2p) ---------------------------


class FakeNode:
    def __init__(self, cache_dir: Path) -> None:
        self.config = SimpleNamespace(cache_dir=cache_dir)
        self.shared: dict = {}

    def status(self) -> dict:
        return {
            "peer_id": "12D3KooWfake",
            "addrs": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWfake"],
            "peers": [],
            "models": [],
            "bytes_up": 0,
            "bytes_down": 0,
        }


class FakeFetcher:
    """Blocks until released; counts calls."""

    def __init__(self, path: Path, error: Exception | None = None) -> None:
        self.path = path
        self.error = error
        self.calls: list = []
        self.release = trio.Event()

    async def __call__(self, req, *, on_event):
        self.calls.append(req)
        on_event({"event": "source", "source": "swarm"})
        on_event({"event": "progress", "have": 1, "total": 2})
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return FetchResult(
            self.path, "swarm", self.path.name, (Attempt("swarm", "ok", f"snapshot at {self.path}"),)
        )


@pytest.fixture
def home(tmp_path) -> Path:
    # A short path: sun_path holds 108 bytes.
    return tmp_path / "h"


async def test_control_joins_identical_fetches_and_types_errors(tmp_path, home, offline):
    snap = tmp_path / "snap" / "abc"
    snap.mkdir(parents=True)
    fetcher = FakeFetcher(snap)
    server = ControlServer(home, FakeNode(tmp_path / "cache"), fetcher=fetcher)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        assert stat.S_IMODE((home / "control.sock").stat().st_mode) == 0o600
        paths = []

        async def one(use_thread: bool) -> None:
            if use_thread:  # the sync client, in a thread
                paths.append(
                    await trio.to_thread.run_sync(lambda: swarm.fetch("acme/m", home=home, progress=False))
                )
            else:
                paths.append(await swarm.afetch("acme/m", home=home, progress=False))

        async with trio.open_nursery() as inner:
            inner.start_soon(one, True)
            inner.start_soon(one, False)
            with trio.fail_after(10):
                while len(server._jobs) != 1 or sum(len(j.subscribers) for j in server._jobs.values()) != 2:
                    await trio.sleep(0.01)
            fetcher.release.set()
        assert paths == [snap, snap] and len(fetcher.calls) == 1

        # A timeout ends one wait, not the fetch; a later request joins the running fetch.
        fetcher.release = trio.Event()
        fetcher.calls.clear()
        with pytest.raises(FetchTimeout) as ei:
            await swarm.afetch("acme/other", home=home, timeout=0.3, progress=False)
        swarm_try = [a for a in ei.value.attempts if a.source == "swarm"]
        assert swarm_try and "still running" in swarm_try[0].reason
        assert len(server._jobs) == 1
        fetcher.release.set()
        assert await swarm.afetch("acme/other", home=home, progress=False) == snap
        assert len(fetcher.calls) <= 2

        # Errors keep their type and attempts across the socket.
        attempts = (Attempt("swarm", "failed", "peer sent bad pieces"),)
        server._fetcher = FakeFetcher(snap, VerificationFailed("cannot fetch acme/bad: no", attempts))
        server._fetcher.release.set()
        with pytest.raises(VerificationFailed) as ei:
            await swarm.afetch("acme/bad", home=home, progress=False)
        assert ei.value.attempts == attempts and str(ei.value) == "cannot fetch acme/bad: no"
        n.cancel_scope.cancel()
    assert not (home / "control.sock").exists()


class ChattyFetcher:
    """Tells progress once per piece, all at once (as a fast transfer does), then is done."""

    def __init__(self, path: Path, pieces: int = 2000) -> None:
        self.path = path
        self.pieces = pieces

    async def __call__(self, req, *, on_event):
        on_event({"event": "source", "source": "swarm"})
        for k in range(1, self.pieces + 1):
            on_event({"event": "progress", "have": k, "total": self.pieces})
        on_event({"event": "done"})
        return FetchResult(self.path, "swarm", self.path.name, (Attempt("swarm", "ok", "snapshot"),))


@pytest.mark.timeout(60)
async def test_progress_is_sent_at_most_every_tenth_second_and_afetch_can_be_cancelled(
    tmp_path, home, offline
):
    snap = tmp_path / "snap" / "abc"
    snap.mkdir(parents=True)
    server = ControlServer(home, FakeNode(tmp_path / "cache"), fetcher=ChattyFetcher(snap))
    async with trio.open_nursery() as n:
        await n.start(server.run)
        seen: list[dict] = []
        assert await swarm.afetch("acme/m", home=home, progress=False, on_event=seen.append) == snap
        progress = [e for e in seen if e["event"] == "progress"]
        # 2000 events within one 0.1 s window: the first, then the latest one before "done".
        assert 1 <= len(progress) <= 5
        assert progress[-1] == {"event": "progress", "have": 2000, "total": 2000}
        assert [e["event"] for e in seen][-1] == "done"

        # Cancelling afetch ends the call (its worker thread's connection is shut down); the
        # node's job goes on and a later request joins it.
        blocker = FakeFetcher(snap)
        server._fetcher = blocker
        with trio.move_on_after(0.5) as scope:
            await swarm.afetch("acme/slow", home=home, progress=False)
        assert scope.cancelled_caught
        blocker.release.set()
        assert await swarm.afetch("acme/slow", home=home, progress=False) == snap
        n.cancel_scope.cancel()


async def test_control_socket_lifecycle(tmp_path, home, monkeypatch):
    monkeypatch.setattr(control, "REQUEST_READ_TIMEOUT", 0.2)
    server = ControlServer(home)  # no node yet: status answers 503, fetches wait
    async with trio.open_nursery() as n:
        await n.start(server.run)
        with pytest.raises(client.NodeUnavailable, match="starting"):
            await trio.to_thread.run_sync(client.status, home)
        # A second server on the same home refuses to start.
        with pytest.raises(HomeBusy):
            await ControlServer(home).run()
        # A client that sends nothing is answered 408 and dropped.
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(str(home / "control.sock"))
        with trio.fail_after(5):
            data = await s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408 ")
        s.close()
        server.attach(FakeNode(tmp_path))
        st = await trio.to_thread.run_sync(client.status, home)
        assert st["peer_id"] == "12D3KooWfake" and st["home"] == str(home)
        n.cancel_scope.cancel()
    # A socket file nobody listens on (a killed node) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "control.sock"))
    stale.close()
    async with trio.open_nursery() as n:
        await n.start(ControlServer(home, FakeNode(tmp_path)).run)
        assert (await trio.to_thread.run_sync(client.status, home))["peer_id"] == "12D3KooWfake"
        n.cancel_scope.cancel()


def test_long_home_paths_work(tmp_path):
    deep = tmp_path.joinpath(*["d" * 40] * 4)  # the socket path is longer than sun_path allows
    deep.mkdir(parents=True)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(ControlServer(deep, FakeNode(tmp_path)).run)
            st = await trio.to_thread.run_sync(client.status, deep)
            n.cancel_scope.cancel()
        return st

    assert len(str(deep / "control.sock")) > 108
    assert trio.run(main)["peer_id"] == "12D3KooWfake"


@pytest.mark.timeout(30)
def test_the_light_home_and_env_match_swarm_config_and_sourceenv(tmp_path, monkeypatch):
    """What the client reads before it sends a fetch, without swarm.config or attrs (issue #12
    item 5), is what swarm.config.resolve_home and SourceEnv.from_environ make of it."""
    from swarm import config, control_client, fetchwire
    from swarm.fetchapi import SourceEnv

    monkeypatch.delenv("SWARM_HOME", raising=False)
    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    for given in (str(tmp_path / "h"), "~/swarm-h", Path("rel/h"), None):
        assert control_client.resolve_home(given) == config.resolve_home(given)
    toml = tmp_path / "c.toml"
    toml.write_text(f'home = "{tmp_path / "from-toml"}"\n')
    assert control_client.resolve_home(None, cli_config=toml) == config.resolve_home(None, cli_config=toml)
    monkeypatch.setenv("SWARM_HOME", f" {tmp_path / 'env'} ")
    for given in (None, "", str(tmp_path / "cli")):
        assert control_client.resolve_home(given, cli_config=toml) == config.resolve_home(
            given, cli_config=toml
        )
    for environ in (
        {},
        {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"},
        {"TRANSFORMERS_OFFLINE": "no", "HUGGING_FACE_HUB_TOKEN": "t", "MODEL_EXPRESS_URL": "grpc://m:1"},
        {"HF_HUB_OFFLINE": "", "MODEL_EXPRESS_CACHE_DIRECTORY": "~/mx", "MODEL_EXPRESS_CACHE_PATH": ""},
    ):
        assert fetchwire.environ_json(environ) == SourceEnv.from_environ(environ).to_json()


@pytest.mark.timeout(60)
def test_a_fetch_goes_out_before_attrs_and_http_client_load():
    """``swarm.fetch`` sends its request having loaded only the light modules; the request checks
    (attrs, swarm.manifest) and http.client come while the node works (issue #12 item 5)."""
    code = (
        "import sys, swarm.cli, swarm.client, swarm.fetchwire; "
        "print(sorted(m for m in ('attrs', 'http.client', 'swarm.config', 'swarm.fetchapi', "
        "'swarm.manifest', 'logging') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _one_answer(home: Path, answer: bytes) -> Any:
    """A socket at ``home``'s control.sock that reads one request and writes ``answer``; a thread."""
    import threading

    home.mkdir(parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(home / "control.sock"))
    srv.listen(1)
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            got["head"], got["body"] = head, body
            conn.sendall(answer)
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, got


def _chunked(data: bytes, sizes: tuple[int, ...]) -> bytes:
    out, i = b"", 0
    for n in sizes:
        part, i = data[i : i + n], i + n
        out += b"%x;ext=1\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\nx-trailer: 1\r\n\r\n"


@pytest.mark.timeout(30)
def test_the_fetch_answer_reader(tmp_path):
    """The client's own reader of a fetch answer (no http.client, issue #12 item 5): chunked NDJSON
    with lines split across chunks, error answers with a Content-Length (400 -> ValueError like
    the client's own checks, others FetchError), and a cut answer (FetchError: lost the node)."""
    from swarm import control_client
    from swarm.fetchapi import FetchError, FetchResult

    events = [
        {"event": "source", "source": "swarm"},
        {"event": "progress", "have": 1, "total": 2},
        {
            "event": "result",
            "path": str(tmp_path / "snap"),
            "source": "swarm",
            "revision": "r1",
            "attempts": [],
        },
    ]
    ndjson = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    ok = b"HTTP/1.1 200 \r\ncontent-type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i, raw in enumerate((False, True)):
        home = tmp_path / f"ok{i}"
        t, got = _one_answer(home, ok + _chunked(ndjson, (7, 1, 30, 2, 500)))
        seen: list[dict] = []
        body = {"repo_id": "acme/x", "timeout": None}
        r = control_client.fetch_via_node(body, home, seen.append, raw=raw)
        t.join(5)
        assert json.loads(got["body"]) == body and got["head"].startswith(b"POST /v1/fetch HTTP/1.1\r\n")
        assert seen == events[:2]
        if raw:
            assert r == {"path": str(tmp_path / "snap"), "source": "swarm", "revision": "r1", "attempts": []}
        else:
            assert r == FetchResult(tmp_path / "snap", "swarm", "r1", ())

    def refused(status: int) -> bytes:
        text = json.dumps({"error": "bad fetch request: no"}).encode()
        return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
            status,
            len(text),
            text,
        )

    for name, answer, error in (
        ("400", refused(400), ValueError),
        ("503", refused(503), FetchError),
        ("cut", ok + _chunked(ndjson, (40,))[:-40], FetchError),
        ("junk", b"SSH-2.0\r\n\r\n", FetchError),
    ):
        t, _got = _one_answer(tmp_path / name, answer)
        with pytest.raises(error) as e:
            control_client.fetch_via_node({"repo_id": "acme/x"}, tmp_path / name, lambda _e: None)
        t.join(5)
        if name in ("400", "503"):
            assert f"HTTP {name}: bad fetch request: no" in str(e.value)
        else:
            assert "lost the swarm-node" in str(e.value)
