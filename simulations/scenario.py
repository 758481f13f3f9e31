"""Scenario files (TOML): who takes part, with what links, when they come and go.

A scenario is read into plain frozen values; every key is checked (an unknown key is an error, so a
typo cannot silently fall back to a default). docs/simulation.md describes every key; the shipped
scenarios are in ``simulations/scenarios/``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from simulations import startup, units
from simulations._engine import (
    FEW_PEERS,
    LOOKUP_RETRY,
    LOOKUP_SETTLED,
    MANIFEST_ASK_FANOUT,
    EngineConfig,
)
from simulations.dists import Arrival, Dist, ScenarioError, _check_keys, _table
from simulations.startup import DEFAULT as STARTUP_DEFAULT
from simulations.startup import StartupModel
from swarm.manifest import EMPTY_DIGEST, HASH_PREFIX, FileEntry, Manifest, piece_size_for

ROLES = ("seed", "fetch")
EVENT_ACTIONS = ("leave", "kill", "vanish", "join")
ANNOUNCE = ("start", "first_piece", "complete", "never")
LIVENESS_TIMEOUT = 5.0
"""swarm.net.lane_link.LIVENESS_TIMEOUT (copied: the simulator never imports swarm.net;
tests/test_simulation.py checks they agree): the data lane's TCP_USER_TIMEOUT, with keepalive
probes after KEEPALIVE_IDLE (2 s) idle, every KEEPALIVE_INTERVAL (1 s)."""
BLACKHOLE_RESET = 6.0
"""Seconds from a peer's vanishing (no FIN, no RST) to our node dropping its link to it: the
kernel drops the lane's connection LIVENESS_TIMEOUT after the peer's last packet, data waiting or
not (unacknowledged data: the retransmission timer, clamped to TCP_USER_TIMEOUT; an idle link:
the keepalive probes, so up to one KEEPALIVE_INTERVAL more); the lane's threads see ETIMEDOUT
within IO_TICK (0.25 s) and the engine forgets the link, its requests and its upload slot. The
namespace testbed measured 6.3-8.9 s from the vanish to the link and slot being gone
(docs/reliability.md, "Hosts that vanish mid-transfer"; node status polled every 0.25 s, machine
busy). libp2p's connection to it goes after 10 s (swarm.net.compat.LIBP2P_LIVENESS_TIMEOUT), not
modelled apart: the simulator's link is the lane. Before December 2026 the lane had no liveness
option and a link was reset only by STALL_TIMEOUT (30 s after a send stopped progressing); plain
TCP gives up after 924.6 s (tcp_retries2 = 15, 200 ms minimum RTO)."""


@attrs.frozen
class Group:
    name: str
    role: str
    count: int
    upload: float
    download: float
    latency: float
    serve: bool
    peers: int
    announce: str
    arrival: Arrival
    session: Dist
    after_finish: Dist | None  # None: stay until the session ends; else linger then leave
    rejoin: Dist | None  # offline time before a node whose session ended comes back
    hash_rate: float  # bytes/s of verifying a received piece; 0: free
    corrupt: float  # probability that a piece this node serves fails verification
    engine: Mapping[str, Any]

    @property
    def fetches(self) -> bool:
        return self.role == "fetch"


_GROUP_KEYS = {
    "role",
    "count",
    "upload",
    "download",
    "latency",
    "serve",
    "peers",
    "announce",
    "arrival",
    "session",
    "after_finish",
    "rejoin",
    "hash_rate",
    "corrupt",
    "engine",
}


def _parse_group(name: str, v: object) -> Group:
    where = f"groups.{name}"
    d = _table(v, where)
    _check_keys(d, _GROUP_KEYS, where)
    role = d.get("role", "fetch")
    if role not in ROLES:
        raise ScenarioError(f"{where}.role: must be one of {ROLES}, got {role!r}")
    count = d.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ScenarioError(f"{where}.count: must be an int >= 0")
    serve = d.get("serve", True)
    if not isinstance(serve, bool):
        raise ScenarioError(f"{where}.serve: must be true or false")
    announce = d.get("announce", "start" if serve else "never")  # node.py announces at fetch start
    if announce not in ANNOUNCE:
        raise ScenarioError(f"{where}.announce: must be one of {ANNOUNCE}")
    if not serve:
        announce = "never"
    af = d.get("after_finish", "stay")
    if af == "stay":
        after_finish = None
    elif af == "leave":
        after_finish = Dist("fixed", 0.0)
    else:
        after_finish = Dist.parse(
            _table(af, f"{where}.after_finish").get("linger"), f"{where}.after_finish.linger"
        )
        _check_keys(af, {"linger"}, f"{where}.after_finish")
    engine = _table(d.get("engine", {}), f"{where}.engine")
    _check_engine(engine, f"{where}.engine")
    peers = d.get("peers", 16)
    if not isinstance(peers, int) or peers < 0:
        raise ScenarioError(f"{where}.peers: must be an int >= 0")
    return Group(
        name=name,
        role=role,
        count=count,
        upload=units.rate(d.get("upload", "100 Mbit/s"), f"{where}.upload"),
        download=units.rate(d.get("download", "1 Gbit/s"), f"{where}.download"),
        latency=units.duration(d.get("latency", "5 ms"), f"{where}.latency"),
        serve=serve,
        peers=peers,
        announce=announce,
        arrival=Arrival.parse(d.get("arrival", {"process": "flash"}), f"{where}.arrival"),
        session=Dist.parse(d.get("session", "forever"), f"{where}.session"),
        after_finish=after_finish,
        rejoin=Dist.parse(d["rejoin"], f"{where}.rejoin") if "rejoin" in d else None,
        hash_rate=units.rate(d["hash_rate"], f"{where}.hash_rate") if "hash_rate" in d else 0.0,
        corrupt=_probability(d.get("corrupt", 0.0), f"{where}.corrupt"),
        engine=engine,
    )


def _probability(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ScenarioError(f"{where}: must be a number within [0, 1]")
    return float(v)


def _check_engine(d: Mapping[str, Any], where: str) -> None:
    fields = {f.name for f in attrs.fields(EngineConfig)}
    _check_keys(d, fields, where)


@attrs.frozen
class Event:
    """A scheduled change: ``leave`` (the node stops and closes its links), ``kill`` (SIGKILL: the
    kernel closes its sockets, so peers see the same as for leave), ``vanish`` (its host's link
    stops carrying packets: nothing is closed, links hang until the peers' own timeouts, dials
    time out) take nodes of a group offline; ``join`` brings offline ones back."""

    at: float
    action: str
    group: str
    count: int | None
    fraction: float | None
    rejoin_after: Dist | None

    @staticmethod
    def parse(v: object, where: str, groups: Mapping[str, Group]) -> Event:
        d = _table(v, where)
        _check_keys(d, {"at", "action", "group", "count", "fraction", "rejoin_after"}, where)
        action = d.get("action")
        if action not in EVENT_ACTIONS:
            raise ScenarioError(f"{where}.action: must be one of {', '.join(EVENT_ACTIONS)}")
        group = d.get("group")
        if group not in groups:
            raise ScenarioError(f"{where}.group: no group {group!r}")
        if "count" in d and "fraction" in d:
            raise ScenarioError(f"{where}: give count or fraction, not both")
        frac = float(d["fraction"]) if "fraction" in d else None
        if frac is not None and not 0 <= frac <= 1:
            raise ScenarioError(f"{where}.fraction: must be within [0, 1]")
        return Event(
            at=units.duration(d.get("at", 0), f"{where}.at"),
            action=action,
            group=group,
            count=int(d["count"]) if "count" in d else None,
            fraction=frac,
            rejoin_after=Dist.parse(d["rejoin_after"], f"{where}.rejoin_after")
            if "rejoin_after" in d
            else None,
        )


# --------------------------------------------------------------------------- network, dht


@attrs.frozen
class NetworkParams:
    jitter: float = 0.0
    """Extra one-way delay per message, uniform in [0, jitter] (order on a link is kept)."""
    loss: float = 0.0
    """Packet loss probability: caps each flow at the Mathis TCP rate and delays a control message
    by one retransmission timeout with this probability."""
    mss: int = 1460
    min_rto: float = 0.2
    connect_rtts: float = 2.0
    """Round trips to open a connection (TCP + Noise + yamux/multistream negotiation)."""
    dial_timeout: float = 10.0
    """Seconds a dial to a host that vanished takes to fail (swarm.net.host.CONNECT_TIMEOUT); a
    dial to a host whose node stopped is refused after one round trip."""
    blackhole_reset: float = BLACKHOLE_RESET
    """Seconds after a peer vanished at which each of our links to it is reset, idle or not (see
    BLACKHOLE_RESET). Until then the link just hangs."""
    window: int = 0
    """If > 0, a flow is capped at window / RTT (a TCP receive window)."""
    time_grid: float = 0.001
    """Message deliveries and flow ends are rounded up to this grid (0: exact); see network.py."""
    share_spread: float = 0.0
    """Uneven TCP shares: each piece's flow gets a weight uniform in [1 - s, 1 + s] in the max-min
    share of the links it crosses (0: exactly fair); see network.py."""


@attrs.frozen
class DHTParams:
    bits_per_hop: float = 3.0
    """A lookup takes ceil(log2(online nodes) / bits_per_hop) hops, each one round trip."""
    record_ttl: float = 48 * 3600.0
    republish: float = 22 * 3600.0
    max_providers: int = 20
    """Providers one lookup returns (swarm.net's find_providers limit)."""
    lookup_retry: float = LOOKUP_RETRY
    """After its first lookups (swarm.discovery.LOOKUP_FIRST apart), a fetching node looks up
    again after this long while it has fewer than ``min_links`` peers ..."""
    lookup_retry_linked: float = LOOKUP_SETTLED
    """... and after this long otherwise, until it is done (swarm.discovery.LookupSchedule)."""
    min_links: int = FEW_PEERS
    lookup_timeout_first: float = 5.0
    """While any host has vanished, a fetch's first lookup takes this long (swarm.node's
    lookup_timeout: GET_PROVIDERS to a dead routing-table entry never answers) ..."""
    lookup_timeout: float = 2.0
    """... and every later lookup this long (the connect loop's find_providers timeout)."""
    manifest_fanout: int = MANIFEST_ASK_FANOUT
    """Providers a fetch asks for the manifest at once (swarm.discovery.ManifestAsk) ..."""
    manifest_timeout: float = 5.0
    """... each one that does not answer failing after this long (swarm.node's
    MANIFEST_ASK_TIMEOUT); once one answered, the others get swarm.discovery's
    MANIFEST_VOTE_GRACE."""


_NET_KEYS = {a.name for a in attrs.fields(NetworkParams)}
_DHT_KEYS = {a.name for a in attrs.fields(DHTParams)}


# --------------------------------------------------------------------------- scenario


@attrs.frozen
class FileSpec:
    path: str
    size: int


@attrs.frozen(slots=False)
class Scenario:
    name: str
    description: str
    files: tuple[FileSpec, ...]
    groups: tuple[Group, ...]
    events: tuple[Event, ...]
    network: NetworkParams
    dht: DHTParams
    engine: Mapping[str, Any]
    stop_at: float
    sample_interval: float
    log_pieces: bool
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)
    startup: StartupModel = STARTUP_DEFAULT
    """The start of a fetch on a real node (simulations/startup.py): the ``[startup]`` table."""

    @property
    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def engine_config(self, group: Group) -> EngineConfig:
        return EngineConfig(**{**self.engine, **group.engine})

    @functools.cached_property
    def manifest(self) -> Manifest:
        return make_manifest(self.files, model=f"sim/{_safe(self.name)}")


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip(".-") or "model"
    return out[:96]


