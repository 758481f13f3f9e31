"""Private swarms and trust: a node with the wrong swarm key (or none) cannot connect, let alone
fetch; an untrusted publisher's manifest is refused under ``trusted-publishers``; plaintext is
never negotiated, on libp2p or on the data lane; and the CLI / environment / TOML options that
set all this (``--psk``, ``--trust``, ``--trusted-publisher``) work end to end."""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from advkit import ENGINE, MODEL, assert_honest_alive, record, start_node
from procs import NodeProc, base_env, same_files, swarm_node

from swarm import client
from swarm.config import ConfigError, load_toml, resolve_run
from swarm.net import lane_crypto as lc
from swarm.net.host import PeerAddr, SwarmHost
from swarm.net.identity import load_or_create_identity
from swarm.net.lane import ACCEPT, MAGIC, OFFER, LaneService, LaneUnavailable
from swarm.node import Node, NodeConfig
from swarm.sources import FetchError, FetchRequest, ModelNotFound

KEY_A = "a1" * 32
KEY_B = "b2" * 32


async def _node(stack, tmp, name, **kw):
    """A node whose dials give up after 2 s (a peer with another key never answers)."""
    node = Node(
        NodeConfig(
            home=tmp / name / "home",
            cache_dir=tmp / name / "cache",
            serve_hf_cache=False,
            engine=ENGINE,
            lookup_timeout=2.0,
            **kw,
        )
    )
    node.host.connect_timeout = 2.0
    await stack.enter_async_context(node.running())
    return node


@pytest.mark.timeout(60)
async def test_wrong_or_missing_swarm_key_cannot_connect(tmp_path, adv_model, error_log):
    src, m, _ = adv_model
    async with AsyncExitStack() as stack:
        worker = await _node(stack, tmp_path, "worker", psk=KEY_A, serve=((MODEL, src),))
        boot = tuple(worker.host.addrs[:1])
        member = await _node(stack, tmp_path, "member", psk=KEY_A, bootstrap=boot)
        outsiders = {  # no bootstrap: their dials are tried below
            "wrong key": await _node(stack, tmp_path, "wrong", psk=KEY_B),
            "no key": await _node(stack, tmp_path, "nokey"),
        }
        with trio.fail_after(30):
            snap = await member.fetch(FetchRequest(MODEL, cache_dir=member.config.cache_dir))
        same_files(src, snap, [f.path for f in m.files])
        assert member.host.security_protocol(worker.peer_id) == "/noise"
        results = {}

        async def outsider(what: str, node) -> None:
            t0 = trio.current_time()
            with pytest.raises(SwarmHost.NetError) as ei:
                await node.host.connect(boot[0])
            with trio.fail_after(20), pytest.raises(ModelNotFound):
                await node.fetch(FetchRequest(MODEL, cache_dir=node.config.cache_dir))
            results[what] = (
                f"{type(ei.value).__name__}; fetch: ModelNotFound ({trio.current_time() - t0:.1f} s)"
            )
            assert node.host.connected_peers() == []
            assert not list(Path(node.config.cache_dir).rglob("snapshots/*"))

        async with trio.open_nursery() as n:
            for what, node in outsiders.items():
                n.start_soon(outsider, what, node)
        assert sorted(worker.host.connected_peers()) == [member.peer_id]
        assert_honest_alive([worker, member])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "private swarm: wrong / missing swarm key",
            member="fetch complete",
            **{k.replace(" ", "_"): v for k, v in results.items()},
            worker_connected_to=len(worker.host.connected_peers()),
            outcome="refused",
        )


