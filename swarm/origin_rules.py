"""Origin once, the rules: constants, wire formats and file helpers of ``swarm/origin.py``.

What every node computes the same way without asking anyone: the DHT key fetchers announce under
(:func:`origin_key`), the XOR distance that orders an election (:func:`distance`), a peer's
answer (:class:`OriginState`), the queries and file listings of ``/swarm/origin/1.0.0`` and
``/swarm/origin-data/2.0.0``, and the file helpers a puller and its backup use on their blobs.
The protocol itself (elections, following, mirroring, the rival check) is
:class:`swarm.origin.OriginCoordinator`.

``swarm.origin`` imports the constants by name and its code reads them there: patch a timing on
``swarm.origin`` (as tests do), not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import attrs

from swarm.hubpull import BLOB_NAME, PARTIAL_SUFFIX

ORIGIN_PROTOCOL = "/swarm/origin/1.0.0"
ELECTION_SETTLE = 0.5
"""Seconds between announcing interest and electing: provider records reach the DHT nodes in
~50-150 ms on a LAN (more on a loaded host), so fetchers that start together see each other."""
LOOKUP_TIMEOUT = 1.5
"""Seconds one lookup of interested peers (or of the model's providers) may take."""
POLL = 0.25
"""Seconds between state queries to the puller (a ~200-byte exchange)."""
PROBE_TIMEOUT = 2.0
"""Seconds one state query may take. A live node answers in milliseconds when idle, but a node
hashing a model on a loaded host took over 1 s to open a stream (namespace testbed, 8 nodes on 2
vCPUs: at 1 s, followers dropped a puller that had just seeded and elected again, ~10 s lost)."""
PROBE_FAILURES = 3
"""Refused state queries in a row (connection refused or reset: a dead process) after which the
puller counts as gone: ~0.75 s with POLL. Queries that time out count only through
SILENT_TIMEOUT."""
SILENT_TIMEOUT = 8.0
"""Seconds without any answer from the puller (state, file listing or mirrored bytes) after which
it counts as gone: a host that vanished (no RST) or hangs. A busy one answers within this."""
BACKUP_SILENT = 4.0
"""SILENT_TIMEOUT for the backup, which hears the pull's bytes on its mirror stream as well as
the state answers: nothing of either for this long and it takes over (a vanished puller is
replaced in ~5 s, not ~9). Dropping a live puller by mistake costs little: the backup then pulls
with more resume bytes than the old puller started with, so the old one gives way to it."""
STALL_TIMEOUT = 3.0
"""Seconds without any progress reported by the puller (bytes of its download) before it is
replaced. The Hub client writes as bytes arrive, so a live pull moves every few ms."""
MAX_CANDIDATES = 16
"""Interested peers from the DHT considered in one election (lookups return at most 20)."""
MAX_PROBES = 64
"""Connected peers asked directly in one election or rival check, besides those the DHT names: an
interest record may still be on its way (testbed, 8 nodes on 2 loaded vCPUs: announcing took
0.8-10 s, and three nodes that found no one in the DHT pulled side by side)."""
SMALL_NETWORK = 20
"""Fewer known peers (connected and in the DHT routing table) than this, Kademlia's bucket size:
the routing table holds the whole network, so a survey that has heard from (or timed out on)
every known peer waits for its DHT lookup only SURVEY_DHT_GRACE more."""
SURVEY_DHT_GRACE = 0.3
"""Seconds (see SMALL_NETWORK). The lookup ran its full LOOKUP_TIMEOUT in every election on the
testbed (1.7-1.8 s, eight nodes that had all answered in milliseconds)."""
PROVIDE_WAIT = 3.0
"""Seconds the interest announcement (ADD_PROVIDER) may hold up the election."""
WAIT_GRACE = 15.0
"""Seconds a follower waits on a peer that does not pull itself but waits too (it is noticing a
dead puller: up to SILENT_TIMEOUT when the puller vanished without a reset, and electing again,
~1-3 s) before passing over it. A peer passed over is left out of elections, not of the rival
check: if it pulls after all, it is followed or given way to as any puller."""
RIVAL_WINDOW = 5.0
"""Seconds at the start of a pull during which the puller looks for a closer one that also pulls
(elected at the same time from a different view) and gives way to it."""
RIVAL_CHECK = 1.0
"""Seconds between those looks."""
MIRROR_PROTOCOL = "/swarm/origin-data/2.0.0"
"""The backup's copy of the puller's files: one long-lived stream per pull (below,
:func:`encode_frame`). Version 1.0.0 was a query per 16 MiB: a stream opened per query, each
reply bounded by the 5 s query timeout, and on the loaded testbed the copy held 1.6-9.8 MB of the
~135 MB the puller had when it was killed (the replacement pulled the rest again: 1.49-1.73 x)."""
MIRROR_FRAME = 1 << 20
"""Most bytes of one frame of the mirror stream (the puller's download writes 1 MiB chunks)."""
FINISHED_FRAMES = 4
"""Frames of finished files the puller sends its backup when the files being downloaded have
nothing new for it (those come first: the download waits on their copy)."""
MIRROR_IDLE = 0.05
"""Seconds the puller's side of the mirror stream sleeps when the backup has every byte written
so far (the copy lags the pull by at most this, plus what is in flight on the stream)."""
MIRROR_MAX_LAG = 8 << 20
"""Most bytes of a file the puller's download may be ahead of what its backup has acknowledged:
the download waits (``hubpull.GATES``) while it is further ahead. A puller that dies then costs
the origin at most this again, plus what was in flight. Without it the copy, a libp2p stream
that a loaded host ran at ~16 MB/s against the origin's 24 MB/s, was 35 MB behind at a kill
(testbed: 1.15 x the model). The price: where the stream is slower than the origin, the pull
runs at the stream's rate."""
MIRROR_GATE_WAIT = 2.0
"""Seconds the download waits on a copy that does not move at all before it stops waiting for
that stream (a backup that hangs; the followers would take a download without progress for
STALL_TIMEOUT as a stalled puller)."""
MAX_MIRRORS = 1
"""Mirror streams a puller serves at once. Views of the interested set differ on a loaded host
(testbed: three followers each took themselves for the backup), and every stream is a copy of the
whole pull through the puller's CPU; the election after a death ranks by bytes held, so the one
backup that copies is the one elected."""
MIRROR_RETRY = 1.0
"""Seconds before a backup opens the mirror stream again (refused: another backup has it; or
broken)."""
MAX_MIRROR_FILES = 64
"""Most files one mirror stream carries (the weight shards of a large model)."""
MAX_FRAME_HEADER = 8192
"""Largest frame header: a file frame's (a blob name and two integers), or the backup's first one
(up to MAX_MIRROR_FILES names and sizes)."""
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
    have: int = 0  # bytes it holds to resume from (its copy of the puller's partial files)

    def encode(self) -> bytes:
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes) -> OriginState:
        """Parse a peer's answer; ValueError on anything malformed."""
        try:
            obj = json.loads(raw)
            state, progress, leader = obj["state"], obj["progress"], obj["leader"]
            have = obj.get("have", 0)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"bad origin state: {e!r}") from None
        if (
            state not in _STATES
            or not _count(progress)
            or not _count(have)
            or not isinstance(leader, str)
            or len(leader) > 128
        ):
            raise ValueError("bad origin state")
        return cls(state, progress, leader, have)

    @property
    def active(self) -> bool:
        """Pulling, or following a pull that made progress, or done: worth following."""
        return self.state in ("pulling", "seeded") or (self.state == "waiting" and self.progress > 0)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 60