_TOP_KEYS = {
    "name",
    "description",
    "model",
    "groups",
    "events",
    "network",
    "dht",
    "engine",
    "stop_at",
    "sample_interval",
    "log_pieces",
    "startup",
}


def parse(data: Mapping[str, Any], *, name: str = "scenario") -> Scenario:
    d = dict(data)
    _check_keys(d, _TOP_KEYS, "scenario")
    model = _table(d.get("model", {}), "model")
    _check_keys(model, {"files"}, "model")
    raw_files = model.get("files") or [{"path": "model.safetensors", "size": "256 MiB"}]
    files = []
    for i, f in enumerate(raw_files):
        f = _table(f, f"model.files[{i}]")
        _check_keys(f, {"path", "size"}, f"model.files[{i}]")
        files.append(FileSpec(str(f["path"]), units.size(f["size"], f"model.files[{i}].size")))
    files.sort(key=lambda f: f.path.encode())
    groups_d = _table(d.get("groups", {}), "groups")
    if not groups_d:
        raise ScenarioError("groups: at least one group is needed")
    groups = tuple(_parse_group(n, g) for n, g in groups_d.items())
    by_name = {g.name: g for g in groups}
    if not any(g.role == "seed" and g.count for g in groups):
        raise ScenarioError('groups: no node holds the model (no role = "seed" group with count > 0)')
    events = tuple(
        sorted(
            (Event.parse(e, f"events[{i}]", by_name) for i, e in enumerate(d.get("events", []))),
            key=lambda e: e.at,
        )
    )
    net = _table(d.get("network", {}), "network")
    _check_keys(net, _NET_KEYS, "network")
    network = NetworkParams(
        jitter=units.duration(net.get("jitter", 0), "network.jitter"),
        loss=float(net.get("loss", 0.0)),
        mss=int(net.get("mss", 1460)),
        min_rto=units.duration(net.get("min_rto", 0.2), "network.min_rto"),
        connect_rtts=float(net.get("connect_rtts", 2.0)),
        dial_timeout=units.duration(net.get("dial_timeout", 10.0), "network.dial_timeout"),
        blackhole_reset=units.duration(
            net.get("blackhole_reset", BLACKHOLE_RESET), "network.blackhole_reset"
        ),
        window=units.size(net.get("window", 0), "network.window"),
        time_grid=units.duration(net.get("time_grid", 0.001), "network.time_grid"),
        share_spread=float(net.get("share_spread", 0.0)),
    )
    if not 0 <= network.share_spread < 1:
        raise ScenarioError("network.share_spread: must be within [0, 1)")
    if not 0 <= network.loss < 1:
        raise ScenarioError("network.loss: must be within [0, 1)")
    dh = _table(d.get("dht", {}), "dht")
    _check_keys(dh, _DHT_KEYS, "dht")
    dht = DHTParams(
        bits_per_hop=float(dh.get("bits_per_hop", 3.0)),
        record_ttl=units.duration(dh.get("record_ttl", 48 * 3600), "dht.record_ttl"),
        republish=units.duration(dh.get("republish", 22 * 3600), "dht.republish"),
        max_providers=int(dh.get("max_providers", 20)),
        lookup_retry=units.duration(dh.get("lookup_retry", LOOKUP_RETRY), "dht.lookup_retry"),
        lookup_retry_linked=units.duration(
            dh.get("lookup_retry_linked", LOOKUP_SETTLED), "dht.lookup_retry_linked"
        ),
        min_links=int(dh.get("min_links", FEW_PEERS)),
        lookup_timeout_first=units.duration(dh.get("lookup_timeout_first", 5.0), "dht.lookup_timeout_first"),
        lookup_timeout=units.duration(dh.get("lookup_timeout", 2.0), "dht.lookup_timeout"),
        manifest_fanout=int(dh.get("manifest_fanout", MANIFEST_ASK_FANOUT)),
        manifest_timeout=units.duration(dh.get("manifest_timeout", 5.0), "dht.manifest_timeout"),
    )
    if dht.manifest_fanout < 1:
        raise ScenarioError("dht.manifest_fanout: must be an int >= 1")
    engine = _table(d.get("engine", {}), "engine")
    _check_engine(engine, "engine")
    sc = Scenario(
        name=str(d.get("name", name)),
        description=str(d.get("description", "")),
        files=tuple(files),
        groups=groups,
        events=events,
        network=network,
        dht=dht,
        engine=engine,
        stop_at=units.duration(d.get("stop_at", 3600), "stop_at"),
        sample_interval=units.duration(d.get("sample_interval", 1.0), "sample_interval"),
        log_pieces=bool(d.get("log_pieces", True)),
        raw=copy.deepcopy(dict(data)),
        startup=startup.parse(_table(d.get("startup", {}), "startup")),
    )
    try:
        sc.engine_config(groups[0])
        _ = sc.manifest
    except (TypeError, ValueError) as e:
        raise ScenarioError(str(e)) from e
    return sc


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    p = Path(path)
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse(data, name=p.stem)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``groups.frontends.count``) in a copy of the raw scenario table."""
    out = copy.deepcopy(dict(data))
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = out
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
                continue
            node = node.setdefault(p, {})
            if not isinstance(node, dict | list):
                raise ScenarioError(f"--set {key}: {p} is not a table")
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return out


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (``100``, ``0.5``, ``true``, ``"1 Gbit/s"``);
    anything TOML cannot read is kept as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# --------------------------------------------------------------------------- manifest


def _fake_digest(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def make_manifest(files: tuple[FileSpec, ...], model: str = "sim/model", revision: str = "sim") -> Manifest:
    """A valid manifest for files of these sizes, with made-up digests (nothing is hashed)."""
    entries = []
    for f in sorted(files, key=lambda f: f.path.encode()):
        ps = piece_size_for(f.size)
        n = -(-f.size // ps)
        whole = _fake_digest(f.path, f.size)
        if n == 1:
            hashes: tuple[bytes, ...] = (whole,)
        elif n == 0:
            whole, hashes = EMPTY_DIGEST, ()
        else:
            hashes = tuple(_fake_digest(f.path, k) for k in range(n))
        entries.append(FileEntry(f.path, f.size, HASH_PREFIX + whole.hex(), ps, hashes))
    return Manifest(model, revision, tuple(entries))


SCENARIO_DIR = Path(__file__).parent / "scenarios"


def shipped() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.toml"))
