"""The start of a fetch on a real node, as the simulator models it (issue #11 item 4).

The namespace testbed (``swarm-sim testbed``) showed the simulator's fetches starting almost at
once, where a real node's take seconds: from the client's call to the node having chosen a
manifest, and from there to its first piece; a restarted host coming back at once and a leaving
host gone at once. Five things make up the difference, each a named
model parameter here (``simulations/sim.py`` calls into this module in a few places only):

- ``announce="manifest"``: a fetching node announces itself once it has chosen the manifest (it
  announces under the manifest's key, which it cannot know before; swarm/node/fetch.py starts
  ``_announce`` in the nursery that runs the transfer, after ``_resolve``). The simulator used to
  put a fetcher's provider record in the DHT at its arrival, so a flash crowd found each other
  before any of them could answer.
- ``lookup_round``: a DHT lookup (``find_providers``) in a small swarm never reaches its limit of
  20 first-hand providers, so it runs to its end: the iterative closest-peer lookup, then
  GET_PROVIDERS to every peer found, dialling the ones it is not linked to. The hop model
  (``DHTParams.bits_per_hop``) gives a few round trips (well under a millisecond on the testbed);
  a real lookup takes this long at least.
- ``node_start``: a host that comes back (``rejoin_after``) runs a new process, which takes
  seconds to import, start libp2p and join before it can fetch; the simulator's host used to be
  back at once.
- ``drain``: a node that leaves gracefully (SIGTERM) keeps sending the pieces it was asked for,
  for up to ``drain_timeout``; the simulator's was gone at once.
- ``link_setup``: a new link (dial, TCP, multistream, the lane's handshake, yamux, the swarm
  protocol's streams) takes this long before it carries a request, on top of the
  ``NetworkParams.connect_rtts`` round trips: Python work on both ends, most of it waiting for the
  CPU. It applies to the connect loop's dials (a manifest request goes over the connection the
  DHT lookup already made to that provider).

A scenario sets them in a ``[startup]`` table (``--set startup.link_setup=2``). The delays are
machine-dependent (Python waiting for a CPU), so a scenario's default is ``DEFAULT``: the node's
behaviour (announce at the manifest) with no delays, the idealised start every shipped scenario
and test assumes. ``TESTBED`` is what the namespace testbed measured (docs/simulation.md, Testbed
validation: 6-8 hosts at 5-40 Mbit/s on a shared 2-core machine, plaintext lane);
``simulations.testbed.for_testbed`` gives it to the simulator's side of ``--compare``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class StartupModel:
    announce_at_manifest: bool = True
    """A fetcher whose group announces at ``start`` does so when its manifest is chosen, not at
    its arrival (swarm/node/fetch.py)."""
    lookup_round: float = 0.0
    """Seconds a DHT lookup takes at least (a lookup that cannot fill its provider limit runs to
    its end)."""
    link_setup: float = 0.0
    """Seconds a new link takes, beyond ``connect_rtts`` round trips, before it carries a request."""

    node_start: float = 0.0
    """Seconds a host that left takes, once it comes back (``rejoin_after``, a session's rejoin),
    before it is online: a new ``swarm-node`` process imports, opens its store, starts libp2p
    and joins the DHT."""

    drain: float = 0.0
    """Seconds a gracefully leaving node (a ``leave`` event, ``after_finish``: SIGTERM on the
    testbed) drains before it is gone: it takes no new requests or links but sends the pieces
    peers already asked of it (swarm/node/serving.py ``Node.drain``, ``drain_timeout`` = 10 s). 0: it is
    gone at once, its pieces in flight aborted."""

    def lookup_delay(self, hops_delay: float) -> float:
        """A lookup's duration given the hop model's."""
        return max(hops_delay, self.lookup_round)

    def connect_delay(self, rtts_delay: float) -> float:
        """A new link's set-up time given the round trips' (dial or manifest request)."""
        return rtts_delay + self.link_setup


DRAIN_POLL = 0.05
"""Seconds between a draining node's checks of its pending uploads (swarm/node/serving.py DRAIN_POLL)."""


def leave(sim: Any, node: Any, why: str, sess: int | None = None, rejoin_after: float | None = None) -> None:
    """A graceful departure in ``sim`` (a ``simulations.sim.Simulation``): drain, then depart.
    ``rejoin_after`` counts from now, as the testbed's timer does from the signal."""
    tr = node.transfer
    limit = sim.sc.startup.drain
    if not node.online or (sess is not None and sess != node.session):
        return
    if tr is None or limit <= 0 or node.draining:
        sim._depart(node, why, sess, rejoin_after)
        return
    tr.stop_uploading()
    node.draining = True
    now = sim.tl.now()
    _drained(sim, node, why, node.session, rejoin_after, now, now + limit)


def _drained(
    sim: Any, node: Any, why: str, sess: int, rejoin_after: float | None, began: float, until: float
) -> None:
    if not node.online or sess != node.session:
        return
    now = sim.tl.now()
    tr = node.transfer
    if tr is None or not tr.uploads_pending or now >= until:
        if rejoin_after is not None:
            rejoin_after = max(0.0, rejoin_after - (now - began))
        sim._depart(node, why, sess, rejoin_after)
        return
    sim.at(min(until, now + DRAIN_POLL), _drained, sim, node, why, sess, rejoin_after, began, until)


DEFAULT = StartupModel()
"""A scenario's start unless its ``[startup]`` table says otherwise: no delays."""
TESTBED = StartupModel(lookup_round=0.3, link_setup=0.4, node_start=1.9, drain=10.0)
"""Calibrated on the namespace testbed (see the module docstring), nodes at nice -5
(``testbed.NODE_NICE``), load 1.4-5 (2026-12-05): arrival to manifest 0.27-0.38 s (median over
hosts), restart 1.5-2.6 s. ``link_setup`` recalibrated on 2026-12-06 on a new VM of the same
kind, where a node needs about half the CPU (2-12% of a core against 5-19%): manifest to first
piece without a crowd at the worker 0.27 s (tb_rolling_churn), 0.30 and 0.62 s (tb_vanish, two
runs), against 0.9-1.2 s on the older VM (link_setup 1.0 then). The first calibration (1.4, 1.0,
6.0) was made with nodes at nice 0 at load 8-27."""
KEYS = tuple(a.name for a in attrs.fields(StartupModel))


def parse(table: Mapping[str, Any], where: str = "startup") -> StartupModel:
    """A scenario's ``[startup]`` table (durations in seconds or as strings like "1.5 s")."""
    from simulations import units
    from simulations.scenario import ScenarioError

    extra = sorted(set(table) - set(KEYS))
    if extra:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(KEYS)})")
    m = StartupModel(
        announce_at_manifest=bool(table.get("announce_at_manifest", DEFAULT.announce_at_manifest)),
        lookup_round=units.duration(table.get("lookup_round", DEFAULT.lookup_round), f"{where}.lookup_round"),
        link_setup=units.duration(table.get("link_setup", DEFAULT.link_setup), f"{where}.link_setup"),
        node_start=units.duration(table.get("node_start", DEFAULT.node_start), f"{where}.node_start"),
        drain=units.duration(table.get("drain", DEFAULT.drain), f"{where}.drain"),
    )
    if min(m.lookup_round, m.link_setup, m.node_start, m.drain) < 0:
        raise ScenarioError(f"{where}: delays must be >= 0")
    return m


def overrides(model: StartupModel) -> dict[str, Any]:
    """``--set``-style overrides that give a scenario ``model``."""
    return {f"startup.{k}": getattr(model, k) for k in KEYS}
