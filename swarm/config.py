"""Option resolution for ``swarm-node`` and ``swarm.fetch``: one declarative table, ``OPTIONS``.

Each entry of ``OPTIONS`` is one setting of ``swarm-node run``. From it come the command-line flag
(``--listen``), the environment variable (``SWARM_LISTEN``), the TOML key (``listen``), the
attribute of ``RunSettings``, the ``run --help`` text and the configuration reference in
``docs/configuration.md`` (``reference_markdown``; a test keeps the file in step). A value comes,
in this order of precedence, from

1. the command line,
2. a ``SWARM_*`` environment variable (an empty one counts as unset),
3. a TOML config file (``--config FILE`` or ``SWARM_CONFIG``; relative paths are relative to the
   file's directory; any key not in the table is an error naming it),
4. the default.

A list option (``listen``, ``bootstrap``, ``serve``, ``trusted_publishers``) is taken whole from
the first place that sets it; lists from different places are not merged. In variables, lists are
comma-separated. A switch (``serve_hf_cache``, ``direct_io``) has ``--x`` and ``--no-x`` flags and
``SWARM_X`` / ``SWARM_NO_X`` variables (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/
``off``).

What a node serves: its ``serve`` directories and what it fetched through the swarm, always; the
complete snapshots of the local HF cache, and what it fetches from the Hub or ModelExpress (which
may be gated or private repos pulled with ``HF_TOKEN``), only with ``serve_hf_cache``. That switch
defaults to on with a private swarm key (``psk``: only nodes holding the key can connect) and to
off without one (anyone who reaches the port could fetch any such snapshot by name); turn it on
without a key deliberately with ``--serve-hf-cache`` (``SWARM_SERVE_HF_CACHE=1``,
``serve_hf_cache = true``).

This module is imported by the client path (``swarm.fetch``): it imports only the standard library
and ``platformdirs``.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LANE_MODES",
    "LOG_FORMATS",
    "OPTIONS",
    "SOCKET_NAME",
    "TRUST_POLICIES",
    "ConfigError",
    "Option",
    "RunSettings",
    "add_run_arguments",
    "check_lane",
    "check_publisher_id",
    "default_cache_dir",
    "default_home",
    "format_rate",
    "load_toml",
    "parse_psk_option",
    "parse_rate",
    "parse_serve",
    "parse_size",
    "reference_markdown",
    "resolve_home",
    "resolve_run",
    "socket_path",
]

SOCKET_NAME = "control.sock"
"""The control socket's file name inside the home directory."""

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
"""``run`` listens on every interface, on a port the OS picks, unless told otherwise."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

TRUST_POLICIES = ("open", "trusted-publishers")
"""Same as ``swarm.trust.POLICIES`` (not imported: this module stays light for the client path)."""

LANE_MODES = ("encrypted", "plaintext", "off")
"""Same as ``swarm.net.lane.LANE_MODES`` (not imported: that would import libp2p). "plaintext" is
for trusted networks only and is used only when both ends are set to it."""
DEFAULT_LANE = "encrypted"

DEFAULT_DRAIN_TIMEOUT = 10.0
"""Seconds a stopping node waits for promised pieces: a 64 MiB piece takes ~5 s at 100 Mbit/s, and
systemd (TimeoutStopSec=30) and Kubernetes (terminationGracePeriodSeconds: 30) kill later."""

LOG_FORMATS = ("text", "json")
"""Same as ``swarm.logfmt.LOG_FORMATS``."""


class ConfigError(ValueError):
    """An option has an unusable value; the message names the option and where it came from."""


# --- defaults ----------------------------------------------------------------------------------


def default_home() -> Path:
    """The node's state directory when neither ``--home`` nor ``SWARM_HOME`` is given."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("swarm"))


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, found the way ``huggingface_hub`` finds it: ``HF_HUB_CACHE``
    (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def socket_path(home: Path | str) -> Path:
    return Path(home) / SOCKET_NAME


# --- parsing helpers ---------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _parse_bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{where}: expected one of 1/true/yes/on or 0/false/no/off, got {value!r}")


def _check_multiaddr(addr: str, where: str, *, need_peer_id: bool) -> str:
    """A light syntax check (the host parses multiaddrs for real; this module imports no libp2p)."""
    if not isinstance(addr, str) or not addr.startswith("/") or len(addr.split("/")) < 3:
        raise ConfigError(f"{where}: {addr!r} is not a multiaddr (like /ip4/0.0.0.0/tcp/4001)")
    if any(c.isspace() for c in addr):
        raise ConfigError(f"{where}: {addr!r} contains white space")
    parts = addr.split("/")
    if need_peer_id and ("p2p" not in parts or not parts[-1] or parts[-2] != "p2p"):
        raise ConfigError(f"{where}: {addr!r} must end in /p2p/<peer id>")
    return addr


_PSK_HEX = re.compile(r"[0-9a-fA-F]{64}")
_SWARM_KEY = re.compile(r"/key/swarm/psk/1\.0\.0/\s*/base16/\s*([0-9a-fA-F]{64})\s*")
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _psk_text(text: str) -> str | None:
    """64 lowercase hex digits from a bare key or a go-style swarm.key file's text; else None."""
    s = text.strip()
    m = _SWARM_KEY.fullmatch(s)
    if m:
        s = m.group(1)
    return s.lower() if _PSK_HEX.fullmatch(s) else None


def parse_psk_option(value: str, where: str, base: Path | None = None) -> str:
    """A swarm key (private network pre-shared key) as 64 lowercase hex digits, from 64 hex digits,
    the text of a go-style ``swarm.key`` (``/key/swarm/psk/1.0.0/``, ``/base16/``, the key) or the
    path of a file holding either (relative to ``base``, the config file's directory, if given)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a swarm key or the path of a swarm key file")
    key = _psk_text(value)
    if key is not None:
        return key
    path = Path(value.strip()).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{where}: not a 64-hex-digit swarm key, and no file {path}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read swarm key file {path}: {e.strerror or e}") from None
    key = _psk_text(text)
    if key is None:
        raise ConfigError(
            f"{where}: {path} holds no swarm key (expected 64 hex digits or a "
            f"swarm.key file: /key/swarm/psk/1.0.0/, /base16/, 64 hex digits)"
        )
    return key


def _b58decode(s: str) -> bytes | None:
    n = 0
    for c in s:
        i = _B58.find(c)
        if i < 0:
            return None
        n = n * 58 + i
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(s) - len(s.lstrip("1"))) + raw


def check_publisher_id(peer_id: str, where: str) -> str:
    """A trusted publisher: the peer id of an Ed25519 libp2p key (``12D3KooW...``, as ``swarm-node
    status`` prints it); manifests are signed with such keys only."""
    if not isinstance(peer_id, str) or not peer_id.strip():
        raise ConfigError(f"{where}: expected a peer id (12D3KooW...), got {peer_id!r}")
    pid = peer_id.strip()
    raw = _b58decode(pid)
    # identity multihash (0x00, length 36) of a protobuf PublicKey {Type: Ed25519, Data: 32 bytes}
    if raw is None or len(raw) != 38 or raw[:6] != b"\x00\x24\x08\x01\x12\x20":
        raise ConfigError(
            f"{where}: {pid!r} is not the peer id of an Ed25519 libp2p key "
            f"(like 12D3KooW...; see `swarm-node status` on the publisher)"
        )
    return pid


def check_trust(
    mode: str, publishers: Sequence[str], mode_at: str, publishers_at: str
) -> tuple[str, tuple[str, ...]]:
    """The trust policy and its publishers, checked together (``*_at`` name where each came
    from)."""
    if mode not in TRUST_POLICIES:
        raise ConfigError(f"{mode_at}: trust policy must be one of {', '.join(TRUST_POLICIES)}, not {mode!r}")
    if mode == "trusted-publishers" and not publishers:
        raise ConfigError(
            f"{mode_at}: trust policy 'trusted-publishers' needs at least one "
            f"trusted publisher (--trusted-publisher PEER_ID, "
            f"SWARM_TRUSTED_PUBLISHERS or trusted_publishers in the config file)"
        )
    if mode == "open" and publishers:
        raise ConfigError(
            f"{publishers_at}: trusted publishers are listed but the trust policy is 'open' "
            f"(which accepts any manifest): set --trust trusted-publishers "
            f"(SWARM_TRUST, or trust in the config file)"
        )
    return mode, tuple(dict.fromkeys(publishers))


def check_lane(mode: Any, where: str) -> str:
    """A data lane mode: one of LANE_MODES (``where`` names the option and where it came from)."""
    if not isinstance(mode, str) or mode.strip().lower() not in LANE_MODES:
        raise ConfigError(f"{where}: lane mode must be one of {', '.join(LANE_MODES)}, not {mode!r}")
    return mode.strip().lower()


def parse_serve(item: str, where: str = "--serve") -> tuple[str, Path]:
    """``ORG/NAME=DIR`` -> ``("ORG/NAME", Path(DIR))`` (the name is validated, DIR must exist)."""
    model, sep, directory = item.partition("=")
    if not sep or not model.strip() or not directory.strip():
        raise ConfigError(f"{where}: expected ORG/NAME=DIR, got {item!r}")
    return _serve_entry(model.strip(), directory.strip(), where, base=None)


def _serve_entry(model: str, directory: str, where: str, base: Path | None) -> tuple[str, Path]:
    from swarm.manifest import ManifestError, validate_model_name

    try:
        validate_model_name(model)
    except ManifestError as e:
        raise ConfigError(f"{where}: bad model name {model!r}: {e}") from None
    path = Path(directory).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    path = path.absolute()
    if not path.is_dir():
        raise ConfigError(f"{where}: {model}={directory}: {path} is not a directory")
    return model, path


def _toml_serve(value: Any, where: str, base: Path) -> tuple[tuple[str, Path], ...]:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for v in value:
            if not isinstance(v, str) or "=" not in v:
                raise ConfigError(f"{where}: expected ORG/NAME=DIR strings, got {v!r}")
            m, _, d = v.partition("=")
            items.append((m.strip(), d.strip()))
    else:
        raise ConfigError(f'{where}: expected a table of "ORG/NAME" = "DIR"')
    out = []
    for model, directory in items:
        if not isinstance(directory, str) or not directory:
            raise ConfigError(f"{where}: {model}: expected a directory path string")
        out.append(_serve_entry(model, directory, where, base))
    return _unique_serve(out, where)


def _unique_serve(entries: Sequence[tuple[str, Path]], where: str) -> tuple[tuple[str, Path], ...]:
    seen: dict[str, Path] = {}
    for model, path in entries:
        if model in seen and seen[model] != path:
            raise ConfigError(f"{where}: {model} is served from two directories: {seen[model]} and {path}")
        seen[model] = path
    return tuple(seen.items())


def check_hostport(value: Any, where: str) -> str:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6), as a TCP listener takes it."""
    text = value.strip() if isinstance(value, str) else ""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT (like 127.0.0.1:9400), got {value!r}")
    return f"{host}:{int(port)}" if ":" not in host else f"[{host}]:{int(port)}"


# --- bandwidth rates (max_upload_rate, max_download_rate, max_peer_upload_rate) ----------------

MIN_RATE = 10_000.0
"""Bytes/s: the lowest limit taken (0 means unlimited). Below it a 4 MiB piece takes over seven
minutes, longer than any request timeout: a typo, not a limit."""

_RATE_TEXT = re.compile(
    r"(?P<num>\d+(?:\.\d*)?|\.\d+)(?:e(?P<exp>[+-]?\d+))?\s*"
    r"(?P<prefix>[kKmMgGtT]i?)?(?P<unit>[A-Za-z/]*)"
)
_PREFIX = {
    "": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}
_BYTE_UNITS = {"", "B", "B/s", "Bps"}
_BIT_UNITS = {"bit", "bits", "bit/s", "bits/s", "bps"}
_UNLIMITED = {"0", "none", "unlimited", "off"}
RATE_DOC = (
    "bytes per second with an optional decimal SI prefix (k = 1000, M, G, T; binary Ki, "
    "Mi, Gi = 1024^n) and unit (B, B/s: bytes, the default; bit, bit/s, bps: bits): 100M "
    "= 100MB/s = 800Mbit/s; 0 or none = unlimited"
)


def parse_rate(value: Any, where: str) -> float | None:
    """A bandwidth limit in bytes per second, or None for unlimited: a number (bytes/s) or text
    like ``100M``, ``100MB/s``, ``800Mbit/s``, ``1.5G``, ``20MiB/s``; ``0``/``none`` = unlimited.
    Prefixes are decimal SI (``M`` = 10^6; ``Mi`` = 2^20); bits are written ``bit`` (or ``bps``);
    a bare ``b`` is refused as ambiguous."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a rate like 100MB/s, got {value!r}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in _UNLIMITED:
            return None
        m = _RATE_TEXT.fullmatch(text)
        if m is None:
            raise ConfigError(
                f"{where}: expected a rate like 100MB/s, 800Mbit/s or 0 (unlimited), got {value!r}"
            )
        unit = m["unit"]
        if unit in _BYTE_UNITS:
            per_unit = 1.0
        elif unit.lower() in _BIT_UNITS:
            per_unit = 1 / 8
        else:
            raise ConfigError(
                f"{where}: unknown unit {unit!r} in {value!r} (write B or B/s for "
                f"bytes, bit or bit/s for bits)"
            )
        rate = (
            float(m["num"] + (f"e{m['exp']}" if m["exp"] else ""))
            * _PREFIX[(m["prefix"] or "").lower()]
            * per_unit
        )
    else:
        raise ConfigError(f"{where}: expected a rate like 100MB/s, got {value!r}")
    if rate == 0:
        return None
    if not MIN_RATE <= rate < float("inf"):
        raise ConfigError(
            f"{where}: {value!r} is not a usable rate: at least {format_rate(MIN_RATE)}, or 0 for unlimited"
        )
    return rate


def format_rate(rate: float | None) -> str:
    """``20 MB/s``, ``1.5 GB/s`` or ``unlimited`` (decimal units, as ``parse_rate`` reads them)."""
    if not rate:
        return "unlimited"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.4g} {unit}"
    return f"{rate:.4g} B/s"


# --- the option table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting of ``swarm-node run``. ``kind`` decides how its values are read:

    - ``path``: a directory path;
    - ``addrs`` / ``peer_addrs``: multiaddrs (``peer_addrs`` must end in ``/p2p/<peer id>``);
    - ``serve``: ``ORG/NAME=DIR`` entries (a TOML table ``"ORG/NAME" = "DIR"`` in a file);
    - ``switch``: a boolean with ``--x`` / ``--no-x``;
    - ``choice``: one of ``choices``;
    - ``psk``: a swarm key or the path of a key file;
    - ``peer_ids``: publisher peer ids;
    - ``hostport``: a TCP address ``HOST:PORT``;
    - ``seconds``: a number of seconds, 0 or more;
    - ``size``: a number of bytes with a unit (``parse_size``); 0 or ``none`` for unbounded;
    - ``rate``: bytes per second with units (``parse_rate``), 0 or ``none`` for unlimited.
    """

    key: str
    kind: str
    help: str
    default: Any = None
    default_doc: str = "none"
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag: str = ""
    noun: str = ""  # how errors name a bad choice ("lane mode must be one of ...")

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "SWARM_" + self.key.upper()

    @property
    def is_list(self) -> bool:
        return self.kind in _LIST_KINDS


_LIST_KINDS = ("addrs", "peer_addrs", "serve", "peer_ids")

OPTIONS: tuple[Option, ...] = (
    Option(
        "home",
        "path",
        "node state directory: identity, piece state, control socket",
        default_doc="the user cache dir (~/.cache/swarm)",
        metavar="DIR",
    ),
    Option(
        "listen",
        "addrs",
        "address to listen on (repeatable)",
        default=DEFAULT_LISTEN,
        default_doc=DEFAULT_LISTEN[0],
        metavar="MULTIADDR",
    ),
    Option(
        "bootstrap", "peer_addrs", "peer to join through (repeatable)", default=(), metavar="MULTIADDR/p2p/ID"
    ),
    Option(
        "serve", "serve", "serve a private model directory (repeatable)", default=(), metavar="ORG/NAME=DIR"
    ),
    Option(
        "cache_dir",
        "path",
        "where fetched models go, in the Hugging Face hub cache layout",
        default_doc="HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub",
        metavar="DIR",
    ),
    Option(
        "serve_hf_cache",
        "switch",
        "serve the complete snapshots of the local HF cache and "
        "what comes from the Hub or ModelExpress to every peer that can connect",
        default_doc="on with a psk, off without one",
    ),
    Option(
        "psk",
        "psk",
        "private swarm key: 64 hex digits, or a swarm.key file (see "
        "`swarm-node keygen`); nodes without the same key cannot connect",
        metavar="KEY|FILE",
    ),
    Option(
        "trust",
        "choice",
        "which manifests to accept: 'open' (any; a fetch by name takes the "
        "one most providers announce) or 'trusted-publishers' (only those signed by a trusted "
        "publisher)",
        default="open",
        default_doc="open",
        choices=TRUST_POLICIES,
        noun="trust policy",
    ),
    Option(
        "trusted_publishers",
        "peer_ids",
        "peer id whose signed manifests are accepted (repeatable); needs --trust trusted-publishers",
        default=(),
        metavar="PEER_ID",
        flag="--trusted-publisher",
    ),
    Option(
        "lane",
        "choice",
        "how piece bytes travel: over a direct TCP data lane set up through "
        "the authenticated libp2p connection, 'encrypted' (AES-256-GCM) or 'plaintext' (piece "
        "bytes unencrypted on the wire: for trusted networks only; used only when both ends are "
        "set to plaintext, an encrypted peer never accepts it; control messages stay encrypted "
        "and every piece is still verified with blake3); or 'off' (libp2p streams only). A link "
        "falls back to a libp2p stream whenever the lane cannot be opened",
        default=DEFAULT_LANE,
        default_doc=DEFAULT_LANE,
        choices=LANE_MODES,
        noun="lane mode",
    ),
    Option(
        "direct_io",
        "switch",
        "write whole pieces received over the data lane with O_DIRECT (off: through the page cache)",
        default=True,
        default_doc="on",
    ),
    Option(
        "log_format",
        "choice",
        "log lines as text, or as one JSON object per line with event "
        "fields (fetch_start, fetch_end, ban, lane_fallback, evict, rm, gc_incomplete)",
        default="text",
        default_doc="text",
        choices=LOG_FORMATS,
        noun="log format",
    ),
    Option(
        "drain_timeout",
        "seconds",
        "on SIGTERM or SIGINT the node stops announcing and "
        "taking new work, then waits up to this long for pieces peers already asked of it",
        default=DEFAULT_DRAIN_TIMEOUT,
        default_doc=f"{DEFAULT_DRAIN_TIMEOUT:g}",
        metavar="SECONDS",
    ),
    Option(
        "max_cache_size",
        "size",
        "keep the HF cache under this size: after each fetch and "
        "every 10 minutes, snapshots fetched through the swarm that are neither served nor in "
        "use are removed, least recently used first. K/M/G/T are powers of 1000, KiB/MiB/GiB/"
        "TiB powers of 1024; 0 or none: unbounded",
        default=None,
        default_doc="none (unbounded)",
        metavar="SIZE",
    ),
    Option(
        "metrics_listen",
        "hostport",
        "serve Prometheus metrics on this TCP address at "
        "/metrics (they are always on the control socket at /v1/metrics)",
        metavar="HOST:PORT",
    ),
    # Bandwidth limits (swarm/ratelimit.py); changed at run time with `swarm-node limits`.
    Option(
        "max_upload_rate",
        "rate",
        "cap on piece bytes this node sends to all peers together "
        "(data lane and libp2p streams alike); changed at run time with `swarm-node limits`",
        default_doc="unlimited",
        metavar="RATE",
    ),
    Option(
        "max_download_rate",
        "rate",
        "cap on piece bytes this node receives from all peers together (requests are paced to it)",
        default_doc="unlimited",
        metavar="RATE",
    ),
    Option(
        "max_peer_upload_rate",
        "rate",
        "cap on piece bytes this node sends to any one peer",
        default_doc="unlimited",
        metavar="RATE",
    ),
)
_BY_KEY = {o.key: o for o in OPTIONS}
_NODE_KEYS = (
    "home",
    "cache_dir",
    "listen",
    "bootstrap",
    "serve",
    "serve_hf_cache",
    "psk",
    "lane",
    "direct_io",
    "max_cache_size",
    "max_upload_rate",
    "max_download_rate",
    "max_peer_upload_rate",
)
"""Options that go into ``swarm.node.NodeConfig`` as they are (trust is built from two)."""


def _from_text(opt: Option, text: str, where: str) -> Any:
    """One value (one list item for list kinds) from the command line or a variable."""
    if opt.kind == "path":
        return Path(text).expanduser()
    if opt.kind in ("addrs", "peer_addrs"):
        return _check_multiaddr(text, where, need_peer_id=opt.kind == "peer_addrs")
    if opt.kind == "serve":
        return parse_serve(text, where)
    if opt.kind == "switch":
        return _parse_bool(text, where)
    if opt.kind == "choice":
        return _check_choice(opt, text, where)
    if opt.kind == "psk":
        return parse_psk_option(text, where)
    if opt.kind == "peer_ids":
        return check_publisher_id(text, where)
    if opt.kind == "hostport":
        return check_hostport(text, where)
    if opt.kind == "seconds":
        return _seconds(text, where)
    if opt.kind == "size":
        return _size(text, where)
    if opt.kind == "rate":
        return parse_rate(text, where)
    raise AssertionError(opt.kind)


def _seconds(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not 0 <= v < float("inf"):
        raise ConfigError(f"{where}: expected a number of seconds >= 0, got {value!r}")
    return v


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
"""Units of a size, case-insensitive: decimal K/M/G/T (powers of 1000, as disks are sold) and
binary KiB/MiB/GiB/TiB (powers of 1024); a bare number is bytes."""
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_UNBOUNDED = {"", "0", "none", "unbounded"}


def parse_size(value: Any) -> int | None:
    """``"500G"`` -> 500 * 10**9, ``"1.5TiB"`` -> 1.5 * 2**40 bytes (rounded down); ``0``, ``"0"``,
    ``"none"`` or None -> None (unbounded). ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a size is a number of bytes or text like 500G or 1.5TiB, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value or None
    if value.strip().lower() in _UNBOUNDED:
        return None
    m = _SIZE.fullmatch(value)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(
            f"not a size: {value!r} (a number with K, M, G, T (powers of 1000) or "
            "KiB, MiB, GiB, TiB (powers of 1024); 0 or none for unbounded)"
        )
    return int(float(m.group(1)) * SIZE_UNITS[unit]) or None


def _size(value: Any, where: str) -> int | None:
    try:
        return parse_size(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_choice(opt: Option, value: Any, where: str) -> str:
    if opt.key == "lane":
        return check_lane(value, where)
    if not isinstance(value, str) or value.strip() not in opt.choices:
        raise ConfigError(f"{where}: {opt.noun} must be one of {', '.join(opt.choices)}, not {value!r}")
    return value.strip()


def _from_toml(opt: Option, value: Any, where: str, base: Path) -> Any:
    """A file's value, checked and converted (paths relative to the file's directory)."""
    if opt.kind == "path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if opt.kind == "serve":
        return _toml_serve(value, where, base)
    if opt.kind == "switch":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if opt.kind == "psk":
        return parse_psk_option(value, where, base)
    if opt.is_list:
        if isinstance(value, str):
            value = [value]
        what = "peer id" if opt.kind == "peer_ids" else "multiaddr"
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of {what} strings")
        return tuple(_from_text(opt, v, where) for v in value)
    if opt.kind == "choice":
        return _check_choice(opt, value, where)
    if opt.kind == "seconds":
        return _seconds(value, where)
    if opt.kind == "size":
        return _size(value, where)
    if opt.kind == "rate":
        return parse_rate(value, where)
    return _from_text(opt, value, where) if isinstance(value, str) else _from_text(opt, repr(value), where)


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read and check a config file: keys of ``OPTIONS`` only, each of the right type. Paths are
    made absolute relative to the file's directory."""
    path = Path(path).expanduser()
    where = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {where} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {where}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {where} is not valid TOML: {e}") from None
    base = path.absolute().parent
    out: dict[str, Any] = {}
    for key, value in raw.items():
        opt = _BY_KEY.get(key)
        if opt is None:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(_BY_KEY)})")
        out[key] = _from_toml(opt, value, f"{where}: {key}", base)
    return out


