"""Which piece to ask which peer for next: pure decisions over counts and sets, no I/O.

Rules (BitTorrent's, with one addition for model files):
- Priority classes: every wanted config piece comes before any weight piece, so a caller can be told
  "configs ready" early. A class is only opened once the one before it is fully verified.
- Random first pieces: until we hold ``RANDOM_FIRST`` pieces we pick at random among those the peer
  has, so a flash crowd does not all chase the same rarest piece and we get something to trade fast.
- Rarest first afterwards: lowest availability among connected peers, ties broken by file order
  (lowest index first) until a peer first rejects a request, at random from then on
  (``contended``). In order, a file is hashed as it arrives and never read back before it is
  published (swarm/store/download.py), which made a 1 GiB single-source transfer ~1.5x faster here. A
  Reject means others want the same pieces from that peer (a seeder's least-copied-first policy
  holds back pieces it just sent elsewhere); several fetchers taking ties in the same order would
  then keep asking one seeder for the same pieces (measured: seeder upload 3.6x the model with
  four leechers over slow libp2p streams, 1.45x with random ties), so random ties restore the
  diversity BitTorrent relies on.
- Never a piece the peer lacks, never one we have, never one already in flight, except in endgame.
- Endgame: once at most ``ENDGAME_PIECES`` wanted pieces are missing and all of them are in flight,
  a piece may be asked of a second peer (at most ``ENDGAME_MAX_DUPLICATES`` requests per piece);
  the first copy wins, the rest are cancelled by the engine.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable

RANDOM_FIRST = 4
"""Pieces fetched at random before switching to rarest-first (BitTorrent uses 4)."""
ENDGAME_MAX_DUPLICATES = 2
"""Requests for one piece at once in endgame: enough to route around one slow peer, no flood."""
ENDGAME_PIECES = 4
"""Endgame starts only when at most this many pieces are missing (Kraken uses 3). Starting it as
soon as every missing piece is in flight wasted 35-80% of a model per frontend in duplicates when
four frontends with deep pipelines shared 24 pieces (measured)."""


class Picker:
    """Tracks availability and in-flight requests for one transfer."""

    def __init__(
        self,
        num_pieces: int,
        wanted: Iterable[int],
        priority: Iterable[int] = (),
        *,
        rng: random.Random | None = None,
    ):
        self.num_pieces = num_pieces
        self.wanted = frozenset(wanted)
        self.availability = [0] * num_pieces
        self.have: set[int] = set()
        # piece -> number of outstanding requests for it (across peers)
        self.in_flight: dict[int, int] = {}
        self._rng = rng or random.Random()
        self.contended = False  # set by the engine on a Reject: break ties at random from then on
        self._priority = pri = frozenset(priority) & self.wanted
        # Missing pieces per priority class, in order. Class 0 = configs, class 1 = the rest.
        self._classes: list[set[int]] = [set(pri), set(self.wanted - pri)]

    # -- state updates ---------------------------------------------------------------------

    def peer_has(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.availability[i] += 1

    def peer_gone(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.availability[i] -= 1

    def requested(self, index: int) -> None:
        self.in_flight[index] = self.in_flight.get(index, 0) + 1

    def request_ended(self, index: int) -> None:
        """A request for ``index`` finished, failed, was rejected or timed out."""
        n = self.in_flight.get(index, 0) - 1
        if n > 0:
            self.in_flight[index] = n
        else:
            self.in_flight.pop(index, None)

    def got(self, index: int) -> None:
        """``index`` is verified and stored."""
        self.have.add(index)
        for c in self._classes:
            c.discard(index)

    def lost(self, index: int) -> None:
        """``index`` was held and is not any more (the store dropped it): wanted again."""
        self.have.discard(index)
        if index in self.wanted:
            self._classes[0 if index in self._priority else 1].add(index)

    # -- queries ---------------------------------------------------------------------------

    @property
    def missing(self) -> set[int]:
        for c in self._classes:
            if c:
                return c
        return set()

    def all_missing(self) -> set[int]:
        return set().union(*self._classes)

    @property
    def done(self) -> bool:
        return not any(self._classes)

    @property
    def priority_done(self) -> bool:
        return not self._classes[0]

    def in_endgame(self) -> bool:
        m = self.missing
        return 0 < len(m) <= ENDGAME_PIECES and all(i in self.in_flight for i in m)

    def interesting(self, peer_have: set[int] | frozenset[int]) -> bool:
        """Does the peer hold any piece we still want (in any class)?"""
        return any(not c.isdisjoint(peer_have) for c in self._classes)

    def pick(
        self,
        peer_have: set[int] | frozenset[int],
        asked_of_peer: Collection[int],
        count: int,
        avoid: Collection[int] = (),
    ) -> list[int]:
        """Up to ``count`` pieces to request from a peer that has ``peer_have``; ``asked_of_peer``
        are the requests already outstanding on that peer, ``avoid`` pieces it recently refused."""
        if count <= 0:
            return []
        missing = self.missing
        candidates = [i for i in missing if i in peer_have and i not in self.in_flight and i not in avoid]
        if candidates:
            if len(self.have) < RANDOM_FIRST:
                self._rng.shuffle(candidates)
            else:
                avail = self.availability
                if self.contended:  # (availability, random tiebreak); sample keys once
                    rnd = self._rng.random
                    candidates.sort(key=lambda i: (avail[i], rnd()))
                else:
                    candidates.sort(key=lambda i: (avail[i], i))
            return candidates[:count]
        if not self.in_endgame():
            return []
        dup = [
            i
            for i in missing
            if i in peer_have
            and i not in asked_of_peer
            and i not in avoid
            and self.in_flight.get(i, 0) < ENDGAME_MAX_DUPLICATES
        ]
        self._rng.shuffle(dup)
        return dup[:count]
