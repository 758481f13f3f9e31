"""Reading one value: multiaddrs, swarm keys, publisher ids, trust, lanes, served directories,
TCP addresses, bandwidth rates, seconds and sizes (``where`` in every error names the option and
where it came from)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swarm.config.base import _FALSE, _TRUE, LANE_MODES, TRUST_POLICIES, ConfigError

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
    """Base58 (bitcoin alphabet, as libp2p peer ids use) to bytes; None if ``s`` is not base58."""
    import base58  # only here: the client path never checks a publisher

    try:
        return base58.b58decode(s)
    except ValueError:
        return None


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
