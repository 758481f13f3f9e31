"""Dynamo integration against the real ai-dynamo-runtime (the ``dynamo`` install extra).

A real Dynamo worker (``tests/dynamo_worker.py``: ``dynamo._core.register_model`` with file-based
discovery, ``DYN_FILE_KV``) registers a generated model; its ModelDeploymentCard is read back from
the discovery directory. Swarm nodes run as ``swarm-node`` subprocesses on 127.0.0.1: the worker
host's node has only Dynamo's environment (it serves the registered model by itself), the others
fetch by card. The last test runs Dynamo's real HTTP frontend (``tests/dynamo_frontend.py``)
behind a counting HTTP proxy and shows it loads the card's files from what the swarm prefetched,
sending no request to the worker's metadata server.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("dynamo._core", reason="needs the dynamo extra: pip install -e '.[test,dynamo]'")

from modelgen import make_model_dir
from procs import PY, NodeProc, base_env

from swarm import client
from swarm.dynamo.card import (
    dir_mismatches,
    file_digest,
    load_card,
    manifest_mismatches,
    swarm_name,
)
from swarm.dynamo.watch import kept_files
from swarm.manifest import build_manifest
from swarm.sources import ModelNotFound, VerificationFailed

TESTS = Path(__file__).resolve().parent
NAME = "my-model"
"""A single-part served name, as ``--served-model-name`` often is: swarm calls it dynamo/my-model."""
NAME_B = "my-model-b"
"""Registered with self-hosted metadata off (file:// paths in the card)."""
REGISTER_TIMEOUT = 60.0
NODE_SERVE_TIMEOUT = 60.0
FRONTEND_TIMEOUT = 60.0
# A tokenizer Dynamo's frontend can load (the generated model's stand-in BPE is for byte counts).
TOKENIZER = json.dumps(
    {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(("<s>", "</s>"))
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3},
            "unk_token": "<unk>",
        },
    }
).encode()
EXTRA = {
    "LICENSE": b"Apache-2.0, see the text\n",
    "logo.png": b"\x89PNG\r\n\x1a\n not a real image",
    "USE_POLICY.md": b"Use responsibly.\n",
    "tokenizer.json": TOKENIZER,
}


