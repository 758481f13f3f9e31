"""Origin once: when several nodes need a model no peer holds, one of them pulls it from the origin.

Without this, every node of a cold flash crowd found no provider in the DHT and went to the Hub
itself: the origin served N x the model. Here (docs/protocol.md, "Origin once"):

1. A node that finds no provider of the model announces its *interest* under the model's origin
   key (a provider record, :func:`origin_key`), waits ``ELECTION_SETTLE`` for fellow fetchers'
   announcements, and looks the interested peers up.
2. It asks each of them for its state over ``/swarm/origin/1.0.0`` (a small JSON query). A peer
   that already pulls (or follows a pull that makes progress, or has finished one) is followed: a
   late-comer never starts a second pull. Otherwise the interested peer whose id is closest (XOR
   of sha256 digests) to the key pulls; every node computes the same choice from the same set.
3. The puller downloads from the Hub (``sources.from_hub``), which checks every file against the
   Hub's listing (sizes, sha256 of LFS files, git blob sha1 of the others) before anything is
   seeded, then builds and seeds the manifest (announced under the model key) like any snapshot
   from the Hub.
4. The others poll the puller every ``POLL`` seconds. When it reports ``seeded`` they fetch
   through the swarm. When it stops answering (``PROBE_FAILURES`` in a row), reports failure, or
   shows no progress for ``STALL_TIMEOUT``, they drop it and elect again among the rest: the
   next-closest live peer pulls.

Peers' answers only steer whom a node waits for; no byte is taken on a peer's word: the puller
verifies against the origin's hashes, and the others verify every piece against the manifest.
A peer that lies about its state can only delay a fetch by ``STALL_TIMEOUT`` per election, or
make this node pull itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from swarm.net.host import NetError, PeerAddr, model_key

log = logging.getLogger(__name__)

ORIGIN_PROTOCOL = "/swarm/origin/1.0.0"
ELECTION_SETTLE = 0.5
"""Seconds between announcing interest and electing: provider records reach the DHT nodes in
~50-150 ms on a LAN (more on a loaded host), so fetchers that start together see each other."""
LOOKUP_TIMEOUT = 1.5
"""Seconds one lookup of interested peers (or of the model's providers) may take."""
POLL = 0.25
"""Seconds between state queries to the puller (a ~200-byte exchange)."""
PROBE_TIMEOUT = 1.0
"""Seconds one state query may take; a live node answers in milliseconds."""
PROBE_FAILURES = 3
"""Failed state queries in a row after which the puller counts as gone (a dead process refuses the
connection at once: ~0.75 s with POLL; a hung host times out: ~3 s)."""
STALL_TIMEOUT = 3.0
"""Seconds without any progress reported by the puller (bytes of its download) before it is
replaced. The Hub client writes as bytes arrive, so a live pull moves every few ms."""
MAX_CANDIDATES = 16
"""Interested peers considered in one election (lookups return at most 20)."""

_ORIGIN_KEY_PREFIX = b"swarm/origin/"
_SHA2_256 = 0x12
_STATES = ("waiting", "pulling", "seeded", "failed", "none")


def origin_key(repo_id: str, ref: str) -> bytes:
    """DHT key under which fetchers of ``repo_id@ref`` announce their interest: the sha2-256
    multihash (34 bytes) of ``b"swarm/origin/" + repo + "@" + ref``."""
    digest = hashlib.sha256(_ORIGIN_KEY_PREFIX + f"{repo_id}@{ref}".encode()).digest()
    return bytes([_SHA2_256, 32]) + digest


def distance(peer_id: str, key: bytes) -> int:
    """XOR distance between a peer and a key, over sha256 digests (as Kademlia measures it)."""
    a = hashlib.sha256(peer_id.encode()).digest()
    b = hashlib.sha256(key).digest()
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@attrs.frozen
class OriginState:
    """One node's answer about one origin key."""

    state: str  # waiting | pulling | seeded | failed | none (not interested)
    progress: int = 0  # bytes of the pull (its own, or the one it follows) last seen
    leader: str = ""  # whom it follows (itself when pulling)

    def encode(self) -> bytes:
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> OriginState:
        """Parse a peer's answer; ValueError on anything malformed."""
        try:
            obj = json.loads(raw)
            state, progress, leader = obj["state"], obj["progress"], obj["leader"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"bad origin state: {e!r}") from None
        if (state not in _STATES or isinstance(progress, bool) or not isinstance(progress, int)
                or progress < 0 or not isinstance(leader, str) or len(leader) > 128):
            raise ValueError("bad origin state")
        return cls(state, progress, leader)

    @property
    def active(self) -> bool:
        """Pulling, or following a pull that made progress, or done: worth following."""
        return self.state in ("pulling", "seeded") or (self.state == "waiting" and self.progress > 0)


@attrs.define
class _Interest:
    state: str = "waiting"
    progress: int = 0
    leader: str = ""
    measure: Callable[[], int] | None = None  # bytes pulled so far, while pulling


def dir_bytes(path: Path) -> int:
    """Bytes of the files directly in ``path`` (the Hub client's blobs, ``.incomplete`` ones too)."""
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return 0
    return total


class OriginCoordinator:
    """The origin-once protocol of one node (see the module docstring)."""

    def __init__(self, host, peer_id: str) -> None:
        self.host = host
        self.peer_id = peer_id
        self.interests: dict[bytes, _Interest] = {}

    def install(self) -> None:
        self.host.set_query_handler(ORIGIN_PROTOCOL, self._answer)

    async def _answer(self, _peer: str, request: bytes) -> bytes:
        obj = json.loads(request)
        key = bytes.fromhex(obj["key"]) if isinstance(obj, dict) and isinstance(obj.get("key"), str) \
            else b""
        if len(key) != 34:
            raise ValueError("bad origin key")
        it = self.interests.get(key)
        if it is None:
            return OriginState("none").encode()
        if it.state == "pulling" and it.measure is not None:
            it.progress = await trio.to_thread.run_sync(it.measure)
        return OriginState(it.state, it.progress, it.leader).encode()

    async def ask(self, peer: str | PeerAddr, key: bytes) -> OriginState:
        """A peer's state about ``key``; NetError when it cannot be asked, ValueError on garbage."""
        raw = await self.host.query(peer, ORIGIN_PROTOCOL, json.dumps({"key": key.hex()}).encode(),
                                    timeout=PROBE_TIMEOUT)
        return OriginState.decode(raw)

    async def fetch(self, repo_id: str, ref: str, *,
                    swarm_fetch: Callable[[], Awaitable[Path]],
                    pull: Callable[[Callable[[Callable[[], int]], None]], Awaitable[Path]]) -> Path:
        """``repo_id@ref`` through the swarm, or pulled from the origin by this node when elected.

        ``swarm_fetch()`` fetches through the swarm (``Node.fetch``); ``pull(start)`` downloads from
        the origin, verifies and seeds, calling ``start(measure)`` once it knows how to measure its
        progress (a callable returning bytes pulled so far)."""
        mkey = model_key(repo_id)
        if await self._providers(mkey):
            return await swarm_fetch()
        key = origin_key(repo_id, ref)
        it = self.interests.get(key)
        if it is not None and it.state == "seeded":  # pulled here before: it is in the swarm
            return await swarm_fetch()
        it = self.interests[key] = _Interest()
        try:
            await self.host.provide(key)
            await trio.sleep(ELECTION_SETTLE)
            return await self._pull_or_follow(key, mkey, it, swarm_fetch, pull)
        except BaseException:
            if it.state != "seeded":
                it.state = "failed"
            raise
        finally:
            if it.state != "seeded":  # a seeded record stays: late followers learn to fetch
                self.host.stop_providing(key)

    async def _pull_or_follow(self, key: bytes, mkey: bytes, it: _Interest, swarm_fetch,
                              pull) -> Path:
        excluded: set[str] = set()
        while True:
            leader = await self._elect(key, mkey, excluded)
            if leader is None:  # the model appeared in the swarm meanwhile
                return await swarm_fetch()
            if leader == self.peer_id:
                return await self._pull(it, pull)
            it.leader = leader
            log.info("origin: following %s's pull of key %s", leader[:12], key.hex()[4:16],
                     extra={"event": "origin_follow", "leader": leader})
            if await self._follow(key, leader, it):
                it.state = "seeded"
                return await swarm_fetch()
            log.warning("origin: puller %s gone or stalled; electing again", leader[:12],
                        extra={"event": "origin_replace", "leader": leader})
            excluded.add(leader)

    async def _pull(self, it: _Interest, pull) -> Path:
        it.state, it.leader, it.progress = "pulling", self.peer_id, 0

        def start(measure: Callable[[], int]) -> None:
            it.measure = measure

        log.info("origin: pulling from the origin", extra={"event": "origin_pull"})
        path = await pull(start)
        it.state = "seeded"
        return path

    async def _providers(self, key: bytes) -> list[PeerAddr]:
        try:
            return await self.host.find_providers(key, timeout=LOOKUP_TIMEOUT)
        except NetError as e:
            log.info("origin: lookup failed: %s", e)
            return []

    async def _elect(self, key: bytes, mkey: bytes, excluded: set[str]) -> str | None:
        """Whom to wait for: an interested peer already pulling (or following progress), else the
        closest live interested peer (maybe us). None when the model has providers now."""
        found = await self._providers(key)
        others = [p for p in found if p.peer_id not in excluded and p.peer_id != self.peer_id]
        others.sort(key=lambda p: distance(p.peer_id, key))
        others = others[:MAX_CANDIDATES]
        states: dict[str, OriginState] = {}

        async def probe(p: PeerAddr) -> None:
            try:
                states[p.peer_id] = await self.ask(p, key)
            except (NetError, ValueError) as e:
                log.debug("origin: %s did not answer: %s", p.peer_id[:12], e)

        async with trio.open_nursery() as n:
            for p in others:
                n.start_soon(probe, p)
        # Follow the puller itself (a follower names it), so a stall is seen where it happens.
        active = {st.leader if st.state == "waiting" and st.leader else pid
                  for pid, st in states.items() if st.active}
        active -= excluded | {self.peer_id}
        if active:
            return min(active, key=lambda pid: distance(pid, key))
        live = [pid for pid, st in states.items() if st.state == "waiting"] + [self.peer_id]
        leader = min(live, key=lambda pid: distance(pid, key))
        if leader == self.peer_id and await self._providers(mkey):
            return None  # a last look before pulling: someone may have seeded it meanwhile
        return leader

    async def _follow(self, key: bytes, leader: str, it: _Interest) -> bool:
        """Wait while ``leader``'s pull goes on: True once seeded, False if it is gone, failed or
        stalled (no change in its state or progress for STALL_TIMEOUT)."""
        failures = 0
        last: tuple[str, int] | None = None
        since = trio.current_time()
        while True:
            try:
                st = await self.ask(leader, key)
            except (NetError, ValueError) as e:
                failures += 1
                if failures >= PROBE_FAILURES:
                    log.info("origin: %s stopped answering: %s", leader[:12], e)
                    return False
                await trio.sleep(POLL)
                continue
            failures = 0
            if st.state == "seeded":
                return True
            if st.state in ("failed", "none"):
                return False
            it.progress = st.progress
            now = trio.current_time()
            if (st.state, st.progress) != last:
                last, since = (st.state, st.progress), now
            elif now - since > STALL_TIMEOUT:
                return False
            await trio.sleep(POLL)