def _config_file(cli_config: str | os.PathLike | None, env: Mapping[str, str]) -> dict[str, Any]:
    path = cli_config or env.get("SWARM_CONFIG") or None
    return load_toml(path) if path else {}


def resolve_home(
    cli_home: str | os.PathLike | None = None,
    *,
    cli_config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The home directory a command talks to: ``--home`` > ``SWARM_HOME`` > the config file's
    ``home`` > the default. ``fetch``, ``status`` and ``swarm.fetch`` find the running node here."""
    env = os.environ if env is None else env
    if cli_home:
        return Path(cli_home).expanduser().absolute()
    if env.get("SWARM_HOME"):
        return Path(env["SWARM_HOME"]).expanduser().absolute()
    toml = _config_file(cli_config, env)
    if "home" in toml:
        return Path(toml["home"]).absolute()
    return default_home()


class RunSettings:
    """The resolved options of ``swarm-node run`` (and of an embedded node): one attribute per
    entry of ``OPTIONS``."""

    __slots__ = tuple(o.key for o in OPTIONS)

    def __init__(self, **values: Any) -> None:
        for opt in OPTIONS:
            setattr(self, opt.key, values.pop(opt.key, opt.default))
        if values:
            raise TypeError(f"unknown settings: {', '.join(sorted(values))}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "psk")
        return f"RunSettings({fields})"

    def node_config(self, **overrides: Any):
        """A ``swarm.node.NodeConfig`` (imports the node, hence libp2p)."""
        from swarm.node import NodeConfig
        from swarm.trust import TrustPolicy

        kw: dict[str, Any] = {k: getattr(self, k) for k in _NODE_KEYS}
        kw["trust"] = TrustPolicy(self.trust, frozenset(self.trusted_publishers))
        kw.update(overrides)
        return NodeConfig(**kw)


def _given(opt: Option, given: Mapping[str, Any]) -> tuple[Any, bool]:
    """The command line's value and whether it was given (None or empty is not given; a switch
    may come as ``key=True/False`` or, as older callers pass it, ``no_key=True``)."""
    value = given.get(opt.key)
    if opt.kind == "switch":
        off = given.get("no_" + opt.key)
        if value and off:
            raise ConfigError(f"{opt.cli} and --no-{opt.cli[2:]} contradict each other")
        if off:
            return False, True
        return value, value is not None
    return value, bool(value)


def _pick(
    opt: Option, given: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any], toml_where: str
) -> tuple[Any, str | None]:
    """(value, where it came from); where is None for the default."""
    value, is_given = _given(opt, given)
    if is_given:
        if opt.kind == "switch":
            return bool(value), opt.cli
        if opt.is_list:
            items = tuple(_from_text(opt, str(v), opt.cli) for v in value)
            return (_unique_serve(items, opt.cli) if opt.kind == "serve" else items), opt.cli
        return _from_text(opt, str(value), opt.cli), opt.cli
    var, off_var = opt.env, "SWARM_NO_" + opt.key.upper()
    if opt.kind == "switch" and env.get(off_var, "").strip():
        if env.get(var, "").strip():
            raise ConfigError(f"set only one of {var} and {off_var}")
        return not _parse_bool(env[off_var], off_var), off_var
    text = env.get(var, "").strip()
    if text:
        if opt.is_list:
            items = tuple(_from_text(opt, t, var) for t in _split_list(text))
            return (_unique_serve(items, var) if opt.kind == "serve" else items), var
        return _from_text(opt, text, var), var
    if opt.key in toml:
        return toml[opt.key], f"{toml_where}: {opt.key}"
    return opt.default, None


def resolve_run(
    *, config: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, **given: Any
) -> RunSettings:
    """Resolve every option of ``run``: ``given`` (keyword per ``OPTIONS`` key, as parsed from the
    command line; None or empty = not given) > ``SWARM_*`` variables > the TOML file > defaults.
    Raises ConfigError."""
    unknown = set(given) - set(_BY_KEY) - {"no_" + o.key for o in OPTIONS if o.kind == "switch"}
    if unknown:
        raise TypeError(f"resolve_run: unknown options {', '.join(sorted(unknown))}")
    env = os.environ if env is None else env
    toml_path = config or env.get("SWARM_CONFIG") or None
    toml = load_toml(toml_path) if toml_path else {}
    values: dict[str, Any] = {}
    where: dict[str, str | None] = {}
    for opt in OPTIONS:
        values[opt.key], where[opt.key] = _pick(opt, given, env, toml, str(toml_path))

    # Defaults that depend on other settings.
    if values["home"] is None:
        values["home"] = default_home()
    if values["cache_dir"] is None:
        values["cache_dir"] = default_cache_dir(env)
    for key, what in (("home", "home"), ("cache_dir", "cache dir")):
        p = Path(values[key])
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{what} {p} exists and is not a directory")
        values[key] = p.absolute()
    if values["serve_hf_cache"] is None:
        # Without a swarm key anyone who reaches the port could fetch the cache by name.
        values["serve_hf_cache"] = values["psk"] is not None
    values["trust"], values["trusted_publishers"] = check_trust(
        values["trust"],
        values["trusted_publishers"],
        where["trust"] or "--trust",
        where["trusted_publishers"] or "--trusted-publisher",
    )
    return RunSettings(**values)


def bootstrap_from_env(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``SWARM_BOOTSTRAP`` (comma-separated), checked; used by the embedded node of swarm.fetch."""
    env = os.environ if env is None else env
    return tuple(
        _check_multiaddr(a, "SWARM_BOOTSTRAP", need_peer_id=True)
        for a in _split_list(env.get("SWARM_BOOTSTRAP", ""))
    )


