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
3. The puller downloads from the origin: whatever the ``pull`` it is handed does. The node hands
   it the Hub's (``swarm/hubpull.py``, which checks every file against the Hub's listing: sizes,
   sha256 of LFS files, git blob sha1 of the others) or, when ModelExpress is configured,
   ModelExpress's (``swarm/modelexpress/pull.py``: commit, paths and sizes; ModelExpress offers no
   hash), then the Hub's if that fails. Both write ``blobs/<name>.swarm-partial`` files renamed to
   ``blobs/<name>`` when checked and call ``hubpull.GATES``, which is all the mirror and the
   take-over below rely on. Then it builds and seeds the manifest (announced under the model key)
   like any snapshot from the origin.
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

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import outcome
import trio

from swarm import hubpull
from swarm.hubpull import PARTIAL_SUFFIX
from swarm.net import compat
from swarm.net.host import QUERY_TIMEOUT, NetError, PeerAddr, model_key
from swarm.origin_rules import (  # noqa: F401 (swarm.origin's names, as before the split)
    BACKUP_SILENT,
    ELECTION_SETTLE,
    FINISHED_FRAMES,
    LOOKUP_TIMEOUT,
    MAX_CANDIDATES,
    MAX_FRAME_HEADER,
    MAX_MIRROR_FILES,
    MAX_MIRRORS,
    MAX_PROBES,
    MIRROR_FRAME,
    MIRROR_GATE_WAIT,
    MIRROR_IDLE,
    MIRROR_MAX_LAG,
    MIRROR_PROTOCOL,
    MIRROR_RETRY,
    ORIGIN_PROTOCOL,
    POLL,
    PROBE_FAILURES,
    PROBE_TIMEOUT,
    PROVIDE_WAIT,
    RIVAL_CHECK,
    RIVAL_WINDOW,
    SILENT_TIMEOUT,
    SMALL_NETWORK,
    STALL_TIMEOUT,
    SURVEY_DHT_GRACE,
    WAIT_GRACE,
    OriginState,
    _append,
    _mirror_name,
    _parse_query,
    _query,
    _size_of,
    _timed_out,
    blob_sizes,
    copy_sizes,
    dir_bytes,
    distance,
    encode_frame,
    encode_header,
    origin_key,
    parse_ack,
    parse_frame_header,
    parse_mirror_request,
    read_blob,
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
    mirrors: int = 0  # mirror streams our pull is serving (at most MAX_MIRRORS)
    copied: dict[str, int] | None = None  # as the puller: what our backup's copy holds (its acks)
    gate_off: bool = False  # as the puller: the copy stopped moving; the download is not held
    streaming: bool = False  # as the backup: our mirror stream is delivering the pull's bytes
    stream_broke: bool = False  # as the backup: a mirror stream that delivered bytes broke


class OriginCoordinator:
    """The origin-once protocol of one node (see the module docstring)."""

    def __init__(self, host, peer_id: str) -> None:
        self.host = host
        self.peer_id = peer_id
        self.interests: dict[bytes, _Interest] = {}

    def install(self) -> None:
        self.host.set_query_handler(ORIGIN_PROTOCOL, self._answer)
        # A long-lived stream, not a query: py-libp2p's host serves it (SwarmHost has no generic
        # stream handler; the data lane and pieces protocols are the engine's). A protocol id is
        # a plain str at run time (libp2p's TProtocol; only swarm/net imports libp2p).
        self.host._host.set_stream_handler(MIRROR_PROTOCOL, self._serve_mirror)

    async def _answer(self, _peer: str, request: bytes) -> bytes:
        key, _obj = _parse_query(request)
        it = self.interests.get(key)
        if it is None:
            return OriginState("none").encode()
        if it.state == "pulling" and it.building:
            it.progress += 1  # hashing the snapshot for the manifest: alive, nothing to download
        elif it.state == "pulling" and it.blobs is not None:
            # Our download's bytes, and our backup's copy: while the download waits for the copy
            # (_gate) the copy moves, and the followers see progress.
            copied = it.copied
            got = await trio.to_thread.run_sync(dir_bytes, it.blobs)
            got += sum(copied.values()) if copied else 0
            # No byte yet: asking the origin for its listing (seconds on a loaded host; a hang
            # there ends in hubpull's timeouts, then "failed"): alive, so progress ticks.
            it.progress = got if got else it.progress + 1
        return OriginState(it.state, it.progress, it.leader, it.have).encode()

    async def _serve_mirror(self, stream) -> None:
        """The puller's side of its backup's mirror stream: every byte our pull has written that
        the backup's copy lacks, then each new one as it lands, until the pull ends. Never raises
        (an exception out of a py-libp2p stream handler tears the host down)."""
        peer = "?"
        try:
            peer = compat.stream_peer_id(stream)[:12]
            with trio.fail_after(QUERY_TIMEOUT):
                key, sent = parse_mirror_request(await _read_frame(stream))
            it = self.interests.get(key)
            if it is None or it.state != "pulling" or it.blobs is None:
                raise ValueError("not pulling that model")
            if it.mirrors >= MAX_MIRRORS:
                raise ValueError(f"already serving {it.mirrors} mirror stream(s)")
            it.mirrors += 1
            it.copied, it.gate_off = dict(sent), False
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._read_acks, stream, it)
                    await self._stream_pull(stream, it, sent)
                    n.cancel_scope.cancel()
            finally:
                it.mirrors -= 1
                it.copied = None
        except Exception as e:
            log.info("origin: mirror stream to %s ended: %r", peer, e)
        finally:
            await _close_stream(stream)

    @staticmethod
    async def _read_acks(stream, it: _Interest) -> None:
        """The backup's acknowledgements: after each frame it has written, ``{"name", "have"}``."""
        while True:
            name, have = parse_ack(await _read_frame(stream))
            if it.copied is not None and (name in it.copied or len(it.copied) < MAX_MIRROR_FILES):
                it.copied[name] = have

    def _gate(self, it: _Interest):
        """The download's gate while we pull (``hubpull.GATES``, called in the download's thread
        after each chunk): hold the download while it is more than MIRROR_MAX_LAG ahead of what
        the backup has acknowledged of that file (or than where this request began: bytes we
        resumed from came from elsewhere), so a puller that dies costs the origin at most that
        much again (plus what is in flight). Never for longer than MIRROR_GATE_WAIT without
        the copy moving: then the gate stays open for this stream (the followers drop a puller
        whose download makes no progress for STALL_TIMEOUT)."""

        def gate(name: str, offset: int, began: int, stop) -> None:
            last, since = None, time.monotonic()
            while not stop.is_set() and not it.gate_off:
                copied = it.copied
                if copied is None:  # no backup copying
                    return
                have = copied.get(name, 0)
                if offset - max(have, began) <= MIRROR_MAX_LAG:
                    return
                now = time.monotonic()
                if have != last:
                    last, since = have, now
                elif now - since > MIRROR_GATE_WAIT:
                    it.gate_off = True
                    log.info("origin: the backup's copy stopped at %d bytes of %s", have, name[:12])
                    return
                time.sleep(0.005)

        return gate

    async def _stream_pull(self, stream, it: _Interest, sent: dict[str, int]) -> None:
        """Send what our pull writes that the backup lacks (``sent``: what its copy holds). The
        files being downloaded come first (our download waits on their copy, ``_gate``); finished
        ones (a backup that attached late, or a new backup of a resumed pull) get a few frames
        whenever those have nothing new."""
        blobs = it.blobs

        async def send(base: str, off: int, n: int) -> bool:
            data = await trio.to_thread.run_sync(read_blob, blobs, base, off, n)
            if not data:
                return False
            # A backup that stops reading holds the stream (and this task) no longer.
            with trio.fail_after(QUERY_TIMEOUT):
                await stream.write(encode_frame(base, off, data))
            sent[base] = off + len(data)
            return True

        while it.state == "pulling" and it.blobs is blobs:
            listing = await trio.to_thread.run_sync(blob_sizes, blobs)
            growing = {n.removesuffix(PARTIAL_SUFFIX) for n, _ in listing if n.endswith(PARTIAL_SUFFIX)}
            sizes: dict[str, int] = {}
            for n, size in listing:
                base = n.removesuffix(PARTIAL_SUFFIX)
                if base in sent or len(sent) < MAX_MIRROR_FILES:
                    sizes[base] = max(sizes.get(base, 0), size)
            moved = False
            for base in sorted(b for b in sizes if b in growing):
                while sent.get(base, 0) < sizes[base] and it.state == "pulling":
                    off = sent.get(base, 0)
                    if not await send(base, off, min(MIRROR_FRAME, sizes[base] - off)):
                        break
                    moved = True
            # Finished files only when the growing ones had nothing new: the download waits on
            # the growing ones' copy (interleaving 4 finished frames per growing one slowed a
            # resumed pull to a fifth of the stream's rate on the testbed).
            budget = 0 if moved else FINISHED_FRAMES
            for base in sorted(b for b in sizes if b not in growing):
                while budget and sent.get(base, 0) < sizes[base] and it.state == "pulling":
                    off = sent.get(base, 0)
                    if not await send(base, off, min(MIRROR_FRAME, sizes[base] - off)):
                        break
                    moved, budget = True, budget - 1
            if not moved:
                await trio.sleep(MIRROR_IDLE)

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

            announced = trio.Event()

            async def announce() -> None:
                try:
                    await self.host.provide(key, timeout=PROVIDE_WAIT)
                finally:
                    announced.set()

            async def body() -> Path:
                found = await self._providers(mkey)
                if found:
                    it.state = "none"
                    return await swarm_fetch()
                # The election waits for our own announcement at most ELECTION_SETTLE past the
                # lookup (fellow fetchers connected to us ask us directly; the DHT record is for
                # the others), then ELECTION_SETTLE for theirs.
                with trio.move_on_after(ELECTION_SETTLE):
                    await announced.wait()
                log.info(
                    "origin: no provider of %s; interest %s (%.1f s)",
                    repo_id,
                    "announced" if announced.is_set() else "being announced",
                    trio.current_time() - t0,
                )
                await trio.sleep(ELECTION_SETTLE)
                return await self._pull_or_follow(key, mkey, it, blobs, swarm_fetch, pull)

            # The announcement goes on beside the election (bounded by PROVIDE_WAIT); the body's
            # outcome is taken out of the nursery so its exceptions reach the caller as they are.
            async with trio.open_nursery() as bg:
                bg.start_soon(announce)
                result = await outcome.acapture(body)
                bg.cancel_scope.cancel()
            return result.unwrap()
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
        take_over = False
        while True:
            if take_over:
                # The backup that holds the copy takes over without an election: the election
                # would pick it anyway (most bytes to resume from), and the others, electing,
                # find it pulling and follow it. On the loaded testbed elections took 1.5-2 s.
                elected: tuple[str, bool] | None = (self.peer_id, False)
                take_over = False
            else:
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
            it.streaming = it.stream_broke = False
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
                    outcome, detail = await self._follow(key, leader, it, excluded, backup=backup)
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
            take_over = outcome == "drop" and backup and it.have > 0
            log.warning(
                "origin: puller %s %s; %s",
                leader[:12],
                why,
                f"taking over as its backup ({it.have} bytes copied)" if take_over else "electing again",
                extra={"event": "origin_replace", "leader": leader, "reason": why},
            )
            # The next election also looks for providers of the model, side by side with its
            # survey: the dropped puller (or another) may have seeded while we could not tell.
            (passed if outcome == "passed" else excluded).add(leader)

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
            hubpull.GATES[blobs] = self._gate(it)
            try:
                result.append(await pull(downloaded))
            finally:
                hubpull.GATES.pop(blobs, None)
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
        noticed. The DHT is asked during the first RIVAL_WINDOW, connected and routing-table
        peers throughout."""
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
        interested peers the DHT names (the closest MAX_CANDIDATES) and every connected or
        routing-table peer (up to MAX_PROBES; those not interested answer ``none``), asked at
        once; then the pullers their answers name that were not asked yet."""
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

        lookup = trio.CancelScope()

        async def from_dht(n: trio.Nursery) -> None:
            found: list[PeerAddr] = []
            with lookup:
                found = [p for p in await self._providers(key) if p.peer_id not in skip]
            found.sort(key=lambda p: distance(p.peer_id, key))
            named.extend(found[:MAX_CANDIDATES])
            ask_all(n, [(p.peer_id, p) for p in named])

        # Known peers at once, the DHT's side by side (its lookup takes up to LOOKUP_TIMEOUT).
        known = self._known_peers()[:MAX_PROBES]
        async with trio.open_nursery() as n:
            if dht:
                n.start_soon(from_dht, n)
            async with trio.open_nursery() as first:
                ask_all(first, [(pid, pid) for pid in known])
            if len(known) < SMALL_NETWORK:
                # Every peer we know has answered (or timed out), and a routing table this small
                # holds the whole network: the lookup can name no one new, give it a moment only.
                lookup.deadline = min(lookup.deadline, trio.current_time() + SURVEY_DHT_GRACE)
        leaders = {st.leader for st in states.values() if st.state == "waiting" and st.leader}
        async with trio.open_nursery() as n:
            ask_all(n, [(pid, pid) for pid in list(leaders - set(states))[:MAX_CANDIDATES]])
        states = {pid: st for pid, st in states.items() if st.state != "none"}
        # Every peer asked that did not answer (a connected one too: on a loaded host answers come
        # late, and three nodes that each heard from a different three of seven all pulled).
        # The election counts them as live: all compute the same order over the same peers; one
        # that turns out not interested answers ``none`` and is dropped at its first answer.
        # (Counting peers whose query was refused as not live made views differ on the loaded
        # testbed: dials failing under load dropped the closest peer from two nodes' order, and
        # three pulled at once. A dead peer elected costs its followers ~1 s, step 4.)
        unanswered = asked - set(states) - answered_none
        return states, unanswered

    def _known_peers(self) -> list[str]:
        """Connected peers first, then the rest of the DHT routing table: on the loaded testbed a
        node connected to two peers (the DHT naming no one in time) elected itself beside the
        puller everyone else chose, and pulled 115 MB before its rival check found the other
        (1.43 x the model from the origin). The routing table knows the LAN's nodes."""
        out = list(self.host.connected_peers())
        try:
            table = self.host._dht.routing_table.get_peer_ids()
        except Exception:  # a host without a DHT (tests' stand-ins)
            table = []
        seen = set(out)
        for pid in table:
            s = pid.to_base58()
            if s not in seen and s != self.peer_id:
                seen.add(s)
                out.append(s)
        return out

    async def _mirror(self, key: bytes, leader: str, blobs: Path, it: _Interest) -> None:
        """Copy the puller's partial and finished files into ours as ``.swarm-partial`` files as
        its pull writes them (one stream, ``/swarm/origin-data/2.0.0``, reopened if it breaks):
        if it dies we are elected next and resume where the copy ends. The bytes are a resume
        point only: the pull verifies each whole file against the Hub's hashes."""
        await trio.to_thread.run_sync(lambda: blobs.mkdir(parents=True, exist_ok=True))
        while True:
            try:
                await self._mirror_stream(key, leader, blobs, it)
            except Exception as e:  # NetError, a bad frame, a stream reset or EOF, a disk error
                log.debug("origin: mirror from %s: %r", leader[:12], e)
                if it.streaming:  # it was delivering: the puller may be dead (_follow asks once)
                    it.stream_broke, it.streaming = True, False
            it.have = sum((await trio.to_thread.run_sync(copy_sizes, blobs)).values())
            await trio.sleep(MIRROR_RETRY)

    async def _mirror_stream(self, key: bytes, leader: str, blobs: Path, it: _Interest) -> None:
        have = await trio.to_thread.run_sync(copy_sizes, blobs)
        it.have = sum(have.values())
        listing = [[name, size] for name, size in sorted(have.items())][:MAX_MIRROR_FILES]
        stream = await self.host._open_stream(leader, MIRROR_PROTOCOL, PROBE_TIMEOUT)
        try:
            await stream.write(encode_header({"key": key.hex(), "have": listing}))
            while True:
                name, offset, n = parse_frame_header(await _read_frame(stream))
                data = await _read_exactly(stream, n)
                it.heard = trio.current_time()  # bytes from the puller: it is alive
                it.streaming, it.stream_broke = True, False
                if name not in have and len(have) >= MAX_MIRROR_FILES:
                    raise ValueError("more files than a mirror carries")
                if (blobs / name).exists():  # finished and verified here already
                    continue
                local = blobs / (name + PARTIAL_SUFFIX)
                grown = await trio.to_thread.run_sync(_append, local, offset, data)
                if not grown:  # our copy changed under us: start the stream over from it
                    raise ValueError(f"{name[:12]}: frame at {offset} does not continue our copy")
                it.have += grown - have.get(name, 0)  # kept current: the election ranks by it
                have[name] = grown
                with trio.fail_after(QUERY_TIMEOUT):  # the puller holds its download on these
                    await stream.write(encode_header({"name": name, "have": grown}))
        finally:
            await _close_stream(stream)

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

        look = trio.CancelScope()

        async def last_look() -> None:  # someone may have seeded it meanwhile
            with look:
                seeded.extend(await self._providers(mkey))

        async with trio.open_nursery() as n:
            n.start_soon(last_look)
            states, unanswered = await self._survey(key, excluded)
            if len(self._known_peers()) < SMALL_NETWORK:  # as in _survey: a moment more only
                look.deadline = min(look.deadline, trio.current_time() + SURVEY_DHT_GRACE)
        if seeded:
            return None
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

        leader = min(active, key=lambda pid: distance(pid, key)) if active else min(live, key=rank)
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

    async def _follow(
        self, key: bytes, leader: str, it: _Interest, excluded: set[str], *, backup: bool = False
    ) -> tuple[str, str]:
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
                if refused >= PROBE_FAILURES or (refused and backup and it.stream_broke):
                    # (The backup's stream of the pull's bytes broke as well: one refusal will do.)
                    return "drop", f"refused {refused} state queries in a row ({e})"
                # The backup, which also hears the pull's bytes as they come, gives up sooner: it
                # is the one elected next, and the others follow whoever pulls.
                if now - it.heard > (BACKUP_SILENT if backup else SILENT_TIMEOUT):
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


async def _read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"mirror stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_frame(stream) -> bytes:
    """A frame's header (its 4-byte length, then that many bytes)."""
    n = int.from_bytes(await _read_exactly(stream, 4), "big")
    if not 0 < n <= MAX_FRAME_HEADER:
        raise ValueError(f"mirror frame header of {n} bytes")
    return await _read_exactly(stream, n)


async def _close_stream(stream) -> None:
    """Close a libp2p stream, reset it if that fails; bounded, never raises."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(1.0):
            try:
                await stream.close()
                return
            except Exception:
                pass
        with trio.move_on_after(1.0):
            try:
                await stream.reset()
            except Exception:
                pass
