"""Bandwidth limits (swarm/ratelimit.py): the token bucket as a pure object (hypothesis), its async
wrapper and the engine under trio's virtual clock (exact, no wall-clock timing), the options, and
the control API / CLI against a real node process."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import NodeProc, base_env, swarm_node
from test_engine import DictStore, Net, cfg, direct
from test_engine import model as model  # the fixture

from swarm import client
from swarm.config import ConfigError, format_rate, parse_rate, reference_markdown, resolve_run, socket_path
from swarm.engine import Transfer
from swarm.node import NodeConfig
from swarm.ratelimit import BURST_SECONDS, Bandwidth, Limits, Throttle, TokenBucket

# --- rates as options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,rate",
    [
        ("100M", 100e6),
        ("100MB/s", 100e6),
        ("800Mbit/s", 100e6),
        ("800 Mbps", 100e6),
        ("1.5G", 1.5e9),
        ("20MiB/s", 20 * 2**20),
        ("64kB", 64e3),
        ("2e6", 2e6),
        (12_500_000, 12.5e6),
        ("0", None),
        ("none", None),
        ("unlimited", None),
        (0, None),
    ],
)
def test_rates_parse_in_decimal_si_units_bits_spelled_bit(text, rate):
    assert parse_rate(text, "x") == rate


@pytest.mark.parametrize(
    "text,why",
    [
        ("100mb", "unknown unit 'b'"),
        ("5 MBq", "unknown unit"),
        ("fast", "expected a rate"),
        ("-5M", "expected a rate"),
        ("1", "at least 10 kB/s"),
        (True, "expected a rate"),
        ("inf", "expected a rate"),
        (float("inf"), "not a usable rate"),
    ],
)
def test_bad_rates_are_refused_with_the_reason(text, why):
    with pytest.raises(ConfigError, match=why):
        parse_rate(text, "--max-upload-rate")


def test_rate_options_come_from_flags_variables_and_toml(tmp_path):
    conf = tmp_path / "swarm.toml"
    conf.write_text('max_upload_rate = "100MB/s"\nmax_download_rate = 5000000\n')
    s = resolve_run(config=conf, env={"SWARM_MAX_PEER_UPLOAD_RATE": "80Mbit/s"}, max_download_rate="1G")
    assert (s.max_upload_rate, s.max_download_rate, s.max_peer_upload_rate) == (100e6, 1e9, 10e6)
    nc = NodeConfig.from_settings(s)
    assert (nc.max_upload_rate, nc.max_download_rate, nc.max_peer_upload_rate) == (100e6, 1e9, 10e6)
    assert resolve_run(env={}).max_upload_rate is None
    with pytest.raises(ConfigError, match="SWARM_MAX_UPLOAD_RATE"):
        resolve_run(env={"SWARM_MAX_UPLOAD_RATE": "lots"})
    conf.write_text("max_upload_rate = true\n")
    with pytest.raises(ConfigError, match="max_upload_rate"):
        resolve_run(config=conf, env={})
    assert "max_peer_upload_rate" in reference_markdown()


def test_format_rate():
    assert [format_rate(r) for r in (None, 20e6, 1.5e9, 64e3, 999)] == [
        "unlimited",
        "20 MB/s",
        "1.5 GB/s",
        "64 kB/s",
        "999 B/s",
    ]


# --- the bucket, pure ---------------------------------------------------------------------------

takes = st.lists(st.tuples(st.floats(0, 3), st.integers(1, 8 << 20)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(1e4, 1e9), start=st.floats(-1e6, 1e6), seq=takes)
def test_bytes_released_by_any_time_stay_within_burst_plus_rate(rate, start, seq):
    """Whatever the pattern of takes, the bytes whose wait has ended by T are at most
    burst + rate * (T - start): the long-run rate never exceeds the limit."""
    b = TokenBucket(rate, stamp=start)
    now, releases = start, []
    for gap, n in seq:
        now += gap
        releases.append((now + b.take(n, now), n))
    assert [t for t, _ in releases] == sorted(t for t, _ in releases)  # first come, first go
    sent = 0
    for t, n in releases:
        sent += n
        assert sent <= b.burst + rate * (t - start) + 1e-6 * sent


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(1e4, 1e9), sizes=st.lists(st.integers(1, 8 << 20), min_size=1, max_size=60))
def test_a_caller_that_always_waits_gets_the_full_rate(rate, sizes):
    """Takes issued as soon as the previous wait ends finish exactly when the rate allows: the
    limit is reached, not only respected."""
    b = TokenBucket(rate, stamp=0.0)
    now = 0.0
    for n in sizes:
        now += b.take(n, now)
    assert now == pytest.approx(max(0.0, (sum(sizes) - b.burst) / rate), rel=1e-9, abs=1e-9)


def test_burst_is_half_a_second_and_unlimited_never_waits():
    b = TokenBucket(20e6)
    assert b.burst == 20e6 * BURST_SECONDS == 10e6
    assert b.take(10e6, 0) == 0 and b.take(4e6, 0) == pytest.approx(0.2)
    u = TokenBucket(None)
    assert u.take(1 << 40, 0) == 0 and u.full(0)


def test_rate_changes_keep_debt_and_cap_credit():
    b = TokenBucket(10e6, stamp=0.0)
    assert b.take(15e6, 0) == pytest.approx(1.0)  # 5 MB of burst, 10 MB of debt
    b.set_rate(5e6, 0.5)  # half the debt paid at the old rate: 5 MB left, at 5 MB/s
    assert b.take(0, 0.5) == pytest.approx(1.0)
    b.set_rate(None, 0.6)
    assert b.take(1 << 30, 0.6) == 0
    b.set_rate(1e6, 0.7)  # limited again: starts full
    assert b.available(0.7) == pytest.approx(0.5e6)
    b.give_back(1e9, 0.7)
    assert b.available(0.7) == pytest.approx(0.5e6)  # never above the burst


# --- the async wrapper, on trio's virtual clock -------------------------------------------------


async def test_throttle_sleeps_exactly_what_the_bucket_says(autojump_clock):
    t = Throttle(1e6)
    start = trio.current_time()
    for _ in range(10):
        await t.acquire(1e6)
    assert trio.current_time() - start == pytest.approx(10 - 0.5, abs=1e-9)
    t.set_rate(None)
    await t.acquire(1 << 40)
    assert trio.current_time() - start == pytest.approx(9.5, abs=1e-9)


async def test_meanwhile_runs_until_the_deadline(autojump_clock):
    t = Throttle(1e6)
    seen = []

    async def meanwhile(deadline):
        seen.append(deadline - trio.current_time())
        await trio.sleep_until(deadline)

    await t.acquire(0.5e6, meanwhile=meanwhile)  # the burst: no wait
    await t.acquire(2e6, meanwhile=meanwhile)
    assert seen == [pytest.approx(2.0)]


# --- the engine under limits, in virtual time ---------------------------------------------------


async def _run_until_done(nursery, leechers, samples, watch, period=0.1):
    """Sample ``watch()`` every ``period`` virtual seconds until every leecher is complete."""

    async def sample():
        while True:
            samples.append((trio.current_time(), watch()))
            await trio.sleep(period)

    nursery.start_soon(sample)
    with trio.fail_after(600):
        for t in leechers:
            await t.completed.wait()
    samples.append((trio.current_time(), watch()))
    nursery.cancel_scope.cancel()


def _max_piece(m):
    return max(p.length for p in m.pieces)


async def test_upload_limit_holds_and_is_reached(model, autojump_clock):
    m, pieces = model
    rate = 4e6
    start = trio.current_time()
    samples = []
    async with trio.open_nursery() as n:
        net = Net(n)
        bw = Bandwidth(Limits(upload=rate))
        seed = net.add(
            "seed", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct, bandwidth=bw)
        )
        leech = net.add("leech", Transfer(m, DictStore(m), config=cfg(), run_blocking=direct))
        net.connect("seed", "leech")
        await _run_until_done(n, [leech], samples, lambda: seed.bytes_up)
    burst = rate * BURST_SECONDS
    for t, sent in samples:
        assert sent <= burst + rate * (t - start), (t - start, sent)
    took = samples[-1][0] - start
    assert seed.bytes_up == m.total_size
    least = (m.total_size - burst) / rate
    assert least <= took <= least * 1.02 + 0.5, took


async def test_download_limit_is_global_across_peers(model, autojump_clock):
    m, pieces = model
    rate = 4e6
    start = trio.current_time()
    samples = []
    async with trio.open_nursery() as n:
        net = Net(n)
        for s in ("seed1", "seed2"):
            net.add(s, Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct))
        leech = net.add(
            "leech",
            Transfer(
                m, DictStore(m), config=cfg(), run_blocking=direct, bandwidth=Bandwidth(Limits(download=rate))
            ),
        )
        net.connect("seed1", "leech")
        net.connect("seed2", "leech")
        await _run_until_done(n, [leech], samples, lambda: leech.bytes_down)
    burst = rate * BURST_SECONDS
    for t, got in samples:  # requests go out while there is credit: one piece may overdraw
        assert got <= burst + rate * (t - start) + _max_piece(m), (t - start, got)
    took = samples[-1][0] - start
    assert leech.bytes_down == m.total_size
    least = (m.total_size - burst - _max_piece(m)) / rate
    assert least <= took <= m.total_size / rate * 1.05 + 0.5, took
    assert all(s.bytes_down > 0 for s in leech.stats.values())  # both seeders served


async def test_per_peer_upload_cap_is_per_peer(model, autojump_clock):
    m, pieces = model
    rate = 2e6
    start = trio.current_time()
    samples = []
    async with trio.open_nursery() as n:
        net = Net(n)
        seed = net.add(
            "seed",
            Transfer(
                m,
                DictStore(m, pieces),
                config=cfg(),
                run_blocking=direct,
                bandwidth=Bandwidth(Limits(peer_upload=rate)),
            ),
        )
        # Not linked to each other and not uploading (so the seeder's least-copied-first policy
        # holds nothing back): everything comes from the seeder.
        leechers = [
            net.add(name, Transfer(m, DictStore(m), config=cfg(), run_blocking=direct, may_upload=False))
            for name in ("a", "b")
        ]
        for name in ("a", "b"):
            net.connect("seed", name)
        await _run_until_done(
            n,
            leechers,
            samples,
            lambda: [seed.stats[p].bytes_up if p in seed.stats else 0 for p in ("a", "b")],
        )
    burst = rate * BURST_SECONDS
    for t, per_peer in samples:
        for sent in per_peer:
            assert sent <= burst + rate * (t - start), (t - start, per_peer)
    took = samples[-1][0] - start
    assert seed.bytes_up == 2 * m.total_size
    least = (m.total_size - burst) / rate  # each peer at its own cap, at the same time
    assert least <= took <= least * 1.02 + 0.5, took


async def test_limits_change_at_run_time(model, autojump_clock):
    m, pieces = model
    fast, slow, change_at = 8e6, 2e6, 2.0
    start = trio.current_time()
    samples = []
    async with trio.open_nursery() as n:
        net = Net(n)
        bw = Bandwidth(Limits(upload=fast))
        seed = net.add(
            "seed", Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct, bandwidth=bw)
        )
        leech = net.add("leech", Transfer(m, DictStore(m), config=cfg(), run_blocking=direct))
        net.connect("seed", "leech")

        async def slow_down():
            await trio.sleep_until(start + change_at)
            samples.append((trio.current_time(), seed.bytes_up))
            bw.set_limits(Limits(upload=slow))

        n.start_soon(slow_down)
        await _run_until_done(n, [leech], samples, lambda: seed.bytes_up)
    changed = next((i for i, (t, _) in enumerate(samples) if t >= start + change_at), None)
    assert changed is not None, f"done before the change, at {samples[-1][0] - start} s"
    t0, sent0 = samples[changed]
    # After the change: the debt of pieces already waiting (one per upload slot at most), then
    # the slow rate; credit is capped at the slow rate's burst.
    slack = 4 * _max_piece(m) + slow * BURST_SECONDS
    for t, sent in samples[changed:]:
        assert sent - sent0 <= slack + slow * (t - t0), (t - start, sent - sent0)
    assert sent0 <= fast * (BURST_SECONDS + change_at)
    took = samples[-1][0] - start
    assert took >= change_at + (m.total_size - sent0 - slack) / slow


async def test_unlimited_bandwidth_changes_nothing(model, autojump_clock):
    m, pieces = model
    start = trio.current_time()
    async with trio.open_nursery() as n:
        net = Net(n)
        net.add(
            "seed",
            Transfer(m, DictStore(m, pieces), config=cfg(), run_blocking=direct, bandwidth=Bandwidth()),
        )
        leech = net.add(
            "leech", Transfer(m, DictStore(m), config=cfg(), run_blocking=direct, bandwidth=Bandwidth())
        )
        net.connect("seed", "leech")
        with trio.fail_after(20):
            await leech.completed.wait()
        n.cancel_scope.cancel()
    assert trio.current_time() - start < 0.5  # memory links: instant without a limit


def test_idle_peer_buckets_are_forgotten(monkeypatch):
    import swarm.ratelimit as rl

    monkeypatch.setattr(rl, "MAX_PEER_BUCKETS", 4)

    async def main():
        bw = Bandwidth(Limits(peer_upload=1e6))
        for i in range(10):
            bw.peer(f"p{i}")
        assert len(bw._per_peer) <= 4
        bw.peer("busy").bucket.take(1e6, trio.current_time())
        for i in range(10):
            bw.peer(f"q{i}")
        assert "busy" in bw._per_peer  # in debt: kept

    trio.run(main)


# --- control API and CLI, against a real node --------------------------------------------------


@pytest.mark.timeout(120)
def test_limits_are_shown_and_changed_through_the_control_api(tmp_path):
    env = base_env(tmp_path)
    node = NodeProc(tmp_path, "node", "--max-upload-rate", "20MB/s", env=env)
    try:
        st = node.start().wait_ready()
        assert st["limits"] == {"upload": 20e6, "download": None, "peer_upload": None}
        assert client.limits(node.home) == st["limits"]

        r = swarm_node(
            "limits",
            "--home",
            str(node.home),
            "--download",
            "800Mbit/s",
            "--peer-upload",
            "5M",
            "--json",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        want = {"upload": 20e6, "download": 100e6, "peer_upload": 5e6}
        assert json.loads(r.stdout) == want
        assert client.status(node.home)["limits"] == want

        r = swarm_node("limits", "--home", str(node.home), "--upload", "0", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "upload unlimited, download 100 MB/s, per-peer upload 5 MB/s"

        r = swarm_node("limits", "--home", str(node.home), "--upload", "fast", env=env)
        assert r.returncode == 2 and "--upload" in r.stderr
        with pytest.raises(ValueError, match="unknown limit"):
            client.limits(node.home, uplaod=1e6)
        with pytest.raises(ValueError, match="at least"):
            client.limits(node.home, upload=5)
        assert client.limits(node.home) == {**want, "upload": None}  # nothing half-applied

        r = swarm_node("status", "--home", str(node.home), env=env)
        assert "limits:     upload unlimited, download 100 MB/s" in r.stdout
        r = swarm_node("limits", "--home", str(node.home), env=env)  # no flag: show them
        assert r.returncode == 0 and r.stdout.startswith("upload unlimited, download 100 MB/s")
        transport = httpx.HTTPTransport(uds=str(socket_path(node.home)))
        with httpx.Client(transport=transport, timeout=10) as c:
            text = c.get("http://swarm-node/v1/metrics").text
            assert c.post("http://swarm-node/v1/limits").status_code == 405
        assert 'swarm_rate_limit_bytes_per_second{direction="download"} 1e+08' in text
        assert 'swarm_rate_limit_bytes_per_second{direction="upload"} 0.0' in text
    finally:
        node.stop()
