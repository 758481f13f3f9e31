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

The constants, wire formats and file helpers are in ``swarm/origin_rules.py`` (imported here by
name, so ``swarm.origin`` still offers them, and a test patches a timing here).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from swarm.hubpull import PARTIAL_SUFFIX
from swarm.net.host import QUERY_TIMEOUT, NetError, PeerAddr, model_key
from swarm.origin_rules import (  # noqa: F401 (swarm.origin's names, as before the split)
    ELECTION_SETTLE,
    LOOKUP_TIMEOUT,
    MAX_CANDIDATES,
    MAX_MIRROR_FILES,
    MAX_PROBES,
    MIRROR_CHUNK,
    MIRROR_PROTOCOL,
    ORIGIN_PROTOCOL,
    POLL,
    PROBE_FAILURES,
    PROBE_TIMEOUT,
    PROVIDE_WAIT,
    RIVAL_CHECK,
    RIVAL_WINDOW,
    SILENT_TIMEOUT,
    STALL_TIMEOUT,
    WAIT_GRACE,
    OriginState,
    _append,
    _mirror_name,
    _parse_listing,
    _parse_query,
    _query,
    _size_of,
    _timed_out,
    blob_sizes,
    dir_bytes,
    distance,
    origin_key,
)

log = logging.getLogger(__name__)


@attrs.define
class _Interest:
    state: str = "waiting"
    progress: int = 0
    leader: str = ""
    blobs: Path | None = None  # where our pull writes (the repo's blobs/), while pulling
    have: int = 0  # bytes our copy of the puller's partial files holds
    building: bool = False  # downloaded; building the manifest (CPU work: progress ticks)
    heard: float = 0.0  # trio time of the followed puller's last answer of any kind


