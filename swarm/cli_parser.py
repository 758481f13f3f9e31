"""The ``swarm-node`` command line: every subcommand, its options and their help, built by one
function (:func:`build_parser`); ``swarm.cli`` runs what it parses (``args.command``).

The options of ``run`` (and ``dynamo-watch``) come from the one table in ``swarm.config``
(``add_run_arguments``: flags, ``SWARM_*`` variables, TOML keys and docs/configuration.md); the
others are here.
"""

from __future__ import annotations

import argparse

import swarm

__all__ = ["LANE_HELP", "build_parser"]


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``swarm-node`` parser; with ``command``, one that knows only that subcommand (what
    ``swarm.cli.main`` builds for a command line naming one: the others cost ~50 ms to build,
    much of a short command's start), else every subcommand."""

    def want(name: str) -> bool:
        # dynamo-watch takes every option of run
        return command is None or name == command or (name == "run" and command == "dynamo-watch")

    parser = argparse.ArgumentParser(
        prog="swarm-node", description="Peer-to-peer delivery of ML model files."
    )
    parser.add_argument("--version", action="version", version=f"swarm {swarm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    if want("run"):
        run = sub.add_parser(
            "run",
            help="run the long-lived node",
            description="Run the node until SIGINT/SIGTERM. Every option can also be "
            "set as a SWARM_* variable or in the --config TOML file.",
        )
        from swarm.config import add_run_arguments

        add_run_arguments(run)  # every option of the table in swarm/config/options.py
        run.add_argument("--config", metavar="FILE", help="TOML config file (env SWARM_CONFIG)")
        run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    if want("fetch"):
        fetch = sub.add_parser(
            "fetch",
            help="fetch a model; prints its local path",
            description="Fetch through the running node (or an embedded one) and print the "
            "snapshot path last.",
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
        fetch.add_argument(
            "--json", action="store_true", help="print {path, source, revision, attempts} as JSON"
        )
        _add_home(fetch)

    if want("dynamo-watch"):
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
            "--etcd",
            metavar="URL[,URL...]",
            help="Dynamo's etcd discovery instead (default: env ETCD_ENDPOINTS)",
        )
        watch.add_argument(
            "--weights", action="store_true", help="also fetch the weights (a host where workers will start)"
        )
        watch.add_argument(
            "--mdc-cache", metavar="DIR", help="Dynamo's metadata cache (default ~/.cache/dynamo/mdc)"
        )

    if want("status"):
        status = sub.add_parser("status", help="the running node's peer id, addresses, peers, models")
        status.add_argument("--json", action="store_true", help="machine-readable output")
        _add_home(status)

    if want("models"):
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

    if want("rm"):
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

    if want("peers"):
        peers = sub.add_parser("peers", help="the running node's connected peers")
        peers.add_argument("--json", action="store_true", help="machine-readable output")
        _add_home(peers)
    if want("limits"):
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
        limits.add_argument(
            "--peer-upload", dest="peer_upload", metavar="RATE", help="uploads to any one peer"
        )
        limits.add_argument("--json", action="store_true", help="machine-readable output")
        _add_home(limits)

    if want("demo"):
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

    if want("keygen"):
        keygen = sub.add_parser(
            "keygen",
            help="print a new random swarm key (private network PSK)",
            description="Print a new random 32-byte swarm key as 64 hex digits, or "
            "write it as a go-style swarm.key file (mode 0600).",
        )
        keygen.add_argument("--out", metavar="FILE", help="write a swarm.key file (never overwritten)")
    return parser
