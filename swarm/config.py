"""Option resolution for ``swarm-node`` and ``swarm.fetch``.

Every option of ``swarm-node run`` comes, in this order of precedence, from

1. the command line (``--home``, ``--listen`` ...),
2. a ``SWARM_*`` environment variable,
3. a TOML config file (``--config FILE`` or ``SWARM_CONFIG``),
4. a default.

A list option (``listen``, ``bootstrap``, ``serve``) is taken whole from the first place that sets
it; lists from different places are not merged.

Environment variables: ``SWARM_HOME``, ``SWARM_LISTEN``, ``SWARM_BOOTSTRAP`` and ``SWARM_SERVE``
(comma-separated lists), ``SWARM_CACHE_DIR``, ``SWARM_SERVE_HF_CACHE`` and
``SWARM_NO_SERVE_HF_CACHE`` (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``),
``SWARM_PSK``, ``SWARM_TRUST``, ``SWARM_TRUSTED_PUBLISHERS``
(comma-separated peer ids), ``SWARM_LANE`` (``encrypted``, ``plaintext`` or ``off``),
``SWARM_NO_DIRECT_IO`` (a boolean, like ``SWARM_NO_SERVE_HF_CACHE``), ``SWARM_CONFIG``.

TOML keys (all optional; any other key is an error naming it)::

    home = "/var/lib/swarm"
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."]
    cache_dir = "/data/hf/hub"
    serve_hf_cache = true            # default: true with a psk, false without one (see below)
    psk = "swarm.key"                # optional private-network key: 64 hex digits, the text of a
                                     # go-style swarm.key file, or the path of a file holding either
    trust = "trusted-publishers"     # "open" (default) or "trusted-publishers"
    trusted_publishers = ["12D3KooW..."]   # publisher peer ids (Ed25519); needs the policy above
    lane = "encrypted"               # the direct TCP data lane for piece bytes: "encrypted"
                                     # (default), "plaintext" (trusted networks only; used only
                                     # with peers also set to plaintext) or "off" (libp2p only)
    direct_io = true                 # O_DIRECT writes of whole aligned pieces from the lane
    [serve]
    "acme/private-model" = "/models/private-model"

Relative paths in a config file are relative to the file's directory.

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

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LANE_MODES",
    "SOCKET_NAME",
    "TRUST_POLICIES",
    "ConfigError",
    "RunSettings",
    "check_lane",
    "check_publisher_id",
    "default_cache_dir",
    "default_home",
    "load_toml",
    "parse_psk_option",
    "parse_serve",
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

_TOML_KEYS = ("home", "listen", "bootstrap", "serve", "cache_dir", "serve_hf_cache", "psk", "trust",
              "trusted_publishers", "lane", "direct_io")

TRUST_POLICIES = ("open", "trusted-publishers")
"""Same as ``swarm.trust.POLICIES`` (not imported: this module stays light for the client path)."""

LANE_MODES = ("encrypted", "plaintext", "off")
"""Same as ``swarm.net.lane.LANE_MODES`` (not imported: that would import libp2p). "plaintext" is
for trusted networks only and is used only when both ends are set to it."""
DEFAULT_LANE = "encrypted"


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


def _serve_hf_cache(on_flag: bool | None, off_flag: bool | None, env: Mapping[str, str],
                    toml: Mapping[str, Any], psk: str | None) -> bool:
    """``--serve-hf-cache`` / ``--no-serve-hf-cache``, else ``SWARM_SERVE_HF_CACHE`` /
    ``SWARM_NO_SERVE_HF_CACHE``, else the file's ``serve_hf_cache``, else on only with a private
    swarm key: without one, anyone who can reach the port could fetch the cache by name."""
    if on_flag and off_flag:
        raise ConfigError("--serve-hf-cache and --no-serve-hf-cache contradict each other")
    if on_flag or off_flag:
        return bool(on_flag)
    if "SWARM_SERVE_HF_CACHE" in env and "SWARM_NO_SERVE_HF_CACHE" in env:
        raise ConfigError("set only one of SWARM_SERVE_HF_CACHE and SWARM_NO_SERVE_HF_CACHE")
    if "SWARM_SERVE_HF_CACHE" in env:
        return _parse_bool(env["SWARM_SERVE_HF_CACHE"], "SWARM_SERVE_HF_CACHE")
    if "SWARM_NO_SERVE_HF_CACHE" in env:
        return not _parse_bool(env["SWARM_NO_SERVE_HF_CACHE"], "SWARM_NO_SERVE_HF_CACHE")
    if "serve_hf_cache" in toml:
        return toml["serve_hf_cache"]
    return psk is not None


def _on_unless(off_flag: bool, env: Mapping[str, str], var: str, toml: Mapping[str, Any],
               key: str) -> bool:
    """A switch that is on by default: off with its ``--no-...`` flag, else from its
    ``SWARM_NO_...`` variable (a boolean), else from the file's ``key``."""
    if off_flag:
        return False
    if var in env:
        return not _parse_bool(env[var], var)
    return toml.get(key, True)


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
        raise ConfigError(f"{where}: {path} holds no swarm key (expected 64 hex digits or a "
                          f"swarm.key file: /key/swarm/psk/1.0.0/, /base16/, 64 hex digits)")
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
        raise ConfigError(f"{where}: {pid!r} is not the peer id of an Ed25519 libp2p key "
                          f"(like 12D3KooW...; see `swarm-node status` on the publisher)")
    return pid


