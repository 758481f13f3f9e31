"""Who gets one of our upload slots: pure decisions, no I/O.

A node serves at most ``slots`` peers at once (an "unchoked" peer may send requests; the others get
Reject). Serving few peers fast beats serving all slowly: a peer with whole pieces can pass them on.

- A free slot goes at once to the interested peer that has waited longest (no waiting for a timer,
  so a config fetch is not delayed by choking). "Longest" is measured with a random jitter of up to
  one ``hold`` (``PeerSlot.order``, drawn by the engine): without it every seed of a swarm sees the
  same wait order and serves the same few peers at once while the rest starve (measured in the
  simulator: 3.94x the lower bound instead of 1.49x with heterogeneous peers).
- Every ``rechoke`` the slots are re-dealt:
  * seeding: fair rotation. A peer that has held a slot for ``hold`` seconds gives it up to the peer
    that has waited longest, so every interested peer gets served in turn;
  * downloading: ``slots - 1`` slots to the peers that send us the most (reciprocation), and one
    optimistic slot rotating in wait order, so newcomers get a first piece to trade
    (``needy_first``: to the peer holding the fewest pieces, whose upload is idle).
- A seed sizes its slots to its upload (``SlotSizer``, fed by ``Choker.size_slots`` every rechoke):
  it starts at ``slots`` and, while more peers wait than it serves, tries twice as many; it keeps
  them only if its measured upload rate rose with them, else it goes back and waits longer before
  the next try. A seed whose peers cannot take what it could send (a 10 Gbit/s datacenter node
  serving 500 Mbit/s edge nodes) serves more of them at once; one whose own upload is the
  bottleneck keeps few slots, so first copies of pieces come out whole sooner.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import attrs

DEFAULT_SLOTS = 4
"""Concurrent uploads per transfer; 4 is BitTorrent's default and enough to fill a 2-core node."""
DEFAULT_HOLD = 2.0
"""Seconds a peer keeps a slot before rotation may take it (several 4 MiB pieces on a LAN)."""
MAX_SLOTS_FACTOR = 8
"""A seed's ``SlotSizer`` opens at most this many times ``slots`` (32 for the default 4)."""


@attrs.define
class PeerSlot:
    """What the choker knows about one peer."""

    peer_id: str
    interested: bool = False
    unchoked: bool = False
    since: float = 0.0  # when it was last choked/unchoked
    order: float = 0.0  # wait-order key: ``since`` plus a random jitter (see Choker)
    down_rate: float = 0.0  # bytes/s we received from it lately
    pieces: int = 0  # pieces it holds (set before a rechoke; used with ``Choker(needy_first=True)``)


@attrs.define
class SlotSizer:
    """How many upload slots a seed opens: more while each added slot adds upload.

    Fed every rechoke with the transfer's cumulative upload (bytes and whole pieces). A
    measurement spans at least ``period`` seconds (one rechoke) and ``slots`` pieces (a piece's
    bytes count when it is out, so a shorter window measures piece boundaries, not the rate).
    Seeding, with peers waiting for a slot, the sizer tries ``2 x slots`` (at most ``most``); the
    next measurement keeps them if the rate grew by at least ``gain`` x the old per-slot rate for
    each added slot (and then tries more at once), else goes back and skips ``backoff``
    measurements (doubling, up to 16) before trying again. A seed whose peers cannot take what it
    could send (a 10 Gbit/s datacenter node serving 500 Mbit/s edge nodes) so serves more of them
    at once; one whose own upload is the bottleneck gains nothing from more slots and stays at
    ``base``, so its first copies of pieces come out whole soon. Not seeding: ``base``. Pure: no
    clock, no I/O."""

    base: int = DEFAULT_SLOTS
    most: int = DEFAULT_SLOTS * MAX_SLOTS_FACTOR
    period: float = 1.0
    gain: float = 0.1
    slots: int = attrs.field(default=None)
    prev_slots: int = 0  # slots before the current try (0: not trying)
    prev_rate: float = 0.0  # the rate measured with them
    backoff: int = 1
    skip: int = 0
    rate: float = 0.0  # the last measured rate (bytes/s)
    _t0: float | None = None
    _bytes0: int = 0
    _pieces0: int = 0

    def __attrs_post_init__(self) -> None:
        if self.base < 1 or self.most < self.base:
            raise ValueError("need 1 <= base <= most")
        if self.slots is None:
            self.slots = self.base

    def update(self, now: float, bytes_up: int, pieces_up: int, *, seeding: bool, waiting: int) -> int:
        """The slots to use from now. ``waiting``: interested peers we do not serve."""
        if not seeding:
            self.slots, self.prev_slots, self.backoff, self.skip = self.base, 0, 1, 0
            self._t0 = None
            return self.slots
        if not self._measure(now, bytes_up, pieces_up):
            return self.slots
        rate = self.rate
        if self.prev_slots:  # judging a try
            added = self.slots - self.prev_slots
            if rate - self.prev_rate < self.gain * added * self.prev_rate / self.prev_slots:
                self.slots, self.prev_slots = self.prev_slots, 0
                self.skip = self.backoff
                self.backoff = min(2 * self.backoff, 16)
                return self.slots
            self.prev_slots, self.backoff = 0, 1  # kept: try more at once if peers still wait
        elif self.skip:
            self.skip -= 1
            return self.slots
        if waiting > 0 and self.slots < self.most and rate > 0:
            self.prev_slots, self.prev_rate = self.slots, rate
            self.slots = min(self.most, 2 * self.slots)
        return self.slots

    def _measure(self, now: float, bytes_up: int, pieces_up: int) -> bool:
        if self._t0 is None or now < self._t0 or bytes_up < self._bytes0:
            self._t0, self._bytes0, self._pieces0 = now, bytes_up, pieces_up
            return False
        span = now - self._t0
        if span < self.period or pieces_up - self._pieces0 < self.slots:
            return False
        self.rate = (bytes_up - self._bytes0) / span
        self._t0, self._bytes0, self._pieces0 = now, bytes_up, pieces_up
        return True


