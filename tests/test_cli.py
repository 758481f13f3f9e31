"""``swarm-node`` end to end, in subprocesses on 127.0.0.1: ``run``, ``fetch``, ``status``; plus the
option resolution of swarm/config/.

Every subprocess gets HF_HUB_OFFLINE=1 and an HF_ENDPOINT on a closed 127.0.0.1 port (see
tests/procs.py), so nothing ever reaches the Internet: a model arrives through the swarm or not at all.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
from modelgen import carried_files, make_model_dir
from procs import PRIVATE, NodeProc, base_env, same_files, swarm_node

from swarm import client
from swarm.config import (
    LANE_MODES,
    ConfigError,
    default_cache_dir,
    load_toml,
    resolve_home,
    resolve_run,
)

# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def private_dir(tmp) -> Path:
    return make_model_dir(tmp / "private-src", weights_bytes=12 << 20, n_weight_files=2, seed=3)


@pytest.fixture(scope="module")
def swarm2(tmp, private_dir):
    """A worker serving PRIVATE and a frontend bootstrapped to it (both running)."""
    worker = NodeProc(tmp, "worker", "--serve", f"{PRIVATE}={private_dir}").start()
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


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_json_of_a_worker(swarm2, tmp, private_dir):
    worker, _front = swarm2
    r = swarm_node("status", "--json", "--home", str(worker.home), env=base_env(tmp))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    pid = st["peer_id"]
    assert pid.startswith("12D3KooW")
    assert st["addrs"] and all(
        a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith(f"/p2p/{pid}") for a in st["addrs"]
    )
    [m] = [m for m in st["models"] if m["model"] == PRIVATE]
    assert m["complete"] and m["path"] == str(private_dir)
    assert {"peers", "bytes_up", "bytes_down"} <= set(st)
    assert st["lane"] == "encrypted" and st["direct_io"] is True  # the defaults
    # The control socket is for this user only.
    sock = worker.home / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    # The human form names the same things; SWARM_HOME finds the node like --home does.
    r = swarm_node("status", env=dict(base_env(tmp), SWARM_HOME=str(worker.home)))
    assert r.returncode == 0, r.stderr
    assert pid in r.stdout and PRIVATE in r.stdout
    assert "data lane:  encrypted" in r.stdout


@pytest.mark.timeout(60)
def test_run_with_lane_plaintext_reports_it(tmp):
    """``run --lane plaintext --no-direct-io``: the node runs with both, and status says so."""
    node = NodeProc(tmp, "plain", "--lane", "plaintext", "--no-direct-io").start()
    try:
        st = node.wait_ready()
        assert st["lane"] == "plaintext" and st["direct_io"] is False
        r = swarm_node("status", "--home", str(node.home), env=base_env(tmp))
        assert r.returncode == 0, r.stderr
        assert "data lane:  plaintext" in r.stdout
        assert node.stop(signal.SIGTERM) == 0
        assert "lane plaintext" in node.log.read_text(errors="replace")  # the ready line
    finally:
        node.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_private_model_fetched_through_the_swarm_only(swarm2, tmp, private_dir):
    worker, front = swarm2
    env = base_env(tmp)
    r = swarm_node("fetch", PRIVATE, "--home", str(front.home), env=env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])  # the path is printed last
    assert path.is_dir() and path.is_relative_to(front.cache)
    assert sorted(p.name for p in path.iterdir()) == sorted(carried_files(2))
    same_files(private_dir, path, carried_files(2))
    # --json says where it came from; the Hub was never asked (offline).
    r = swarm_node(
        "fetch", PRIVATE, "--home", str(front.home), "--json", "--cache-dir", str(front.cache), env=env
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == str(path)
    assert out["source"] in ("swarm", "local-cache")
    # The frontend now holds and seeds it; the worker sent it.
    st = json.loads(swarm_node("status", "--json", "--home", str(front.home), env=env).stdout)
    assert worker.status["peer_id"] in st["peers"]
    [m] = [m for m in st["models"] if m["model"] == PRIVATE]
    assert m["complete"] and st["bytes_down"] >= m["bytes"] > 0


@pytest.mark.timeout(60)
def test_configs_only_then_the_rest(swarm2, tmp, private_dir):
    worker, _front = swarm2
    # A second frontend: configs first, then the weights (the same manifest, fetched twice).
    front2 = NodeProc(tmp, "front2", "--bootstrap", worker.addr).start()
    try:
        front2.wait_ready()
        env = base_env(tmp)
        r = swarm_node("fetch", PRIVATE, "--configs-only", "--json", "--home", str(front2.home), env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["source"] == "swarm"
        path = Path(out["path"])
        names = sorted(p.name for p in path.iterdir())
        assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)
        r = swarm_node(
            "fetch",
            PRIVATE,
            "--include",
            "*.safetensors",
            "--home",
            str(front2.home),
            "--timeout",
            "30",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip().splitlines()[-1]) == path
        same_files(private_dir, path, carried_files(2))
    finally:
        front2.stop()


@pytest.mark.timeout(60)
def test_second_node_on_one_home_is_refused(swarm2, tmp):
    worker, _front = swarm2
    r = swarm_node(
        "run",
        "--home",
        str(worker.home),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-serve-hf-cache",
        env=base_env(tmp),
        timeout=30,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: another swarm-node is running")
    assert client.status(worker.home)["peer_id"] == worker.status["peer_id"]  # still fine


@pytest.mark.timeout(60)
def test_offline_with_no_peers_is_a_clear_error(tmp):
    # No node runs on this home: fetch runs an embedded node, which has no peers; the Hub is off.
    env = base_env(tmp)
    home = tmp / "lonely" / "home"
    r = swarm_node("fetch", "acme/nowhere", "--home", str(home), "--cache-dir", str(tmp / "lonely"), env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: cannot fetch acme/nowhere@main: no source has it")
    assert "swarm: failed: no providers" in line
    assert "hub: skipped: HF_HUB_OFFLINE is set" in line
    assert r.stdout == ""
    # With no node running, status says so.
    r = swarm_node("status", "--json", "--home", str(home), env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: no swarm-node is running")


@pytest.mark.timeout(60)
def test_usage_errors(tmp):
    env = base_env(tmp)
    r = swarm_node("fetch", "not a model", "--home", str(tmp / "x"), env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    r = swarm_node("run", "--home", str(tmp / "x"), "--serve", "acme/m=/does/not/exist", env=env)
    assert r.returncode == 2 and "--serve" in r.stderr and "not a directory" in r.stderr
    r = swarm_node("run", "--home", str(tmp / "x"), "--bootstrap", "/ip4/1.2.3.4/tcp/1", env=env)
    assert r.returncode == 2 and "/p2p/" in r.stderr


@pytest.mark.timeout(60)
def test_sigterm_then_restart_serves_again_without_rehashing(tmp, private_dir):
    env = base_env(tmp)
    node = NodeProc(tmp, "restart", "--serve", f"{PRIVATE}={private_dir}", env=env).start()
    try:
        st1 = node.wait_ready()
        cache_files = sorted((node.home / "manifests").glob("*.json"))
        assert cache_files
        mtimes = [p.stat().st_mtime_ns for p in cache_files]
        assert node.stop(signal.SIGTERM) == 0
        assert not (node.home / "control.sock").exists()
        node.start()
        st2 = node.wait_ready()
        assert st2["peer_id"] == st1["peer_id"]  # identity kept
        assert [m["manifest"] for m in st2["models"]] == [m["manifest"] for m in st1["models"]]
        assert [p.stat().st_mtime_ns for p in cache_files] == mtimes  # not rebuilt
        assert node.stop(signal.SIGINT) == 0
        assert not (node.home / "control.sock").exists()
    finally:
        node.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_stale_socket_is_replaced(tmp, private_dir):
    env = base_env(tmp)
    node = NodeProc(tmp, "stale", env=env).start()
    try:
        node.wait_ready()
        node.stop(signal.SIGKILL)  # leaves control.sock behind, nobody listening
        assert (node.home / "control.sock").exists()
        node.start()
        node.wait_ready()
    finally:
        node.stop()


# --- option resolution -------------------------------------------------------------------------


def test_config_precedence_cli_env_toml_default(tmp_path):
    served = tmp_path / "m"
    served.mkdir()
    cfg = tmp_path / "swarm.toml"
    cfg.write_text(
        'home = "h-from-toml"\n'
        'listen = ["/ip4/0.0.0.0/tcp/4001"]\n'
        'bootstrap = ["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWabc"]\n'
        'cache_dir = "/data/hub"\n'
        "serve_hf_cache = false\n"
        '[serve]\n"acme/m" = "m"\n'
    )
    s = resolve_run(config=cfg, env={})
    assert s.home == tmp_path / "h-from-toml"  # relative to the file
    assert s.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert s.bootstrap == ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWabc",)
    assert s.cache_dir == Path("/data/hub") and s.serve_hf_cache is False
    assert s.serve == (("acme/m", served),)
    env = {
        "SWARM_CONFIG": str(cfg),
        "SWARM_HOME": "/env/home",
        "SWARM_LISTEN": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
        "SWARM_NO_SERVE_HF_CACHE": "0",
        "SWARM_CACHE_DIR": "/env/hub",
    }
    s = resolve_run(env=env)
    assert s.home == Path("/env/home") and s.cache_dir == Path("/env/hub")
    assert s.listen == ("/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2")
    assert s.serve_hf_cache is True
    s = resolve_run(home="/cli/home", listen=["/ip4/127.0.0.1/tcp/3"], no_serve_hf_cache=True, env=env)
    assert s.home == Path("/cli/home") and s.listen == ("/ip4/127.0.0.1/tcp/3",)
    assert s.serve_hf_cache is False
    assert resolve_home(env=env) == Path("/env/home")
    assert resolve_home(cli_config=cfg, env={}) == tmp_path / "h-from-toml"
    s = resolve_run(env={})
    assert s.listen == ("/ip4/0.0.0.0/tcp/0",) and s.bootstrap == ()
    # Security issue #18 f10: the HF cache is served by default only inside a private swarm.
    assert s.serve_hf_cache is False
    assert resolve_run(psk="a1" * 32, env={}).serve_hf_cache is True
    assert resolve_run(serve_hf_cache=True, env={}).serve_hf_cache is True


def test_config_errors_name_the_problem(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('hom = "/x"\n')
    with pytest.raises(ConfigError, match="unknown key 'hom'"):
        load_toml(cfg)
    cfg.write_text("listen = 5\n")
    with pytest.raises(ConfigError, match="listen"):
        load_toml(cfg)
    cfg.write_text("listen = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="SWARM_NO_SERVE_HF_CACHE"):
        resolve_run(env={"SWARM_NO_SERVE_HF_CACHE": "maybe"})
    with pytest.raises(ConfigError, match="ORG/NAME=DIR"):
        resolve_run(serve=["acme/m"], env={})
    with pytest.raises(ConfigError, match="SWARM_BOOTSTRAP"):
        resolve_run(env={"SWARM_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1"})


def test_lane_modes_match_the_lane_module():
    # swarm.config keeps its own copy (it must not import swarm.net, hence libp2p).
    from swarm.net.lane import LANE_MODES as NET_LANE_MODES

    assert LANE_MODES == NET_LANE_MODES


def test_lane_and_direct_io_precedence_cli_env_toml_default(tmp_path):
    s = resolve_run(env={})
    assert s.lane == "encrypted" and s.direct_io is True
    cfg = tmp_path / "swarm.toml"
    cfg.write_text('lane = "off"\ndirect_io = false\n')
    assert load_toml(cfg) == {"lane": "off", "direct_io": False}
    s = resolve_run(config=cfg, env={})
    assert s.lane == "off" and s.direct_io is False
    # An empty variable counts as unset, like the others.
    s = resolve_run(env={"SWARM_CONFIG": str(cfg), "SWARM_LANE": " "})
    assert s.lane == "off"
    env = {"SWARM_CONFIG": str(cfg), "SWARM_LANE": "plaintext", "SWARM_NO_DIRECT_IO": "0"}
    s = resolve_run(env=env)
    assert s.lane == "plaintext" and s.direct_io is True
    s = resolve_run(lane="encrypted", no_direct_io=True, env=env)
    assert s.lane == "encrypted" and s.direct_io is False
    assert resolve_run(env={"SWARM_NO_DIRECT_IO": "yes"}).direct_io is False
    assert "lane='encrypted'" in repr(s)


def test_lane_bad_values_name_the_option(tmp_path, monkeypatch, capsys):
    with pytest.raises(
        ConfigError,
        match=r"^--lane: lane mode must be one of encrypted, "
        r"plaintext, off, not 'fast'$",
    ):
        resolve_run(lane="fast", env={})
    with pytest.raises(ConfigError, match=r"^SWARM_LANE: .*not 'tls'"):
        resolve_run(env={"SWARM_LANE": "tls"})
    cfg = tmp_path / "c.toml"
    for text in ('lane = "none"\n', "lane = 1\n", 'lane = ["plaintext"]\n'):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match="lane mode must be one of") as e:
            resolve_run(config=cfg, env={})
        assert str(e.value).startswith(f"{cfg}: lane: ")
    cfg.write_text('direct_io = "no"\n')
    with pytest.raises(ConfigError, match="direct_io: expected true or false"):
        load_toml(cfg)
    with pytest.raises(ConfigError, match="SWARM_NO_DIRECT_IO"):
        resolve_run(env={"SWARM_NO_DIRECT_IO": "maybe"})
    # From the CLI: argparse refuses an unknown --lane; a bad SWARM_LANE is one line, exit 2.
    from swarm import cli

    with pytest.raises(SystemExit) as ex:
        cli.main(["run", "--home", str(tmp_path / "h"), "--lane", "fast"])
    assert ex.value.code == 2 and "--lane" in capsys.readouterr().err
    for var in [v for v in os.environ if v.startswith("SWARM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SWARM_LANE", "fast")
    assert cli.main(["run", "--home", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SWARM_LANE: lane mode must be one of") and len(err.splitlines()) == 1


def test_run_cli_path_gives_the_node_its_lane_mode(tmp_path):
    """``swarm-node run --lane off|plaintext``, parsed and resolved as ``run`` does, builds a Node
    with that mode (constructed only: nothing listens)."""
    from swarm.cli import build_parser, run_settings
    from swarm.node import Node, NodeConfig

    def node_for(*extra: str) -> Node:
        args = build_parser().parse_args(
            [
                "run",
                "--home",
                str(tmp_path / "home"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-serve-hf-cache",
                *extra,
            ]
        )
        return Node(NodeConfig.from_settings(run_settings(args)))

    node = node_for("--lane", "off")
    assert node.config.lane == "off" and node.lane is None and node.store.direct_io is True
    node = node_for("--lane", "plaintext", "--no-direct-io")
    assert node.config.lane == "plaintext" and node.lane is not None
    assert node.lane.mode == "plaintext" and node.store.direct_io is False
    node = node_for()
    assert node.config.lane == "encrypted" and node.lane.mode == "encrypted"


def test_default_cache_dir_follows_huggingface_hub():
    assert default_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert default_cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert default_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_configuration_reference_is_generated_from_the_option_table():
    from swarm.config import OPTIONS, reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run scripts/gen_config_reference.py"
    )
    for o in OPTIONS:  # every option reaches argparse, the variables and the file
        assert f"`{o.key}`" in doc.read_text() and o.env in doc.read_text()


def test_every_option_resolves_from_cli_env_and_file(tmp_path):
    """The table drives all three places: for each option, the file's value is overridden by the
    variable's, which is overridden by the command line's."""
    from swarm.cli import build_parser, run_settings

    served = tmp_path / "m"
    served.mkdir()
    keyfile = tmp_path / "k"
    keyfile.write_text("ab" * 32)
    pub = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'log_format = "json"\nmetrics_listen = "127.0.0.1:9400"\nserve_hf_cache = false\ndirect_io = false\n'
    )
    s = resolve_run(config=cfg, env={})
    assert (s.log_format, s.metrics_listen, s.serve_hf_cache, s.direct_io) == (
        "json",
        "127.0.0.1:9400",
        False,
        False,
    )
    env = {
        "SWARM_CONFIG": str(cfg),
        "SWARM_LOG_FORMAT": "text",
        "SWARM_METRICS_LISTEN": "[::1]:80",
        "SWARM_SERVE_HF_CACHE": "yes",
        "SWARM_DIRECT_IO": "1",
    }
    s = resolve_run(env=env)
    assert (s.log_format, s.metrics_listen, s.serve_hf_cache, s.direct_io) == ("text", "[::1]:80", True, True)
    args = build_parser().parse_args(
        [
            "run",
            "--log-format",
            "json",
            "--metrics-listen",
            "0.0.0.0:1",
            "--no-serve-hf-cache",
            "--no-direct-io",
            "--serve",
            f"acme/m={served}",
            "--psk",
            str(keyfile),
            "--trust",
            "trusted-publishers",
            "--trusted-publisher",
            pub,
        ]
    )
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        s = run_settings(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert (s.log_format, s.metrics_listen, s.serve_hf_cache, s.direct_io) == (
        "json",
        "0.0.0.0:1",
        False,
        False,
    )
    assert s.serve == (("acme/m", served),) and s.psk == "ab" * 32
    assert s.trusted_publishers == (pub,)
    for bad, match in [
        ({"SWARM_METRICS_LISTEN": "9400"}, "SWARM_METRICS_LISTEN: expected HOST:PORT"),
        ({"SWARM_LOG_FORMAT": "xml"}, "SWARM_LOG_FORMAT: log format must be one of"),
        ({"SWARM_DIRECT_IO": "1", "SWARM_NO_DIRECT_IO": "1"}, "only one of"),
    ]:
        with pytest.raises(ConfigError, match=match):
            resolve_run(env=bad)
    with pytest.raises(ConfigError, match="contradict"):
        resolve_run(env={}, serve_hf_cache=True, no_serve_hf_cache=True)