def _query(key: bytes, **fields: object) -> bytes:
    return json.dumps({"key": key.hex(), **fields}).encode()


def _parse_query(request: bytes) -> tuple[bytes, dict]:
    obj = json.loads(request)
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        raise ValueError("bad origin query")
    key = bytes.fromhex(obj["key"])
    if len(key) != 34:
        raise ValueError("bad origin key")
    return key, obj


def _mirror_name(name: str) -> bool:
    return BLOB_NAME.fullmatch(name.removesuffix(PARTIAL_SUFFIX)) is not None


def encode_frame(name: str, offset: int, data: bytes) -> bytes:
    """One frame of the mirror stream: a 4-byte big-endian header length, the header (JSON
    ``{"name": <blob name>, "offset": <byte of the file>, "len": <payload bytes>}``), the payload.
    The stream's first frame, from the backup, is a header alone: ``{"key": <origin key hex>,
    "have": [[name, size], ...]}`` (what its copy holds); the puller answers with file frames,
    each continuing a file where the backup's copy ends."""
    header = json.dumps({"name": name, "offset": offset, "len": len(data)}).encode()
    return len(header).to_bytes(4, "big") + header + data


def encode_header(obj: dict) -> bytes:
    """A header-only frame (the backup's first)."""
    raw = json.dumps(obj).encode()
    if len(raw) > MAX_FRAME_HEADER:
        raise ValueError(f"mirror header of {len(raw)} bytes")
    return len(raw).to_bytes(4, "big") + raw


