"""Publisher release records and trust policies."""

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.net.identity import load_or_create_identity, peer_id_of
from swarm.trust import (
    EXPIRY_GRACE,
    RELEASE_LIFETIME,
    TrustError,
    TrustPolicy,
    next_seq,
    refuse_stale,
    sign_manifest,
    sign_release,
    verify_release,
    verify_signature,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return load_or_create_identity(d / "a.key"), load_or_create_identity(d / "b.key")


H = bytes(range(32))


def test_signature_names_the_libp2p_peer_id(keys):
    a, _ = keys
    assert verify_signature(sign_manifest(a, H), H) == peer_id_of(a)


def test_signature_is_bound_to_the_manifest(keys):
    a, _ = keys
    with pytest.raises(TrustError, match="does not match"):
        verify_signature(sign_manifest(a, H), bytes(32))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_is_refused(keys, data):
    a, _ = keys
    blob = bytearray(sign_manifest(a, H))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(TrustError):
        verify_signature(bytes(blob), H)


@given(st.binary(max_size=200))
def test_garbage_is_refused_cleanly(blob):
    with pytest.raises(TrustError):
        verify_signature(blob, H)


def test_policies(keys):
    a, b = keys
    sa, sb = sign_manifest(a, H), sign_manifest(b, H)
    open_ = TrustPolicy()
    assert open_.check(H, b"") is None
    assert open_.check(H, sa).publisher == peer_id_of(a)
    strict = TrustPolicy("trusted-publishers", frozenset({peer_id_of(a)}))
    assert strict.check(H, sa).publisher == peer_id_of(a)
    with pytest.raises(TrustError, match="not trusted"):
        strict.check(H, sb)
    with pytest.raises(TrustError):
        strict.check(H, b"")
    with pytest.raises(ValueError):
        TrustPolicy("trusted-publishers")
    with pytest.raises(ValueError):
        TrustPolicy("anything")


def test_release_record_carries_seq_and_expiry(keys):
    a, _ = keys
    blob = sign_release(a, H, 42, 1_900_000_000)
    r = verify_release(blob, H)
    assert (r.publisher, r.seq, r.expires, r.blob) == (peer_id_of(a), 42, 1_900_000_000, blob)
    # seq and expiry are signed: a relay cannot raise the seq or extend the expiry
    for at, new in ((1, 43), (9, 2_000_000_000)):
        forged = blob[:at] + struct.pack(">Q", new) + blob[at + 8 :]
        with pytest.raises(TrustError, match="does not match"):
            verify_release(forged, H)


def test_old_format_signatures_are_refused(keys):
    a, _ = keys
    v1 = b"\x01" + sign_manifest(a, H)[17:]  # version 1: no seq, no expiry
    with pytest.raises(TrustError, match="version 1"):
        verify_release(v1, H)


def test_trusted_publishers_refuse_expired_records_open_does_not(keys):
    """Finding 6 of issue #18: a relayed record does not stay valid for ever."""
    a, _ = keys
    now = time.time()
    old = sign_release(a, H, 1, int(now) - EXPIRY_GRACE - 1)
    strict = TrustPolicy("trusted-publishers", frozenset({peer_id_of(a)}))
    with pytest.raises(TrustError, match="expired"):
        strict.check(H, old, now)
    assert strict.check(H, old, now, fresh=False).seq == 1  # pinned: the hash is the authority
    assert TrustPolicy().check(H, old, now).seq == 1  # open: records only break ties
    recent = sign_release(a, H, 1, int(now) - EXPIRY_GRACE + 60)  # within the clock grace
    assert strict.check(H, recent, now).seq == 1
    assert verify_release(sign_manifest(a, H, now=now), H).expires == int(now) + RELEASE_LIFETIME


def test_stale_release_is_refused(keys):
    a, _ = keys
    r = verify_release(sign_release(a, H, 5, 2**40), H)
    refuse_stale(r, 5)
    refuse_stale(r, 0)
    with pytest.raises(TrustError, match="rollback refused"):
        refuse_stale(r, 6)


def test_next_seq_is_monotonic_even_when_the_clock_goes_back():
    assert next_seq(0, now=1000.0) == 1_000_000
    assert next_seq(1_000_000, now=999.0) == 1_000_001
    assert next_seq(5, now=2000.0) == 2_000_000
