"""The state of a simulation run: the store stand-in (``Blob``, ``SimStore``), a node's state across
sessions (``Node``), the results (``NodeResult``, ``SimResult``) and the GC guard of a run.

Split out of ``simulations/sim.py`` (issue #13); ``simulations.sim`` re-exports every name.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
from collections.abc import Iterator
from typing import Any

import attrs

from simulations._engine import ConnectPolicy, ManifestAsk, PieceHashMismatch, ProviderScores
from simulations.driver import LinkEnd, SimTransfer
from simulations.network import Port
from simulations.scenario import Group

INF = math.inf


# --------------------------------------------------------------------------- store


class Blob:
    """A piece payload stand-in: only its length exists (the engine only calls ``len``)."""

    __slots__ = ("bad", "n")

    def __init__(self, n: int, bad: bool = False):
        self.n = n
        self.bad = bad

    def __len__(self) -> int:
        return self.n


class SimStore:
    """engine.PieceStore over lengths: verified pieces are a set of indices."""

    __slots__ = ("_bad", "_blobs", "_have", "corrupt", "lengths", "rng")

    def __init__(
        self, lengths: list[int], have: bool = False, corrupt: float = 0.0, rng: random.Random | None = None
    ):
        self.lengths = lengths
        self._have: set[int] = set(range(len(lengths))) if have else set()
        cache: dict[int, Blob] = {}
        self._blobs = [cache.setdefault(n, Blob(n)) for n in lengths]
        self._bad = [Blob(n, bad=True) for n in lengths] if corrupt else []
        self.corrupt = corrupt  # probability that a piece we serve fails verification
        self.rng = rng

    @property
    def have(self) -> frozenset[int]:
        return frozenset(self._have)

    def read_piece(self, index: int) -> Blob:
        if self.corrupt and self.rng is not None and self.rng.random() < self.corrupt:
            return self._bad[index]
        return self._blobs[index]

    def write_piece(self, index: int, data: Any) -> bool:
        if len(data) != self.lengths[index] or getattr(data, "bad", False):
            raise PieceHashMismatch(index, f"piece {index}: blake3 mismatch (simulated)")
        self._have.add(index)
        return True

    @property
    def complete(self) -> bool:
        return len(self._have) == len(self.lengths)


# --------------------------------------------------------------------------- nodes


def _node_id(n: Node) -> str:
    return n.id


class Node:
    def __init__(self, nid: str, group: Group, index: int, port: Port, store: SimStore, seed: int):
        self.id = nid
        self.group = group
        self.index = index
        self.port = port
        self.store = store
        self.rng = random.Random(f"{seed}/{nid}/sim")
        self.session = 0
        self.online = False
        self.vanished = False  # offline because its host's link went dark (see Simulation._vanish)
        self.gone = False  # left for good without the model
        self.transfer: SimTransfer | None = None
        self.links: dict[str, LinkEnd] = {}
        self.dialing: dict[str, None] = {}
        self.scores = ProviderScores()  # swarm.discovery, as in swarm/node/: outlives sessions
        self.ask: ManifestAsk[Node] | None = None  # the manifest requests of this session
        self.ask_found: list[Node] = []  # the providers of the lookup being asked, answered first
        self.connect: ConnectPolicy[Node] | None = None  # this session's connect loop
        self.draining = False  # leaving gracefully (startup.leave)
        self.first_arrival: float | None = None
        self.completed_at: float | None = None
        self.configs_at: float | None = None
        self.first_piece_at: float | None = None
        self.last_piece_at = 0.0
        self.announced_at: float | None = None  # start of this session's announcing
        self.record_until = -INF  # provider record validity after leaving
        self.departures = 0
        self.lookups = 0
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def fetches(self) -> bool:
        return self.group.role == "fetch"


@attrs.frozen
class NodeResult:
    id: str
    group: str
    role: str
    first_arrival: float | None
    completed_at: float | None
    configs_at: float | None
    departures: int
    bytes_up: int
    bytes_down: int

    @property
    def completion_time(self) -> float | None:
        if self.completed_at is None or self.first_arrival is None:
            return None
        return self.completed_at - self.first_arrival


@attrs.frozen
class SimResult:
    scenario: str
    seed: int
    end_time: float
    stopped_by: str  # "done" (every fetching node finished or left for good) or "stop_at"
    nodes: tuple[NodeResult, ...]
    events: list[tuple]
    samples: list[tuple]  # (t, completed, {group: uploaded bytes})
    stats: dict[str, Any]

    def completion_times(self, group: str | None = None) -> list[float]:
        return sorted(
            n.completion_time
            for n in self.nodes
            if n.role == "fetch" and n.completion_time is not None and (group is None or n.group == group)
        )


# --------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """No cyclic GC passes during a run: with ~10^6 live objects every full pass walks them all.
    Garbage is collected once at the end."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()
