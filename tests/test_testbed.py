"""The namespace testbed (simulations/testbed.py): real swarm-node processes, one per network
namespace, joined by a bridge in a namespace of its own. Needs root; skipped with the reason
otherwise. Traffic stays inside the namespaces (10.77.0.0/16 exists only there)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from simulations import cli, scenario, testbed

WHY = testbed.available() if sys.platform.startswith("linux") else "not Linux"
needs_netns = pytest.mark.skipif(WHY is not None, reason=str(WHY))


def _ours() -> list[str]:
    return [n for n in testbed._our_namespaces() if n.startswith(f"{testbed.PREFIX}-{os.getpid()}-")]


def test_testbed_rejects_what_only_the_simulator_runs():
    sc = scenario.load(scenario.SCENARIO_DIR / "rolling_weibull.toml")
    with pytest.raises(scenario.ScenarioError, match="session/rejoin"):
        testbed.check_supported(sc)


@needs_netns
@pytest.mark.timeout(90)
def test_smoke_run_matches_the_run_outputs_and_tears_down(tmp_path):
    path = scenario.SCENARIO_DIR / "testbed_smoke.toml"
    doc = cli.run_testbed(path, {}, [1], tmp_path, lane="plaintext", plots=False, quiet=True, timeout=60.0)
    s = doc["per_seed"][0]
    assert s["completed"] == s["fetchers"] == 2, s["stats"].get("fetch_errors")
    assert doc["bounds"]["T_min"] > 0 and doc["bounds"]["T_client_server"] > 0
    F = doc["bounds"]["F_bytes"]
    assert s["groups"]["frontends"]["bytes_down"] >= 2 * F * 0.99  # measured by the nodes
    assert s["stats"]["cpu_seconds"]["workers-0000"] > 0
    # who sent whom piece bytes, from the nodes' per-peer counters: each frontend got the model
    got = s["stats"]["bytes_from"]
    fronts = [h for h in got if h.startswith("frontends")]
    assert len(fronts) == 2 and all(sum(got[h].values()) >= F * 0.99 for h in fronts), got
    assert all(src in {"workers-0000", *fronts} for h in fronts for src in got[h]), got
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["per_seed"][0]["completion"]["max"] == s["completion"]["max"]
    with open(tmp_path / "events_seed1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["event"] == "complete" for r in rows) == 2
    assert _ours() == []


@needs_netns
@pytest.mark.timeout(60)
def test_a_node_that_cannot_start_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "EXTRA_NODE_FLAGS", ("--no-such-flag",))
    sc = scenario.load(scenario.SCENARIO_DIR / "testbed_smoke.toml")
    tb = testbed.Testbed(sc, 1, timeout=30.0)
    with pytest.raises(testbed.TestbedError, match="node exited"):
        tb.run()
    assert _ours() == []
    assert tb.tmp is not None and not tb.tmp.exists()


@needs_netns
@pytest.mark.timeout(60)
def test_cleanup_removes_namespaces_of_killed_runs_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{testbed.PREFIX}-{dead.pid}-h0"
    mine = f"{testbed.PREFIX}-{os.getpid()}-keep"
    for ns in (stale, mine):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        import time

        deadline = time.monotonic() + 10  # `ip netns exec` joins the namespace after it starts
        while not subprocess.run(
            ["ip", "netns", "pids", stale], capture_output=True, text=True
        ).stdout.strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        removed = testbed.cleanup_stale()
        assert stale in removed and mine not in removed
        assert sleeper.wait(timeout=10) != 0  # its processes were killed
        assert stale not in testbed._our_namespaces()
        assert mine in testbed._our_namespaces()
    finally:
        sleeper.kill()
        for ns in (stale, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_netns
@pytest.mark.timeout(60)
def test_sigint_tears_everything_down(tmp_path):
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(testbed.Path(testbed.__file__).resolve().parent.parent))
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulations",
            "testbed",
            "testbed_smoke",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--quiet",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    prefix = f"{testbed.PREFIX}-{p.pid}-"
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(prefix) and n.endswith("h2") for n in testbed._our_namespaces()):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()
    assert not [n for n in testbed._our_namespaces() if n.startswith(prefix)]


@pytest.mark.timeout(60)
def test_startup_table_and_the_testbed_calibration():
    from simulations import startup

    path = scenario.SCENARIO_DIR / "tb_flash_crowd.toml"
    assert scenario.load(path).startup == startup.DEFAULT
    assert scenario.load(path, testbed.for_testbed(path, {})).startup == startup.TESTBED
    mine = testbed.for_testbed(path, {"startup.link_setup": 0.25})
    assert scenario.load(path, mine).startup == startup.StartupModel(link_setup=0.25)
    with pytest.raises(scenario.ScenarioError, match="startup"):
        scenario.load(path, {"startup.nope": 1})
    # tbf's caps become payload rates, and TCP's uneven shares are on unless the caller sets them
    plain, tb = scenario.load(path), scenario.load(path, testbed.for_testbed(path, {}))
    for g, h in zip(plain.groups, tb.groups, strict=True):
        assert h.upload == pytest.approx(g.upload * testbed.TESTBED_PAYLOAD)
        assert h.download == pytest.approx(g.download * testbed.TESTBED_PAYLOAD)
    assert plain.network.share_spread == 0 and tb.network.share_spread == testbed.TESTBED_SHARE_SPREAD
    even = testbed.for_testbed(path, {"network.share_spread": 0})
    assert scenario.load(path, even).network.share_spread == 0
    with pytest.raises(scenario.ScenarioError, match="share_spread"):
        scenario.load(path, {"network.share_spread": 1.5})


@pytest.mark.timeout(60)
def test_simulated_start_of_fetch_restart_and_drain():
    """Virtual time: a fetch's manifest comes after a lookup round and before its first piece, a
    restarted host is back node_start after rejoin_after, a leaving worker drains first."""
    from simulations import report, startup
    from simulations.sim import Simulation

    path = scenario.SCENARIO_DIR / "tb_rolling_churn.toml"
    sc = scenario.load(path, testbed.for_testbed(path, {}))
    r = Simulation(sc, 1, log_pieces=False).run()
    start = report.start_of_fetch(r)
    assert startup.TESTBED.lookup_round <= start["manifest"] < start["first_piece"]
    kills = [e for e in r.events if e[1] == "depart" and e[0] < 5]
    assert len(kills) == 2
    for t, _ev, node, _p, _v in kills:
        back = [e[0] for e in r.events if e[1] == "arrive" and e[2] == node and e[0] > t]
        assert back and back[0] >= t + 3 + startup.TESTBED.node_start - 1e-9
    leave = next(e[0] for e in r.events if e[1] == "event_leave")
    gone = [e[0] for e in r.events if e[1] == "depart" and e[2].startswith("workers")]
    assert gone and leave < gone[0] <= leave + startup.TESTBED.drain + 1e-9  # it had pieces to send
    assert r.stats["wasted_bytes"] >= 0