@pytest.mark.timeout(60)
async def test_plaintext_is_never_negotiated(tmp_path, adv_model, error_log):
    """libp2p: offering /plaintext/2.0.0, /plaintext/1.0.0, /secio/1.0.0 or /tls/1.0.0 to a node
    gets "na". Data lane: a peer asking an encrypted node for a plaintext lane gets an encrypted
    one; an acceptor answering "plaintext" to an encrypted node's offer is refused."""
    src, _m, _ = adv_model
    async with AsyncExitStack() as stack:
        node = await start_node(stack, tmp_path, "node", serve=((MODEL, src),))
        addr = node.host.addrs[0]
        parts = addr.split("/")
        refused = []
        for proto in ("/plaintext/2.0.0", "/plaintext/1.0.0", "/secio/1.0.0", "/tls/1.0.0"):
            reply = await _offer_security(parts[2], int(parts[4]), proto)
            assert reply == b"na\n", (proto, reply)
            refused.append(proto)
        assert await _offer_security(parts[2], int(parts[4]), "/noise") == b"/noise\n"

        # A peer that wants a plaintext lane: the encrypted node answers with an encrypted lane.
        peer = SwarmHost(load_or_create_identity(tmp_path / "peer.key"))
        await stack.enter_async_context(peer.run())
        target = PeerAddr(node.peer_id, (addr.rsplit("/p2p/", 1)[0],))
        stream = await peer.open_lane_stream(target)
        await stream.write(OFFER.pack(MAGIC, lc.MODE_PLAINTEXT, secrets.token_bytes(32)))
        answer = b""
        with trio.fail_after(5):
            while len(answer) < ACCEPT.size:
                answer += await stream.read(ACCEPT.size - len(answer))
        _magic, status, mode, _port, _nonce = ACCEPT.unpack(answer)
        assert status == 0 and mode == lc.MODE_ENCRYPTED, (status, mode)
        await stream.reset()

        # An acceptor that answers "plaintext" to an encrypted offer: the dialer refuses it.
        liar = SwarmHost(load_or_create_identity(tmp_path / "liar.key"))

        async def plaintext_acceptor(s) -> None:
            await s.read(OFFER.size)
            await s.write(ACCEPT.pack(MAGIC, 0, lc.MODE_PLAINTEXT, 9, secrets.token_bytes(32)))
            await trio.sleep(1)
            await s.reset()

        liar.set_lane_handler(plaintext_acceptor)
        await stack.enter_async_context(liar.run())
        lane = LaneService("encrypted", node.peer_id)
        liar_addr = PeerAddr(liar.peer_id, (liar.addrs[0].rsplit("/p2p/", 1)[0],))
        with pytest.raises(LaneUnavailable, match="lane mode"):
            await lane.dial(lambda: node.host.open_lane_stream(liar_addr))
        assert_honest_alive([node])
        assert not error_log, [r.getMessage() for r in error_log]
        record(
            "plaintext never negotiated",
            libp2p_refused="+".join(refused),
            lane_plaintext_offer="answered encrypted",
            lane_plaintext_answer="refused by the dialer",
            outcome="as required",
        )


async def _offer_security(host: str, port: int, protocol: str) -> bytes:
    """multistream-select over raw TCP: offer ``protocol`` as the security transport."""
    with trio.fail_after(5):
        s = await trio.open_tcp_stream(host, port)
        async with s:
            for line in (b"/multistream/1.0.0\n", protocol.encode() + b"\n"):
                await s.send_all(bytes([len(line)]) + line)
            buf, lines = b"", []
            while len(lines) < 2:
                chunk = await s.receive_some(1024)
                if not chunk:
                    break
                buf += chunk
                while buf and len(buf) > buf[0]:
                    lines.append(buf[1 : 1 + buf[0]])
                    buf = buf[1 + buf[0] :]
            return lines[1] if len(lines) > 1 else b""


# --------------------------------------------------------------------------- options