def check_trust(mode: str, publishers: Sequence[str], mode_at: str, publishers_at: str
                ) -> tuple[str, tuple[str, ...]]:
    """The trust policy and its publishers, checked together (``*_at`` name where each came
    from)."""
    if mode not in TRUST_POLICIES:
        raise ConfigError(f"{mode_at}: trust policy must be one of {', '.join(TRUST_POLICIES)}, "
                          f"not {mode!r}")
    if mode == "trusted-publishers" and not publishers:
        raise ConfigError(f"{mode_at}: trust policy 'trusted-publishers' needs at least one "
                          f"trusted publisher (--trusted-publisher PEER_ID, "
                          f"SWARM_TRUSTED_PUBLISHERS or trusted_publishers in the config file)")
    if mode == "open" and publishers:
        raise ConfigError(f"{publishers_at}: trusted publishers are listed but the trust policy is 'open' "
                          f"(which accepts any manifest): set --trust trusted-publishers "
                          f"(SWARM_TRUST, or trust in the config file)")
    return mode, tuple(dict.fromkeys(publishers))


def check_lane(mode: Any, where: str) -> str:
    """A data lane mode: one of LANE_MODES (``where`` names the option and where it came from)."""
    if not isinstance(mode, str) or mode.strip().lower() not in LANE_MODES:
        raise ConfigError(f"{where}: lane mode must be one of {', '.join(LANE_MODES)}, "
                          f"not {mode!r}")
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


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read and check a config file: known keys only, each of the right type. Paths are made
    absolute relative to the file's directory."""
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
        at = f"{where}: {key}"
        if key not in _TOML_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(_TOML_KEYS)})")
        if key in ("home", "cache_dir"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{at}: expected a path string")
            p = Path(value).expanduser()
            out[key] = p if p.is_absolute() else base / p
        elif key in ("listen", "bootstrap"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{at}: expected a list of multiaddr strings")
            out[key] = tuple(_check_multiaddr(v, at, need_peer_id=key == "bootstrap") for v in value)
        elif key == "serve":
            out[key] = _toml_serve(value, at, base)
        elif key in ("serve_hf_cache", "direct_io"):
            if not isinstance(value, bool):
                raise ConfigError(f"{at}: expected true or false")
            out[key] = value
        elif key == "psk":
            out[key] = parse_psk_option(value, at, base)
        elif key == "trust":
            if not isinstance(value, str) or value not in TRUST_POLICIES:
                raise ConfigError(f"{at}: expected one of {', '.join(TRUST_POLICIES)}, got {value!r}")
            out[key] = value
        elif key == "lane":
            out[key] = check_lane(value, at)
        elif key == "trusted_publishers":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{at}: expected a list of peer id strings")
            out[key] = tuple(check_publisher_id(v, at) for v in value)
    return out


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
        raise ConfigError(f"{where}: expected a table of \"ORG/NAME\" = \"DIR\"")
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
            raise ConfigError(f"{where}: {model} is served from two directories: {seen[model]} "
                              f"and {path}")
        seen[model] = path
    return tuple(seen.items())


# --- resolution --------------------------------------------------------------------------------


def _config_file(cli_config: str | os.PathLike | None, env: Mapping[str, str]) -> dict[str, Any]:
    path = cli_config or env.get("SWARM_CONFIG") or None
    return load_toml(path) if path else {}


def resolve_home(cli_home: str | os.PathLike | None = None, *,
                 cli_config: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> Path:
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
    """The resolved options of ``swarm-node run`` (and of an embedded node)."""

    __slots__ = ("bootstrap", "cache_dir", "direct_io", "home", "lane", "listen", "psk", "serve",
                 "serve_hf_cache", "trust", "trusted_publishers")

    def __init__(self, *, home: Path, cache_dir: Path, listen: tuple[str, ...],
                 bootstrap: tuple[str, ...], serve: tuple[tuple[str, Path], ...],
                 serve_hf_cache: bool, psk: str | None, trust: str = "open",
                 trusted_publishers: tuple[str, ...] = (), lane: str = DEFAULT_LANE,
                 direct_io: bool = True) -> None:
        self.home = home
        self.cache_dir = cache_dir
        self.listen = listen
        self.bootstrap = bootstrap
        self.serve = serve
        self.serve_hf_cache = serve_hf_cache
        self.psk = psk
        self.trust = trust
        self.trusted_publishers = trusted_publishers
        self.lane = lane
        self.direct_io = direct_io

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "psk")
        return f"RunSettings({fields})"

    def node_config(self, **overrides: Any):
        """A ``swarm.node.NodeConfig`` (imports the node, hence libp2p)."""
        from swarm.node import NodeConfig
        from swarm.trust import TrustPolicy

        kw: dict[str, Any] = dict(home=self.home, cache_dir=self.cache_dir, listen=self.listen,
                                  bootstrap=self.bootstrap, serve=self.serve,
                                  serve_hf_cache=self.serve_hf_cache, psk=self.psk,
                                  trust=TrustPolicy(self.trust, frozenset(self.trusted_publishers)),
                                  lane=self.lane, direct_io=self.direct_io)
        kw.update(overrides)
        return NodeConfig(**kw)


def resolve_run(*, home: str | os.PathLike | None = None,
                listen: Sequence[str] | None = None,
                bootstrap: Sequence[str] | None = None,
                serve: Sequence[str] | None = None,
                cache_dir: str | os.PathLike | None = None,
                no_serve_hf_cache: bool | None = None,
                serve_hf_cache: bool | None = None,
                config: str | os.PathLike | None = None,
                psk: str | None = None,
                trust: str | None = None,
                trusted_publishers: Sequence[str] | None = None,
                lane: str | None = None,
                no_direct_io: bool | None = None,
                env: Mapping[str, str] | None = None) -> RunSettings:
    """Resolve every option of ``run``: arguments (None / empty = not given on the command line)
    > ``SWARM_*`` variables > the TOML file > defaults. Raises ConfigError."""
    env = os.environ if env is None else env
    toml = _config_file(config, env)

    # home
    if home:
        home_p = Path(home).expanduser()
    elif env.get("SWARM_HOME"):
        home_p = Path(env["SWARM_HOME"]).expanduser()
    else:
        home_p = Path(toml.get("home") or default_home())
    if home_p.exists() and not home_p.is_dir():
        raise ConfigError(f"home {home_p} exists and is not a directory")

    # cache dir
    if cache_dir:
        cache_p = Path(cache_dir).expanduser()
    elif env.get("SWARM_CACHE_DIR"):
        cache_p = Path(env["SWARM_CACHE_DIR"]).expanduser()
    else:
        cache_p = Path(toml.get("cache_dir") or default_cache_dir(env))
    if cache_p.exists() and not cache_p.is_dir():
        raise ConfigError(f"cache dir {cache_p} exists and is not a directory")

    # listen / bootstrap
    def addrs(cli: Sequence[str] | None, var: str, key: str, need_peer_id: bool,
              default: tuple[str, ...]) -> tuple[str, ...]:
        if cli:
            return tuple(_check_multiaddr(a, f"--{key}", need_peer_id=need_peer_id) for a in cli)
        if env.get(var, "").strip():
            return tuple(_check_multiaddr(a, var, need_peer_id=need_peer_id)
                         for a in _split_list(env[var]))
        return tuple(toml.get(key, default))

    listen_t = addrs(listen, "SWARM_LISTEN", "listen", False, DEFAULT_LISTEN)
    bootstrap_t = addrs(bootstrap, "SWARM_BOOTSTRAP", "bootstrap", True, ())

    # serve
    if serve:
        serve_t = _unique_serve([parse_serve(s, "--serve") for s in serve], "--serve")
    elif env.get("SWARM_SERVE", "").strip():
        serve_t = _unique_serve([parse_serve(s, "SWARM_SERVE") for s in _split_list(env["SWARM_SERVE"])],
                                "SWARM_SERVE")
    else:
        serve_t = toml.get("serve", ())

    # private network key
    if psk:
        psk_v: str | None = parse_psk_option(psk, "--psk")
    elif env.get("SWARM_PSK", "").strip():
        psk_v = parse_psk_option(env["SWARM_PSK"], "SWARM_PSK")
    else:
        psk_v = toml.get("psk")

    serve_hf = _serve_hf_cache(serve_hf_cache, no_serve_hf_cache, env, toml, psk_v)

    # trust policy and its publishers (each from the first place that sets it)
    if trust:
        mode, mode_at = trust, "--trust"
    elif env.get("SWARM_TRUST", "").strip():
        mode, mode_at = env["SWARM_TRUST"].strip(), "SWARM_TRUST"
    else:
        mode, mode_at = toml.get("trust", "open"), "trust (config file)"
    if trusted_publishers:
        pubs = tuple(check_publisher_id(p, "--trusted-publisher") for p in trusted_publishers)
        pubs_at = "--trusted-publisher"
    elif env.get("SWARM_TRUSTED_PUBLISHERS", "").strip():
        pubs = tuple(check_publisher_id(p, "SWARM_TRUSTED_PUBLISHERS")
                     for p in _split_list(env["SWARM_TRUSTED_PUBLISHERS"]))
        pubs_at = "SWARM_TRUSTED_PUBLISHERS"
    else:
        pubs, pubs_at = toml.get("trusted_publishers", ()), "trusted_publishers (config file)"
    trust_mode, publishers = check_trust(mode, pubs, mode_at, pubs_at)

    # data lane mode (the file's value was checked by load_toml)
    if lane:
        lane_v = check_lane(lane, "--lane")
    elif env.get("SWARM_LANE", "").strip():
        lane_v = check_lane(env["SWARM_LANE"], "SWARM_LANE")
    else:
        lane_v = toml.get("lane", DEFAULT_LANE)

    direct_io = _on_unless(no_direct_io, env, "SWARM_NO_DIRECT_IO", toml, "direct_io")

    return RunSettings(home=home_p.absolute(), cache_dir=cache_p.absolute(), listen=listen_t,
                       bootstrap=bootstrap_t, serve=serve_t, serve_hf_cache=serve_hf, psk=psk_v,
                       trust=trust_mode, trusted_publishers=publishers, lane=lane_v,
                       direct_io=direct_io)


def bootstrap_from_env(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``SWARM_BOOTSTRAP`` (comma-separated), checked; used by the embedded node of swarm.fetch."""
    env = os.environ if env is None else env
    return tuple(_check_multiaddr(a, "SWARM_BOOTSTRAP", need_peer_id=True)
                 for a in _split_list(env.get("SWARM_BOOTSTRAP", "")))
