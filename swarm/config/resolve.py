"""The one resolver: a value comes from the command line, else a ``SWARM_*`` variable, else the
TOML file, else the default (``_pick``); ``resolve_run`` and ``resolve_home`` both go through it."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swarm.config.base import ConfigError, default_cache_dir, default_home
from swarm.config.options import _BY_KEY, _NODE_KEYS, OPTIONS, Option, option
from swarm.config.parse import (
    _check_multiaddr,
    _parse_bool,
    _seconds,
    _size,
    _split_list,
    _toml_serve,
    _unique_serve,
    check_hostport,
    check_lane,
    check_publisher_id,
    check_trust,
    parse_psk_option,
    parse_rate,
    parse_serve,
)


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


def resolve_home(
    cli_home: str | os.PathLike | None = None,
    *,
    cli_config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The home directory a command talks to: ``--home`` > ``SWARM_HOME`` > the config file's
    ``home`` > the default. ``fetch``, ``status`` and ``swarm.fetch`` find the running node here."""
    env = os.environ if env is None else env
    toml_path = cli_config or env.get("SWARM_CONFIG") or None
    home, _where = _pick(option("home"), {"home": cli_home}, env, _LazyToml(toml_path), str(toml_path))
    return default_home() if home is None else Path(home).absolute()


class _LazyToml(Mapping):
    """The TOML file's values, read only when the command line and the variables left the option
    unset (``resolve_home`` with ``--home`` given never reads, so never fails on, the file)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self._path = path
        self._values: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._values is None:
            self._values = load_toml(self._path) if self._path else {}
        return self._values

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


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

    def node_fields(self) -> dict[str, Any]:
        """The fields of a ``swarm.node.NodeConfig`` these settings give (the node builds it:
        ``NodeConfig.from_settings``; the config package never imports the node)."""
        from swarm.trust import TrustPolicy

        kw: dict[str, Any] = {k: getattr(self, k) for k in _NODE_KEYS}
        kw["trust"] = TrustPolicy(self.trust, frozenset(self.trusted_publishers))
        return kw


def _given(opt: Option, given: Mapping[str, Any]) -> tuple[Any, bool]:
    """The command line's value and whether it was given (None or empty is not given; a switch
    may come as ``key=True/False`` or, as older callers pass it, ``no_key=True``)."""
    value = given.get(opt.key)
    if opt.kind == "switch":
        off = given.get("no_" + opt.key)
        if value and off:
            raise ConfigError(f"{opt.cli} and {opt.cli_off} contradict each other")
        if off:
            return False, True
        return value, value is not None
    return value, bool(value)


def _pick(
    opt: Option, given: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any], toml_where: str
) -> tuple[Any, str | None]:
    """The one place the order of precedence lives: the command line (``given``), else the
    variable, else the TOML file, else the default. Returns (value, where it came from); where is
    None for the default."""
    value, is_given = _given(opt, given)
    if is_given:
        if opt.kind == "switch":
            return bool(value), opt.cli
        if opt.is_list:
            items = tuple(_from_text(opt, str(v), opt.cli) for v in value)
            return (_unique_serve(items, opt.cli) if opt.kind == "serve" else items), opt.cli
        return _from_text(opt, str(value), opt.cli), opt.cli
    var, off_var = opt.env, opt.env_off
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
    return _pick(option("bootstrap"), {}, env, {}, "")[0]
