"""Security issue #18, finding 13: the declared cryptography floor must provide what the data lane
calls. ``AESGCM.encrypt_into`` / ``decrypt_into`` (pieces sealed and opened in place) first
shipped in cryptography 47.0.0; with ``cryptography>=42`` an install could pick 42.0.8 to 46.x and
the lane failed at the first piece."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarm.net import lane_crypto as lc

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
INTO_SINCE = (47, 0)
"""Checked in the wheels: cryptography 46.0.3 has no AESGCM.encrypt_into, 47.0.0 has it."""


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string: "47" -> (47, 0), "50.0.2" -> (50, 0)."""
    major, minor = ([int(x) for x in re.findall(r"\d+", text)[:2]] + [0, 0])[:2]
    return major, minor


def _declared_floor() -> tuple[int, ...]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"cryptography\b", d)]
    floor = re.search(r">=\s*([\d.]+)", spec)
    assert floor, f"no lower bound for cryptography in pyproject.toml: {spec!r}"
    return _version(floor.group(1))


def test_declared_cryptography_floor_has_the_in_place_aead_calls():
    assert _declared_floor() >= INTO_SINCE, (
        f"pyproject.toml allows cryptography {_declared_floor()}, but AESGCM.encrypt_into and "
        f"decrypt_into need {INTO_SINCE}"
    )
    assert lc.CRYPTOGRAPHY_MIN == INTO_SINCE


def test_installed_cryptography_has_what_the_lane_calls():
    assert _version(cryptography.__version__) >= INTO_SINCE, cryptography.__version__
    for name in ("encrypt", "decrypt", "encrypt_into", "decrypt_into"):
        assert callable(getattr(AESGCM, name, None)), name
    # The calls as the lane makes them: a piece sealed and opened in place in one buffer.
    keys = lc.derive_keys(b"d" * 32, b"a" * 32, "dialer", "acceptor", lc.MODE_ENCRYPTED, 1)
    payload = bytes(range(256)) * 16
    buf = memoryview(bytearray(4096 + len(payload) + lc.TAG))
    buf[4096 : 4096 + len(payload)] = payload
    record = lc.Sealer(keys.dialer_to_acceptor).seal_piece_into(5, buf, 4096, len(payload))
    header, body = bytes(record[: lc.HEADER.size]), memoryview(bytearray(record[lc.HEADER.size :]))
    lc.Opener(keys.dialer_to_acceptor).open_piece_into(header, body, len(payload))
    assert bytes(body[: len(payload)]) == payload
