"""The manifest exchange (``/swarm/manifest/1.0.0``) as a pure protocol: what each side sends,
what it accepts, and the limits, without any I/O (``SwarmHost`` moves the frames; see
``requests``)::

    asker  -> server   ManifestRequest(model, revision, manifest hash or empty)
    server -> asker    ManifestReply(manifest, signature) x n, then ManifestEnd(n)
                       or Error(reason): busy, not serving, internal error

n is at most MAX_REPLIES and the replies together hold at most MAX_REPLY_BYTES (manifest and
signature bytes): the server cuts its answer to fit (``reply_budget``), the asker refuses a
bigger one whole (``ReplyCollector``). Each frame is also bounded by ``wire`` (MAX_MANIFEST_FRAME
for a reply, MAX_CONTROL_FRAME for the rest).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from swarm import wire

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_TYPES",
    "MAX_REPLIES",
    "MAX_REPLY_BYTES",
    "REQUEST_TYPES",
    "Refused",
    "ReplyCollector",
    "check_request",
    "reply_budget",
]

MAX_REPLIES = wire.MAX_MANIFESTS_PER_REPLY
"""ManifestReply frames in one answer."""
MAX_REPLY_BYTES = wire.MAX_MANIFEST_REPLY_BYTES
"""Manifest and signature bytes of one answer, all replies together."""
REQUEST_TYPES = frozenset({wire.ManifestRequest.TYPE})
"""What the server's decoder admits: the request, nothing else."""
ANSWER_TYPES = frozenset({wire.ManifestReply.TYPE, wire.ManifestEnd.TYPE, wire.Error.TYPE})
"""What the asker's decoder admits."""

BUSY = "busy: too many manifest requests at once"
NOT_SERVING = "not serving manifests"
INTERNAL_ERROR = "internal error"


class Refused(Exception):
    """The server answered with an Error frame (``reason``) instead of manifests."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_request(msg: wire.Message) -> wire.ManifestRequest:
    """The request, from the first message on the stream; ProtocolError for anything else."""
    if not isinstance(msg, wire.ManifestRequest):  # the decoder admits nothing else
        raise wire.ProtocolError(f"expected ManifestRequest, got {type(msg).__name__}")
    return msg


def reply_budget(items: Iterable[tuple[bytes, bytes]]) -> list[wire.ManifestReply]:
    """The replies to send for a manifest handler's answer: at most MAX_REPLIES, and only as many
    as fit MAX_REPLY_BYTES together (the asker refuses a bigger reply whole). ValueError for an
    item no peer would accept. Nothing is copied (bytes stay shared). The server sends them, then
    ``wire.ManifestEnd(len(replies))``."""
    out: list[wire.ManifestReply] = []
    total = 0
    for m, sig in itertools.islice(items, MAX_REPLIES):
        m, sig = bytes(m), bytes(sig)
        if len(sig) > wire.MAX_SIGNATURE_BYTES:
            raise ValueError("ManifestReply.signature too long")
        if len(m) + len(sig) + 16 > wire.MAX_MANIFEST_FRAME:
            raise ValueError(f"manifest of {len(m)} bytes over MAX_MANIFEST_FRAME")
        total += len(m) + len(sig)
        if total > MAX_REPLY_BYTES:
            log.warning("manifest reply cut at %d of its manifests (MAX_MANIFEST_REPLY_BYTES)", len(out))
            break
        out.append(wire.ManifestReply(m, sig))
    return out


class ReplyCollector:
    """The asker's side of one answer: ``feed`` each message received; it returns the replies
    once the ManifestEnd came (None until then), raises ProtocolError for an answer that breaks
    the protocol (too many replies, too many bytes, a count mismatch, another message) and
    Refused for an Error frame."""

    def __init__(self) -> None:
        self.replies: list[wire.ManifestReply] = []
        self.held = 0

    def feed(self, msg: wire.Message) -> list[wire.ManifestReply] | None:
        if isinstance(msg, wire.ManifestReply):
            if len(self.replies) >= MAX_REPLIES:
                raise wire.ProtocolError("too many ManifestReply frames")
            self.held += len(msg.manifest) + len(msg.signature)
            if self.held > MAX_REPLY_BYTES:
                raise wire.ProtocolError(f"manifest reply over {MAX_REPLY_BYTES} bytes")
            self.replies.append(msg)
            return None
        if isinstance(msg, wire.ManifestEnd):
            if msg.count != len(self.replies):
                raise wire.ProtocolError(f"ManifestEnd.count {msg.count} but {len(self.replies)} replies")
            return self.replies
        if isinstance(msg, wire.Error):
            raise Refused(msg.reason)
        raise wire.ProtocolError(f"unexpected {type(msg).__name__}")