def free_port() -> int:
    """A free 127.0.0.1 port under 32768 (Dynamo reads DYN_SYSTEM_PORT as an i16)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port under 32768")


def model(root: Path, seed: int) -> Path:
    return make_model_dir(root, weights_bytes=1 << 20, n_weight_files=2, seed=seed, extra_files=EXTRA)


class DynamoWorker:
    """``tests/dynamo_worker.py`` as a subprocess; stops when its stdin closes."""

    def __init__(self, env: dict, model_dir: Path, name: str, endpoint: str, log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.popen = subprocess.Popen(
                [PY, str(TESTS / "dynamo_worker.py"), str(model_dir), name, endpoint],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        lines: queue.Queue[bytes] = queue.Queue()

        def read() -> None:
            for line in self.popen.stdout:
                lines.put(line)
            lines.put(b"")  # exited

        threading.Thread(target=read, daemon=True).start()
        try:
            line = lines.get(timeout=REGISTER_TIMEOUT)
        except queue.Empty:
            line = b""
        if b"REGISTERED" not in line:
            self.stop()
            raise AssertionError(f"the Dynamo worker did not register:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def card_record(kv: Path, name: str) -> Path:
    for p in sorted((kv / "v1" / "mdc").iterdir()):
        if json.loads(p.read_bytes())["card_json"]["display_name"] == name:
            return p
    raise AssertionError(f"no card for {name} in {kv}")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dynamo")


@pytest.fixture(scope="module")
def dyn_env(tmp) -> dict:
    env = base_env(tmp)
    env.update(
        DYN_FILE_KV=str(tmp / "kv"),
        DYN_DISCOVERY_BACKEND="file",
        DYN_TCP_RPC_HOST="127.0.0.1",
        DYN_SYSTEM_HOST="127.0.0.1",
        NO_COLOR="1",
        DYN_LOG="warn",
    )
    (tmp / "kv").mkdir()
    return env


@pytest.fixture(scope="module")
def sources(tmp) -> dict[str, Path]:
    return {
        "v1": model(tmp / "worker-model", seed=21),
        "v2": model(tmp / "updated-model", seed=22),
        "b": model(tmp / "worker-model-b", seed=23),
    }


@pytest.fixture(scope="module")
def workers(tmp, dyn_env, sources):
    """Two real Dynamo workers: self-hosted metadata on (NAME) and off (NAME_B)."""
    port = free_port()
    on = DynamoWorker(
        dict(dyn_env, DYN_SELF_HOST_METADATA="1", DYN_SYSTEM_PORT=str(port)),
        sources["v1"],
        NAME,
        "ns1.backend.generate",
        tmp / "dynamo-worker.log",
    )
    off = None
    try:
        off = DynamoWorker(
            dict(dyn_env, DYN_SELF_HOST_METADATA="0"),
            sources["b"],
            NAME_B,
            "ns2.backend.generate",
            tmp / "dynamo-worker-b.log",
        )
        yield {"port": port, "card": card_record(tmp / "kv", NAME), "card_b": card_record(tmp / "kv", NAME_B)}
    finally:
        for w in (off, on):
            if w is not None:
                w.stop()


@pytest.fixture(scope="module")
def nodes(tmp, dyn_env, workers):
    """The worker host's swarm node (Dynamo's environment, nothing else) and a frontend's."""
    worker = NodeProc(tmp, "swarm-worker", env=dyn_env).start()
    front = None
    try:
        worker.wait_ready()
        front = NodeProc(tmp, "swarm-front", "--bootstrap", worker.addr, env=base_env(tmp)).start()
        front.wait_ready()
        wait_served(
            worker, {swarm_name(load_card(workers["card"])), swarm_name(load_card(workers["card_b"]))}
        )
        yield worker, front
    finally:
        for n in (front, worker):
            if n is not None:
                n.stop()


def wait_served(node: NodeProc, names: set[str], timeout: float = NODE_SERVE_TIMEOUT) -> list:
    end = time.monotonic() + timeout
    while True:
        models = client.models(node.home)
        if names <= {m["model"] for m in models}:
            return models
        if time.monotonic() > end:
            raise AssertionError(
                f"{node.name} serves {models}, not {names}:\n{node.log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.2)


# --- the card ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_card_of_the_real_runtime_matches_swarm_manifests(workers, sources):
    card = load_card(workers["card"])
    names = {f.name for f in card.files}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
        "model.safetensors.index.json",
        "LICENSE",
        "logo.png",
        "USE_POLICY.md",
    } <= names
    assert not any(n.endswith(".safetensors") for n in names)  # weights are never in a card
    assert all(
        f.url.startswith(f"http://127.0.0.1:{workers['port']}/v1/metadata/ns1/backend/generate/{NAME}/_base/")
        for f in card.files
    )
    assert card.source_path == str(sources["v1"])
    # The card's checksum of a file is its plain blake3: what a swarm manifest holds for it.
    for f in card.files:
        assert file_digest(sources["v1"] / f.name) == (f.checksum, f.size)
    # Files manifests skip by default (LICENSE, images) are carried when the card asks for them.
    assert kept_files(card) == {"LICENSE", "logo.png"}
    default = build_manifest(sources["v1"], swarm_name(card), "r")
    assert manifest_mismatches(default, card.expect()) == [
        "LICENSE: not in the manifest",
        "logo.png: not in the manifest",
    ]
    kept = build_manifest(sources["v1"], swarm_name(card), "r", keep=kept_files(card))
    assert manifest_mismatches(kept, card.expect()) == []
    # The worker's metadata server hands out those bytes.
    f = next(f for f in card.files if f.name == "LICENSE")
    with urllib.request.urlopen(f.url, timeout=10) as r:
        assert r.read() == EXTRA["LICENSE"]