def test_trust_and_psk_options_resolve_and_fail_clearly(tmp_path):
    """CLI > SWARM_* > TOML for --psk, --trust, --trusted-publisher; every bad value is a
    ConfigError naming the option."""
    pub = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    other = "12D3KooWRHnwBaUAmQ8V2mo9WGK2bbpZZZ1SuWLCEtWHVtp1rPNh"
    keyfile = tmp_path / "swarm.key"
    keyfile.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{KEY_A.upper()}\n")
    cfg = tmp_path / "swarm.toml"
    cfg.write_text(f'psk = "swarm.key"\ntrust = "trusted-publishers"\ntrusted_publishers = ["{pub}"]\n')
    s = resolve_run(config=cfg, env={})
    assert (s.psk, s.trust, s.trusted_publishers) == (KEY_A, "trusted-publishers", (pub,))
    assert "psk" not in repr(s)
    s = resolve_run(config=cfg, env={"SWARM_PSK": KEY_B, "SWARM_TRUSTED_PUBLISHERS": f"{other}, {pub}"})
    assert s.psk == KEY_B and s.trusted_publishers == (other, pub)
    assert resolve_run(config=cfg, psk=str(keyfile), env={"SWARM_PSK": KEY_B}).psk == KEY_A
    with pytest.raises(ConfigError, match="trust policy is 'open'"):
        resolve_run(config=cfg, trust="open", env={})  # the file's publishers with open
    s = resolve_run(env={}, trust="open")
    assert s.trust == "open" and s.trusted_publishers == () and s.psk is None
    policy = NodeConfig.from_settings(resolve_run(config=cfg, env={})).trust
    assert policy.mode == "trusted-publishers" and policy.publishers == {pub}
    bad = [
        (dict(psk="not-a-key"), "--psk"),
        (dict(psk=str(tmp_path / "missing.key")), "--psk"),
        (dict(trust="trusted-publishers"), "needs at least one"),
        (dict(trust="paranoid"), "must be one of"),
        (dict(trusted_publishers=["12D3KooWabc"]), "not the peer id"),
        (dict(trusted_publishers=["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]), "Ed25519"),
        (dict(trusted_publishers=[pub]), "trust policy is 'open'"),
    ]
    for kw, match in bad:
        with pytest.raises(ConfigError, match=match):
            resolve_run(env={}, **kw)
    with pytest.raises(ConfigError, match="SWARM_TRUST"):
        resolve_run(env={"SWARM_TRUST": "closed"})
    for text, match in [
        ('trust = "x"', "trust"),
        ("trusted_publishers = 5", "list of peer id"),
        ('psk = "nope"', "psk"),
    ]:
        cfg.write_text(text + "\n")
        with pytest.raises(ConfigError, match=match):
            load_toml(cfg)
    record(
        "options: --psk / --trust / --trusted-publisher",
        bad_values_tried=len(bad) + 4,
        outcome="ConfigError naming the option, each",
    )


@pytest.mark.timeout(120)
def test_cli_private_swarm_and_trusted_publishers(tmp_path, adv_model):
    """End to end with ``swarm-node`` processes: a worker started with ``--psk FILE`` (from
    ``swarm-node keygen --out``); a frontend with the same key in hex and ``--trust
    trusted-publishers --trusted-publisher <worker>`` fetches; one trusting another publisher
    (set through SWARM_TRUST / SWARM_TRUSTED_PUBLISHERS) is refused the manifest; one with another
    key (SWARM_PSK) cannot reach the worker at all. Bad option values exit with status 2."""
    src, m, _ = adv_model
    env = base_env(tmp_path)
    keyfile = tmp_path / "swarm.key"
    r = swarm_node("keygen", "--out", str(keyfile), env=env)
    assert r.returncode == 0 and keyfile.stat().st_mode & 0o777 == 0o600, r.stderr
    key = keyfile.read_text().split()[-1]
    assert swarm_node("keygen", "--out", str(keyfile), env=env).returncode == 1  # never overwrites
    for args, match in [
        (["--trust", "trusted-publishers"], "needs at least one"),
        (["--trusted-publisher", "nope"], "not the peer id"),
        (["--psk", "zz"], "--psk"),
    ]:
        r = swarm_node("run", "--home", str(tmp_path / "bad"), *args, env=env, timeout=30)
        assert r.returncode == 2 and match in r.stderr, (args, r.stderr)

    worker = NodeProc(tmp_path, "worker", "--serve", f"{MODEL}={src}", "--psk", str(keyfile), env=env)
    nodes = [worker]
    try:
        worker.start().wait_ready()
        wid = worker.status["peer_id"]
        good = NodeProc(
            tmp_path,
            "good",
            "--bootstrap",
            worker.addr,
            "--psk",
            key,
            "--trust",
            "trusted-publishers",
            "--trusted-publisher",
            wid,
            env=env,
        )
        distrust_env = dict(
            env,
            SWARM_PSK=key,
            SWARM_TRUST="trusted-publishers",
            SWARM_TRUSTED_PUBLISHERS="12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        )
        distrust = NodeProc(tmp_path, "distrust", "--bootstrap", worker.addr, env=distrust_env)
        outsider = NodeProc(
            tmp_path, "outsider", "--bootstrap", worker.addr, env=dict(env, SWARM_PSK="cd" * 32)
        )
        nodes += [good, distrust, outsider]
        for n in nodes[1:]:
            n.start()
        for n in nodes[1:]:
            n.wait_ready()
        t0 = time.monotonic()
        path = client.fetch(MODEL, home=good.home, timeout=60, progress=False)
        same_files(src, path, [f.path for f in m.files])
        good_s = time.monotonic() - t0
        refusals: dict[str, tuple[BaseException | None, float]] = {}

        def refused(name: str, node: NodeProc) -> None:
            t1 = time.monotonic()
            try:
                client.fetch(MODEL, home=node.home, timeout=60, progress=False)
                err = None
            except BaseException as e:
                err = e
            refusals[name] = (err, time.monotonic() - t1)

        threads = [
            threading.Thread(target=refused, args=a) for a in (("distrust", distrust), ("outsider", outsider))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        err, _ = refusals["distrust"]
        assert isinstance(err, FetchError) and "not trusted" in str(err), err
        err, outsider_s = refusals["outsider"]
        assert isinstance(err, FetchError) and "no providers" in str(err), err
        assert client.status(outsider.home)["peers"] == []
        assert worker.popen.poll() is None
        assert not list(Path(distrust.cache).rglob("snapshots/*"))
        assert not list(Path(outsider.cache).rglob("snapshots/*"))
        record(
            "CLI: --psk FILE / hex / SWARM_PSK, --trust, --trusted-publisher (processes)",
            trusted_fetch_s=round(good_s, 1),
            untrusted_publisher="refused: not trusted",
            other_key=f"no providers ({outsider_s:.1f} s), 0 peers",
            bad_cli_values="exit 2 each",
            outcome="as required",
        )
    finally:
        for n in nodes:
            n.stop()