# --- generated views of the table --------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``OPTIONS`` as a flag of ``parser`` (``dest`` is the option's key; nothing
    is defaulted here, so ``resolve_run`` can tell what the command line set)."""
    for opt in OPTIONS:
        doc = f"{opt.help} (env {opt.env}; config key {opt.key}; default {opt.default_doc})"
        doc = doc.replace("%", "%%")
        kw: dict[str, Any] = {"dest": opt.key, "help": doc, "default": None}
        if opt.kind == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = opt.metavar or opt.key.upper()
            if opt.is_list:
                kw["action"] = "append"
            if opt.choices:
                kw["choices"] = opt.choices
                kw["metavar"] = "{" + ",".join(opt.choices) + "}"
        parser.add_argument(opt.cli, **kw)


_KIND_DOC = {
    "path": "path",
    "addrs": "list of multiaddrs",
    "peer_addrs": "list of multiaddrs ending in /p2p/ID",
    "serve": 'table "ORG/NAME" = "DIR"',
    "switch": "true/false",
    "choice": "string",
    "psk": "64 hex digits or a key file's path",
    "peer_ids": "list of peer ids",
    "hostport": '"HOST:PORT"',
    "seconds": "number",
    "size": 'string ("500G", "1.5TiB") or integer bytes',
    "rate": 'number (bytes/s) or string like "100MB/s"',
}


def reference_markdown() -> str:
    """``docs/configuration.md``, generated from ``OPTIONS`` (scripts/gen_config_reference.py)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `swarm/config.py` (`OPTIONS`) by `scripts/gen_config_reference.py`; a test",
        "fails when this file and the table differ. Every setting of `swarm-node run` comes from, in",
        "this order: the command line, a `SWARM_*` variable (an empty one counts as unset), the TOML",
        "file named by `--config` or `SWARM_CONFIG` (relative paths are relative to the file), the",
        "default. Lists are taken whole from the first place that sets them; in variables they are",
        "comma-separated. Switches have `--x` / `--no-x` flags and `SWARM_X` / `SWARM_NO_X`",
        "variables (`1/true/yes/on` or `0/false/no/off`).",
        "",
        "| TOML key | flag | variable | TOML type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        flag = f"`{o.cli}` / `--no-{o.cli[2:]}`" if o.kind == "switch" else f"`{o.cli}`"
        var = f"`{o.env}` / `SWARM_NO_{o.key.upper()}`" if o.kind == "switch" else f"`{o.env}`"
        kind = _KIND_DOC[o.kind] + (f": {', '.join(o.choices)}" if o.choices else "")
        meaning = o.help.replace("|", "\\|")
        lines.append(f"| `{o.key}` | {flag} | {var} | {kind} | {o.default_doc} | {meaning} |")
    lines += [
        "",
        f"Rates: {RATE_DOC}.",
        "",
        "Other variables the node and `swarm.fetch` read: `SWARM_CONFIG` (the TOML file),",
        "`SWARM_HOME` (also where `fetch` and `status` find the node), `MODEL_EXPRESS_URL`,",
        "`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE` / `HF_HOME` (the default cache",
        "dir).",
        "",
        "An example file:",
        "",
        "```toml",
        'home = "/var/lib/swarm"',
        'listen = ["/ip4/0.0.0.0/tcp/4001"]',
        'bootstrap = ["/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."]',
        'cache_dir = "/data/hf/hub"',
        'psk = "swarm.key"',
        'trust = "trusted-publishers"',
        'trusted_publishers = ["12D3KooW..."]',
        'lane = "encrypted"',
        'log_format = "json"',
        'metrics_listen = "127.0.0.1:9400"',
        'max_cache_size = "500G"',
        'max_upload_rate = "100MB/s"',
        "[serve]",
        '"acme/private-model" = "/models/private-model"',
        "```",
        "",
    ]
    return "\n".join(lines)