def parse_frame_header(raw: bytes) -> tuple[str, int, int]:
    """(blob name, offset, payload length) of a file frame's header; ValueError on anything else."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("bad mirror frame")
    name, offset, n = obj.get("name"), obj.get("offset"), obj.get("len")
    if not isinstance(name, str) or not _mirror_name(name) or name.endswith(PARTIAL_SUFFIX):
        raise ValueError("bad mirror frame name")
    if not _count(offset) or not _count(n) or n > MIRROR_FRAME or not n:
        raise ValueError("bad mirror frame offset or length")
    return name, offset, n


def parse_ack(raw: bytes) -> tuple[str, int]:
    """(blob name, bytes the backup's copy of it holds) of an acknowledgement frame."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("bad mirror ack")
    name, have = obj.get("name"), obj.get("have")
    if not isinstance(name, str) or not _mirror_name(name) or name.endswith(PARTIAL_SUFFIX):
        raise ValueError("bad mirror ack name")
    if not _count(have):
        raise ValueError("bad mirror ack size")
    return name, have


def parse_mirror_request(raw: bytes) -> tuple[bytes, dict[str, int]]:
    """(origin key, {blob name: bytes the backup holds}) of a mirror stream's first frame."""
    key, obj = _parse_query(raw)
    have = obj.get("have", [])
    if not isinstance(have, list) or len(have) > MAX_MIRROR_FILES:
        raise ValueError("bad mirror request")
    out: dict[str, int] = {}
    for item in have:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not _mirror_name(item[0])
            or not _count(item[1])
        ):
            raise ValueError("bad mirror request entry")
        out[item[0].removesuffix(PARTIAL_SUFFIX)] = item[1]
    return key, out


def read_blob(blobs: Path, base: str, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes from ``offset`` of blob ``base`` in ``blobs``, partial or finished (the
    pull renames the partial file when it is verified); b"" if neither is there."""
    for name in (base + PARTIAL_SUFFIX, base):
        try:
            with open(blobs / name, "rb") as fh:
                fh.seek(offset)
                return fh.read(n)
        except FileNotFoundError:
            continue
    return b""


def copy_sizes(blobs: Path) -> dict[str, int]:
    """{blob name: size} of what ``blobs`` holds, partial or finished (one entry per blob)."""
    out: dict[str, int] = {}
    for name, size in blob_sizes(blobs):
        base = name.removesuffix(PARTIAL_SUFFIX)
        out[base] = max(out.get(base, 0), size)
    return out


def blob_sizes(blobs: Path) -> list[list]:
    """[name, size] of the blobs and partial blobs in ``blobs`` (at most MAX_MIRROR_FILES)."""
    out = []
    try:
        with os.scandir(blobs) as it:
            for e in it:
                if _mirror_name(e.name):
                    with contextlib.suppress(OSError):
                        out.append([e.name, e.stat(follow_symlinks=False).st_size])
    except OSError:
        return []
    return sorted(out)[:MAX_MIRROR_FILES]


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append(path: Path, offset: int, data: bytes) -> int:
    """Append ``data`` at ``offset``; the file's new size (0: it had changed, copy it over)."""
    with open(path, "ab") as fh:
        if fh.tell() != offset:  # our own pull or another copy wrote meanwhile
            fh.truncate(0)
            return 0
        fh.write(data)
        return offset + len(data)


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


def _timed_out(e: Exception) -> bool:
    """Whether a query failed by timing out (a busy or unreachable peer) rather than by being
    refused or reset (a dead process: its kernel answers at once)."""
    return "timed out" in str(e)