class OriginCoordinator:
    """The origin-once protocol of one node (see the module docstring)."""

    def __init__(self, host, peer_id: str) -> None:
        self.host = host
        self.peer_id = peer_id
        self.interests: dict[bytes, _Interest] = {}

    def install(self) -> None:
        self.host.set_query_handler(ORIGIN_PROTOCOL, self._answer)
        self.host.set_query_handler(MIRROR_PROTOCOL, self._answer_mirror, max_reply=MIRROR_CHUNK)

    async def _answer(self, _peer: str, request: bytes) -> bytes:
        key, obj = _parse_query(request)
        it = self.interests.get(key)
        if it is None:
            return OriginState("none").encode()
        if obj.get("op") == "files":  # what the backup may mirror: our partial and done blobs
            if it.state != "pulling" or it.blobs is None:
                return b"[]"
            return json.dumps(await trio.to_thread.run_sync(blob_sizes, it.blobs)).encode()
        if it.state == "pulling" and it.building:
            it.progress += 1  # hashing the snapshot for the manifest: alive, nothing to download
        elif it.state == "pulling" and it.blobs is not None:
            got = await trio.to_thread.run_sync(dir_bytes, it.blobs)
            # No byte yet: asking the origin for its listing (seconds on a loaded host; a hang
            # there ends in hubpull's timeouts, then "failed"): alive, so progress ticks.
            it.progress = got if got else it.progress + 1
        return OriginState(it.state, it.progress, it.leader, it.have).encode()

    async def _answer_mirror(self, _peer: str, request: bytes) -> bytes:
        """Bytes ``offset``.. of one of the files our pull is writing (at most MIRROR_CHUNK)."""
        key, obj = _parse_query(request)
        it = self.interests.get(key)
        name, offset = obj.get("name"), obj.get("offset")
        if (
            it is None
            or it.state != "pulling"
            or it.blobs is None
            or not isinstance(name, str)
            or not _mirror_name(name)
            or isinstance(offset, bool)
            or not isinstance(offset, int)
            or offset < 0
        ):
            raise ValueError("bad mirror request")
        path = it.blobs / name

        def read() -> bytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(MIRROR_CHUNK)

        return await trio.to_thread.run_sync(read)

    async def ask(self, peer: str | PeerAddr, key: bytes) -> OriginState:
        """A peer's state about ``key``; NetError when it cannot be asked, ValueError on garbage."""
        raw = await self.host.query(peer, ORIGIN_PROTOCOL, _query(key), timeout=PROBE_TIMEOUT)
        return OriginState.decode(raw)

    async def fetch(
        self,
        repo_id: str,
        ref: str,
        blobs: Path,
        *,
        swarm_fetch: Callable[..., Awaitable[Path]],
        pull: Callable[[Callable[[], None]], Awaitable[Path]],
    ) -> Path:
        """``repo_id@ref`` through the swarm, or pulled from the origin by this node when elected.

        ``blobs``: where a pull writes (``<cache>/models--.../blobs``; partial files end in
        ``.swarm-partial``, swarm/hubpull.py). ``swarm_fetch(hint=())`` fetches through the swarm
        (``Node.fetch``; ``hint``: peer ids that hold it); ``pull()`` downloads from the origin
        (resuming the partial files in ``blobs``), verifies and seeds, calling the function it is
        given once the download is over (the manifest is built next: progress then ticks)."""
        mkey = model_key(repo_id)
        key = origin_key(repo_id, ref)
        it = self.interests.get(key)
        if it is not None and it.state == "seeded":  # pulled here before: it is in the swarm
            return await swarm_fetch()
        # Interested from now on (fellow fetchers that ask us learn it at once, DHT or not), while
        # we look for providers of the model and announce the interest, side by side.
        it = self.interests[key] = _Interest()
        try:
            t0 = trio.current_time()
            found: list[PeerAddr] = []

            async def lookup() -> None:
                found.extend(await self._providers(mkey))

            async def announce() -> None:
                await self.host.provide(key, timeout=PROVIDE_WAIT)

            async with trio.open_nursery() as n:
                n.start_soon(lookup)
                n.start_soon(announce)
            if found:
                it.state = "none"
                return await swarm_fetch()
            log.info(
                "origin: no provider of %s; interest announced (%.1f s)", repo_id, trio.current_time() - t0
            )
            await trio.sleep(ELECTION_SETTLE)
            return await self._pull_or_follow(key, mkey, it, blobs, swarm_fetch, pull)
        except BaseException:
            if it.state != "seeded":
                it.state = "failed"
            raise
        finally:
            if it.state != "seeded":  # a seeded record stays: late followers learn to fetch
                self.host.stop_providing(key)
                if it.state == "none":
                    self.interests.pop(key, None)

    async def _pull_or_follow(
        self, key: bytes, mkey: bytes, it: _Interest, blobs: Path, swarm_fetch, pull
    ) -> Path:
        excluded: set[str] = set()  # gone, failed or stalled pullers: never followed again
        passed: set[str] = set()  # peers that kept waiting: not elected, still seen pulling
        while True:
            elected = await self._elect(key, mkey, excluded | passed, it)
            if elected is None:  # the model appeared in the swarm meanwhile
                return await self._swarm(swarm_fetch, ())
            leader, backup = elected
            if leader == self.peer_id:
                path, rival = await self._pull(key, it, blobs, pull, excluded)
                if path is not None:
                    return path
                # Gave way to a puller ahead of us: follow it (electing again could pick us once
                # more when answers come late, and the two would take turns).
                leader, backup = rival, False
            it.leader = leader
            log.info(
                "origin: following %s's pull of key %s%s",
                leader[:12],
                key.hex()[4:16],
                " as its backup" if backup else "",
                extra={"event": "origin_follow", "leader": leader, "backup": backup},
            )
            while True:
                it.heard = trio.current_time()
                async with trio.open_nursery() as n:
                    if backup:  # next in line: keep a copy of its partial files to resume from
                        n.start_soon(self._mirror, key, leader, blobs, it)
                    outcome, detail = await self._follow(key, leader, it, excluded)
                    n.cancel_scope.cancel()
                if outcome != "redirect":
                    break
                # We chose a peer that follows another's pull (we did not hear from that one in
                # time): follow the puller itself, and fetch from it once it has seeded.
                log.info("origin: %s follows %s: following that one", leader[:12], detail[:12])
                leader = it.leader = detail
            if outcome == "seeded":
                it.state = "seeded"
                hint = tuple(dict.fromkeys(p for p in (detail, leader) if p and p != self.peer_id))
                log.info("origin: %s seeded; fetching through the swarm", hint[0][:12])
                return await self._swarm(swarm_fetch, hint)
            why = detail
            log.warning(
                "origin: puller %s %s; electing again",
                leader[:12],
                why,
                extra={"event": "origin_replace", "leader": leader, "reason": why},
            )
            (passed if outcome == "passed" else excluded).add(leader)
            if await self._providers(mkey):  # it (or another) seeded while we could not tell
                it.state = "seeded"
                return await self._swarm(swarm_fetch, (leader,))

    async def _pull(
        self, key: bytes, it: _Interest, blobs: Path, pull, excluded: set[str]
    ) -> tuple[Path | None, str]:
        """(the snapshot, "") from our pull; (None, the other puller) if we gave way to a puller
        ahead of us (two elected at once)."""
        it.state, it.leader, it.progress, it.blobs = "pulling", self.peer_id, 0, blobs
        it.building = False

        started = trio.current_time()
        done_at: list[float] = []

        def downloaded() -> None:
            it.building = True
            done_at.append(trio.current_time())
            log.info("origin: pulled and verified in %.1f s; building the manifest", done_at[0] - started)

        log.info("origin: pulling from the origin", extra={"event": "origin_pull"})
        result: list[Path] = []

        async def run_pull(cancel: trio.CancelScope) -> None:
            result.append(await pull(downloaded))
            cancel.cancel()

        rival: str | None = None
        async with trio.open_nursery() as n:
            n.start_soon(run_pull, n.cancel_scope)
            rival = await self._closer_puller(key, it, excluded)
            if rival is not None:
                log.warning(
                    "origin: %s pulls too and is closer to the key: giving way",
                    rival[:12],
                    extra={"event": "origin_yield", "leader": rival},
                )
                n.cancel_scope.cancel()
            else:
                await trio.sleep_forever()
        if result:
            it.state = "seeded"
            log.info(
                "origin: seeded %.1f s after the download",
                trio.current_time() - (done_at[0] if done_at else started),
            )
            return result[0], ""
        assert rival is not None
        it.state, it.blobs, it.leader = "waiting", None, rival
        return None, rival

    async def _closer_puller(self, key: bytes, it: _Interest, excluded: set[str]) -> str | None:
        """Look, every RIVAL_CHECK for as long as we pull, for another puller ahead of us: one that
        started with more bytes to resume from (``have``, fixed for a pull), or as many and closer
        to the key. Both sides compare the same two fixed values, so exactly one gives way. Views
        of the interested set can differ while announcements spread, or while a dead puller is
        noticed. The DHT is asked during the first RIVAL_WINDOW, connected peers throughout."""
        mine = (it.have, -distance(self.peer_id, key))
        end = trio.current_time() + RIVAL_WINDOW
        while True:
            await trio.sleep(RIVAL_CHECK)
            states, _unanswered = await self._survey(key, excluded, dht=trio.current_time() < end)
            for pid, st in states.items():
                if st.state == "pulling" and (st.have, -distance(pid, key)) > mine:
                    return pid

    async def _survey(
        self, key: bytes, excluded: set[str], *, dht: bool = True
    ) -> tuple[dict[str, OriginState], set[str]]:
        """(states of the interested peers that answered, peers asked that did not): the
        interested peers the DHT names (the closest MAX_CANDIDATES) and every connected peer (up
        to MAX_PROBES; those not interested answer ``none``), asked at once; then the pullers
        their answers name that were not asked yet."""
        skip = excluded | {self.peer_id}
        states: dict[str, OriginState] = {}
        asked: set[str] = set()
        named: list[PeerAddr] = []

        answered_none: set[str] = set()

        async def probe(pid: str, p: str | PeerAddr) -> None:
            try:
                states[pid] = st = await self.ask(p, key)
            except (NetError, ValueError) as e:
                log.debug("origin: %s did not answer: %s", pid[:12], e)
                return
            if st.state == "none":
                answered_none.add(pid)

        def ask_all(n: trio.Nursery, targets: list[tuple[str, str | PeerAddr]]) -> None:
            for pid, p in targets:
                if pid not in skip and pid not in asked:
                    asked.add(pid)
                    n.start_soon(probe, pid, p)

        async def from_dht(n: trio.Nursery) -> None:
            found = [p for p in await self._providers(key) if p.peer_id not in skip]
            found.sort(key=lambda p: distance(p.peer_id, key))
            named.extend(found[:MAX_CANDIDATES])
            ask_all(n, [(p.peer_id, p) for p in named])

        # Connected peers at once, the DHT's side by side (its lookup takes up to LOOKUP_TIMEOUT).
        async with trio.open_nursery() as n:
            ask_all(n, [(pid, pid) for pid in self.host.connected_peers()[:MAX_PROBES]])
            if dht:
                n.start_soon(from_dht, n)
        leaders = {st.leader for st in states.values() if st.state == "waiting" and st.leader}
        async with trio.open_nursery() as n:
            ask_all(n, [(pid, pid) for pid in list(leaders - set(states))[:MAX_CANDIDATES]])
        states = {pid: st for pid, st in states.items() if st.state != "none"}
        # Every peer asked that did not answer (a connected one too: on a loaded host answers come
        # late, and three nodes that each heard from a different three of seven all pulled).
        # The election counts them as live: all compute the same order over the same peers; one
        # that turns out not interested answers ``none`` and is dropped at its first answer.
        unanswered = asked - set(states) - answered_none
        return states, unanswered

    async def _mirror(self, key: bytes, leader: str, blobs: Path, it: _Interest) -> None:
        """Copy the puller's partial and finished files into ours as ``.swarm-partial`` files,
        every POLL: if it dies we are elected next and resume where its copy ends. The bytes are
        a resume point only: the pull verifies each whole file against the Hub's hashes."""
        await trio.to_thread.run_sync(lambda: blobs.mkdir(parents=True, exist_ok=True))
        while True:
            try:
                raw = await self.host.query(
                    leader, ORIGIN_PROTOCOL, _query(key, op="files"), timeout=PROBE_TIMEOUT
                )
                listing = _parse_listing(raw)
                it.heard = trio.current_time()  # an answer: the puller is alive
                for name, size in listing:
                    await self._mirror_file(key, leader, blobs, name, size, it)
            except (NetError, ValueError, OSError) as e:
                log.debug("origin: mirror from %s: %s", leader[:12], e)
            it.have = await trio.to_thread.run_sync(dir_bytes, blobs)
            await trio.sleep(POLL)

    async def _mirror_file(
        self, key: bytes, leader: str, blobs: Path, name: str, size: int, it: _Interest
    ) -> None:
        base = name.removesuffix(PARTIAL_SUFFIX)
        if (blobs / base).exists():
            return
        local = blobs / (base + PARTIAL_SUFFIX)
        have = await trio.to_thread.run_sync(_size_of, local)
        while have < size:
            chunk = await self.host.query(
                leader,
                MIRROR_PROTOCOL,
                _query(key, name=name, offset=have),
                timeout=QUERY_TIMEOUT,
                max_reply=MIRROR_CHUNK,
            )
            if not chunk:
                return
            it.heard = trio.current_time()
            grown = await trio.to_thread.run_sync(_append, local, have, chunk[: size - have])
            it.have += grown - have  # kept current: the election ranks the backup by it
            have = grown

    async def _providers(self, key: bytes) -> list[PeerAddr]:
        try:
            return await self.host.find_providers(key, timeout=LOOKUP_TIMEOUT)
        except NetError as e:
            log.info("origin: lookup failed: %s", e)
            return []

    async def _elect(
        self, key: bytes, mkey: bytes, excluded: set[str], it: _Interest
    ) -> tuple[str, bool] | None:
        """(whom to wait for, whether we are next in line): an interested peer already pulling (or
        following progress), else the live interested peer holding most bytes to resume from
        (the dead puller's backup), ties to the closest (maybe us). None when the model has
        providers now."""
        t0 = trio.current_time()
        seeded: list[PeerAddr] = []

        async def last_look() -> None:  # someone may have seeded it meanwhile
            seeded.extend(await self._providers(mkey))

        async with trio.open_nursery() as n:
            n.start_soon(last_look)
            states, unanswered = await self._survey(key, excluded)
        # Follow the puller itself (a follower names it), so a stall is seen where it happens.
        active = {
            st.leader if st.state == "waiting" and st.leader else pid
            for pid, st in states.items()
            if st.active
        }
        active -= excluded | {self.peer_id}
        # A peer that did not answer counts as live (a busy host answers late; a dead one is
        # dropped by _follow within a second): passing over it risks a second pull.
        live = unanswered | {pid for pid, st in states.items() if st.state == "waiting"}
        live.add(self.peer_id)
        have = {pid: st.have for pid, st in states.items()}
        have[self.peer_id] = it.have

        def rank(pid: str) -> tuple[int, int]:
            return -have.get(pid, 0), distance(pid, key)

        if active:
            leader = min(active, key=lambda pid: distance(pid, key))
        else:
            leader = min(live, key=rank)
            if leader == self.peer_id and seeded:
                return None
        rest = live - {leader}
        log.info(
            "origin: election in %.1f s: %d interested answered, %d silent, %d active; leader %s",
            trio.current_time() - t0,
            len(states),
            len(unanswered),
            len(active),
            leader[:12],
        )
        return leader, bool(rest) and min(rest, key=rank) == self.peer_id

    async def _follow(self, key: bytes, leader: str, it: _Interest, excluded: set[str]) -> tuple[str, str]:
        """Wait while ``leader``'s pull goes on. ("seeded", the puller's id) once it has seeded;
        ("redirect", puller) if ``leader`` itself follows a pull (we follow the puller instead);
        ("drop", why) when it is given up: gone (``PROBE_FAILURES`` refused queries in a row, or
        no answer of any kind for ``SILENT_TIMEOUT``), failed, or stalled (no change in its state
        or progress for STALL_TIMEOUT while it pulls, WAIT_GRACE while it waits)."""
        refused = 0
        last: tuple[str, int] | None = None
        since = trio.current_time()
        while True:
            try:
                st = await self.ask(leader, key)
            except (NetError, ValueError) as e:
                now = trio.current_time()
                if isinstance(e, ValueError) or not _timed_out(e):
                    refused += 1
                if refused >= PROBE_FAILURES:
                    return "drop", f"refused {refused} state queries in a row ({e})"
                if now - it.heard > SILENT_TIMEOUT:
                    return "drop", f"did not answer for {now - it.heard:.1f} s ({e})"
                await trio.sleep(POLL)
                continue
            refused = 0
            now = it.heard = trio.current_time()
            if st.state == "seeded":
                return "seeded", st.leader or leader
            if st.state in ("failed", "none"):
                return "drop", f"reports {st.state}"
            if (
                st.state == "waiting"
                and st.leader
                and st.leader not in (leader, self.peer_id)
                and st.leader not in excluded
            ):
                return "redirect", st.leader
            it.progress = st.progress
            if (st.state, st.progress) != last:
                last, since = (st.state, st.progress), now
            elif st.state == "pulling" and now - since > STALL_TIMEOUT:
                return "drop", f"made no progress for {now - since:.1f} s (pulling)"
            elif st.state == "waiting" and now - since > WAIT_GRACE:
                return "passed", f"kept waiting for {now - since:.1f} s"
            await trio.sleep(POLL)

    async def _swarm(self, swarm_fetch, hint: tuple[str, ...]) -> Path:
        """The swarm fetch after an origin pull, its failure logged (the chain goes on to the Hub:
        a second copy from the origin, so the reason matters)."""
        t0 = trio.current_time()
        try:
            return await swarm_fetch(hint)
        except Exception as e:
            log.warning(
                "origin: swarm fetch after the pull failed in %.1f s (hint %s): %s",
                trio.current_time() - t0,
                ", ".join(h[:12] for h in hint) or "none",
                e,
                extra={"event": "origin_swarm_failed", "reason": str(e)},
            )
            raise
