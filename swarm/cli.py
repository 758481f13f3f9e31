"""``swarm-node``: run a node, fetch through it, ask its status, or run the local demo swarm.

    swarm-node run [--home DIR] [--listen MA]... [--bootstrap MA/p2p/ID]... [--serve ORG/NAME=DIR]...
                   [--cache-dir DIR] [--[no-]serve-hf-cache] [--config FILE] [--psk KEY|FILE]
                   [--trust open|trusted-publishers] [--trusted-publisher PEER_ID]...
                   [--lane encrypted|plaintext|off] [--no-direct-io]
    swarm-node fetch ORG/NAME [--revision R] [--configs-only] [--include GLOB]... [--exclude GLOB]...
                   [--cache-dir DIR] [--local-dir DIR] [--timeout S] [--json] [--home DIR]
    swarm-node status [--json] [--home DIR]
    swarm-node models [--json] [--home DIR] [--cache-dir DIR]
    swarm-node rm ORG/NAME[@REV] [--force] [--json] [--home DIR] [--cache-dir DIR]
    swarm-node peers [--json] [--home DIR]
    swarm-node demo [--size-mb 300] [--frontends 3] [--timeout 300] [--lane MODE]
    swarm-node keygen [--out FILE]

Every failure prints one line ``error: ...`` on stderr and exits non-zero (1; 2 for bad usage or
configuration; 130 when interrupted). ``fetch`` and ``status`` never import libp2p when a node runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import swarm

__all__ = ["build_parser", "format_cache", "format_status", "main", "run_settings"]

log = logging.getLogger("swarm.cli")

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


# --- run ---------------------------------------------------------------------------------------


def _setup_logging(level: int = logging.INFO, fmt: str = "text") -> None:
    from swarm.logfmt import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


async def _watch_signals(receiver: Any, scope: Any, running: dict, drain_timeout: float) -> None:
    """The first SIGINT/SIGTERM drains the node (``Node.drain``) and then stops it; a second one
    exits at once."""
    import signal

    import trio

    async def drain_then_stop() -> None:
        node = running.get("node")
        if node is not None and drain_timeout > 0:
            with trio.move_on_after(drain_timeout + 1):
                await node.drain(drain_timeout)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        async for signum in receiver:
            if running.get("stopping"):
                log.warning("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(EXIT_INTERRUPTED)
            running["stopping"] = True
            log.info("%s: shutting down (draining up to %g s)", signal.Signals(signum).name, drain_timeout)
            nursery.start_soon(drain_then_stop)


async def _run_node(settings: Any, modelexpress_url: str | None, watch: Any = None) -> None:
    import signal

    import trio

    from swarm.control import ControlServer

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        async with trio.open_nursery() as outer:
            work = trio.CancelScope()
            running: dict = {}
            outer.start_soon(_watch_signals, receiver, work, running, settings.drain_timeout)
            with work:
                async with trio.open_nursery() as nursery:
                    server = ControlServer(settings.home, modelexpress_url=modelexpress_url)
                    await nursery.start(server.run)  # up first: fetches wait while we start
                    from swarm.net import quiet_libp2p_logs
                    from swarm.node import Node

                    quiet_libp2p_logs()
                    node = Node(settings.node_config())
                    async with node.running():
                        st = node.status()
                        if not st["addrs"]:
                            raise RuntimeError(
                                f"not listening on any address (check --listen: {', '.join(settings.listen)})"
                            )
                        server.attach(node)
                        running["node"] = node
                        if settings.metrics_listen:
                            await nursery.start(server.serve_metrics, settings.metrics_listen)
                        if watch is not None:  # Dynamo's discovery (swarm.dynamo.watch)
                            from swarm.dynamo.watch import Watcher

                            await nursery.start(Watcher(node, watch).run)
                        log.info(
                            "swarm-node %s ready; listening on %s; serving %d model(s); "
                            "control socket %s; trust %s%s; lane %s%s",
                            node.peer_id,
                            ", ".join(st["addrs"]),
                            len(st["models"]),
                            server.path,
                            settings.trust,
                            f" ({len(settings.trusted_publishers)} publisher(s))"
                            if settings.trusted_publishers
                            else "",
                            settings.lane,
                            "; private swarm (psk)" if settings.psk else "",
                        )
                        await trio.sleep_forever()
            outer.cancel_scope.cancel()
    log.info("swarm-node stopped")


def run_settings(args: argparse.Namespace) -> Any:
    """``swarm.config.RunSettings`` from parsed ``run`` arguments (> SWARM_* > --config > the
    defaults). Raises ConfigError."""
    from swarm.config import OPTIONS, resolve_run

    return resolve_run(config=args.config, **{o.key: getattr(args, o.key) for o in OPTIONS})


def _watch_config(args: argparse.Namespace) -> Any:
    """What to do with Dynamo's discovery: ``dynamo-watch`` prefetches every card; a plain ``run``
    with Dynamo's file discovery in its environment (DYN_FILE_KV) serves the cards of models this
    host has (a worker host needs nothing else); otherwise None."""
    kv = getattr(args, "kv", None)
    etcd = getattr(args, "etcd", None)
    if not (kv or etcd):
        kv = os.environ.get("DYN_FILE_KV")
        etcd = None if kv else os.environ.get("ETCD_ENDPOINTS")
    if not (kv or etcd):
        return None
    from pathlib import Path

    from swarm.dynamo.watch import WatchConfig

    prefetch = args.command == "dynamo-watch"
    mdc = getattr(args, "mdc_cache", None)
    return WatchConfig(
        Path(kv).expanduser() if kv else None,
        tuple(e.strip() for e in (etcd or "").split(",") if e.strip()),
        prefetch=prefetch,
        weights=prefetch and bool(getattr(args, "weights", False)),
        mdc_root=Path(mdc).expanduser() if mdc else None,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from swarm.config import ConfigError

    try:
        settings = run_settings(args)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    _setup_logging(logging.DEBUG if args.verbose else logging.INFO, settings.log_format)
    import trio

    from swarm.home import HomeBusy, HomeLock

    try:
        lock = HomeLock(settings.home).acquire()
    except HomeBusy as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot use home {settings.home}: {e}")
    try:
        trio.run(_run_node, settings, os.environ.get("MODEL_EXPRESS_URL") or None, _watch_config(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as e:  # one line for anything that stops the node
        leaf = _leaf(e)
        if isinstance(leaf, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        log.debug("node failed", exc_info=True)
        return _fail(_one_line(leaf))
    finally:
        lock.release()
    return 0


def cmd_dynamo_watch(args: argparse.Namespace) -> int:
    if args.kv and args.etcd:
        return _fail("--kv or --etcd, not both", EXIT_USAGE)
    if not (args.kv or args.etcd or os.environ.get("DYN_FILE_KV") or os.environ.get("ETCD_ENDPOINTS")):
        return _fail(
            "dynamo-watch needs Dynamo's discovery: --kv DIR (or DYN_FILE_KV) or --etcd "
            "URL[,URL...] (or ETCD_ENDPOINTS)",
            EXIT_USAGE,
        )
    return cmd_run(args)


# --- fetch -------------------------------------------------------------------------------------


def _result_json(result: Any) -> dict:
    return {
        "path": str(result.path),
        "source": result.source,
        "revision": result.revision,
        "attempts": [{"source": a.source, "outcome": a.outcome, "reason": a.reason} for a in result.attempts],
    }


def cmd_fetch(args: argparse.Namespace) -> int:
    from swarm import client
    from swarm.config import ConfigError, resolve_home

    try:
        home = resolve_home(args.home, cli_config=args.config)
    except ConfigError as e:
        return _fail(str(e), EXIT_USAGE)
    if (args.card is None) == (args.repo_id is None):
        return _fail("give either ORG/NAME or --card CARD.json", EXIT_USAGE)
    try:
        if args.card is not None:
            if args.revision or args.configs_only or args.include or args.exclude:
                return _fail(
                    "--card fetches the card's files: no --revision, --configs-only, --include or --exclude",
                    EXIT_USAGE,
                )
            result = client.fetch_card_result(
                args.card,
                weights=args.weights,
                cache_dir=args.cache_dir,
                local_dir=args.local_dir,
                mdc_cache=args.mdc_cache or False,
                timeout=args.timeout,
                home=home,
            )
        else:
            result = client.fetch_result(
                args.repo_id,
                args.revision,
                allow_patterns=args.include or None,
                ignore_patterns=args.exclude or None,
                configs_only=args.configs_only,
                cache_dir=args.cache_dir,
                local_dir=args.local_dir,
                timeout=args.timeout,
                home=home,
            )
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:
        from swarm.sources import FetchError

        leaf = _leaf(e)
        if args.json:
            print(
                json.dumps(
                    {
                        "error": type(leaf).__name__,
                        "message": str(leaf),
                        "attempts": [
                            {"source": a.source, "outcome": a.outcome, "reason": a.reason}
                            for a in getattr(leaf, "attempts", ())
                        ],
                    }
                ),
                flush=True,
            )
        code = (
            EXIT_USAGE if isinstance(leaf, ValueError) and not isinstance(leaf, FetchError) else EXIT_FAILURE
        )
        return _fail(_one_line(leaf), code)
    if args.json:
        print(json.dumps(_result_json(result)), flush=True)
    else:
        print(result.path, flush=True)
    return 0


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


# --- demo --------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from swarm import demo

    try:
        return demo.run(
            size_mb=args.size_mb,
            frontends=args.frontends,
            timeout=args.timeout,
            keep=args.keep,
            lane=args.lane,
        )
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except demo.DemoError as e:
        return _fail(str(e))


# --- keygen ------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new random swarm key (private network PSK): 64 hex digits on stdout, or a go-style
    ``swarm.key`` file (mode 0600, never overwritten) with ``--out``."""
    import secrets

    key = secrets.token_hex(32)
    if not args.out:
        print(key, flush=True)
        return 0
    text = f"/key/swarm/psk/1.0.0/\n/base16/\n{key}\n"
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _fail(f"{args.out} exists; not overwriting a swarm key")
    except OSError as e:
        return _fail(f"cannot create {args.out}: {e.strerror or e}")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(
        f"wrote a new swarm key to {args.out}; give this file to every node of the swarm "
        f"(swarm-node run --psk {args.out})",
        file=sys.stderr,
        flush=True,
    )
    return 0


