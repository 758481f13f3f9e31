"""Finding providers and agreeing on one manifest (the manifest vote), and the order providers
are tried in."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from swarm import wire
from swarm.discovery import (
    LOOKUP_RETRY,
    MANIFEST_ASK_HEDGE,
    MANIFEST_ASK_MAX_OUT,
    MANIFEST_STRAGGLER_GRACE,
    MANIFEST_VOTE_GRACE,
    MANIFEST_VOTE_MIN_GRACE,
    ManifestAsk,
)
from swarm.dynamo.card import manifest_mismatches
from swarm.manifest import Manifest, ManifestError
from swarm.net.host import NetError, PeerAddr, manifest_key, model_key
from swarm.sources import (
    FetchRequest,
    ModelNotFound,
)
from swarm.trust import (
    Release,
    TrustError,
    refuse_stale,
)

log = logging.getLogger("swarm.node")  # one logger for the whole node, as before the split

MANIFEST_ASK_TIMEOUT = 5.0
"""Seconds one provider has to answer a manifest request (dial included)."""
CONNECTED_FALLBACK = 16
"""Peers we are connected to that are asked for the manifest directly when the DHT lookup comes
back empty. The DHT can miss a provider we are connected to: a worker that a flash crowd asks at
once resets GET_PROVIDERS beyond 12 (swarm/net/providers.py), and on a loaded host its answers come
after ``lookup_timeout`` (16 frontend processes bootstrapped to one worker: a few failed with "no
providers" under load; on the namespace testbed late fetchers connected only to the worker did
too). Fleets bootstrap to their workers, so a worker is usually among them. A peer that does not
hold the model answers at once with no manifest; at most this many are asked (8 at a time)."""
HINTED_LOOKUP = 0.1
"""Seconds the first DHT lookup may take when the caller names peers that hold the model
(``hint``: the origin puller that just seeded, swarm/origin.py). Those are asked anyway; the
lookup only adds others (right after a pull, nobody else holds the model), and the transfer
looks up again as it goes (``LOOKUP_FIRST`` apart). On the namespace testbed the full lookup took
2.1 s of the followers' critical path; at 0.5 s, the followers' manifest still came 0.6-1.1 s
after the puller had seeded (quiet machine, 2026-12-06)."""


class ManifestVote:
    """Part of ``Node`` (swarm/node/core.py): see the module docstring."""

    async def _find_providers(self, key: bytes, kind: str, *, timeout: float) -> list[PeerAddr]:
        """``host.find_providers``, timed into the DHT lookup histogram (``kind``: the key's)."""
        started = trio.current_time()
        try:
            return await self.host.find_providers(key, timeout=timeout)
        finally:
            self.metrics.dht_lookup.labels(kind).observe(trio.current_time() - started)

    async def _resolve(
        self, req: FetchRequest, manifest_hash: bytes | None, hint: tuple[str, ...] = ()
    ) -> tuple[Manifest, bytes, list[PeerAddr]]:
        """Find providers and agree on one manifest."""
        key = manifest_key(manifest_hash) if manifest_hash else model_key(req.repo_id)
        began = trio.current_time()
        deadline = began + (
            min(HINTED_LOOKUP, self.config.lookup_timeout) if hint else self.config.lookup_timeout
        )
        providers: list[PeerAddr] = []
        while True:
            try:
                providers = await self._find_providers(
                    key,
                    "manifest" if manifest_hash else "model",
                    timeout=max(HINTED_LOOKUP if hint else 0.5, deadline - trio.current_time()),
                )
            except NetError as e:
                log.info("DHT lookup failed: %s", e)
            providers += [PeerAddr(pid) for pid in hint if pid not in {p.peer_id for p in providers}]
            if providers or trio.current_time() >= deadline:
                break
            await trio.sleep(min(LOOKUP_RETRY, max(0.0, deadline - trio.current_time())))
        what = f"manifest {manifest_hash.hex()[:16]}" if manifest_hash else req.repo_id
        not_in_dht = f"no providers for {what} in the DHT (looked for {self.config.lookup_timeout:.0f} s)"
        from_connected = not providers
        if from_connected:  # see CONNECTED_FALLBACK
            providers = [PeerAddr(pid) for pid in self.host.connected_peers()[:CONNECTED_FALLBACK]]
            if not providers:
                raise ModelNotFound(not_in_dht, ())
            log.info("%s; asking the %d peers connected to", not_in_dht, len(providers))
        request = wire.ManifestRequest(req.repo_id, req.revision or "", manifest_hash or b"")
        votes: Counter[bytes] = Counter()
        manifests: dict[bytes, Manifest] = {}
        holders: dict[bytes, list[PeerAddr]] = {}
        releases: dict[bytes, Release] = {}  # the newest valid record offered for each manifest
        reasons: list[str] = []

        closed = False  # the choice is made: answers coming later only update ProviderScores

        async def ask(p: PeerAddr) -> None:
            try:
                replies = await self._fetch_manifests_from(p, request)
            except Exception as e:
                reasons.append(f"{p.peer_id[:12]}: {e}")
                return
            if closed:
                return
            for r in replies:
                try:
                    m = Manifest.decode(r.manifest)
                except ManifestError as e:
                    reasons.append(f"{p.peer_id[:12]} sent a bad manifest: {e}")
                    continue
                if not self._acceptable(m, req, manifest_hash):
                    reasons.append(f"{p.peer_id[:12]} sent a manifest for {m.model}@{m.revision}")
                    continue
                h = m.manifest_hash
                try:
                    release = self.config.trust.check(h, r.signature, fresh=manifest_hash is None)
                except TrustError as e:
                    reasons.append(f"{p.peer_id[:12]}: manifest {m.hash_str[:20]} refused: {e}")
                    continue
                if release is not None and (h not in releases or release.rank() > releases[h].rank()):
                    releases[h] = release
                manifests[h] = m
                votes[h] += 1
                holders.setdefault(h, []).append(p)

        providers = self._order_providers(providers)
        looked_up = trio.current_time()
        # A manifest pinned by hash is as good from one provider as from eight; by name, the
        # answers of the others count (votes; under trusted-publishers, the newest release).
        # Under `open` by name the vote counts the answers in by the cutoff: MANIFEST_VOTE_GRACE_FACTOR
        # times as long as the first usable answer took, at least MANIFEST_VOTE_MIN_GRACE, at most
        # MANIFEST_VOTE_GRACE; providers that answer never (vanished) are not waited for longer.
        # Under trusted-publishers the stragglers keep MANIFEST_VOTE_GRACE (a slower provider may
        # hold a newer release), pinned fetches MANIFEST_STRAGGLER_GRACE: both as before.
        adaptive = manifest_hash is None and self.config.trust.mode == "open"
        try:
            asked = await self._ask_in_turn(
                providers,
                ask,
                settled=lambda: bool(votes),
                grace=MANIFEST_STRAGGLER_GRACE if manifest_hash is not None else MANIFEST_VOTE_GRACE,
                min_grace=MANIFEST_VOTE_MIN_GRACE if adaptive else None,
            )
        finally:
            closed = True
        if not votes and from_connected:
            raise ModelNotFound(
                f"{not_in_dht}, and none of the {len(providers)} peers connected to has it"
                + (f": {'; '.join(reasons[:4])}" if reasons else ""),
                (),
            )
        if not votes:
            raise ModelNotFound(
                f"{len(providers)} providers of {req.repo_id} found, none gave a "
                f"usable manifest: {'; '.join(reasons[:4])}",
                (),
            )
        # (in a thread: the rollback floors are read and durably raised on disk)
        best = await trio.to_thread.run_sync(self._choose, req, manifest_hash, votes, manifests, releases)
        count = votes[best]
        log_ = log.warning if len(votes) > 1 else log.info
        log_(
            "%s: taking manifest %s (revision %s), announced by %d of %d providers asked; "
            "%d distinct manifests offered (lookup %.2f s, manifest requests %.2f s)",
            req.repo_id,
            manifests[best].hash_str[:20],
            manifests[best].revision,
            count,
            asked,
            len(votes),
            looked_up - began,
            trio.current_time() - looked_up,
        )
        return (
            manifests[best],
            releases[best].blob if best in releases else b"",
            holders[best] + [p for p in providers if p not in holders[best]],
        )

    # ------------------------------------------------------------------ provider order and scores

    def _order_providers(self, providers: list[PeerAddr]) -> list[PeerAddr]:
        """The order to try providers in (``ProviderScores.order``): those that failed us lately
        last, peers we are connected to first, otherwise the lookup's order shuffled in groups."""
        return self._scores.order(
            providers, time.monotonic(), connected=set(self.host.connected_peers()), rng=self.rng
        )

    def _failed_recently(self, peer_id: str) -> bool:
        return self._scores.failed_recently(peer_id, time.monotonic())

    def _note_failed(self, peer_id: str) -> None:
        self._scores.note_failed(peer_id, time.monotonic())

    async def _fetch_manifests_from(
        self, p: PeerAddr, request: wire.ManifestRequest
    ) -> list[wire.ManifestReply]:
        """``host.fetch_manifests``, remembering whether the provider answered."""
        try:
            replies = await self.host.fetch_manifests(p, request, timeout=MANIFEST_ASK_TIMEOUT)
        except Exception:
            self._note_failed(p.peer_id)
            raise
        self._scores.note_answered(p.peer_id)
        return replies

    async def _ask_in_turn(
        self,
        providers: list[PeerAddr],
        ask: Callable[[PeerAddr], Any],
        *,
        settled: Callable[[], bool],
        grace: float,
        min_grace: float | None = None,
    ) -> int:
        """Run ``ask`` on providers as ``ManifestAsk`` decides (MANIFEST_ASK_FANOUT at a time,
        each end, or MANIFEST_ASK_HEDGE seconds without one, making room for the next until a
        usable manifest is in (``settled()``), those that failed us lately last, stragglers cut
        off after the grace); returns how many were asked. Stragglers cut off are remembered as
        failed at once; their requests go on in the node's nursery (each bounded by
        MANIFEST_ASK_TIMEOUT), so one that answers after all is forgiven (``ask`` must ignore
        what comes after the choice)."""
        plan = ManifestAsk(
            providers,
            stale=self._failed_recently,
            grace=grace,
            min_grace=min_grace,
            hedge=MANIFEST_ASK_HEDGE,
            max_out=MANIFEST_ASK_MAX_OUT,
            now=trio.current_time(),
        )
        finished_send, finished = trio.open_memory_channel[str](math.inf)

        async def one(p: PeerAddr) -> None:
            try:
                await ask(p)
            except Exception as e:  # in the node's nursery: a bad answer must not stop the node
                log.warning("manifest request to %s: %r", p.peer_id[:12], e)
            finally:
                finished_send.send_nowait(p.peer_id)

        nursery = self._nursery
        async with trio.open_nursery() as local:
            # Requests run in the node's nursery when it runs (stragglers outlive the vote).
            spawn = (nursery or local).start_soon
            for p in plan.start(settled(), trio.current_time()):
                spawn(one, p)
            while not plan.over(trio.current_time()):
                with trio.move_on_at(min(plan.cutoff, plan.wake_at)):
                    pid = await finished.receive()
                    for p in plan.finished(pid, trio.current_time(), settled()):
                        spawn(one, p)
                for p in plan.start(settled(), trio.current_time()):  # a hedge ended
                    spawn(one, p)
            for pid in plan.out:
                log.info("manifest request to %s cut off after the grace period", pid[:12])
                self._note_failed(pid)
            local.cancel_scope.cancel()
        return plan.asked

    def _choose(
        self,
        req: FetchRequest,
        pinned: bytes | None,
        votes: Counter[bytes],
        manifests: dict[bytes, Manifest],
        releases: dict[bytes, Release],
    ) -> bytes:
        """The manifest to fetch among those offered (all acceptable under the policy).

        ``trusted-publishers``, fetch by name: the release with the highest seq; with no revision
        asked (the latest), never one older than the highest seq this node has seen from its
        publisher for the model (persisted), so an old signed release relayed later cannot roll
        the node back. Then the most votes; a tie goes to the manifest we already hold complete,
        else to the only signed one; otherwise no manifest is taken: ModelNotFound naming them,
        so the chain goes on to the Hub. (The tie went to the larger hash, which a liar grinds
        in a few tries to win one-against-one.)"""
        cands = list(votes)
        if pinned is not None or (len(cands) == 1 and self.config.trust.mode == "open"):
            return cands[0]
        model = req.repo_id
        if self.config.trust.mode == "trusted-publishers":
            if not req.revision:
                fresh, stale = [], []
                for h in cands:
                    r = releases[h]
                    try:
                        refuse_stale(r, self._provenance.floor(r.publisher, model))
                    except TrustError as e:
                        stale.append(f"manifest {manifests[h].hash_str[:20]}: {e}")
                        continue
                    fresh.append(h)
                if not fresh:
                    raise ModelNotFound(
                        f"{req.repo_id}: every release offered is older than one "
                        f"seen before: {'; '.join(stale[:4])}",
                        (),
                    )
                self._provenance.raise_floors(model, releases.values())
                cands = fresh
            top = max(releases[h].seq for h in cands)
            cands = [h for h in cands if releases[h].seq == top]
        most = max(votes[h] for h in cands)
        cands = [h for h in cands if votes[h] == most]
        for prefer in (lambda h: self._holds_complete(manifests[h]), lambda h: h in releases):
            if len(cands) > 1:
                cands = [h for h in cands if prefer(h)] or cands
        if len(cands) > 1:
            offered = ", ".join(
                f"{manifests[h].hash_str[:20]} (revision {manifests[h].revision})" for h in sorted(cands)
            )
            raise ModelNotFound(
                f"{req.repo_id}: no majority among the manifests offered: "
                f"{offered}, each announced by {most} provider(s); taking none",
                (),
            )
        return cands[0]

    def _holds_complete(self, m: Manifest) -> bool:
        """Whether ``m`` is complete here: shared, or a finished snapshot of it in the store."""
        sh = self.shared.get(m.manifest_hash)
        if sh is not None:
            return sh.complete
        try:
            stored = self.store.load_manifest(m.model, m.revision)
            return (
                stored is not None
                and stored.manifest_hash == m.manifest_hash
                and self.store.find_complete(m.model, m.revision) is not None
            )
        except Exception as e:  # a tie-break only: an unreadable store just does not count
            log.debug("cannot check the store for %s: %s", m.hash_str[:20], e)
            return False

    @staticmethod
    def _acceptable(m: Manifest, req: FetchRequest, manifest_hash: bytes | None) -> bool:
        if req.expect and manifest_mismatches(m, req.expect):
            return False  # e.g. another version than the Dynamo card asks for (a rolling update)
        if manifest_hash is not None:
            return m.manifest_hash == manifest_hash
        if m.model != req.repo_id:
            return False
        return not req.revision or m.revision == req.revision
