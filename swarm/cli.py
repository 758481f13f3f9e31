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
import os
import sys
from typing import Any

from swarm.cli_parser import build_parser
from swarm.cli_queries import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    _fail,
    _leaf,
    _one_line,
    cmd_limits,
    cmd_models,
    cmd_peers,
    cmd_rm,
    cmd_status,
    format_cache,
    format_status,
)

__all__ = ["build_parser", "format_cache", "format_status", "main", "run_settings"]


def _log() -> Any:
    """This module's logger (logging loads only for commands that log: ``run``, ``dynamo-watch``)."""
    import logging

    return logging.getLogger("swarm.cli")


# --- run ---------------------------------------------------------------------------------------


def _setup_logging(level: int | None = None, fmt: str = "text") -> None:
    import logging

    from swarm.logfmt import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=logging.INFO if level is None else level, handlers=[handler])


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
                _log().warning("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(EXIT_INTERRUPTED)
            running["stopping"] = True
            _log().info("%s: shutting down (draining up to %g s)", signal.Signals(signum).name, drain_timeout)
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
                    from swarm.node import Node, NodeConfig

                    quiet_libp2p_logs()
                    node = Node(NodeConfig.from_settings(settings))
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
                        _log().info(
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
    _log().info("swarm-node stopped")


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
    import logging

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
        _log().debug("node failed", exc_info=True)
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


def cmd_fetch(args: argparse.Namespace) -> int:
    from swarm import client

    try:
        home = client.resolve_home(args.home, cli_config=args.config)  # swarm.config only if needed
    except Exception as e:
        from swarm.config import ConfigError

        if not isinstance(e, ConfigError):
            raise
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
            from swarm.fetchapi import result_json

            answer = result_json(
                client.fetch_card_result(
                    args.card,
                    weights=args.weights,
                    cache_dir=args.cache_dir,
                    local_dir=args.local_dir,
                    mdc_cache=args.mdc_cache or False,
                    timeout=args.timeout,
                    home=home,
                )
            )
        else:
            answer = client.fetch_answer(
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
        from swarm.fetchapi import FetchError, error_json

        leaf = _leaf(e)
        if args.json:
            told = error_json(leaf)  # the node's error event, named by its own class here
            answer = {"error": type(leaf).__name__, "message": told["message"], "attempts": told["attempts"]}
            print(json.dumps(answer), flush=True)
        code = (
            EXIT_USAGE if isinstance(leaf, ValueError) and not isinstance(leaf, FetchError) else EXIT_FAILURE
        )
        return _fail(_one_line(leaf), code)
    # The result as swarm.fetchapi.result_json gives it (through a running node, attrs never loads).
    print(json.dumps(answer) if args.json else answer["path"], flush=True)
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


# --- main --------------------------------------------------------------------------------------

COMMANDS = {
    "run": cmd_run,
    "fetch": cmd_fetch,
    "dynamo-watch": cmd_dynamo_watch,
    "status": cmd_status,
    "models": cmd_models,
    "rm": cmd_rm,
    "peers": cmd_peers,
    "limits": cmd_limits,
    "demo": cmd_demo,
    "keygen": cmd_keygen,
}
"""What each subcommand of :func:`swarm.cli_parser.build_parser` runs."""


QUICK_EXIT = frozenset({"fetch", "status", "models", "rm", "peers", "limits"})
"""Commands whose process ends with ``os._exit`` once its output is flushed (see :func:`main`)."""


def _quick_exit(code: int | None) -> None:
    """End this process now, skipping the interpreter's teardown (freeing every module and object:
    25-80 ms, a third of what ``swarm-node fetch`` added to the fetch it asked for; issue #12 item
    5). Only when no node ran in this process (a fetch or query through a running node, or a
    ``models`` / ``rm`` on the cache itself): nothing of a node (libp2p, trio threads, open store
    files) lives here then; stdout / stderr are flushed first. Returns (the caller exits the usual
    way) when an embedded node ran, or for an exit code ``sys.exit`` would print."""
    if code is None:
        code = 0  # as sys.exit(None)
    if not isinstance(code, int) or any(m in sys.modules for m in ("swarm.node", "trio")):
        return  # an embedded node ran here: leave the teardown to Python
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``swarm-node``. Called with no ``argv`` as the process itself (the ``swarm-node`` script,
    ``python -m swarm.cli``): a query or a fetch through a running node then ends the process
    without the interpreter's teardown (:func:`_quick_exit`)."""
    process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    # A command line naming a subcommand first gets a parser of that one only (a quicker start).
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return EXIT_FAILURE
    if process and args.command in QUICK_EXIT:
        _quick_exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