class Choker:
    def __init__(
        self,
        slots: int = DEFAULT_SLOTS,
        hold: float = DEFAULT_HOLD,
        *,
        rng: random.Random | None = None,
        most: int | None = None,
        needy_first: bool = False,
        feed_empty: bool = False,
    ):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.needy_first = needy_first
        self.feed_empty = feed_empty
        self.hold = hold
        self.rng = rng or random.Random()
        self.sizer = SlotSizer(slots, slots * MAX_SLOTS_FACTOR if most is None else most)

    def size_slots(
        self, peers: Iterable[PeerSlot], now: float, bytes_up: int, pieces_up: int, *, seeding: bool
    ) -> int:
        """Size ``slots`` to the upload (``SlotSizer``) before a ``rechoke``: ``bytes_up`` and
        ``pieces_up`` are what this transfer has uploaded so far (whole pieces)."""
        waiting = sum(1 for p in peers if p.interested and not p.unchoked)
        self.slots = self.sizer.update(now, bytes_up, pieces_up, seeding=seeding, waiting=waiting)
        return self.slots

    def wait_key(self, now: float) -> float:
        """``PeerSlot.order`` for a peer that starts waiting now (became interested, or was
        choked): ``now`` plus a random jitter of up to one ``hold``, drawn from this choker's rng,
        so seeds that see the same peers wait at the same moment still serve different ones."""
        return now + self.rng.uniform(0, self.hold)

    def fill(self, peers: Iterable[PeerSlot], now: float) -> list[PeerSlot]:
        """Peers to unchoke now into free slots (chokes nobody)."""
        peers = list(peers)
        used = sum(1 for p in peers if p.unchoked)
        needy = self.feed_empty
        waiting = sorted(
            (p for p in peers if p.interested and not p.unchoked),
            key=lambda p: (p.pieces if needy else 0, p.order, p.peer_id),
        )
        return waiting[: max(0, self.slots - used)]

    def rechoke(
        self, peers: Iterable[PeerSlot], now: float, *, seeding: bool
    ) -> tuple[list[PeerSlot], list[PeerSlot]]:
        """Re-deal the slots. Returns (to_unchoke, to_choke)."""
        peers = list(peers)
        # Peers that lost interest free their slot.
        keep = [p for p in peers if p.unchoked and p.interested]
        drop = [p for p in peers if p.unchoked and not p.interested]
        waiting = sorted(
            (p for p in peers if p.interested and not p.unchoked), key=lambda p: (p.order, p.peer_id)
        )
        if seeding:
            # Longest-held first out, but only after `hold`, and only if someone is waiting.
            keep.sort(key=lambda p: (p.since, p.peer_id))
            free = self.slots - len(keep)
            while free < len(waiting) and keep and now - keep[0].since >= self.hold:
                drop.append(keep.pop(0))
                free += 1
            while len(keep) > self.slots:
                drop.append(keep.pop(0))
            take = waiting[: max(0, self.slots - len(keep))]
            return take, drop
        interested = keep + waiting
        # Downloading: best senders keep regular slots; one optimistic slot rotates.
        # With ``feed_empty``: first the peers holding no piece (their upload is idle).
        chosen: set[str] = set()
        if self.feed_empty:
            empties = sorted(
                (p for p in interested if p.pieces == 0), key=lambda p: (not p.unchoked, p.order, p.peer_id)
            )
            chosen = {p.peer_id for p in empties[: self.slots]}
        regular = sorted(interested, key=lambda p: (-p.down_rate, p.since, p.peer_id))
        room = max(0, self.slots - 1 - len(chosen))
        regular = [p for p in regular if p.down_rate > 0 and p.peer_id not in chosen][:room]
        chosen |= {p.peer_id for p in regular}
        rest = [p for p in interested if p.peer_id not in chosen]
        # Optimistic: a currently unchoked non-regular keeps it until `hold`, else longest waiter.
        # With ``needy_first``: the peer holding the fewest pieces (then the longest waiter).
        holders = [p for p in rest if p.unchoked and now - p.since < self.hold]
        needy = self.needy_first
        optimistic = (
            holders[:1]
            or sorted(rest, key=lambda p: (p.unchoked, p.pieces if needy else 0, p.since, p.peer_id))[:1]
        )
        if len(chosen) < self.slots:
            chosen |= {p.peer_id for p in optimistic}
        # Leftover slots (few senders yet) go in wait order (``needy_first``: fewest pieces first).
        for p in sorted(
            rest, key=lambda p: (p.unchoked is False, p.pieces if needy else 0, p.since, p.peer_id)
        ):
            if len(chosen) >= self.slots:
                break
            chosen.add(p.peer_id)
        to_unchoke = [p for p in interested if p.peer_id in chosen and not p.unchoked]
        to_choke = drop + [p for p in keep if p.peer_id not in chosen]
        return to_unchoke, to_choke
