"""DHT provider records: announcing what we serve, and finding who serves a key (``SwarmHost``'s
``provide``, ``stop_providing``, ``find_providers``, from ``ProvidersMixin``).

py-libp2p's own ``find_providers`` answers from the local provider cache whenever it has any
entry, so lookups here always ask the network too, with our own bounded GET_PROVIDERS client
(``compat.get_providers_on``, ``parse_providers_answer``). What a DHT peer says about *other*
peers is hearsay and is ranked after first-hand records (``ProviderBook``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import multiaddr
import trio
from libp2p.kad_dht.common import ALPHA
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from swarm.discovery import LOOKUP_HEDGE, lookup_grace
from swarm.net import compat
from swarm.net.addrs import PeerAddr, check_key, strip_p2p

log = logging.getLogger(__name__)

__all__ = ["MAX_ADDRS_PER_PROVIDER", "ProviderBook", "ProvidersMixin", "parse_providers_answer"]

LOOKUP_PARALLEL = 3 * ALPHA
"""GET_PROVIDERS requests one lookup has out at once (each a place for LOOKUP_HEDGE at most): a
lookup first asks the <= 20 closest peers it knows plus those it is connected to, and some may have
vanished."""
PROVIDE_TIMEOUT = 30.0
"""Seconds ``provide`` may take to send its ADD_PROVIDERs."""
GET_PROVIDERS_ATTEMPTS = 4
"""Tries of a GET_PROVIDERS that comes back empty (a busy DHT peer resets requests beyond 12 at
once; measured: 16 frontends looking up one worker together, 3-5 of them got nothing for 5 s)."""
MAX_PROVIDERS_PER_ANSWER = 20
"""Providers taken from one GET_PROVIDERS answer (Kademlia's k). py-libp2p caps a message at
4 MiB, room for ~400,000 addresses: one answer could otherwise make us parse and keep them all."""
MAX_ADDRS_PER_PROVIDER = 16
"""Addresses kept per provider (a peer listens on a few: ip4/ip6 x interfaces). Measured before this
bound: one provider record with 30,000 addresses blocked the event loop 5.4 s (a quadratic
de-duplication)."""
MAX_CLOSER_PER_ANSWER = 20
"""Closer peers taken from one answer (k)."""
MAX_PROVIDERS_FOUND = 200
"""Distinct providers one lookup keeps; it stops there."""
MAX_SIGNED_RECORD_BYTES = 4096
"""A signed peer record (an envelope with a key, a signature and a few addresses) is a few hundred
bytes; a bigger one is not verified (its addresses would all be parsed into the peerstore)."""


class _FirstAnswer:
    """Set once a DHT peer names providers; ``took``: how long its request took."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.took = 0.0


class ProviderBook:
    """The providers one lookup found, first-hand apart from hearsay, with bounded work per record.

    First-hand: a record whose provider is the peer that gave it (``source`` is its id) or one
    from our own provider store (``source`` None: ADD_PROVIDERs, which py-libp2p accepts only from
    the provider itself). Hearsay: what a peer says about others, kept per answering peer so the
    result can take it in turn from each (one hostile peer's twenty made-up providers do not push
    out an honest peer's one). Every record adds at most MAX_ADDRS_PER_PROVIDER addresses, with
    set membership (dict keys), so no record costs more than a few microseconds."""

    def __init__(self, own_id: str):
        self.own_id = own_id
        self.first_hand: dict[str, dict[str, None]] = {}
        self.hearsay: dict[str, dict[str, dict[str, None]]] = {}
        self._seen: set[str] = set()

    @property
    def first_hand_count(self) -> int:
        return len(self.first_hand)

    @property
    def full(self) -> bool:
        return len(self._seen) >= MAX_PROVIDERS_FOUND

    def add(self, infos: Iterable[PeerInfo], *, source: str | None) -> None:
        for info in itertools.islice(infos, MAX_PROVIDERS_FOUND):
            try:
                pid = info.peer_id.to_base58()
            except Exception:
                continue
            if pid == self.own_id or (pid not in self._seen and self.full):
                continue
            if source is None or source == pid:
                addrs = self.first_hand.setdefault(pid, {})
            else:
                told = self.hearsay.setdefault(source, {})
                if pid not in told and len(told) >= MAX_PROVIDERS_PER_ANSWER:
                    continue
                addrs = told.setdefault(pid, {})
            self._seen.add(pid)
            for a in itertools.islice(info.addrs, MAX_ADDRS_PER_PROVIDER):
                if len(addrs) >= MAX_ADDRS_PER_PROVIDER:
                    break
                try:
                    addrs[str(strip_p2p(a))] = None
                except Exception:
                    continue

    def result(self, limit: int, *, connected_at: Callable[[str], list[str] | None]) -> list[PeerAddr]:
        """First-hand providers in the order found, then hearsay in turn from each source; at
        most ``limit``. ``connected_at(pid)``: the addresses of a peer we are connected to (which
        hearsay does not replace), None for others."""
        out = [PeerAddr(pid, tuple(addrs)) for pid, addrs in itertools.islice(self.first_hand.items(), limit)]
        taken = set(self.first_hand)
        rounds = itertools.zip_longest(*(list(told) for told in self.hearsay.values()))
        for pid in itertools.chain.from_iterable(rounds):
            if len(out) >= limit:
                break
            if pid is None or pid in taken:
                continue
            taken.add(pid)
            lists = [list(told[pid]) for told in self.hearsay.values() if pid in told]
            addrs = dict.fromkeys(
                a
                for a in itertools.chain.from_iterable(  # each source in turn
                    itertools.zip_longest(*lists)
                )
                if a is not None
            )
            known = connected_at(pid)
            out.append(
                PeerAddr(
                    pid,
                    known if known is not None else tuple(itertools.islice(addrs, MAX_ADDRS_PER_PROVIDER)),
                )
            )
        return out


class ProvidersMixin:
    """``SwarmHost``'s DHT provider methods. Uses the host's ``_host`` (py-libp2p host), ``_dht``
    (KadDHT), ``_id`` / ``peer_id``, ``_require_running``, ``_is_connected`` and
    ``_known_addrs``."""

    _host: Any
    _dht: Any
    _id: ID
    peer_id: str
    _require_running: Callable[[], None]
    _is_connected: Callable[[ID], bool]
    _known_addrs: Callable[[ID], list[multiaddr.Multiaddr]]

    async def provide(self, key: bytes, *, timeout: float = PROVIDE_TIMEOUT) -> None:
        """Announce that we provide ``key``: stored locally at once, then sent (ADD_PROVIDER) to
        the peers closest to the key. Returns once sent; remote peers store it a few ms later.
        py-libp2p republishes every 22 h while the host runs. Never raises for an unreachable
        network (the record is still ours and will be served to peers that ask us)."""
        key = check_key(key)
        self._require_running()
        with trio.move_on_after(timeout) as scope:
            try:
                ok = await self._dht.provider_store.provide(key)
            except Exception as e:
                log.warning("provide %s failed: %r", key.hex()[:16], e)
                return
        if scope.cancelled_caught:
            log.info("provide %s: timed out after %g s", key.hex()[:16], timeout)
        elif not ok:
            log.info("provide %s: no DHT peer reached (recorded locally)", key.hex()[:16])

    def stop_providing(self, key: bytes) -> None:
        """Stop announcing ``key`` (no more republishing, our local record dropped). Records already
        held by other peers expire on their own (48 h)."""
        compat.forget_provider(self._dht, check_key(key), self._id)

    async def find_providers(self, key: bytes, *, timeout: float = 5.0, limit: int = 20) -> list[PeerAddr]:
        """Peers providing ``key``, without us and without duplicates, at most ``limit``.

        Always asks the network (py-libp2p's own find_providers returns its local cache alone as
        soon as that has an entry, so a peer that once learnt of one provider would never learn of
        the next): an iterative Kademlia lookup for the closest peers, then GET_PROVIDERS to them
        (and to closer peers they name). Returns what it found when every peer asked has
        answered or failed, ``lookup_grace`` after the first answer naming providers (DHT peers
        that vanished never answer), or after ``timeout`` seconds, whichever comes first.

        What a DHT peer says about *other* peers is hearsay: one hostile peer can answer with any
        number of made-up providers, or with junk addresses for a real one. So the list is
        ordered by how much we know (see ``ProviderBook``): first-hand records first (the
        ADD_PROVIDERs sent to us, whose provider py-libp2p checks is the sender, then peers
        answering for themselves), then hearsay taken in turn from each answering peer; the
        lookup stops early only once ``limit`` first-hand providers are in, never at a count that
        hearsay fills; hearsay never adds to or replaces a peer's first-hand addresses, nor those of
        a peer we are connected to (nor, at dial time, those we knew). Answers are read with
        bounds (``_get_providers_from``)."""
        key = check_key(key)
        self._require_running()
        book = ProviderBook(self.peer_id)
        local = self._dht.provider_store.get_providers(key)
        book.add(itertools.islice(local, MAX_PROVIDERS_FOUND), source=None)
        found = _FirstAnswer()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                async def lookup() -> None:
                    await self._lookup_providers(key, limit, book, found)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(lookup)
                # Peers that vanished (no FIN, no RST) never answer: once one peer has named
                # providers, the others get a grace in proportion (discovery.lookup_grace).
                await found.event.wait()
                await trio.sleep(lookup_grace(found.took))
                nursery.cancel_scope.cancel()
        return book.result(limit, connected_at=self._connected_addrs)

    def _connected_addrs(self, peer_id: str) -> list[str] | None:
        pid = ID.from_base58(peer_id)
        if not self._is_connected(pid):
            return None
        return [str(strip_p2p(a)) for a in self._known_addrs(pid)[:MAX_ADDRS_PER_PROVIDER]]

    async def _lookup_providers(
        self, key: bytes, limit: int, book: ProviderBook, found: _FirstAnswer | None = None
    ) -> None:
        """GET_PROVIDERS to the closest peers we already know (one round trip: enough in a small
        swarm) while the iterative closest-peer lookup runs; then to the peers that lookup finds,
        and to closer peers named in the answers. Returns early once ``limit`` first-hand
        providers are found (or MAX_PROVIDERS_FOUND in all)."""
        queried: set[ID] = {self._id}
        sem = trio.Semaphore(LOOKUP_PARALLEL)
        closer: list[ID] = []

        async with trio.open_nursery() as nursery:
            asked_at: dict[ID, float] = {}

            async def request(peer: ID) -> Any:
                asked_at[peer] = trio.current_time()  # once it holds a place (_hedged)
                return await self._get_providers_from(peer, key)

            async def ask(peer: ID) -> None:
                provs: list[PeerInfo] = []
                more: list[ID] = []
                for attempt in range(GET_PROVIDERS_ATTEMPTS):
                    if attempt:
                        await trio.sleep(random.uniform(0.05, 0.25) * attempt)
                    answer = await self._hedged(sem, functools.partial(request, peer))
                    if answer is None:  # unreachable: no point in asking again
                        return
                    provs, more = answer
                    if provs or more:
                        break
                    # Neither providers nor closer peers: most likely refused. py-libp2p's DHT
                    # resets every request beyond 12 it is handling (a flash crowd of fetchers
                    # asking one worker at once).
                book.add(provs, source=peer.to_base58())
                if provs and found is not None and not found.event.is_set():
                    found.took = trio.current_time() - asked_at[peer]
                    found.event.set()
                closer.extend(more)
                if book.first_hand_count >= limit or book.full:
                    nursery.cancel_scope.cancel()

            async def ask_all(peers: Iterable[ID]) -> None:
                async with trio.open_nursery() as n:
                    for p in peers:
                        if p not in queried:
                            queried.add(p)
                            n.start_soon(ask, p)

            known = self._dht.routing_table.find_local_closest_peers(key, 20)
            known += [p for p in self._host.get_connected_peers() if p not in known]
            nursery.start_soon(ask_all, known)
            try:
                closest = await self._dht.peer_routing.find_closest_peers_network(key)
            except Exception as e:
                log.debug("closest-peer lookup for %s failed: %r", key.hex()[:16], e)
                closest = []
            await ask_all(closest)
            for _ in range(3):  # a few more hops through closer peers we are able to dial
                more = [
                    p
                    for p in dict.fromkeys(closer)
                    if p not in queried and (self._is_connected(p) or self._known_addrs(p))
                ]
                closer.clear()
                if not more:
                    break
                await ask_all(more)

    @staticmethod
    async def _hedged(sem: trio.Semaphore, request: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``request`` holding one of ``sem``'s places for at most LOOKUP_HEDGE seconds:
        a DHT peer that vanished (no FIN, no RST) would otherwise hold it to the dial or request
        timeout while peers that answer wait behind it."""
        await sem.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                sem.release()

        async def hedge() -> None:
            await trio.sleep(LOOKUP_HEDGE)
            release()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(hedge)
                answer = await request()
                n.cancel_scope.cancel()
            return answer
        finally:
            release()

    async def _get_providers_from(self, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]] | None:
        """One GET_PROVIDERS to ``peer``: (providers, closer peers); ([], []) on a failed request,
        None if no connection could be made (py-libp2p's closest-peer lookup also returns peers
        it merely has in its peerstore: asking those four times cost ~1 s per lookup).

        Our own client of the request rather than py-libp2p 0.8.1's (a private helper of its
        ProviderStore), which turns every address of the answer into a Multiaddr: a 4 MiB answer
        may hold ~400,000. Here the answer is parsed by protobuf's C parser (~11 ms for 4 MiB)
        and only the first MAX_PROVIDERS_PER_ANSWER providers, MAX_ADDRS_PER_PROVIDER addresses
        each, and MAX_CLOSER_PER_ANSWER closer peers are looked at; a signed peer record over
        MAX_SIGNED_RECORD_BYTES is not verified (its provider is skipped; the whole answer is
        dropped for the sender's own record, as py-libp2p drops an invalid one)."""
        try:
            stream = await compat.open_dht_stream(self._host, peer)
        except Exception as e:
            # A busy DHT peer resets the stream during negotiation: that one is asked again.
            log.debug("GET_PROVIDERS to %s: no stream: %r", peer, e)
            return ([], []) if self._is_connected(peer) else None
        try:
            resp = await compat.get_providers_on(self._host, stream, key)
        except trio.Cancelled:
            raise
        except Exception as e:
            log.debug("GET_PROVIDERS to %s failed: %r", peer, e)
            return [], []
        return parse_providers_answer(resp, self._host, peer, self._id)


def parse_providers_answer(resp: Any, host: Any, peer: ID, own_id: ID) -> tuple[list[PeerInfo], list[ID]]:
    """(providers, closer peers) from ``peer``'s GET_PROVIDERS answer, bounded: only the first
    MAX_PROVIDERS_PER_ANSWER providers, MAX_ADDRS_PER_PROVIDER addresses each, and
    MAX_CLOSER_PER_ANSWER closer peers are looked at; a signed peer record over
    MAX_SIGNED_RECORD_BYTES is not verified (its provider is skipped; the whole answer is dropped
    for the sender's own record, as py-libp2p drops an invalid one). Valid records' addresses go
    into ``host``'s peerstore (py-libp2p's record check does that)."""
    if resp.type != compat.KadMessage.MessageType.GET_PROVIDERS:
        return [], []
    if len(resp.senderRecord) > MAX_SIGNED_RECORD_BYTES or not compat.consume_signed_record(resp, host, peer):
        log.debug("GET_PROVIDERS from %s: bad sender record, answer dropped", peer)
        return [], []
    providers: list[PeerInfo] = []
    for p in resp.providerPeers[:MAX_PROVIDERS_PER_ANSWER]:
        if len(p.signedRecord) > MAX_SIGNED_RECORD_BYTES or not compat.consume_signed_record(p, host):
            continue
        try:
            pid = ID(p.id)
        except Exception:
            continue
        addrs = []
        for a in p.addrs[:MAX_ADDRS_PER_PROVIDER]:
            try:
                addrs.append(multiaddr.Multiaddr(a))
            except Exception:
                continue
        providers.append(PeerInfo(pid, addrs))
    closer: list[ID] = []
    for c in resp.closerPeers[:MAX_CLOSER_PER_ANSWER]:
        try:
            closer.append(ID(c.id))
        except Exception:
            continue
    return providers, [c for c in closer if c != own_id]