# --- parser ------------------------------------------------------------------------------------


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return v


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return v


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        metavar="DIR",
        help="node state directory: identity, piece state, control socket "
        "(env SWARM_HOME; default: the user cache dir)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (env SWARM_CONFIG)")


LANE_HELP = (
    "how piece bytes travel: over a direct TCP data lane set up through the authenticated libp2p "
    "connection, 'encrypted' (AES-256-GCM, the default) or 'plaintext' (piece bytes unencrypted "
    "on the wire: for trusted networks only; used only when both ends are set to plaintext, an "
    "encrypted peer never accepts it; control messages stay encrypted and every piece is still "
    "verified with blake3); or 'off' (libp2p streams only). A link falls back to a libp2p stream "
    "whenever the lane cannot be opened"
)


def _add_lane(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from swarm.config import LANE_MODES

    where = (
        f"default {default}" if default is not None else "env SWARM_LANE, config key lane; default encrypted"
    )
    p.add_argument("--lane", choices=LANE_MODES, default=default, help=f"{LANE_HELP} ({where})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-node", description="Peer-to-peer delivery of ML model files."
    )
    parser.add_argument("--version", action="version", version=f"swarm {swarm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run the long-lived node",
        description="Run the node until SIGINT/SIGTERM. Every option can also be "
        "set as a SWARM_* variable or in the --config TOML file.",
    )
    from swarm.config import add_run_arguments

    add_run_arguments(run)  # every option of the table in swarm/config.py
    run.add_argument("--config", metavar="FILE", help="TOML config file (env SWARM_CONFIG)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_run)

    fetch = sub.add_parser(
        "fetch",
        help="fetch a model; prints its local path",
        description="Fetch through the running node (or an embedded one) and print the snapshot path last.",
    )
    fetch.add_argument("repo_id", metavar="ORG/NAME", nargs="?")
    fetch.add_argument(
        "--card",
        metavar="CARD.json",
        help="fetch exactly the files of a Dynamo ModelDeploymentCard (or its "
        "discovery record), refusing other bytes",
    )
    fetch.add_argument(
        "--weights",
        action="store_true",
        help="with --card: also the weights of the snapshot the card describes",
    )
    fetch.add_argument(
        "--mdc-cache",
        nargs="?",
        const=True,
        metavar="DIR",
        help="with --card: also put the files into Dynamo's metadata cache (default ~/.cache/dynamo/mdc)",
    )
    fetch.add_argument("--revision", metavar="R", help="branch, tag or commit (default main)")
    fetch.add_argument("--configs-only", action="store_true", help="only config and tokenizer files")
    fetch.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only files matching GLOB (repeatable; huggingface_hub allow_patterns)",
    )
    fetch.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="skip files matching GLOB (repeatable; ignore_patterns)",
    )
    fetch.add_argument("--cache-dir", metavar="DIR", help="hub cache to return the snapshot in")
    fetch.add_argument("--local-dir", metavar="DIR", help="also copy the files into DIR")
    fetch.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this")
    fetch.add_argument("--json", action="store_true", help="print {path, source, revision, attempts} as JSON")
    _add_home(fetch)
    fetch.set_defaults(func=cmd_fetch)

    watch = sub.add_parser(
        "dynamo-watch",
        help="run the node and prefetch every model Dynamo registers",
        description="Run the node (all `run` options) and follow Dynamo's file discovery: every "
        "registered ModelDeploymentCard's files are fetched through the swarm, checked "
        "against the card and put into Dynamo's metadata cache; models this host has "
        "are served. See docs/dynamo.md.",
    )
    for action in run._actions:
        if action.dest != "help":
            watch._add_action(action)
    watch.add_argument(
        "--kv", metavar="DIR", help="Dynamo's file discovery directory (default: env DYN_FILE_KV)"
    )
    watch.add_argument(
        "--etcd", metavar="URL[,URL...]", help="Dynamo's etcd discovery instead (default: env ETCD_ENDPOINTS)"
    )
    watch.add_argument(
        "--weights", action="store_true", help="also fetch the weights (a host where workers will start)"
    )
    watch.add_argument(
        "--mdc-cache", metavar="DIR", help="Dynamo's metadata cache (default ~/.cache/dynamo/mdc)"
    )
    watch.set_defaults(func=cmd_dynamo_watch)

    status = sub.add_parser("status", help="the running node's peer id, addresses, peers, models")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_home(status)
    status.set_defaults(func=cmd_status)

    models = sub.add_parser(
        "models",
        help="what the HF cache holds: size, last use, served, in use, evictable",
        description="List the snapshots of the HF cache, from the running node (or, with none, "
        "from the cache itself).",
    )
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument(
        "--cache-dir", metavar="DIR", help="read this cache directly instead of asking the node"
    )
    _add_home(models)
    models.set_defaults(func=cmd_models)

    rm = sub.add_parser(
        "rm",
        help="remove a model (or one revision) from the HF cache",
        description="Remove ORG/NAME (every revision) or ORG/NAME@REVISION: the snapshot, the "
        "refs naming it, and the blobs no other snapshot links. Refused while a "
        "download of the model runs, and (unless --force) while the snapshot is in "
        "use (handed to a caller in the last 10 minutes).",
    )
    rm.add_argument("target", metavar="ORG/NAME[@REV]")
    rm.add_argument(
        "--force",
        action="store_true",
        help="remove even if recently handed to a caller (never during a download)",
    )
    rm.add_argument("--json", action="store_true", help="machine-readable output")
    rm.add_argument(
        "--cache-dir", metavar="DIR", help="work on this cache directly instead of through the node"
    )
    _add_home(rm)
    rm.set_defaults(func=cmd_rm)

    peers = sub.add_parser("peers", help="the running node's connected peers")
    peers.add_argument("--json", action="store_true", help="machine-readable output")
    _add_home(peers)
    peers.set_defaults(func=cmd_peers)
    limits = sub.add_parser(
        "limits",
        help="show or change the running node's bandwidth limits",
        description="Show the running node's bandwidth limits, or change them at once for every "
        "transfer (not saved: a restart takes the configured max_*_rate options). "
        "RATE: bytes per second with a decimal SI prefix (k, M, G, T = 10^3n; Ki, "
        "Mi, Gi = 2^10n) and unit B (bytes, the default) or bit: 20M = 20MB/s = "
        "160Mbit/s; 0 or none = unlimited.",
    )
    limits.add_argument("--upload", metavar="RATE", help="all uploads together")
    limits.add_argument("--download", metavar="RATE", help="all downloads together")
    limits.add_argument("--peer-upload", dest="peer_upload", metavar="RATE", help="uploads to any one peer")
    limits.add_argument("--json", action="store_true", help="machine-readable output")
    _add_home(limits)
    limits.set_defaults(func=cmd_limits)

    demo = sub.add_parser(
        "demo",
        help="a local swarm on 127.0.0.1: one worker, N frontends",
        description="Start one worker serving a generated model and N frontends "
        "that fetch it concurrently; print times and bytes.",
    )
    demo.add_argument("--size-mb", type=_positive_int, default=300, help="weights size (MB)")
    demo.add_argument("--frontends", type=_positive_int, default=3, help="number of frontends")
    demo.add_argument("--timeout", type=_positive, default=300.0, help="give up after this many seconds")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    _add_lane(demo, default="encrypted")
    demo.set_defaults(func=cmd_demo)

    keygen = sub.add_parser(
        "keygen",
        help="print a new random swarm key (private network PSK)",
        description="Print a new random 32-byte swarm key as 64 hex digits, or "
        "write it as a go-style swarm.key file (mode 0600).",
    )
    keygen.add_argument("--out", metavar="FILE", help="write a swarm.key file (never overwritten)")
    keygen.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
