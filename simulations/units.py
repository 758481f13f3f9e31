"""Sizes, rates and durations as scenario files write them: ``"256 MiB"``, ``"1 Gbit/s"``, ``"5 ms"``.

A bare number is bytes, bytes per second or seconds. Decimal prefixes (kB, MB, GB, TB; kbit, Mbit,
Gbit) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of 1024.
"""

from __future__ import annotations

import re

_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_BIT_UNITS = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "tbit": 1e12 / 8,
    "bps": 1 / 8,
    "kbps": 1e3 / 8,
    "mbps": 1e6 / 8,
    "gbps": 1e9 / 8,
    "tbps": 1e12 / 8,
}
_TIME_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
}


class UnitError(ValueError):
    pass


def _split(text: str, what: str) -> tuple[float, str]:
    m = re.fullmatch(_NUM + r"\s*([A-Za-zµ/]*)", text.strip())
    if not m:
        raise UnitError(f"{what}: cannot read {text!r}")
    return float(m.group(1)), m.group(2).lower()


def size(v: object, what: str = "size") -> int:
    """Bytes, from an int/float or a string such as ``"256 MiB"``."""
    if isinstance(v, bool):
        raise UnitError(f"{what}: not a size: {v!r}")
    if isinstance(v, int | float):
        n, unit = float(v), ""
    elif isinstance(v, str):
        n, unit = _split(v, what)
    else:
        raise UnitError(f"{what}: not a size: {v!r}")
    if unit not in _SIZE_UNITS:
        raise UnitError(f"{what}: unknown size unit {unit!r} in {v!r}")
    out = n * _SIZE_UNITS[unit]
    if out < 0:
        raise UnitError(f"{what}: negative")
    return round(out)


def rate(v: object, what: str = "rate") -> float:
    """Bytes per second, from a number or a string such as ``"1 Gbit/s"``, ``"100 Mbps"``,
    ``"12.5 MB/s"``."""
    if isinstance(v, bool):
        raise UnitError(f"{what}: not a rate: {v!r}")
    if isinstance(v, int | float):
        out = float(v)
    elif isinstance(v, str):
        n, unit = _split(v, what)
        unit = unit.removesuffix("/s")
        if unit in _BIT_UNITS:
            out = n * _BIT_UNITS[unit]
        elif unit in _SIZE_UNITS:
            out = n * _SIZE_UNITS[unit]
        else:
            raise UnitError(f"{what}: unknown rate unit in {v!r}")
    else:
        raise UnitError(f"{what}: not a rate: {v!r}")
    if out <= 0:
        raise UnitError(f"{what}: must be positive, got {v!r}")
    return out


def duration(v: object, what: str = "duration") -> float:
    """Seconds, from a number or a string such as ``"5 ms"``, ``"2 min"``."""
    if isinstance(v, bool):
        raise UnitError(f"{what}: not a duration: {v!r}")
    if isinstance(v, int | float):
        out = float(v)
    elif isinstance(v, str):
        n, unit = _split(v, what)
        if unit not in _TIME_UNITS:
            raise UnitError(f"{what}: unknown time unit in {v!r}")
        out = n * _TIME_UNITS[unit]
    else:
        raise UnitError(f"{what}: not a duration: {v!r}")
    if out < 0:
        raise UnitError(f"{what}: negative")
    return out


def fmt_rate(bps: float) -> str:
    bits = bps * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def fmt_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:g} B"
