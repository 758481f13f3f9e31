"""Tests for swarm.manifest: encoding, validation, pieces, selection, build_manifest."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import threading
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from modelgen import (
    CARRIED_CONFIGS,
    carried_files,
    make_hf_snapshot,
    make_model_dir,
    weight_file_names,
    write_pseudorandom,
)

import swarm.manifest as mf
import swarm.manifest.build as mf_build
import swarm.manifest.codec as mf_codec
import swarm.manifest.kinds as mf_kinds
import swarm.manifest.rules as mf_rules
import swarm.manifest.values as mf_values
from swarm.manifest import (
    EMPTY_DIGEST,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_PATH_BYTES,
    MAX_PIECES,
    MAX_TOTAL_BYTES,
    FileEntry,
    Manifest,
    ManifestError,
    Piece,
    build_manifest,
    classify,
    piece_size_for,
    should_skip,
    validate_model_name,
    validate_path,
    validate_revision,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
REV = "0123456789abcdef0123456789abcdef01234567"

# ---------------------------------------------------------------------------------------------
# Reference helpers, written independently of the module under test
# ---------------------------------------------------------------------------------------------


MF_MODULES = (mf_rules, mf_kinds, mf_values, mf_codec, mf_build)


def patch_mf(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> None:
    """Set ``name`` in every module of swarm/manifest/ that holds it (a limit is read where it is
    checked: the file-list rules, the decoder, the build)."""
    held = [m for m in MF_MODULES if hasattr(m, name)]
    assert held, name
    for m in held:
        monkeypatch.setattr(m, name, value)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def entry_for(path: str, data: bytes) -> FileEntry:
    """The FileEntry of real bytes, computed directly."""
    ps = piece_size_for(len(data))
    hashes = tuple(b3(data[o : o + ps]) for o in range(0, len(data), ps))
    return FileEntry(path, len(data), "blake3:" + b3(data).hex(), ps, hashes)


def fake_entry(path: str, size: int, seed: int = 0) -> FileEntry:
    """A consistent FileEntry for a file too large to materialise (digests are made up)."""
    ps = piece_size_for(size)
    n = -(-size // ps)
    xof = blake3.blake3(f"{path}/{size}/{seed}".encode())
    if n == 0:
        return FileEntry(path, 0, "blake3:" + EMPTY_DIGEST.hex(), ps, ())
    digest = xof.digest(length=32)
    if n == 1:
        return FileEntry(path, size, "blake3:" + digest.hex(), ps, (digest,))
    blob = xof.digest(length=32 * n, seek=32)
    hashes = tuple(blob[k : k + 32] for k in range(0, len(blob), 32))
    return FileEntry(path, size, "blake3:" + digest.hex(), ps, hashes)


def raw_file(
    path: str | bytes,
    size: int = 0,
    digest: bytes = EMPTY_DIGEST,
    log2: int | None = None,
    hashes: list[bytes] | None = None,
) -> tuple:
    if log2 is None:
        log2 = piece_size_for(size).bit_length() - 1
    if hashes is None:
        n = -(-size // (1 << log2))
        hashes = [digest] if n == 1 else [b"\x07" * 32] * n
    return (path, size, digest, log2, hashes)


def raw_encode(
    model: str | bytes,
    revision: str | bytes,
    files: list[tuple],
    *,
    magic: bytes = b"SWMF",
    version: int = 1,
    count: int | None = None,
) -> bytes:
    """Encode per the documented format without any validation (to build bad inputs)."""

    def s16(v: str | bytes) -> bytes:
        b = v.encode() if isinstance(v, str) else v
        return struct.pack(">H", len(b)) + b

    out = [magic, struct.pack(">B", version), s16(model), s16(revision)]
    out.append(struct.pack(">I", len(files) if count is None else count))
    for path, size, digest, log2, hashes in files:
        out += [
            s16(path),
            struct.pack(">Q", size),
            digest,
            struct.pack(">BI", log2, len(hashes)),
            *hashes,
        ]
    return b"".join(out)


def raw_of(m: Manifest) -> bytes:
    return raw_encode(
        m.model,
        m.revision,
        [(f.path, f.size, f.digest, f.piece_size.bit_length() - 1, list(f.piece_hashes)) for f in m.files],
    )


def small_manifest() -> Manifest:
    files = [
        entry_for("config.json", b'{"model_type": "llama"}'),
        entry_for("empty.txt", b""),
        fake_entry("model.safetensors", 9 * MiB + 3),
    ]
    return Manifest("org/model", "main", files)


def expect_error(field: str, fn, *args, match: str | None = None, **kw) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.field == field, str(err)
    assert str(err).startswith(field + ": "), str(err)
    if match is not None:
        assert match in err.reason, str(err)
    return err


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
components = st.text(alphabet=SAFE + "éÜß日本 +=@", min_size=1, max_size=10).filter(
    lambda c: c not in (".", "..")
)
paths = st.lists(components, min_size=1, max_size=3).map("/".join)
sizes = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            16 * KiB - 1,
            16 * KiB,
            16 * KiB + 1,
            4 * MiB - 1,
            4 * MiB,
            4 * MiB + 1,
            4 * GiB,
            4 * GiB + 1,
            64 * GiB + 1,
            100 * GiB,
        ]
    ),
    st.integers(0, 10 * MiB),
    st.integers(0, 200 * GiB),
)
name_parts = st.text(alphabet=SAFE, min_size=1, max_size=12).filter(
    lambda p: p[0] not in ".-" and ".." not in p and "--" not in p  # as the Hub's names
)
models = st.tuples(name_parts, name_parts).map("/".join)
revisions = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=40, max_size=40),
    st.text(alphabet=SAFE, min_size=1, max_size=20).filter(lambda r: r not in (".", "..")),
)


def _fold(p: str) -> str:
    return p.casefold()


@st.composite
def manifests(draw, max_files: int = 8) -> Manifest:
    chosen: list[str] = []
    folded: set[str] = set()
    for p in draw(st.lists(paths, min_size=1, max_size=max_files)):
        key = mf_rules._fold(p)
        parts = key.split("/")
        prefixes = {"/".join(parts[:k]) for k in range(1, len(parts))}
        under = any(f.startswith(key + "/") for f in folded)
        if key in folded or prefixes & folded or under:
            continue
        folded.add(key)
        chosen.append(p)
    chosen.sort(key=lambda p: p.encode())
    files = [fake_entry(p, draw(sizes), seed=draw(st.integers(0, 3))) for p in chosen]
    return Manifest(draw(models), draw(revisions), files)


def _insert(p: str, i: int, s: str) -> str:
    i = i % (len(p) + 1)
    return p[:i] + s + p[i:]


CONTROL = [chr(c) for c in [*range(0, 32), *range(0x7F, 0xA0)]]
bad_paths = st.one_of(
    paths.map(lambda p: "/" + p),  # absolute
    st.just(".."),
    paths.map(lambda p: "../" + p),
    paths.map(lambda p: p + "/.."),
    st.tuples(paths, paths).map(lambda t: f"{t[0]}/../{t[1]}"),
    paths.map(lambda p: "./" + p),
    paths.map(lambda p: p + "/."),
    st.tuples(paths, paths).map(lambda t: f"{t[0]}/./{t[1]}"),
    st.tuples(paths, paths).map(lambda t: t[0] + "\\" + t[1]),
    paths.map(lambda p: "..\\" + p),
    st.tuples(paths, st.sampled_from(CONTROL), st.integers(0, 40)).map(lambda t: _insert(t[0], t[2], t[1])),
    paths.map(lambda p: p + "/"),  # trailing slash
    st.tuples(paths, paths).map(lambda t: f"{t[0]}//{t[1]}"),
    st.just(""),
    st.just("/"),
    st.integers(MAX_PATH_BYTES + 1, MAX_PATH_BYTES + 300).map(
        lambda n: "/".join(["x" * 99] * (n // 100 + 1))
    ),
    st.integers(256, 400).map(lambda n: "d/" + "y" * n),  # one component over NAME_MAX
)

# ---------------------------------------------------------------------------------------------
# Piece sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "piece_size", "count"),
    [
        (0, 16 * KiB, 0),
        (1, 16 * KiB, 1),
        (16 * KiB, 16 * KiB, 1),
        (16 * KiB + 1, 32 * KiB, 1),
        (1_170_079, 2 * MiB, 1),
        (4 * MiB, 4 * MiB, 1),
        (4 * MiB + 1, 4 * MiB, 2),
        (4 * GiB, 4 * MiB, 1024),
        (4 * GiB + 1, 8 * MiB, 513),
        (64 * GiB, 64 * MiB, 1024),
        (64 * GiB + 1, 64 * MiB, 1025),
        (1 * TiB, 64 * MiB, 16384),
    ],
)
def test_piece_size_examples(size: int, piece_size: int, count: int) -> None:
    assert piece_size_for(size) == piece_size
    assert -(-size // piece_size) == count


@given(st.integers(0, 8 * TiB), st.integers(0, 8 * TiB))
def test_piece_size_rule(a: int, b: int) -> None:
    ps = piece_size_for(a)
    assert ps & (ps - 1) == 0
    assert 16 * KiB <= ps <= 64 * MiB
    if a <= 4 * MiB:
        assert ps >= a and ps // 2 < max(a, 16 * KiB)  # smallest power of two holding the file
    else:
        assert ps >= 4 * MiB
        if a <= 64 * GiB:
            assert -(-a // ps) <= 1024
    if a <= b:
        assert piece_size_for(a) <= piece_size_for(b)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_piece_size_rejects_non_sizes(bad) -> None:
    expect_error("size", piece_size_for, bad)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_roundtrip_and_determinism(m: Manifest) -> None:
    enc = m.encode()
    assert enc == raw_of(m)  # the documented format, byte for byte
    assert enc[:5] == b"SWMF\x01"
    back = Manifest.decode(enc)
    assert back == m
    assert hash(back) == hash(m)
    assert back.encode() == enc
    assert back.manifest_hash == m.manifest_hash == b3(enc)
    assert m.hash_str == "blake3:" + b3(enc).hex()
    again = Manifest(m.model, m.revision, [FileEntry(*attrs_tuple(f)) for f in m.files])
    assert again.encode() == enc
    assert Manifest.decode(bytearray(enc)) == m
    assert Manifest.decode(memoryview(enc)) == m
    assert len(enc) <= MAX_MANIFEST_BYTES


def attrs_tuple(f: FileEntry) -> tuple:
    return (f.path, f.size, f.blake3, f.piece_size, f.piece_hashes)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(manifests(max_files=4), st.data())
def test_bit_flip_never_yields_an_equal_manifest(m: Manifest, data: st.DataObject) -> None:
    enc = m.encode()
    bit = data.draw(st.integers(0, len(enc) * 8 - 1))
    flipped = bytearray(enc)
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        other = Manifest.decode(bytes(flipped))
    except ManifestError:
        return
    assert other != m
    assert other.manifest_hash != m.manifest_hash
    assert other.encode() == bytes(flipped)


def test_bit_flip_exhaustive() -> None:
    m = Manifest("a/b", "r", [entry_for("c.json", b"{}"), entry_for("w.bin", b"\x01" * 20)])
    enc = m.encode()
    accepted = 0
    for bit in range(len(enc) * 8):
        flipped = bytearray(enc)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            other = Manifest.decode(bytes(flipped))
        except ManifestError as e:
            assert e.field and str(e).startswith(e.field + ": ")
            continue
        accepted += 1
        assert other.manifest_hash != m.manifest_hash
        assert other.encode() == bytes(flipped)
    assert accepted  # some flips (e.g. in names) give other valid manifests


def test_truncation_and_trailing_bytes() -> None:
    enc = small_manifest().encode()
    for n in range(len(enc)):
        with pytest.raises(ManifestError) as info:
            Manifest.decode(enc[:n])
        assert "truncated" in str(info.value) or info.value.field == "magic"
    expect_error("manifest", Manifest.decode, enc + b"\0", match="trailing")
    expect_error("manifest", Manifest.decode, enc + enc, match="trailing")


def test_decode_header_errors() -> None:
    good = [raw_file("a.json", 2, b3(b"{}"))]
    expect_error("magic", Manifest.decode, raw_encode("a/b", "r", good, magic=b"SWMX"))
    expect_error("magic", Manifest.decode, b"")
    expect_error("version", Manifest.decode, raw_encode("a/b", "r", good, version=2))
    expect_error("version", Manifest.decode, raw_encode("a/b", "r", good, version=0))
    expect_error("model", Manifest.decode, raw_encode(b"a/\xff", "r", good), match="UTF-8")
    expect_error("model", Manifest.decode, raw_encode("a/b/c", "r", good))
    expect_error("revision", Manifest.decode, raw_encode("a/b", b"\xc0\x80", good), match="UTF-8")
    expect_error("revision", Manifest.decode, raw_encode("a/b", "..", good))
    expect_error("files", Manifest.decode, raw_encode("a/b", "r", []), match="no files")
    expect_error(
        "files",
        Manifest.decode,
        raw_encode("a/b", "r", good, count=MAX_FILES + 1),
        match="MAX_FILES",
    )
    expect_error("files[1].path", Manifest.decode, raw_encode("a/b", "r", good, count=2), match="truncated")
    expect_error("manifest", Manifest.decode, b"SWMF" + bytes(MAX_MANIFEST_BYTES), match="MAX_MANIFEST_BYTES")
    expect_error("manifest", Manifest.decode, 12345)


def test_decode_file_field_errors() -> None:
    d = b3(b"{}")
    cases = [
        ("files[0].path", raw_file(b"a\xffb.json", 2, d), "UTF-8"),
        ("files[0].path", raw_file(b"\xed\xa0\x80.json", 2, d), "UTF-8"),  # encoded surrogate
        ("files[0].path", raw_file(b"a/../b", 2, d), "'..'"),
        ("files[0].piece_size", raw_file("a.json", 2, d, log2=13), "outside"),
        ("files[0].piece_size", raw_file("a.json", 2, d, log2=27), "outside"),
        ("files[0].piece_size", raw_file("a.json", 2, d, log2=255), "outside"),
        ("files[0].piece_size", raw_file("a.json", 2, d, log2=15), "uses 16384"),
        ("files[0].piece_size", raw_file("w.bin", 5 * MiB, d, log2=23), "uses 4194304"),
        ("files[0].piece_hashes", raw_file("a.json", 2, d, hashes=[d, d]), "1 pieces"),
        ("files[0].piece_hashes", raw_file("a.json", 2, d, hashes=[]), "1 pieces"),
        ("files[0].piece_hashes", raw_file("w.bin", 5 * MiB, d, hashes=[d] * 3), "2 pieces"),
        ("files[0].piece_hashes[0]", raw_file("a.json", 2, d, hashes=[b"\0" * 32]), "must equal"),
        ("files[0].blake3", raw_file("e.txt", 0, d), "empty file"),
        (
            "files[0].size",
            raw_file("a.json", MAX_TOTAL_BYTES + 1, d, log2=26, hashes=[]),
            "MAX_TOTAL_BYTES",
        ),
    ]
    for field, f, match in cases:
        expect_error(field, Manifest.decode, raw_encode("a/b", "r", [f]), match=match)
    # Truncated in the middle of each field of a file.
    enc = raw_encode("a/b", "r", [raw_file("w.bin", 5 * MiB, d)])
    start = len(raw_encode("a/b", "r", [])) + 2 + len("w.bin")
    for cut, field in [
        (4, "size"),
        (8 + 10, "blake3"),
        (40, "piece_size"),
        (41 + 2, "piece_hashes"),
        (45 + 40, "piece_hashes"),
    ]:
        expect_error(f"files[0].{field}", Manifest.decode, enc[: start + cut], match="truncated")


def test_decode_rejects_order_and_collisions() -> None:
    d = b3(b"{}")
    a, b = raw_file("a.json", 2, d), raw_file("b.json", 2, d)
    expect_error("files[1].path", Manifest.decode, raw_encode("o/m", "r", [b, a]), match="not sorted")
    expect_error("files[1].path", Manifest.decode, raw_encode("o/m", "r", [a, a]), match="duplicate")
    big_a = raw_file("A.json", 2, d)
    expect_error("files[1].path", Manifest.decode, raw_encode("o/m", "r", [big_a, a]), match="collides")
    # "Z" (0x5a) sorts before "a" (0x61) and "é" (0xc3 0xa9) after "z": order is by UTF-8 bytes.
    names = ["Z.json", "a.json", "y.json", "é.json", "日.json"]
    files = [raw_file(p, 2, d) for p in names]
    assert [f.path for f in Manifest.decode(raw_encode("o/m", "r", files)).files] == names
    expect_error("files[1].path", Manifest.decode, raw_encode("o/m", "r", files[1::-1]), match="not sorted")


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_pieces_cover_every_byte_once(m: Manifest) -> None:
    pieces = m.pieces
    assert len(pieces) == m.num_pieces == sum(f.num_pieces for f in m.files)
    assert [p.index for p in pieces] == list(range(m.num_pieces))
    assert sum(p.length for p in pieces) == m.total_size == sum(f.size for f in m.files)
    for fi, f in enumerate(m.files):
        rng = m.file_piece_range(fi)
        mine = [pieces[i] for i in rng]
        assert all(p.file_index == fi for p in mine)
        pos = 0
        for k, p in enumerate(mine):
            assert isinstance(p, Piece)
            assert p.offset == pos  # no gap, no overlap
            assert 0 < p.length <= f.piece_size
            assert p.digest == f.piece_hashes[k]
            assert f.piece_span(k) == (p.offset, p.length)
            pos += p.length
        assert pos == f.size
        for i in rng:
            assert m.file_of_piece(i) == fi
    assert m.pieces is pieces  # cached
    want = {i for fi, f in enumerate(m.files) if f.kind == "config" for i in m.file_piece_range(fi)}
    assert m.config_piece_indices() == frozenset(want)


def test_piece_ranges_and_bounds() -> None:
    m = small_manifest()
    assert [f.path for f in m.files] == ["config.json", "empty.txt", "model.safetensors"]
    assert m.file_piece_range(0) == range(0, 1)
    assert m.file_piece_range(1) == range(1, 1)
    assert m.file_piece_range(2) == range(1, 4)
    assert m.num_pieces == 4
    last = m.pieces[-1]
    assert (last.file_index, last.offset, last.length) == (2, 8 * MiB, 1 * MiB + 3)
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            m.file_piece_range(bad)
    with pytest.raises(IndexError):
        m.file_of_piece(4)
    assert m.config_piece_indices() == frozenset({0})
    assert m.pieces_of([0, 2]) == frozenset({0, 1, 2, 3})
    assert m.file_index("empty.txt") == 1


# ---------------------------------------------------------------------------------------------
# Paths, names, revisions
# ---------------------------------------------------------------------------------------------


@given(paths)
def test_good_paths_accepted(p: str) -> None:
    assert validate_path(p) == p


@settings(max_examples=500)
@given(bad_paths)
@example("a/\x00b")
@example("C:\\Windows")
@example("a\ud800b")  # lone surrogate
def test_bad_paths_rejected_everywhere(p: str) -> None:
    expect_error("path", validate_path, p)
    expect_error("path", FileEntry, p, 0, "blake3:" + EMPTY_DIGEST.hex(), 16 * KiB, ())
    try:
        raw = p.encode()
    except UnicodeEncodeError:
        return
    if len(raw) < 65536:
        expect_error("files[0].path", Manifest.decode, raw_encode("o/m", "r", [raw_file(raw)]))


@given(paths, st.data())
def test_case_collisions_rejected(p: str, data: st.DataObject) -> None:
    variant = p.swapcase()
    assume(variant != p and mf_rules._fold(variant) == mf_rules._fold(p))
    a, b = sorted([p, variant], key=str.encode)
    err = expect_error("files[1].path", Manifest, "o/m", "r", [fake_entry(a, 1), fake_entry(b, 2)])
    assert "collides with files[0].path" in err.reason
    # Also when other files sort between them.
    others = data.draw(st.lists(st.sampled_from(["0.json", "M.json", "m/x.json", "~.bin"]), unique=True))
    names = sorted({a, b, *others}, key=str.encode)
    with pytest.raises(ManifestError, match=r"^files\[\d+\]\.path: .*collides"):
        Manifest("o/m", "r", [fake_entry(n, 1) for n in names])


@given(paths)
def test_duplicates_rejected(p: str) -> None:
    expect_error(
        "files[1].path",
        Manifest,
        "o/m",
        "r",
        [fake_entry(p, 1), fake_entry(p, 1)],
        match="duplicate",
    )


def test_file_and_directory_conflicts() -> None:
    expect_error(
        "files[1].path",
        Manifest,
        "o/m",
        "r",
        [fake_entry("a", 1), fake_entry("a/b", 1)],
        match="under files[0].path",
    )
    expect_error(
        "files[1].path",
        Manifest,
        "o/m",
        "r",
        [fake_entry("A", 1), fake_entry("a/b", 1)],
        match="under files[0].path",
    )
    # Unicode normalisation: NFC "é" and NFD "e\u0301" are the same name on macOS.
    expect_error(
        "files[1].path",
        Manifest,
        "o/m",
        "r",
        [fake_entry("cafe\u0301", 1), fake_entry("caf\u00e9", 1)],
        match="collides",
    )
    Manifest("o/m", "r", [fake_entry("a.json", 1), fake_entry("a/b", 1), fake_entry("ab", 1)])


def test_unsorted_rejected() -> None:
    expect_error(
        "files[1].path",
        Manifest,
        "o/m",
        "r",
        [fake_entry("b", 1), fake_entry("a", 1)],
        match="not sorted",
    )


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Llama-3.2-1B",
        "a/b",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "x_1/y.z",
        "o" * 96 + "/" + "n" * 96,
        "gpt2",  # single-part Hub names (the cache folder is models--gpt2)
        "bert-base-uncased",
        "n" * 96,
    ],
)
def test_good_model_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b/c",
        "my--model",  # "--" would make models--my--model read back as my/model
        "org--x/b",
        "a/b--c",
        "/b",
        "a/",
        ".a/b",
        "a/-b",
        "a/b..c",
        "a/..",
        "a b/c",
        "a/b\n",
        "a\\b/c",
        "ä/b",
        "o" * 97 + "/n",
        None,
        3,
        b"a/b",
    ],
)
def test_bad_model_names(name) -> None:
    expect_error("model", validate_model_name, name)
    expect_error("model", Manifest, name, "main", [fake_entry("a", 1)])


@pytest.mark.parametrize("rev", ["main", REV, "v1.0", "refs_pr_1", "a" * 128, "...", "-x", "_"])
def test_good_revisions(rev: str) -> None:
    assert validate_revision(rev) == rev


@pytest.mark.parametrize("rev", ["", ".", "..", "refs/pr/1", "a" * 129, "a b", "x\0", "é", None, 7])
def test_bad_revisions(rev) -> None:
    expect_error("revision", validate_revision, rev)
    expect_error("revision", Manifest, "o/m", rev, [fake_entry("a", 1)])


# ---------------------------------------------------------------------------------------------
# FileEntry
# ---------------------------------------------------------------------------------------------


def test_file_entry_validation() -> None:
    d = b3(b"xy")
    h = "blake3:" + d.hex()
    ok = FileEntry("a.json", 2, h, 16 * KiB, [d])  # list converted to tuple
    assert ok.piece_hashes == (d,)
    assert ok.digest == d and ok.num_pieces == 1 and ok.kind == "config"
    assert ok == FileEntry("a.json", 2, h, 16 * KiB, (d,))
    assert hash(ok) == hash(FileEntry("a.json", 2, h, 16 * KiB, (d,)))
    cases = [
        ("size", ("a.json", -1, h, 16 * KiB, (d,))),
        ("size", ("a.json", 2.0, h, 16 * KiB, (d,))),
        ("size", ("a.json", True, h, 16 * KiB, (d,))),
        ("blake3", ("a.json", 2, h.upper(), 16 * KiB, (d,))),
        ("blake3", ("a.json", 2, d.hex(), 16 * KiB, (d,))),
        ("blake3", ("a.json", 2, "sha256:" + d.hex(), 16 * KiB, (d,))),
        ("blake3", ("a.json", 2, h + "0", 16 * KiB, (d,))),
        ("blake3", ("a.json", 2, d, 16 * KiB, (d,))),
        ("piece_size", ("a.json", 2, h, 3 * KiB, (d,))),
        ("piece_size", ("a.json", 2, h, 0, (d,))),
        ("piece_size", ("a.json", 2, h, 8 * KiB, (d,))),
        ("piece_size", ("a.json", 2, h, 32 * KiB, (d,))),
        ("piece_size", ("a.json", 2, h, 128 * MiB, (d,))),
        ("piece_hashes", ("a.json", 2, h, 16 * KiB, ())),
        ("piece_hashes[0]", ("a.json", 2, h, 16 * KiB, (d.hex(),))),
        ("piece_hashes[0]", ("a.json", 2, h, 16 * KiB, (d[:31],))),
        ("piece_hashes[0]", ("a.json", 2, h, 16 * KiB, (bytearray(d),))),
        ("piece_hashes[0]", ("a.json", 2, h, 16 * KiB, (b3(b"other"),))),
        ("piece_hashes[1]", ("w.bin", 5 * MiB, h, 4 * MiB, (d, b"short"))),
        ("blake3", ("e", 0, h, 16 * KiB, ())),
        ("path", ("../a", 2, h, 16 * KiB, (d,))),
    ]
    for field, args in cases:
        expect_error(field, FileEntry, *args)


def test_manifest_needs_file_entries() -> None:
    expect_error("files[0]", Manifest, "o/m", "r", [("a", 1)])
    expect_error("files", Manifest, "o/m", "r", [], match="no files")


def test_equality_and_caching() -> None:
    m1, m2 = small_manifest(), small_manifest()
    _ = m1.manifest_hash, m1.pieces, m1.config_piece_indices()  # fill caches on one side only
    assert m1 == m2 and hash(m1) == hash(m2)
    assert m1.manifest_hash == m2.manifest_hash
    assert {m1, m2} == {m1}
    assert m1 != Manifest("org/model", "other", m1.files)
    with pytest.raises(AttributeError):
        m1.model = "x/y"  # type: ignore[misc]


def test_error_type_and_pickling() -> None:
    err = expect_error("files[0].path", Manifest.decode, raw_encode("o/m", "r", [raw_file("a/../b")]))
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.field, back.reason, str(back)) == (err.field, err.reason, str(err))


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def test_limit_constants() -> None:
    assert mf.MAX_FILES == 10_000
    assert mf.MAX_TOTAL_BYTES == 1 << 42  # 4 TiB
    assert mf.MAX_PIECES == 262_144
    assert mf.MAX_PATH_BYTES == 1024
    assert mf.MAX_MANIFEST_BYTES == 1 << 24  # 16 MiB


def test_max_pieces_real_limit() -> None:
    # 256 files of 4 GiB at 4 MiB pieces: exactly MAX_PIECES, which is allowed, and under 9 MB.
    files = [fake_entry(f"w{i:03d}.bin", 4 * GiB) for i in range(256)]
    m = Manifest("o/m", "r", files)
    assert m.num_pieces == MAX_PIECES
    enc = m.encode()
    assert len(enc) < 9_000_000
    assert Manifest.decode(enc) == m
    over = [*files, fake_entry("x.bin", 4 * MiB + 1)]
    expect_error("files", Manifest, "o/m", "r", over, match="MAX_PIECES")
    raw = raw_encode(
        "o/m", "r", [raw_file(f.path, f.size, f.digest, hashes=list(f.piece_hashes)) for f in over]
    )
    expect_error("files[256].piece_hashes", Manifest.decode, raw, match="MAX_PIECES")


def test_max_total_bytes_real_limit() -> None:
    files = [fake_entry(f"w{i}.bin", 1 * TiB) for i in range(4)]
    assert Manifest("o/m", "r", files).total_size == MAX_TOTAL_BYTES
    expect_error("files", Manifest, "o/m", "r", [*files, fake_entry("x.json", 1)], match="MAX_TOTAL_BYTES")
    expect_error("size", fake_entry, "huge.bin", MAX_TOTAL_BYTES + 64 * MiB)


def test_max_path_bytes_real_limit() -> None:
    ok = "/".join(["d" * 254] * 4) + "/" + "f" * 3  # 1023 bytes
    assert len(ok.encode()) == 1023
    validate_path(ok)
    validate_path(ok + "x")
    expect_error("path", validate_path, ok + "xy", match="MAX_PATH_BYTES")
    expect_error("path", validate_path, "é" * 513, match="MAX_PATH_BYTES")  # 1026 bytes, 513 chars


def test_max_files_and_manifest_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Manifest("o/m", "r", [fake_entry(f"f{i}", 1) for i in range(5)])
    enc = m.encode()
    patch_mf(monkeypatch, "MAX_FILES", 4)
    expect_error("files", Manifest, "o/m", "r", m.files, match="MAX_FILES")
    expect_error("files", Manifest.decode, enc, match="MAX_FILES")
    patch_mf(monkeypatch, "MAX_FILES", 10)
    patch_mf(monkeypatch, "MAX_MANIFEST_BYTES", len(enc) - 1)
    expect_error("manifest", Manifest, "o/m", "r", m.files, match="MAX_MANIFEST_BYTES")
    expect_error("manifest", Manifest.decode, enc, match="MAX_MANIFEST_BYTES")
    patch_mf(monkeypatch, "MAX_MANIFEST_BYTES", len(enc))
    assert Manifest.decode(enc) == m


def test_max_manifest_bytes_real_limit() -> None:
    # 10_000 files with 1000-byte paths and 20 pieces each encode to ~17 MB: too big, though every
    # other limit holds.
    digest = b3(b"d")
    hashes = (digest,) * 20
    long = "/".join(["p" * 198] * 5)
    files = [
        FileEntry(f"{i:05d}/{long}", 80 * MiB, "blake3:" + digest.hex(), 4 * MiB, hashes)
        for i in range(MAX_FILES)
    ]
    expect_error("manifest", Manifest, "o/m", "r", files, match="MAX_MANIFEST_BYTES")


def test_limits_checked_before_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.json").write_text("{}")
    hashed = []
    real = mf_build._hash_file
    patch_mf(monkeypatch, "_hash_file", lambda *a: hashed.append(a) or real(*a))
    patch_mf(monkeypatch, "MAX_FILES", 2)
    expect_error("files", build_manifest, tmp_path, "o/m", "r", match="MAX_FILES")
    patch_mf(monkeypatch, "MAX_FILES", 10)
    patch_mf(monkeypatch, "MAX_TOTAL_BYTES", 5)
    expect_error("files", build_manifest, tmp_path, "o/m", "r", match="MAX_TOTAL_BYTES")
    patch_mf(monkeypatch, "MAX_TOTAL_BYTES", 10)
    patch_mf(monkeypatch, "MAX_PIECES", 2)
    expect_error("files", build_manifest, tmp_path, "o/m", "r", match="MAX_PIECES")
    patch_mf(monkeypatch, "MAX_PIECES", 10)
    patch_mf(monkeypatch, "MAX_MANIFEST_BYTES", 100)
    expect_error("manifest", build_manifest, tmp_path, "o/m", "r", match="MAX_MANIFEST_BYTES")
    assert hashed == []
    patch_mf(monkeypatch, "MAX_MANIFEST_BYTES", 1000)
    assert len(build_manifest(tmp_path, "o/m", "r").files) == 3
    assert len(hashed) == 3


# ---------------------------------------------------------------------------------------------
# Classification, skipping, selection, subsets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "tiktoken.model",
        "cl100k_base.tiktoken",
        "preprocessor_config.json",
        "params.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "original/params.json",
        "sub/dir/Config.JSON",
        "notes.txt",
        "modeling_custom.py",
        "tokenizer.model.v3",
        "vocab.bpe",
        "source.spm",
        "tekken.json",
        "processor_config.json",
    ],
)
def test_classify_config(path: str) -> None:
    assert classify(path) == "config"


@pytest.mark.parametrize(
    "path",
    [
        "model.safetensors",
        "model-00001-of-00004.safetensors",
        "pytorch_model.bin",
        "x.gguf",
        "a.pt",
        "original/consolidated.00.pth",
        "onnx/model.onnx",
        "onnx/model.onnx_data",
        "tf_model.h5",
        "flax_model.msgpack",
        "m.ckpt",
        "m.pkl",
        "m.npz",
        "m.tflite",
        "MODEL.SAFETENSORS",
        "dir/W.Bin",
        "model.ckpt.index",  # .ckpt.index, .iop, .gas: what ModelExpress's ignore_weights drops
        "x.iop",
        "x.gas",
    ],
)
def test_classify_weight(path: str) -> None:
    assert classify(path) == "weight"


def test_classify_by_size() -> None:
    assert classify("blob.dat", 1 * MiB) == "config"
    assert classify("blob.dat", 65 * MiB) == "weight"
    assert classify("tokenizer.json", 100 * MiB) == "config"  # known configs stay configs
    assert classify("tokenizer.model.v3", 100 * MiB) == "config"
    assert classify("vocab.bpe", 100 * MiB) == "config"
    assert fake_entry("big.arrow", 1 * GiB).kind == "weight"


@pytest.mark.parametrize(
    ("path", "skip"),
    [
        (".gitattributes", True),
        ("README.md", True),
        ("readme.MD", True),
        ("docs/README.md", True),
        ("LICENSE", True),
        ("LICENSE.txt", True),
        ("LICENSE-MODEL", True),
        ("sub/license.md", True),
        ("logo.png", True),
        ("a/b.JPG", True),
        ("x.jpeg", True),
        ("x.gif", True),
        ("x.webp", True),
        ("x.svg", True),
        (".git/config", True),
        (".git/objects/ab/cd", True),
        (".cache/huggingface/x", True),
        ("sub/.hidden/x.json", True),
        ("model.safetensors.lock", True),
        ("model.safetensors.incomplete", True),
        ("config.json", False),
        ("model.safetensors", False),
        ("README.txt", False),
        ("docs/x.md", False),
        ("original/params.json", False),
        ("readme_generator.py", False),
        ("tokenizer.model", False),
    ],
)
def test_should_skip(path: str, skip: bool) -> None:
    assert should_skip(path) is skip


def test_select(model_manifest: Manifest) -> None:
    m = model_manifest
    paths = [f.path for f in m.files]

    def names(idx: frozenset[int]) -> set[str]:
        return {paths[i] for i in idx}

    weights = set(weight_file_names(2))
    assert names(m.select()) == set(paths)
    assert names(m.select(configs_only=True)) == set(CARRIED_CONFIGS)
    assert names(m.select(allow_patterns="*.safetensors")) == weights
    assert names(m.select(allow_patterns=["*.json"], ignore_patterns=["*index*", "tokenizer*"])) == {
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
    }
    assert names(m.select(configs_only=True, allow_patterns="*.safetensors*")) == {
        "model.safetensors.index.json"
    }
    assert m.select(allow_patterns=[]) == frozenset()
    assert names(m.select(ignore_patterns=[])) == set(paths)
    assert m.select(allow_patterns="CONFIG.JSON") == frozenset()  # case-sensitive like the Hub
    h = m.manifest_hash
    m.select(configs_only=True)
    assert m.manifest_hash == h


def test_select_directory_patterns() -> None:
    m = Manifest(
        "o/m",
        "r",
        [
            fake_entry(p, 10)
            for p in [
                "a.json",
                "onnx/model.onnx",
                "onnx/sub/x.json",
                "onnxx.json",
                "original/p.json",
            ]
        ],
    )
    paths = [f.path for f in m.files]

    def sel(**kw) -> list[str]:
        return [paths[i] for i in sorted(m.select(**kw))]

    assert sel(allow_patterns="onnx/") == ["onnx/model.onnx", "onnx/sub/x.json"]
    assert sel(ignore_patterns=["onnx/", "original/"]) == ["a.json", "onnxx.json"]
    assert sel(allow_patterns="*.json") == [
        "a.json",
        "onnx/sub/x.json",
        "onnxx.json",
        "original/p.json",
    ]
    assert sel(allow_patterns="onnx/*.onnx") == ["onnx/model.onnx"]


def test_subset(model_manifest: Manifest) -> None:
    m = model_manifest
    configs = m.select(configs_only=True)
    sub = m.subset(configs)
    assert sub.manifest_hash != m.manifest_hash
    assert (sub.model, sub.revision) == (m.model, m.revision)
    assert [f.path for f in sub.files] == [f.path for i, f in enumerate(m.files) if i in configs]
    assert all(f.kind == "config" for f in sub.files)
    assert sub.config_piece_indices() == frozenset(range(sub.num_pieces))
    assert Manifest.decode(sub.encode()) == sub
    assert m.subset(range(len(m.files))) == m
    assert m.subset([3, 1, 1]) == m.subset([1, 3])
    expect_error("file_indices", m.subset, [len(m.files)])
    expect_error("file_indices", m.subset, [-1])
    expect_error("files", m.subset, [])


# ---------------------------------------------------------------------------------------------
# build_manifest
# ---------------------------------------------------------------------------------------------

BOUNDARY_SIZES = [
    0,
    1,
    100,
    16 * KiB - 1,
    16 * KiB,
    16 * KiB + 1,
    1 * MiB + 7,
    4 * MiB - 1,
    4 * MiB,
    4 * MiB + 1,
    8 * MiB,
    9 * MiB + 5,
]


def pseudo(n: int, key: int) -> bytes:
    return blake3.blake3(key.to_bytes(8, "big")).digest(length=n)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.lists(
            st.text(alphabet="abcXYZ019._-é", min_size=1, max_size=6).filter(
                lambda c: c not in (".", "..") and not c.startswith(".")
            ),
            min_size=1,
            max_size=2,
        ).map("/".join),
        st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 10 * MiB)),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([64 * KiB, 4 * MiB]),
)
def test_build_agrees_with_direct_blake3(
    tmp_path_factory, files: dict[str, int], threads: int, chunk: int
) -> None:
    root = tmp_path_factory.mktemp("gen")
    keys = {mf_rules._fold(p) for p in files}
    expected = []
    for i, (p, size) in enumerate(sorted(files.items(), key=lambda t: t[0].encode())):
        parts = mf_rules._fold(p).split("/")
        assume(not any("/".join(parts[:k]) in keys for k in range(1, len(parts))))
        data = pseudo(size, i)
        assume(not should_skip(p))
        target = root / p
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        expected.append(entry_for(p, data))
    assume(len(keys) == len(files))
    seen: list[int] = []
    callers: set[int] = set()

    def progress(n: int) -> None:
        seen.append(n)
        callers.add(threading.get_ident())

    old = mf_build._CHUNK
    mf_build._CHUNK = chunk  # exercise pieces spanning chunks as well as chunks holding whole pieces
    try:
        m = build_manifest(root, "o/m", "r", threads=threads, progress=progress)
    finally:
        mf_build._CHUNK = old
    assert m == Manifest("o/m", "r", expected)
    assert sum(seen) == m.total_size
    assert callers <= {threading.get_ident()}  # progress runs on the calling thread
    for f in m.files:
        assert f.blake3 == "blake3:" + blake3.blake3((root / f.path).read_bytes()).hexdigest()
    shutil.rmtree(root)


def test_build_model_dir(model_dir: Path, model_manifest: Manifest) -> None:
    m = model_manifest
    assert [f.path for f in m.files] == carried_files(2)
    for f in m.files:
        data = (model_dir / f.path).read_bytes()
        assert f == entry_for(f.path, data)
        assert f.kind == ("weight" if f.path.endswith(".safetensors") else "config")
    assert {f.path for f in m.files if f.kind == "config"} == set(CARRIED_CONFIGS)
    assert m.total_size > 8 * MiB
    assert build_manifest(model_dir, "test-org/tiny-llama", REV, threads=1) == m


def test_modelgen_is_deterministic(tmp_path: Path) -> None:
    a = make_model_dir(tmp_path / "a", weights_bytes=3 * MiB, n_weight_files=3, seed=7)
    b = make_model_dir(tmp_path / "b", weights_bytes=3 * MiB, n_weight_files=3, seed=7)
    c = make_model_dir(tmp_path / "c", weights_bytes=3 * MiB, n_weight_files=3, seed=8)
    ma, mb, mc = (build_manifest(p, "o/m", "r") for p in (a, b, c))
    assert ma == mb and ma != mc
    assert [f.path for f in ma.files] == carried_files(3)
    single = make_model_dir(tmp_path / "d", weights_bytes=1 * MiB, n_weight_files=1)
    assert [f.path for f in build_manifest(single, "o/m", "r").files] == carried_files(1)


def test_build_hf_snapshot_follows_symlinks(
    tmp_path: Path, model_dir: Path, model_manifest: Manifest
) -> None:
    snap = make_hf_snapshot(tmp_path / "hub", "test-org/tiny-llama", REV)
    repo = tmp_path / "hub" / "models--test-org--tiny-llama"
    assert snap == repo / "snapshots" / REV
    assert (repo / "refs" / "main").read_text() == REV
    for name in carried_files(2):
        link = snap / name
        assert link.is_symlink()
        target = os.readlink(link)
        assert target.startswith("../../blobs/")
        assert link.resolve().parent == (repo / "blobs").resolve()
    assert (snap / "README.md").is_symlink() and (snap / ".gitattributes").is_symlink()
    m = build_manifest(snap, "test-org/tiny-llama", REV)
    assert m == model_manifest  # same seed, same bytes, same manifest
    # A symlinked directory is not followed; a nested file link still is.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "extra.json").write_text("{}")
    (snap / "linked_dir").symlink_to(outside, target_is_directory=True)
    assert build_manifest(snap, "test-org/tiny-llama", REV) == m
    (snap / "sub").mkdir()
    (snap / "sub" / "extra.json").symlink_to(
        "../../../blobs/" + os.readlink(snap / "config.json").split("/")[-1]
    )
    m2 = build_manifest(snap, "test-org/tiny-llama", REV)
    assert [f.path for f in m2.files] == sorted([*carried_files(2), "sub/extra.json"], key=str.encode)
    # A dangling link is an incomplete snapshot: an error naming the file.
    (snap / "broken.json").symlink_to("../../blobs/missing")
    err = expect_error("files['broken.json']", build_manifest, snap, "test-org/tiny-llama", REV)
    assert "broken symlink" in err.reason


def test_nested_snapshot_links(tmp_path: Path) -> None:
    snap = make_hf_snapshot(
        tmp_path,
        "o/m",
        "main",
        ref=None,
        weights_bytes=64 * KiB,
        extra_files={"original/params.json": b"{}", "onnx/a/b.onnx": b"\0" * 100},
    )
    assert os.readlink(snap / "onnx" / "a" / "b.onnx").startswith("../../../../blobs/")
    m = build_manifest(snap, "o/m", "main")
    assert {"original/params.json", "onnx/a/b.onnx"} <= {f.path for f in m.files}
    assert m.files[m.file_index("onnx/a/b.onnx")] == entry_for("onnx/a/b.onnx", b"\0" * 100)


def test_build_skips(tmp_path: Path) -> None:
    files = {
        "config.json": b"{}",
        "README.md": b"# hi",
        "docs/Readme.md": b"x",
        ".gitattributes": b"*.bin lfs",
        "LICENSE": b"MIT",
        "LICENSE.txt": b"MIT",
        "logo.png": b"\x89PNG",
        "img/a.JPG": b"jpg",
        ".git/HEAD": b"ref: refs/heads/main",
        ".cache/huggingface/download/model.safetensors.metadata": b"x",
        "model.safetensors.incomplete": b"partial",
        "model.safetensors.lock": b"",
        "sub/.hidden": b"h",
        "weights/model.safetensors": b"\1" * 1000,
    }
    for p, data in files.items():
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(data)
    os.mkfifo(tmp_path / "fifo")
    m = build_manifest(tmp_path, "o/m", "r")
    assert [f.path for f in m.files] == ["config.json", "weights/model.safetensors"]


def test_build_empty_and_bad_roots(tmp_path: Path) -> None:
    expect_error("files", build_manifest, tmp_path, "o/m", "r", match="no files")
    (tmp_path / "README.md").write_text("only skipped files")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("x")
    expect_error("files", build_manifest, tmp_path, "o/m", "r", match="no files")
    expect_error("root", build_manifest, tmp_path / "missing", "o/m", "r")
    expect_error("root", build_manifest, tmp_path / "README.md", "o/m", "r")
    expect_error("model", build_manifest, tmp_path, "bad/na/me", "r")
    expect_error("revision", build_manifest, tmp_path, "o/m", "..")
    (tmp_path / "a.json").write_text("{}")
    expect_error("threads", build_manifest, tmp_path, "o/m", "r", threads=0)


@pytest.mark.parametrize(
    ("name", "field"),
    [("a\\b.json", "files['a\\\\b.json'].path"), ("x\x01y", "files['x\\x01y'].path")],
)
def test_build_rejects_bad_file_names(tmp_path: Path, name: str, field: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_text("{}")
    expect_error(field, build_manifest, tmp_path, "o/m", "r")


def test_build_rejects_case_collisions(tmp_path: Path) -> None:
    (tmp_path / "Config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    expect_error("files[1].path", build_manifest, tmp_path, "o/m", "r", match="collides")


def test_build_error_in_progress_stops_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        write_pseudorandom(tmp_path / f"w{i}.bin", 6 * MiB, b"k%d" % i)
    patch_mf(monkeypatch, "_CHUNK", 64 * KiB)  # readers are mid-file when the error comes

    class Stop(Exception):
        pass

    def progress(n: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        build_manifest(tmp_path, "o/m", "r", threads=2, progress=progress)
    assert not [t for t in threading.enumerate() if t.name.startswith(("swarm-hash", "swarm-manifest"))]


def test_build_detects_size_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.bin").write_bytes(b"\0" * 100)
    real_scan = mf_build._scan

    def scan_then_grow(root: str):
        jobs = real_scan(root)
        (tmp_path / "a.bin").write_bytes(b"\0" * 200)
        return jobs

    patch_mf(monkeypatch, "_scan", scan_then_grow)
    expect_error("files['a.bin']", build_manifest, tmp_path, "o/m", "r", match="changed size")
