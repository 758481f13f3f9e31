"""Publisher signatures and trust policies."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.net.identity import load_or_create_identity, peer_id_of
from swarm.trust import TrustError, TrustPolicy, sign_manifest, verify_signature


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
    assert open_.check(H, sa) == peer_id_of(a)
    strict = TrustPolicy("trusted-publishers", frozenset({peer_id_of(a)}))
    assert strict.check(H, sa) == peer_id_of(a)
    with pytest.raises(TrustError, match="not trusted"):
        strict.check(H, sb)
    with pytest.raises(TrustError):
        strict.check(H, b"")
    with pytest.raises(ValueError):
        TrustPolicy("trusted-publishers")
    with pytest.raises(ValueError):
        TrustPolicy("anything")
