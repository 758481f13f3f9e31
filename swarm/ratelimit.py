"""Bandwidth limits: token buckets shared by every transfer of a node, whatever the transport.

``TokenBucket`` is a pure object (no I/O, no clock of its own): ``take(n, now)`` debits ``n``
bytes and answers how many seconds the caller must wait before they may go. It may go into debt,
so a piece larger than the burst is not refused, only delayed; over any run the bytes whose wait
has ended by time T stay within ``burst + rate * (T - start)`` (tests/test_ratelimit.py checks
this with hypothesis).

``Throttle`` is its async wrapper on trio's clock (``trio.current_time``/``sleep_until``: trio's
MockClock works too). ``Bandwidth`` is the node's set of them: one upload bucket,
one download bucket, one upload bucket per peer; the engine (swarm/engine/) takes upload tokens
before it sends a piece (both the data lane and libp2p streams) and paces its requests by the
download bucket. Limits change at run time (``set_limits``: the control API's ``PUT /v1/limits``).
Unlimited (the default) costs one attribute test per piece.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import attrs
import trio

__all__ = ["BURST_SECONDS", "Bandwidth", "Limits", "Throttle", "TokenBucket"]

BURST_SECONDS = 0.5
"""A bucket holds at most this many seconds of its rate. Large enough that the engine's decisions,
taken when a piece arrives or at each ``EngineConfig.tick`` (0.25 s), never leave the link idle
while tokens pile up (two ticks' worth); small enough that a burst adds at most 0.5 / 30 = 1.7%
to a 30 s transfer (the target is 5%)."""

MAX_PEER_BUCKETS = 1024
"""Per-peer buckets kept before full (idle) ones are forgotten: a full bucket is the same as a
new one, so dropping it changes nothing; links per transfer are bounded by max_peers (64)."""


@attrs.define
class TokenBucket:
    """``rate`` bytes/s (None: unlimited), holding at most ``burst`` bytes of credit."""

    rate: float | None
    stamp: float = 0.0
    tokens: float = attrs.field(default=math.nan)

    def __attrs_post_init__(self) -> None:
        if math.isnan(self.tokens):
            self.tokens = self.burst  # a new bucket starts full

    @property
    def burst(self) -> float:
        return self.rate * BURST_SECONDS if self.rate else math.inf

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            if self.rate:
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, n: float, now: float) -> float:
        """Debit ``n`` bytes at ``now``: the seconds to wait before sending them (0 if the credit
        covers them). Times must not go backwards (an earlier ``now`` counts as the last one)."""
        if not self.rate:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)

    def available(self, now: float) -> float:
        """The credit at ``now`` (negative: in debt)."""
        if not self.rate:
            return math.inf
        self._refill(now)
        return self.tokens

    def give_back(self, n: float, now: float) -> None:
        """Return ``n`` bytes taken but not sent (capped at the burst)."""
        if self.rate:
            self._refill(now)
            self.tokens = min(self.burst, self.tokens + n)

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the rate from ``now`` on: credit earned so far counts at the old rate, debt is
        kept (paid at the new rate), credit above the new burst is dropped."""
        self._refill(now)
        old = self.rate
        self.rate = rate
        if not rate:
            self.tokens = math.inf
        elif not old:
            self.tokens = self.burst
        else:
            self.tokens = min(self.tokens, self.burst)
        self.stamp = now

    def full(self, now: float) -> bool:
        return not self.rate or self.available(now) >= self.burst


class Throttle:
    """A ``TokenBucket`` on trio's clock (made outside trio too: it starts full)."""

    def __init__(self, rate: float | None = None) -> None:
        self.bucket = TokenBucket(rate, stamp=-math.inf)

    @property
    def rate(self) -> float | None:
        return self.bucket.rate

    def set_rate(self, rate: float | None) -> None:
        self.bucket.set_rate(rate, trio.current_time())

    async def acquire(self, n: float, *, meanwhile: Callable[[float], Awaitable[None]] | None = None) -> None:
        """Take ``n`` bytes and return once they may go. ``meanwhile(deadline)``, if given, is
        awaited instead of sleeping and must return at ``deadline`` (the engine sends control
        messages in the meantime)."""
        now = trio.current_time()
        wait = self.bucket.take(n, now)
        if wait > 0:
            await (meanwhile or trio.sleep_until)(now + wait)

    def give_back(self, n: float) -> None:
        self.bucket.give_back(n, trio.current_time())


@attrs.frozen
class Limits:
    """Bytes/s, None = unlimited."""

    upload: float | None = None
    download: float | None = None
    peer_upload: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return attrs.asdict(self)


class Bandwidth:
    """A node's limits, shared by all its transfers."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self._limits = limits
        self.upload = Throttle(limits.upload)
        self.download = Throttle(limits.download)
        self._per_peer: dict[str, Throttle] = {}

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def limits_upload(self) -> bool:
        return bool(self._limits.upload or self._limits.peer_upload)

    @property
    def limits_download(self) -> bool:
        return bool(self._limits.download)

    def set_limits(self, limits: Limits) -> None:
        self._limits = limits
        self.upload.set_rate(limits.upload)
        self.download.set_rate(limits.download)
        for t in self._per_peer.values():
            t.set_rate(limits.peer_upload)

    def peer(self, peer_id: str) -> Throttle:
        """The upload bucket of one peer (across all transfers)."""
        t = self._per_peer.get(peer_id)
        if t is None:
            if len(self._per_peer) >= MAX_PEER_BUCKETS:
                self._forget_idle()
            t = self._per_peer[peer_id] = Throttle(self._limits.peer_upload)
        return t

    def _forget_idle(self) -> None:
        now = trio.current_time()
        for pid in [p for p, t in self._per_peer.items() if t.bucket.full(now)]:
            del self._per_peer[pid]

    async def before_upload(
        self, peer_id: str, n: int, *, meanwhile: Callable[[float], Awaitable[None]] | None = None
    ) -> None:
        """Wait until ``n`` piece bytes may go to ``peer_id``: its own bucket first, then the
        node's (so a peer held by its own cap does not hold the others' share)."""
        if self._limits.peer_upload:
            await self.peer(peer_id).acquire(n, meanwhile=meanwhile)
        if self._limits.upload:
            await self.upload.acquire(n, meanwhile=meanwhile)

    def may_request(self, n: int) -> bool:
        """Whether a request for ``n`` more piece bytes may go out now; if so they are taken.
        A request goes out while there is any credit (one piece may put the bucket in debt), so
        requested bytes stay within burst + rate * elapsed + one piece."""
        if not self._limits.download:
            return True
        b = self.download.bucket
        now = trio.current_time()
        if b.available(now) <= 0:
            return False
        b.take(n, now)
        return True

    def refund_download(self, n: int) -> None:
        """A request the peer refused: its bytes will not come."""
        if self._limits.download:
            self.download.give_back(n)
