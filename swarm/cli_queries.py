"""The query commands of ``swarm-node`` (``status``, ``models``, ``rm``, ``peers``, ``limits``):
they ask a running node over the control socket (``models`` / ``rm`` work on the cache directly
when none runs) and print JSON or text. Also the exit codes and one-line errors every command
shares. ``run``, ``fetch``, ``demo`` and ``keygen`` are in :mod:`swarm.cli`, which dispatches."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _one_line(exc: BaseException) -> str:
    """An exception as one line (multi-line messages, e.g. a fetch's attempts, joined by '; ')."""
    exc = _leaf(exc)
    text = str(exc).strip() or type(exc).__name__
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


# --- status ------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(st: dict) -> str:
    lines = [
        f"peer id:    {st.get('peer_id')}",
        f"home:       {st.get('home')}",
        f"cache dir:  {st.get('cache_dir')}",
    ]
    addrs = st.get("addrs") or []
    lines.append("listening:  " + (addrs[0] if addrs else "-"))
    lines += [f"            {a}" for a in addrs[1:]]
    peers = st.get("peers") or []
    if st.get("lane"):
        lines.append(f"data lane:  {st['lane']}")
    if st.get("limits"):
        lines.append(f"limits:     {format_limits(st['limits'])}")
    lines.append(f"peers:      {len(peers)} connected")
    lines += [f"            {p}" for p in peers]
    lines.append(f"bytes:      {_size(st.get('bytes_up'))} up, {_size(st.get('bytes_down'))} down")
    models = st.get("models") or []
    lines.append(f"models:     {len(models)}")
    for m in models:
        state = (
            "complete" if m.get("complete") else f"{_size(m.get('have_bytes'))} of {_size(m.get('bytes'))}"
        )
        lines.append(
            f"  {m.get('model')}@{str(m.get('revision'))[:12]}  {state}  "
            f"up {_size(m.get('bytes_up'))}  down {_size(m.get('bytes_down'))}  "
            f"{len(m.get('peers') or [])} peer(s)"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from swarm import client
    from swarm.config import ConfigError, resolve_home

    try:
        home = resolve_home(args.home, cli_config=args.config)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        st = client.status(home)
    except client.NodeUnavailable as e:
        return _fail(str(e))
    print(json.dumps(st, indent=2) if args.json else format_status(st), flush=True)
    return 0


# --- cache: models, rm, peers -------------------------------------------------------------------


def _offline_store(args: argparse.Namespace) -> Any:
    """The cache ``models`` / ``rm`` work on when no node runs: ``--cache-dir``, else the
    ``cache_dir`` of the config (file or SWARM_CACHE_DIR), else the HF default."""
    from swarm.config import default_cache_dir, resolve_run
    from swarm.store import Store

    if args.cache_dir:
        return Store(args.cache_dir), None
    settings = resolve_run(config=args.config)
    return Store(settings.cache_dir or default_cache_dir()), settings.max_cache_size


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def format_cache(report: dict, *, node: bool = True) -> str:
    import time

    limit = report.get("max_bytes")
    lines = [
        f"cache:      {report.get('cache_dir')}",
        f"size:       {_size(report.get('bytes'))} of "
        f"{_size(limit) if limit is not None else 'unbounded'}"
        f" ({_size(report.get('incomplete_bytes'))} in partial downloads)",
    ]
    if not node:
        lines.append("node:       none running (served and seeded are not known)")
    snaps = report.get("snapshots") or []
    lines.append(f"snapshots:  {len(snaps)}")
    now = time.time()
    for s in snaps:
        state = []
        if s.get("served"):
            state.append("served")
        elif s.get("seeded"):
            state.append("seeded")
        if s.get("in_use"):
            state.append(f"in use ({s['in_use']})")
        if not s.get("fetched"):
            state.append("not fetched by swarm (never evicted)")
        elif s.get("evictable"):
            state.append("evictable")
        refs = f" [{', '.join(s['refs'])}]" if s.get("refs") else ""
        lines.append(
            f"  {s.get('model')}@{str(s.get('revision'))[:12]}{refs}  "
            f"{_size(s.get('bytes'))} ({_size(s.get('unique_bytes'))} own)  "
            f"{s.get('files')} file(s)  used {_age(now - float(s.get('last_access') or 0))}"
            f"  {', '.join(state)}"
        )
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from swarm import client
    from swarm.config import ConfigError, resolve_home

    try:
        home = resolve_home(args.home, cli_config=args.config)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    node = True
    try:
        report = client.cache(home) if not args.cache_dir else None
    except client.NodeUnavailable:
        report = None
    if report is None:
        from swarm import cache_admin

        node = False
        try:
            store, limit = _offline_store(args)
            report = cache_admin.report(store, limit=limit)
        except (ConfigError, OSError, ValueError) as e:
            return _fail(_one_line(e), EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILURE)
    report["node"] = node
    print(json.dumps(report, indent=2) if args.json else format_cache(report, node=node), flush=True)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from swarm import cache_admin, client
    from swarm.config import ConfigError, resolve_home

    try:
        home = resolve_home(args.home, cli_config=args.config)
        model, revision = cache_admin.parse_target(args.target)
    except (ConfigError, ValueError) as e:
        return _fail(_one_line(e), EXIT_USAGE)
    try:
        if args.cache_dir:
            raise client.NodeUnavailable("--cache-dir: working on the cache directly")
        removed = client.remove(args.target, force=args.force, home=home)
    except client.CacheRefusal as e:
        return _fail(str(e))
    except client.NodeUnavailable:
        try:
            store, _limit = _offline_store(args)
            removed = [
                {"model": r.model, "revision": r.revision, "bytes": r.bytes}
                for r in cache_admin.remove(store, model, revision, force=args.force)
            ]
        except (cache_admin.NotCached, cache_admin.Refused) as e:
            return _fail(str(e))
        except (ConfigError, OSError, ValueError) as e:
            return _fail(_one_line(e), EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILURE)
    if args.json:
        print(json.dumps({"removed": removed}, indent=2), flush=True)
    else:
        for r in removed:
            print(f"removed {r['model']}@{r['revision']} ({_size(r['bytes'])} freed)", flush=True)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from swarm import client
    from swarm.config import ConfigError, resolve_home

    try:
        home = resolve_home(args.home, cli_config=args.config)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        peers = client.peers(home)
    except client.NodeUnavailable as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps({"peers": peers}, indent=2), flush=True)
    else:
        print(f"{len(peers)} connected", flush=True)
        for p in peers:
            print(f"  {p}", flush=True)


# --- limits ------------------------------------------------------------------------------------


def format_limits(limits: dict) -> str:
    from swarm.config import format_rate

    return (
        f"upload {format_rate(limits.get('upload'))}, "
        f"download {format_rate(limits.get('download'))}, "
        f"per-peer upload {format_rate(limits.get('peer_upload'))}"
    )


def cmd_limits(args: argparse.Namespace) -> int:
    from swarm import client
    from swarm.config import ConfigError, parse_rate, resolve_home

    changes = {}
    try:
        home = resolve_home(args.home, cli_config=args.config)
        for key, flag in (
            ("upload", "--upload"),
            ("download", "--download"),
            ("peer_upload", "--peer-upload"),
        ):
            value = getattr(args, key)
            if value is not None:
                changes[key] = parse_rate(value, flag)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    try:
        limits = client.limits(home, **changes)
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    except client.NodeUnavailable as e:
        return _fail(str(e))
    print(json.dumps(limits) if args.json else format_limits(limits), flush=True)
    return 0
