"""``Transfer``: the trio runner of ``TransferCore`` that the node and the simulator use.

Per link there are two tasks: a reader that hands each message to the core as it arrives (so a
yamux stream is always drained) and a writer that sends what the core queued, control messages
first and piece payloads when the peer holds an upload slot. One more task (``run``) calls the
core's ``tick``. Disk reads, writes and hashing run through ``run_blocking`` (worker threads in
production), never on the event loop. Time is ``trio.current_time()`` only, so the simulator
runs it under a virtual clock.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from swarm import wire
from swarm.engine.config import EngineConfig, LinkClosed, PeerLink, PieceStore
from swarm.engine.core import TransferCore
from swarm.engine.peer import Drop, Handshake, PeerState
from swarm.manifest import Manifest
from swarm.store import PieceHashMismatch, StoreError

log = logging.getLogger("swarm.engine")


def _release(data: Any) -> None:
    """Hand a pooled receive buffer back to its link (a link may lend one per PieceData)."""
    release = getattr(data, "release", None)
    if release is not None:
        release()


async def _run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


class Transfer(TransferCore):
    """Everything about trading one manifest, run by trio.

    Use ``async with trio.open_nursery() as n: n.start_soon(t.run)`` and hand each link to
    ``serve_link``; ``completed`` fires once every wanted piece is verified, ``configs_ready`` once
    every wanted config piece is. After completion the transfer keeps serving (seeding) until
    cancelled.
    """

    def __init__(
        self,
        manifest: Manifest,
        store: PieceStore,
        *,
        wanted_files: Iterable[int] | None = None,
        config: EngineConfig | None = None,
        rng: random.Random | None = None,
        run_blocking: Callable[..., Awaitable[Any]] | None = None,
        may_upload: bool = True,
        local_id: str = "",
        on_piece: Callable[[int, int], None] | None = None,
        bandwidth: Any = None,
    ):
        self.completed = trio.Event()
        self.failed = trio.Event()  # set with ``error`` when the local store cannot go on
        self.configs_ready = trio.Event()
        self.run_blocking = run_blocking or _run_in_thread
        super().__init__(
            manifest,
            store,
            clock=trio.current_time,
            wanted_files=wanted_files,
            config=config,
            rng=rng,
            may_upload=may_upload,
            local_id=local_id,
            on_piece=on_piece,
            bandwidth=bandwidth,
        )

    # ------------------------------------------------------------------ hooks

    def _cancel_link(self, peer: PeerState) -> None:
        if peer.scope is not None:
            peer.scope.cancel()

    def _on_completed(self) -> None:
        self.completed.set()

    def _on_configs_ready(self) -> None:
        self.configs_ready.set()

    def _on_failed(self) -> None:
        self.failed.set()

    # ------------------------------------------------------------------ tasks

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Timers: request deadlines every ``tick``, slot re-dealing every ``rechoke_interval``."""
        task_status.started()
        self._next_rechoke = trio.current_time() + self.config.rechoke_interval
        while True:
            await trio.sleep(self.config.tick)
            for p in self.tick(trio.current_time()):
                with trio.move_on_after(2):
                    try:
                        await p.link.aclose()
                    except Exception:
                        log.debug("closing idle link to %s failed", p.id, exc_info=True)

    async def close_links(self) -> None:
        """Close every link of this transfer (their ``serve_link`` calls then return)."""
        for p in list(self.peers.values()):
            with trio.move_on_after(2):
                try:
                    await p.link.aclose()
                except Exception:
                    log.debug("closing link to %s failed", p.id, exc_info=True)

    async def serve_link(
        self, link: PeerLink, hello: wire.Hello | None = None, *, address: str | None = None
    ) -> None:
        """Trade over ``link`` until either side closes it. Never raises for a peer's fault: the
        link is closed and the peer scored. ``hello`` is the peer's Hello if the caller already
        read it (to route the stream to this transfer); ``address`` the IP address an inbound
        link comes from, if known (``handshakes_per_address``)."""
        why = self._refusal(link, address)
        if why:
            log.info("refusing a link from %s: %s", link.peer_id, why)
            await self._close_link(link, why)
            return
        hs = self._admit(link, address)
        try:
            await self._serve_link(link, hello, hs)
        finally:
            self._handshake_over(hs)

    async def _serve_link(self, link: PeerLink, hello: wire.Hello | None, hs: Handshake) -> None:
        pid = link.peer_id
        peer = PeerState(link, trio.current_time())
        try:
            with trio.fail_after(self.config.handshake_timeout):
                for msg in self._greeting():
                    await link.send(msg)
                if hello is None:
                    hello = await link.receive()
                self._check_hello(hello)
                expect = getattr(link, "expect_pieces", None)  # optional: refuse oversized pieces
                if expect is not None:  # from their header, before memory is taken for them
                    expect(self._lengths)
                peer.serves = hello.serves
                self._check_bitfield(peer, await link.receive())
        except (trio.TooSlowError, LinkClosed, wire.ProtocolError, Drop, OSError) as e:
            log.info("handshake with %s failed: %s", pid, e)
            await self._close_link(link, f"handshake: {e}")
            return
        if pid in self.peers:  # both sides opened a link at once: keep exactly one
            if not self._replaces(link):
                await self._close_link(link, "duplicate link")
                return
            old = self.peers[pid]
            self._forget(old)
            await self._close_link(old.link, None)
        peer.wake = trio.Event()
        try:
            self._register(peer, hs)
            async with trio.open_nursery() as nursery:
                peer.scope = nursery.cancel_scope
                nursery.start_soon(self._guard, peer, self._writer, nursery.cancel_scope)
                await self._guard(peer, self._reader, nursery.cancel_scope)
        except Exception:  # a bug of ours: log it loudly, but one link never takes the node down
            self.internal_errors += 1
            log.exception("engine error on link to %s", pid)
            peer.close_reason = peer.close_reason or "internal error"
        finally:
            self._forget(peer)
            with trio.CancelScope(shield=True):
                await self._close_link(link, peer.close_reason if peer.tell else None)
        log.debug("link to %s ended: %s", pid, peer.close_reason)

    async def _guard(
        self, peer: PeerState, task: Callable[[PeerState], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        """Run a link task; a peer's fault ends the link (both tasks) with a reason, not an error."""
        try:
            await task(peer)
        except Drop as e:
            peer.close_reason, peer.tell = peer.close_reason or str(e), True
        except wire.ProtocolError as e:
            peer.close_reason, peer.tell = peer.close_reason or f"protocol error: {e}", True
            self._faulted(peer)
        except (LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            peer.close_reason = peer.close_reason or f"link lost: {e!r}"
        finally:
            peer.closed = True
            scope.cancel()

    async def _reader(self, peer: PeerState) -> None:
        """Messages in arrival order; a piece's bookkeeping happens here, in order, and its
        verify + write runs as a child task (at most ``writes_per_link`` at once). A peer's fault
        found by a write ends the link like one found here."""
        slots = trio.Semaphore(max(1, self.config.writes_per_link))
        fault: list[BaseException] = []
        async with trio.open_nursery() as writes:

            async def store(i: int, msg: wire.PieceData) -> None:
                try:
                    await self._store_piece(peer, i, msg)
                except (Drop, wire.ProtocolError) as e:
                    fault.append(e)
                    writes.cancel_scope.cancel()
                finally:
                    _release(msg.data)
                    slots.release()

            try:
                while not fault:
                    try:
                        msg = await peer.link.receive()
                    except LinkClosed:
                        peer.close_reason = peer.close_reason or "closed by peer"
                        break
                    if isinstance(msg, wire.PieceData):
                        try:
                            i = self._accept_piece(peer, msg)
                        except BaseException:
                            _release(msg.data)
                            raise
                        if i is None:
                            _release(msg.data)
                            continue
                        try:
                            await slots.acquire()
                        except BaseException:
                            self._write_abandoned(i)
                            _release(msg.data)
                            raise
                        writes.start_soon(store, i, msg)
                    else:
                        self._on_control(peer, msg)
            except Exception as e:  # re-raised below, outside the nursery (no ExceptionGroup)
                fault.append(e)
                writes.cancel_scope.cancel()
        if fault:
            raise fault[0]

    async def _store_piece(self, peer: PeerState, i: int, msg: wire.PieceData) -> None:
        """Verify and write an accepted piece (``_accept_piece``), then announce it."""
        error: Exception | None = None
        try:
            await self.run_blocking(self.store.write_piece, i, msg.data)
        except (PieceHashMismatch, StoreError) as e:
            error = e
        except BaseException:
            self._write_abandoned(i)
            raise
        self._piece_written(peer, i, len(msg.data), error)

    async def _writer(self, peer: PeerState) -> None:
        while True:
            while peer.control:
                await peer.link.send(peer.control.pop(0))
            index = self._next_upload(peer)
            if index is None:
                if peer.control:  # Rejects for what a choked peer had queued
                    continue
                peer.wake = trio.Event()
                await peer.wake.wait()
                continue
            self._upload_started(index)
            n: int | None = None
            error: StoreError | None = None
            try:
                if not await self._upload_credit(peer, index):
                    peer.uploads.insert(0, index)  # choked meanwhile: Rejected by _next_upload
                    continue
                self._upload_copy(index)
                if peer.send_piece is not None:
                    n = await peer.send_piece(index, self.store)
                else:
                    data = await self.run_blocking(self.store.read_piece, index)
                    await peer.link.send(wire.PieceData(index, data))
                    n = len(data)
            except StoreError as e:
                error = e
            finally:
                self._upload_ended(peer, index, n, error)

    async def _upload_credit(self, peer: PeerState, index: int) -> bool:
        """Wait for upload credit for piece ``index`` (``swarm.ratelimit``), sending control
        messages meanwhile. False if the peer was choked while we waited (credit given back)."""
        bw = self.bandwidth
        if bw is None or not bw.limits_upload:
            return True
        n = self._lengths[index]
        await bw.before_upload(peer.id, n, meanwhile=lambda until: self._send_control(peer, until))
        if peer.slot.unchoked:
            return True
        if bw.limits.peer_upload:
            bw.peer(peer.id).give_back(n)
        if bw.limits.upload:
            bw.upload.give_back(n)
        return False

    async def _send_control(self, peer: PeerState, until: float) -> None:
        """Send control messages as they come until ``until`` (a piece waits for credit: Have,
        Request and Choke must not wait with it)."""
        while True:
            while peer.control:
                await peer.link.send(peer.control.pop(0))
            if trio.current_time() >= until:
                return
            peer.wake = trio.Event()
            with trio.move_on_at(until):
                await peer.wake.wait()

    async def _close_link(self, link: PeerLink, reason: str | None) -> None:
        """Close ``link``, first telling the peer ``reason`` if there is one."""
        with trio.move_on_after(2):
            try:
                if reason:
                    await link.send(wire.Error(reason[: wire.MAX_REASON_BYTES]))
            except Exception:  # the link may already be gone; nothing more to tell it
                pass
            try:
                await link.aclose()
            except Exception:
                log.debug("closing link to %s failed", link.peer_id, exc_info=True)
