"""The control API's fetch jobs: one :class:`Job` per distinct fetch running on the node,
watched by any number of connections (a :class:`Subscriber` each), and the NDJSON stream of one
connection's answer. Identical concurrent requests join one job; a late joiner is told what
happened so far first; progress events reach a connection at most once per
:data:`PROGRESS_INTERVAL` (the latest one kept) and coalesce for a slow reader."""

from __future__ import annotations

import json
import time
from collections import deque

import h11
import trio

from swarm.control_http import headers, send
from swarm.fetchapi import FetchRequest, jsonable

__all__ = ["MAX_QUEUED_EVENTS", "PROGRESS_INTERVAL", "Job", "Subscriber", "job_key", "stream_job"]

MAX_QUEUED_EVENTS = 256
"""Events waiting for one slow reader; progress events coalesce, so only bursts of others count."""
PROGRESS_INTERVAL = 0.1
"""Seconds between two progress events sent to the clients (a fetch makes one per piece)."""


def job_key(req: FetchRequest) -> tuple:
    """What makes two requests the same fetch. Callers with another environment (offline, token,
    endpoint, ModelExpress) get their own job."""
    return (
        req.repo_id,
        req.revision,
        req.configs_only,
        req.allow_patterns,
        req.ignore_patterns,
        req.expect,
        req.env,
    )


class Subscriber:
    """One waiting connection's queue of events (progress coalesced, bounded)."""

    def __init__(self) -> None:
        self.events: deque[dict] = deque()
        self._wake = trio.Event()

    def put(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress" and self.events and self.events[-1].get("event") == "progress":
            self.events[-1] = event
        else:
            if len(self.events) >= MAX_QUEUED_EVENTS:
                # Drop the oldest informational event; final events are put last and never dropped.
                self.events.popleft()
            self.events.append(event)
        self._wake.set()

    async def get(self) -> dict:
        while not self.events:
            self._wake = trio.Event()
            await self._wake.wait()
        return self.events.popleft()


class Job:
    """One fetch running on the node, watched by any number of connections."""

    REPLAYED = ("source", "attempt", "manifest", "progress", "configs_ready")

    def __init__(self, key: tuple, req: FetchRequest) -> None:
        self.key = key
        self.req = req
        self.subscribers: set[Subscriber] = set()
        self.history: list[dict] = []  # what a late joiner is told first (progress kept last only)
        self.attempts: list[dict] = []
        self.current_source: str | None = None
        self.final: dict | None = None
        self.done = trio.Event()
        self._progress_at = -PROGRESS_INTERVAL  # when a progress event last went out
        self._held: dict | None = None  # the latest progress event not sent yet

    def emit(self, event: dict) -> None:
        if event.get("event") == "progress":
            now = time.monotonic()
            if now - self._progress_at < PROGRESS_INTERVAL:
                self._held = event  # goes out with the next event, or replaced by a newer one
                return
            self._progress_at = now
            self._held = None
        elif self._held is not None:
            held, self._held = self._held, None
            self._publish(held)
        self._publish(event)

    def _publish(self, event: dict) -> None:
        try:
            event = jsonable(dict(event))
        except Exception:  # an odd event must not break the fetch
            return
        kind = event.get("event")
        if kind == "source":
            self.current_source = event.get("source")
        elif kind == "attempt":
            self.attempts.append({k: event.get(k) for k in ("source", "outcome", "reason")})
        if kind in self.REPLAYED:
            if kind == "progress" and self.history and self.history[-1].get("event") == "progress":
                self.history[-1] = event
            elif len(self.history) < MAX_QUEUED_EVENTS:
                self.history.append(event)
        for s in self.subscribers:
            s.put(event)

    def subscribe(self) -> Subscriber:
        s = Subscriber()
        for e in self.history:
            s.put(e)
        if self.final is not None:
            s.put(self.final)
        else:
            self.subscribers.add(s)
        return s

    def finish(self, final: dict) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._publish(held)
        self.final = final
        for s in self.subscribers:
            s.put(final)
        self.subscribers.clear()
        self.done.set()

    def timeout_event(self, timeout: float) -> dict:
        attempts = list(self.attempts)
        if self.current_source is not None:
            attempts.append(
                {
                    "source": self.current_source,
                    "outcome": "failed",
                    "reason": f"still running after {timeout:g} s (the node goes on with it)",
                }
            )
        lines = [f"cannot fetch {self.req.repo_id}@{self.req.ref}: timed out after {timeout:g} s"]
        lines += [f"  {a['source']}: {a['outcome']}: {a['reason']}" for a in attempts]
        return {"event": "error", "type": "FetchTimeout", "message": "\n".join(lines), "attempts": attempts}


async def stream_job(
    stream: trio.SocketStream, conn: h11.Connection, job: Job, timeout: float | None
) -> None:
    """Answer one ``POST /v1/fetch``: ``job``'s events as NDJSON until its result or error, or a
    timeout error after ``timeout`` seconds (the job goes on for others)."""
    sub = job.subscribe()
    try:
        await send(stream, conn, h11.Response(status_code=200, headers=headers("application/x-ndjson")))
        deadline = trio.current_time() + timeout if timeout is not None else float("inf")
        while True:
            event = None
            with trio.move_on_at(deadline):
                event = await sub.get()
            if event is None:
                event = job.timeout_event(timeout or 0.0)
            await send(stream, conn, h11.Data(data=(json.dumps(event) + "\n").encode()))
            if event.get("event") in ("result", "error"):
                break
        await send(stream, conn, h11.EndOfMessage())
    finally:
        job.subscribers.discard(sub)
