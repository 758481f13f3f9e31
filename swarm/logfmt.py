"""Log formats of ``swarm-node run``: ``text`` for people, ``json`` (one object per line) for log
pipelines.

A log call that marks an event passes its fields as ``extra={"event": "fetch_end", ...}``; the
JSON format writes them as top-level keys next to ``ts``, ``level``, ``logger`` and ``msg``, so
``jq 'select(.event == "ban")'`` finds every ban. Events used by the node:

| event | fields |
|---|---|
| ``fetch_start`` | ``model``, ``revision`` |
| ``fetch_end`` | ``model``, ``source``, ``result``, ``duration_s`` (and ``error`` on failure) |
| ``ban`` | ``model``, ``peer``, ``reason`` |
| ``lane_fallback`` | ``peer``, ``reason`` |
| ``evict`` | ``model``, ``revision``, ``bytes`` (freed: a snapshot removed under ``--max-cache-size``) |
| ``rm`` | ``model``, ``revision``, ``bytes`` (freed: a snapshot removed by ``swarm-node rm``) |
| ``gc_incomplete`` | ``model``, ``bytes`` (an abandoned ``.incomplete`` file collected) |
| ``gc_orphan`` | ``model``, ``bytes`` (a blob no snapshot links, abandoned, collected) |
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["EVENT_FIELDS", "LOG_FORMATS", "TEXT_FORMAT", "JsonFormatter", "formatter"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVENT_FIELDS = (
    "event",
    "model",
    "revision",
    "source",
    "result",
    "duration_s",
    "error",
    "peer",
    "reason",
    "bytes",
)
"""Keys a log call may pass in ``extra`` to appear in the JSON line (others are not records')."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
