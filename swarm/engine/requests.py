"""Our requests to peers: which pieces to ask each peer for (through the picker), and when a
peer's queue of them counts as stuck. A part of ``TransferCore`` (its base class); no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from swarm import wire
from swarm.engine.config import EngineConfig
from swarm.engine.peer import PeerState
from swarm.picker import Picker


class RequestBook:
    # Set by TransferCore.__init__.
    clock: Callable[[], float]
    config: EngineConfig
    picker: Picker
    peers: dict[str, PeerState]
    bandwidth: Any
    timeouts: int
    _lengths: list[int]
    _writing: set[int]

    def _timeout_for(self, i: int) -> float:
        return self.config.request_timeout + self._lengths[i] / self.config.min_rate

    def _queue_deadline(self, peer: PeerState) -> float | None:
        """When the peer's queue of our requests counts as stuck: the oldest request's timeout,
        counted from when the peer could start on it (sent, or the peer's last answer: the
        requests before it were being served until then). None if nothing is outstanding."""
        if not peer.requests:
            return None
        head, sent = next(iter(peer.requests.items()))
        return max(sent, peer.moved_at) + self._timeout_for(head)

    def _fill_requests(self, peer: PeerState) -> None:
        if peer.peer_choking or not peer.am_interested or peer.closed:
            return
        depth = 1 if peer.timeouts >= self.config.max_timeouts else self.config.pipeline_depth
        room = depth - len(peer.requests)
        if room <= 0:
            return
        now = self.clock()
        if peer.refused:
            for i in [i for i, until in peer.refused.items() if until <= now]:
                del peer.refused[i]
        # Never a piece being verified and written (it may still fail, then it is asked again).
        avoid = peer.refused.keys() | self._writing if self._writing else peer.refused
        if self.picker.in_endgame():
            avoid = set(avoid) | self._moving_heads(now)
        paced = self._paced_downloads()
        for i in self.picker.pick(peer.have, peer.requests.keys(), room, avoid):
            if paced and not self.bandwidth.may_request(self._lengths[i]):
                break  # over the download limit: ``tick`` asks again
            if not peer.requests:
                peer.moved_at = now  # an idle peer's clock starts with this request
            peer.requests[i] = now
            peer.cancelled.discard(i)
            self.picker.requested(i)
            peer.post(wire.Request(i))

    def _moving_heads(self, now: float) -> set[int]:
        """Pieces at the head of a peer's queue of our requests that are on time: being sent
        now, so an endgame copy from another peer would arrive as a second copy (a Cancel only
        takes queued requests off the sender's queue). Endgame duplicates go to requests still
        queued behind others and to heads past half their timeout (a slow or stuck peer). With
        every head duplicated, a tenth of what 6 frontends received from 1 worker were such
        copies of 4 MiB pieces (simulator). ``tick`` asks again in endgame, as heads fall late."""
        heads: set[int] = set()
        for p in self.peers.values():
            if p.requests:
                head, sent = next(iter(p.requests.items()))
                if now - max(sent, p.moved_at) < self._timeout_for(head) / 2:
                    heads.add(head)
        return heads

    def _paced_downloads(self) -> bool:
        """Whether requests wait for download credit (``swarm.ratelimit``). Requests, not
        received bytes, are paced: a piece asked for is sent at once, so nothing waits in socket
        buffers and request deadlines stay true."""
        return self.bandwidth is not None and self.bandwidth.limits_download and not self.picker.done

    def _fill_all(self, skip: PeerState | None = None) -> None:
        for p in self.peers.values():
            # (_fill_requests' own first test, here: most peers choke us, and a large crowd's
            # nodes call this for ~50 peers per piece they get)
            if p is not skip and not p.peer_choking and p.am_interested:
                self._fill_requests(p)

    def _end_request(self, peer: PeerState, i: int) -> None:
        if peer.requests.pop(i, None) is not None:
            self.picker.request_ended(i)

    def _on_reject(self, peer: PeerState, i: int, now: float) -> None:
        peer.answered_at = now
        if i in peer.requests:
            peer.moved_at = now
        peer.refused[i] = now + self.config.reject_backoff
        self.picker.contended = True  # others compete for these pieces: random ties
        if i in peer.requests:
            self._end_request(peer, i)
            if self.bandwidth is not None:
                self.bandwidth.refund_download(self._lengths[i])
            self._fill_all(skip=peer)

    def _expire_refusals(self, now: float) -> None:
        """Ask again, once its back-off is over, for a piece a peer refused. Refusals were only
        expired when a request was being made, so a fetcher whose last pieces every holder had
        refused (a holder whose store dropped the piece and fetched it again, a seeder holding
        it back) made no request again: it waited forever (tests/test_store_engine.py)."""
        for p in self.peers.values():
            if p.refused and any(until <= now for until in p.refused.values()):
                for i in [i for i, until in p.refused.items() if until <= now]:
                    del p.refused[i]
                self._fill_requests(p)

    def _expire_requests(self, now: float) -> None:
        expired = False
        for p in self.peers.values():
            if not p.requests:  # (most peers, every tick: skip the call)
                continue
            deadline = self._queue_deadline(p)
            if deadline is None or deadline > now:
                continue
            # The queue did not move for the head's whole timeout: everything behind it is stuck
            # too; the Cancels take the queued ones off the peer's upload queue.
            p.moved_at = now
            for i in list(p.requests):
                self._end_request(p, i)
                p.cancelled.add(i)
                p.post(wire.Cancel(i))
                p.timeouts += 1
                self.timeouts += 1
                expired = True
        if expired:
            self._fill_all()
