"""What a transfer knows of one linked peer (``PeerState``) and of a link still in its handshake
(``Handshake``). Plain state: no I/O, no clock."""

from __future__ import annotations

from typing import Any

import attrs

from swarm import wire
from swarm.choker import PeerSlot
from swarm.engine.config import PeerLink


class Drop(Exception):
    """Close this link (reason in args)."""


class _NoWake:
    """A peer's ``wake`` until a runner gives it one (``TransferCore`` alone queues messages only)."""

    __slots__ = ()

    def set(self) -> None:
        pass


NO_WAKE: Any = _NoWake()


class PeerState:
    """One linked peer. The transfer's actions for it are queued here: ``control`` (messages to
    send, in order) and ``uploads`` (pieces it asked for, sent while it holds an upload slot);
    ``post`` queues a message and calls ``wake.set()`` (the runner's writer waits on it). The
    queues are lists, not deques (short, and an empty deque costs ~600 bytes more: two per link
    end, ~40 link ends per node in a large simulated crowd)."""

    __slots__ = (
        "am_interested",
        "answered_at",
        "cancelled",
        "close_reason",
        "closed",
        "control",
        "have",
        "held_back",
        "id",
        "idle_since",
        "inbound",
        "interested_since",
        "link",
        "moved_at",
        "peer_choking",
        "refused",
        "requests",
        "scope",
        "send_alone",
        "send_piece",
        "served_at",
        "serves",
        "slot",
        "tell",
        "timeouts",
        "upload_piece",
        "uploads",
        "wake",
        "wasted",
        "window_bytes",
    )

    def __init__(self, link: PeerLink, now: float):
        self.link = link
        self.id = link.peer_id
        self.have: set[int] = set()
        self.am_interested = False
        self.peer_choking = True
        self.interested_since = now  # when we last became interested in them
        self.answered_at = now  # when they last answered a request of ours (piece or Reject)
        # Whether they opened the link (``reserved_outbound``); None: the link cannot tell.
        self.inbound = getattr(link, "outbound", None) is False
        self.scope: Any = None  # the runner's handle on the link's tasks (``_cancel_link``)
        self.slot = PeerSlot(self.id, since=now, order=now)
        # Our outstanding requests in the order sent (the order the peer serves them): index ->
        # when sent. ``moved_at``: when the peer last answered one (a piece or a Reject) or we
        # gave up on its queue; the request at the head has its timeout from then on.
        self.requests: dict[int, float] = {}
        self.moved_at = now
        self.cancelled: set[int] = set()  # requests we cancelled whose piece may still come
        self.uploads: list[int] = []
        # The writer's piece being sent (``_next_upload`` .. ``_upload_ended``), whether it goes
        # alone (``EngineConfig.serial_uploads``) and when we last started one for them.
        self.upload_piece = -1  # -1: none
        self.send_alone = False
        self.served_at = -1.0
        self.refused: dict[int, float] = {}  # piece -> until when we don't re-ask this peer
        self.idle_since: float | None = None  # both sides uninterested since (we complete)
        self.held_back: set[int] = set()  # pieces we refused them once by the seeding policy
        self.serves = True  # from their Hello: they upload to peers
        self.control: list[wire.Message] = []
        self.wake: Any = NO_WAKE
        self.timeouts = 0
        self.wasted = 0
        self.window_bytes = 0
        self.closed = False
        self.close_reason = ""
        # Optional fast path of a link (the data lane): send piece ``index`` straight from the
        # store, returning the bytes sent; raises StoreError if the piece cannot be read.
        self.send_piece = getattr(link, "send_piece", None)
        self.tell = False  # send the reason in an Error frame (we are dropping them for cause)

    def post(self, msg: wire.Message) -> None:
        self.control.append(msg)
        self.wake.set()


@attrs.define
class Handshake:
    """A link admitted by ``serve_link`` and not yet registered (past the Bitfield exchange)."""

    peer_id: str
    address: str | None
    inbound: bool
    open: bool = True