@pytest.mark.timeout(120)
def test_card_with_self_hosting_off_lists_worker_paths(workers, sources):
    card = load_card(workers["card_b"])
    assert card.files and all(f.url.startswith("file:///") or f.url.startswith("/") for f in card.files)
    names = {f.name for f in card.files}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    # Without self-hosting Dynamo lists no extra_files: its frontend picks siblings up from the
    # worker's directory itself, when that is reachable (a shared mount).
    assert "LICENSE" not in names, names
    assert dir_mismatches(sources["b"], card.expect()) == []
    assert swarm_name(card) == f"dynamo/{NAME_B}"


# --- fetch by card through two nodes -------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", ["card", "card_b"])
def test_fetch_card_through_two_nodes(workers, nodes, tmp, which):
    _, front = nodes
    card = load_card(workers[which])
    result = client.fetch_card_result(workers[which], home=front.home, timeout=60)
    assert result.source == "swarm"
    assert dir_mismatches(result.path, card.expect()) == []
    assert sorted(p.name for p in result.path.iterdir()) == sorted(f.name for f in card.files)
    assert not list(result.path.glob("*.safetensors"))  # the card's files, not the weights


@pytest.mark.timeout(180)
def test_fetch_card_cli_with_weights_for_scale_out(workers, nodes, tmp, sources):
    _, front = nodes
    out = subprocess.run(
        [
            PY,
            "-m",
            "swarm.cli",
            "fetch",
            "--card",
            str(workers["card"]),
            "--weights",
            "--home",
            str(front.home),
            "--json",
            "--timeout",
            "60",
        ],
        env=base_env(tmp),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    path = Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert file_digest(path / shard) == file_digest(sources["v1"] / shard)
    assert dir_mismatches(path, load_card(workers["card"]).expect()) == []


@pytest.mark.timeout(120)
def test_card_manifest_mismatch_is_refused(workers, nodes, tmp):
    _, front = nodes
    obj = json.loads(workers["card"].read_bytes())
    cfg = obj["card_json"]["model_info"]["hf_config_json"]
    cfg["checksum"] = "blake3:" + "0" * 64  # the card says other bytes than any manifest has
    bad = tmp / "bad-card.json"
    bad.write_text(json.dumps(obj))
    with pytest.raises(ModelNotFound) as e:
        client.fetch_card(bad, home=front.home, timeout=60)
    assert "none gave a usable manifest" in str(e.value)


@pytest.mark.timeout(120)
def test_tampered_file_is_refused(workers, nodes, tmp):
    _, front = nodes
    card = load_card(workers["card"])
    path = client.fetch_card(card, home=front.home, timeout=60)
    target = (path / "tokenizer_config.json").resolve()  # the blob the snapshot links to
    original = target.read_bytes()
    try:
        target.write_bytes(original.replace(b"131072", b"999999"))
        with pytest.raises(VerificationFailed) as e:
            client.fetch_card(card, home=front.home, timeout=60)
        assert "tokenizer_config.json" in str(e.value)
    finally:
        target.write_bytes(original)
    assert dir_mismatches(client.fetch_card(card, home=front.home, timeout=60), card.expect()) == []


@pytest.mark.timeout(240)
def test_rolling_update_fetch_by_card_gets_the_cards_version(workers, nodes, tmp, sources):
    """Three providers already announce an updated model under the same name, two (the worker and
    the frontend that fetched it) the card's version: a fetch by name takes the majority's
    manifest, a fetch by card the card's."""
    worker, _ = nodes
    name = swarm_name(load_card(workers["card"]))
    updated = [
        NodeProc(
            tmp,
            f"updated-{i}",
            "--bootstrap",
            worker.addr,
            "--serve",
            f"{name}={sources['v2']}",
            env=base_env(tmp),
        ).start()
        for i in range(3)
    ]
    fresh = None
    try:
        for n in updated:
            n.wait_ready()
        fresh = NodeProc(tmp, "fresh-front", "--bootstrap", worker.addr, env=base_env(tmp)).start()
        fresh.wait_ready()
        card = load_card(workers["card"])
        by_name = client.fetch(name, home=fresh.home, configs_only=True, timeout=60)
        assert dir_mismatches(by_name, card.expect()), "the by-name fetch took the card's version"
        path = client.fetch_card(card, home=fresh.home, timeout=60)
        assert dir_mismatches(path, card.expect()) == []
    finally:
        for n in (fresh, *updated):
            if n is not None:
                n.stop()


# --- the sidecar and Dynamo's real frontend ------------------------------------------------------


class CountingProxy:
    """An HTTP forward proxy on 127.0.0.1 that counts the requests passing through it."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                try:
                    with opener.open(self.path, timeout=10) as r:
                        code, body = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, body = e.code, e.read()
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def frontend_lists(env: dict, home: Path, log: Path) -> None:
    """Run Dynamo's frontend with ``home`` until /v1/models lists NAME, then stop it."""
    port = free_port()
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [PY, str(TESTS / "dynamo_frontend.py"), str(port)],
            env=dict(env, HOME=str(home)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        end = time.monotonic() + FRONTEND_TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError, ValueError),
                direct.open(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r,
            ):
                if NAME in {m["id"] for m in json.loads(r.read())["data"]}:
                    return
            assert p.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < end, (
                f"the frontend never listed {NAME}:\n" + log.read_text(errors="replace")[-3000:]
            )
            time.sleep(0.2)
    finally:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.timeout(240)
def test_watch_prefetches_and_the_frontend_requests_nothing_from_the_worker(workers, nodes, tmp, dyn_env):
    """The sidecar on a frontend host fetches the card's files through the swarm into Dynamo's
    metadata cache; Dynamo's frontend then loads the model without asking the worker for a file.

    All processes share one machine, so the worker's model directory is visible to the sidecar,
    which would serve that instead of fetching: the sidecar reads a copy of the discovery
    directory whose card names a source_path it cannot see, as on a real frontend host."""
    worker, _ = nodes
    card = load_card(workers["card"])
    kv = tmp / "frontend-kv"
    (kv / "v1" / "mdc").mkdir(parents=True)
    record = json.loads(workers["card"].read_bytes())
    record["card_json"]["source_path"] = "/nonexistent/worker/model"
    (kv / "v1" / "mdc" / workers["card"].name).write_text(json.dumps(record))
    fhome = tmp / "frontend-home"
    blobs = fhome / ".cache" / "dynamo" / "mdc" / "blobs"
    watch = NodeProc(tmp, "watch", "--bootstrap", worker.addr, env=base_env(tmp))
    watch.cmd[watch.cmd.index("run")] = "dynamo-watch"
    watch.cmd += ["--kv", str(kv), "--mdc-cache", str(blobs.parent)]
    watch.start()
    try:
        watch.wait_ready()
        end = time.monotonic() + NODE_SERVE_TIMEOUT
        while not all((blobs / f.hex).is_file() for f in card.files):
            assert time.monotonic() < end, watch.log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
    finally:
        watch.stop()
    for f in card.files:
        assert file_digest(blobs / f.hex) == (f.checksum, f.size)
    assert "ready at" in watch.log.read_text()  # fetched, not served from the worker's directory

    proxy = CountingProxy()
    try:
        env = dict(dyn_env, http_proxy=proxy.url, HTTP_PROXY=proxy.url, no_proxy="", NO_PROXY="")
        # Control: a frontend with an empty cache asks the worker for the card's files, via the
        # proxy (all but those whose bytes it already copied from the other card's file:// paths:
        # its cache is content-addressed).
        frontend_lists(env, tmp / "empty-home", tmp / "frontend-control.log")
        metadata = [r for r in proxy.requests if "/v1/metadata/" in r]
        shared = {f.checksum for f in load_card(workers["card_b"]).files}
        assert {f.url for f in card.files if f.checksum not in shared} <= set(metadata)
        assert set(metadata) <= {f.url for f in card.files}
        print(f"frontend without the swarm: {len(metadata)} metadata requests to the worker")
        proxy.requests.clear()
        # With the swarm's prefetch: the same frontend loads the model and asks the worker nothing.
        frontend_lists(env, fhome, tmp / "frontend.log")
        assert [r for r in proxy.requests if "/v1/metadata/" in r] == []
        print("frontend after the swarm's prefetch: 0 metadata requests to the worker")
    finally:
        proxy.close()
    assert os.path.isdir(fhome / ".cache" / "dynamo" / "mdc" / "by-slug" / NAME)
    shutil.rmtree(tmp / "empty-home", ignore_errors=True)


# --- etcd discovery ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd(tmp):
    """A real etcd server (Debian's etcd-server) on 127.0.0.1."""
    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("needs etcd (Debian: apt-get install etcd-server; scripts/install --test does)")
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    log = tmp / "etcd.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [
                exe,
                "--data-dir",
                str(tmp / "etcd-data"),
                "--name",
                "test",
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"test=http://127.0.0.1:{peer_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        end = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"{url}/health", timeout=2
                ) as r,
            ):
                if json.loads(r.read()).get("health") == "true":
                    break
            assert p.poll() is None and time.monotonic() < end, log.read_text()[-2000:]
            time.sleep(0.1)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.timeout(240)
