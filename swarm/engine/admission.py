"""Links in their handshake: counted per peer id, per address and inbound against the limits of
``EngineConfig`` (``handshakes_per_peer``, ``handshakes_per_address``, ``max_peers``,
``reserved_outbound``), so no one peer or address fills a transfer's link budget."""

from __future__ import annotations

from collections import Counter

from swarm.engine.config import EngineConfig
from swarm.engine.peer import Handshake


class HandshakeGate:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.open = 0
        self.peers: Counter[str] = Counter()
        self.addresses: Counter[str] = Counter()
        self.inbound = 0

    def refusal(
        self, pid: str, inbound: bool, address: str | None, links: int, links_in: int, done: bool
    ) -> str:
        """Why a new link may not start its handshake by the limits ("" if it may): ``links``
        registered now, ``links_in`` of them inbound; ``done``: the transfer is complete."""
        cfg = self.config
        if self.peers[pid] >= cfg.handshakes_per_peer:
            return "too many handshakes from this peer"
        if inbound and address is not None and self.addresses[address] >= cfg.handshakes_per_address:
            return "too many handshakes from this address"
        if links + self.open >= cfg.max_peers:
            return "too many peers"
        if inbound and not done and self.inbound + links_in >= cfg.max_peers - cfg.reserved_outbound:
            return "too many peers"
        return ""

    def admit(self, pid: str, inbound: bool, address: str | None) -> Handshake:
        hs = Handshake(pid, address if inbound else None, inbound)
        self.open += 1
        self.peers[pid] += 1
        if hs.address is not None:
            self.addresses[hs.address] += 1
        self.inbound += hs.inbound
        return hs

    def over(self, hs: Handshake) -> None:
        """The link of ``hs`` is registered or gone: it no longer counts as a handshake."""
        if not hs.open:
            return
        hs.open = False
        self.open -= 1
        self.peers[hs.peer_id] -= 1
        if not self.peers[hs.peer_id]:
            del self.peers[hs.peer_id]
        if hs.address is not None:
            self.addresses[hs.address] -= 1
            if not self.addresses[hs.address]:
                del self.addresses[hs.address]
        self.inbound -= hs.inbound