def test_etcd_discovery_worker_serves_and_watch_prefetches(tmp, etcd, sources):
    from swarm.dynamo.watch import read_etcd_records

    env = dict(
        base_env(tmp),
        DYN_DISCOVERY_BACKEND="etcd",
        ETCD_ENDPOINTS=etcd,
        DYN_TCP_RPC_HOST="127.0.0.1",
        NO_COLOR="1",
        DYN_LOG="warn",
        DYN_SELF_HOST_METADATA="1",
        DYN_SYSTEM_HOST="127.0.0.1",
        DYN_SYSTEM_PORT=str(free_port()),
    )
    dyn = DynamoWorker(
        env, sources["v2"], "org/etcd-model", "ns3.backend.generate", tmp / "dynamo-worker-etcd.log"
    )
    worker = front = None
    try:
        records = read_etcd_records((etcd,))
        assert [k.split("/")[:3] for k, _ in records] == [["ns3", "backend", "generate"]]
        card = load_card(records[0][1])
        assert swarm_name(card) == "org/etcd-model" and dir_mismatches(sources["v2"], card.expect()) == []
        node_env = {k: v for k, v in env.items() if not k.startswith("DYN_")}
        worker = NodeProc(tmp, "etcd-worker", env=node_env).start()  # ETCD_ENDPOINTS only
        worker.wait_ready()
        wait_served(worker, {"org/etcd-model"})
        front = NodeProc(tmp, "etcd-watch", "--bootstrap", worker.addr, env=base_env(tmp))
        front.cmd[front.cmd.index("run")] = "dynamo-watch"
        mdc = tmp / "etcd-mdc"
        front.cmd += ["--etcd", f"http://127.0.0.1:9,{etcd}", "--mdc-cache", str(mdc)]
        front.start()
        front.wait_ready()
        end = time.monotonic() + NODE_SERVE_TIMEOUT
        while not all((mdc / "blobs" / f.hex).is_file() for f in card.files):
            assert time.monotonic() < end, front.log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        for f in card.files:
            assert file_digest(mdc / "blobs" / f.hex) == (f.checksum, f.size)
    finally:
        for n in (front, worker):
            if n is not None:
                n.stop()
        dyn.stop()
