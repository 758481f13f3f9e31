"""Dynamo cards without Dynamo: parsing, names, checks against directories and manifests, the
metadata cache, the ``expect`` field of a fetch request and the control API's answer to it.
(``test_dynamo_runtime.py`` does the same against cards the real runtime produces.)"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from modelgen import make_model_dir

from swarm.control import ControlServer, _BadRequest
from swarm.dynamo.card import (
    MAX_CARD_FILES,
    CardError,
    dir_mismatches,
    file_digest,
    fnmatch_exact,
    install_mdc_cache,
    load_card,
    manifest_mismatches,
    parse_card,
    swarm_name,
)
from swarm.dynamo.watch import kept_files, local_copy, read_records
from swarm.manifest import build_manifest
from swarm.sources import FetchRequest


def checked(d: Path, name: str, url: str | None = None) -> dict:
    data = (d / name).read_bytes()
    return {
        "path": url or f"file://{d / name}",
        "checksum": f"blake3:{blake3.blake3(data).hexdigest()}",
        "size": len(data),
    }


@pytest.fixture(scope="module")
def mdir(tmp_path_factory) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("m"),
        weights_bytes=1 << 20,
        n_weight_files=2,
        seed=5,
        extra_files={"LICENSE": b"license\n", "logo.png": b"png"},
    )


def card_json(d: Path, **over) -> dict:
    base = "http://10.0.0.1:9090/v1/metadata/ns/backend/generate/org/m/_base/"
    obj = {
        "display_name": "org/m",
        "slug": "org--m",
        "source_path": str(d),
        "model_info": {"hf_config_json": checked(d, "config.json", base + "config.json")},
        "tokenizer": {"hf_tokenizer_json": checked(d, "tokenizer.json")},
        "prompt_formatter": {"hf_tokenizer_config_json": checked(d, "tokenizer_config.json")},
        "chat_template_file": {
            "hf_chat_template": {"is_custom": False, "file": checked(d, "chat_template.jinja")}
        },
        "gen_config": {"hf_generation_config_json": checked(d, "generation_config.json")},
        "extra_files": [
            checked(d, "LICENSE"),
            checked(d, "logo.png"),
            checked(d, "model.safetensors.index.json"),
        ],
    }
    obj.update(over)
    return obj


def test_parse_card_and_its_discovery_record(mdir):
    obj = card_json(mdir)
    card = parse_card(obj)
    assert [f.name for f in card.files] == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "LICENSE",
        "logo.png",
        "model.safetensors.index.json",
    ]
    assert card.files[0].url.startswith("http://")
    record = {
        "type": "Model",
        "namespace": "ns",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": 7,
        "card_json": obj,
    }
    wrapped = parse_card(json.dumps(record).encode())
    assert wrapped.files == card.files and wrapped.key == "ns/backend/generate/7"
    assert dir_mismatches(mdir, card.expect()) == []
    assert kept_files(card) == {"LICENSE", "logo.png"}


def test_custom_chat_template_is_not_carried(mdir, tmp_path):
    (tmp_path / "my.jinja").write_text("{{ x }}")
    obj = card_json(
        mdir,
        chat_template_file={"hf_chat_template": {"is_custom": True, "file": checked(tmp_path, "my.jinja")}},
    )
    card = parse_card(obj)
    assert "my.jinja" in {f.name for f in card.files}
    assert "my.jinja" not in {f.name for f in card.carried}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o["model_info"]["hf_config_json"].update(checksum="sha256:00"), "checksum"),
        (lambda o: o["model_info"]["hf_config_json"].update(checksum="blake3:" + "A" * 64), "checksum"),
        (lambda o: o["model_info"]["hf_config_json"].update(size=-1), "size"),
        (lambda o: o["model_info"]["hf_config_json"].update(size=True), "size"),
        (lambda o: o["model_info"]["hf_config_json"].update(path="http://h/x/.."), "unusable name"),
        (lambda o: o["model_info"]["hf_config_json"].update(path="http://h/a/%2e%2e"), "unusable name"),
        (lambda o: o["model_info"]["hf_config_json"].pop("path"), "no path"),
        (lambda o: o.update(extra_files={"a": 1}), "extra_files must be a list"),
        (
            lambda o: o.update(extra_files=[dict(o["extra_files"][0], size=1)] * 2 + o["extra_files"]),
            "twice with different contents",
        ),
        (lambda o: o.update(extra_files=[o["extra_files"][0]] * (MAX_CARD_FILES + 1)), "MAX_CARD_FILES"),
        (lambda o: o.pop("display_name"), "display_name"),
        (lambda o: o.update(tokenizer={"a": {}, "b": {}}), "one variant"),
    ],
)
def test_bad_cards_are_refused_with_a_reason(mdir, mutate, message):
    obj = card_json(mdir)
    mutate(obj)
    with pytest.raises(CardError, match=message):
        parse_card(obj)


def test_load_card_reads_files_and_refuses_junk(mdir, tmp_path):
    p = tmp_path / "card.json"
    p.write_text(json.dumps(card_json(mdir)))
    assert load_card(p).display_name == "org/m"
    assert load_card(str(p)) == load_card(p)
    with pytest.raises(CardError, match="cannot read"):
        load_card(tmp_path / "missing.json")
    with pytest.raises(CardError, match="not JSON"):
        load_card("{nope")
    with pytest.raises(CardError, match="JSON object"):
        parse_card("[1]")


@pytest.mark.parametrize(
    "display, source, want",
    [
        ("org/m", "/models/x", "org/m"),
        ("served", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
        ("my-model", "/models/x", "dynamo/my-model"),
        ("a name with spaces!", None, "dynamo/a-name-with-spaces"),
    ],
)
def test_swarm_name(mdir, display, source, want):
    obj = card_json(mdir, display_name=display, slug=display, source_path=source)
    assert swarm_name(parse_card(obj)) == want


def test_fnmatch_exact_quotes_globs():
    import fnmatch

    for name in ("a[1].json", "x*y?.txt", "plain.json"):
        assert fnmatch.fnmatchcase(name, fnmatch_exact(name))
    assert not fnmatch.fnmatchcase("a1.json", fnmatch_exact("a[1].json"))


def test_manifest_keeps_skipped_files_only_when_asked(mdir):
    card = parse_card(card_json(mdir))
    plain = build_manifest(mdir, "org/m", "r")
    assert manifest_mismatches(plain, card.expect()) == [
        "LICENSE: not in the manifest",
        "logo.png: not in the manifest",
    ]
    kept = build_manifest(mdir, "org/m", "r", keep=kept_files(card))
    assert manifest_mismatches(kept, card.expect()) == []
    assert {f.path for f in kept.files} - {f.path for f in plain.files} == {"LICENSE", "logo.png"}
    # A manifest's file digest is the plain blake3 of the file: the card's checksum.
    for f in kept.files:
        assert file_digest(mdir / f.path) == (f.blake3, f.size)


def test_dir_and_manifest_mismatches_name_the_file(mdir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mdir, copy)
    card = parse_card(card_json(mdir))
    (copy / "config.json").write_bytes((copy / "config.json").read_bytes().replace(b"1", b"2", 1))
    (copy / "LICENSE").unlink()
    differ = dir_mismatches(copy, card.expect())
    assert len(differ) == 2 and differ[0].startswith("config.json: blake3")
    assert differ[1] == "LICENSE: missing"
    other = build_manifest(copy, "org/m", "r")
    assert manifest_mismatches(other, card.expect())[0] == "config.json: the manifest has other bytes"


def test_install_mdc_cache_is_content_addressed_and_checked(mdir, tmp_path):
    card = parse_card(card_json(mdir))
    blobs = install_mdc_cache(mdir, card, tmp_path / "mdc")
    assert [b.name for b in blobs] == [f.hex for f in card.carried]
    for f in card.carried:
        assert file_digest(tmp_path / "mdc" / "blobs" / f.hex) == (f.checksum, f.size)
    # A stale blob is replaced; a source that does not match the card is refused, nothing left.
    stale = tmp_path / "mdc" / "blobs" / card.files[0].hex
    stale.write_bytes(b"stale")
    install_mdc_cache(mdir, card, tmp_path / "mdc")
    assert file_digest(stale)[0] == card.files[0].checksum
    bad = parse_card(
        card_json(
            mdir,
            model_info={"hf_config_json": dict(checked(mdir, "config.json"), checksum="blake3:" + "1" * 64)},
        )
    )
    with pytest.raises(CardError, match="changed while being copied"):
        install_mdc_cache(mdir, bad, tmp_path / "mdc2")
    assert not (tmp_path / "mdc2" / "blobs" / ("1" * 64)).exists()
    assert not list((tmp_path / "mdc2" / "blobs").glob("*swarm-tmp*"))


def test_read_records_and_local_copy(mdir, tmp_path):
    d = tmp_path / "kv" / "v1" / "mdc"
    d.mkdir(parents=True)
    (d / "ns%2Fb%2Fg%2F1").write_text(json.dumps({"card_json": card_json(mdir)}))
    (d / "huge").write_bytes(b" " * (4 << 20 + 1))
    records = read_records(tmp_path / "kv")
    assert [k for k, _ in records] == ["ns%2Fb%2Fg%2F1"]
    card = parse_card(records[0][1])
    assert local_copy(card, tmp_path / "cache") == (mdir, None)
    other = parse_card(card_json(mdir, source_path=str(tmp_path)))
    assert local_copy(other, tmp_path / "cache") is None
    assert read_records(tmp_path / "absent") == []


def test_fetch_request_expect_is_validated(mdir):
    card = parse_card(card_json(mdir))
    req = FetchRequest(repo_id="org/m", expect=card.expect())
    assert req.expect == tuple(sorted(card.expect()))
    for bad in (
        [("../x", "blake3:" + "0" * 64, 1)],
        [("x", "md5:0", 1)],
        [("x", "blake3:" + "0" * 64, -1)],
        [],
        [("x", "y")],
    ):
        with pytest.raises((ValueError, TypeError)):
            FetchRequest(repo_id="org/m", expect=bad)


def test_control_api_parses_expect(tmp_path):
    server = ControlServer(tmp_path / "home")
    good = {"repo_id": "org/m", "expect": [["config.json", "blake3:" + "0" * 64, 3]]}
    req, _ = server._parse_fetch(json.dumps(good).encode())
    assert req.expect == (("config.json", "blake3:" + "0" * 64, 3),)
    for bad in (
        {"repo_id": "org/m", "expect": "x"},
        {"repo_id": "org/m", "expect": [["a", "b"]]},
        {"repo_id": "org/m", "expect": [["a", "blake3:zz", 1]]},
    ):
        with pytest.raises(_BadRequest):
            server._parse_fetch(json.dumps(bad).encode())


def test_cli_usage_errors(monkeypatch, capsys, tmp_path):
    from swarm import cli

    monkeypatch.delenv("DYN_FILE_KV", raising=False)
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    assert cli.main(["fetch", "--home", str(tmp_path)]) == cli.EXIT_USAGE
    assert cli.main(["fetch", "org/m", "--card", "c.json", "--home", str(tmp_path)]) == cli.EXIT_USAGE
    assert (
        cli.main(["fetch", "--card", "c.json", "--configs-only", "--home", str(tmp_path)]) == cli.EXIT_USAGE
    )
    assert cli.main(["dynamo-watch", "--home", str(tmp_path)]) == cli.EXIT_USAGE
    assert (
        cli.main(["dynamo-watch", "--kv", "a", "--etcd", "http://x", "--home", str(tmp_path)])
        == cli.EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "--card" in err and "DYN_FILE_KV" in err
    # A card that cannot be read is a clear failure, not a traceback.
    assert (
        cli.main(["fetch", "--card", str(tmp_path / "none.json"), "--home", str(tmp_path)]) == cli.EXIT_USAGE
    )
    assert "cannot read card" in capsys.readouterr().err


def test_local_copy_of_a_hub_repo_card_is_its_hf_cache_snapshot(tmp_path):
    from modelgen import make_hf_snapshot

    cache = tmp_path / "hub"
    snap = make_hf_snapshot(
        cache,
        "org/hubbed",
        weights_bytes=1 << 20,
        n_weight_files=2,
        seed=9,
        extra_files={"LICENSE": b"l\n", "logo.png": b"png"},
    )
    card = parse_card(
        card_json(
            snap,
            display_name="served-name",
            slug="served-name",
            source_path="org/hubbed",
            extra_files=[checked(snap, "LICENSE")],
        )
    )
    assert swarm_name(card) == "org/hubbed"
    assert local_copy(card, cache) == (snap, snap.name)
    # Other bytes under the same repo id (another version) are not this card's.
    other = parse_card(
        card_json(
            snap,
            source_path="org/hubbed",
            model_info={"hf_config_json": dict(checked(snap, "config.json"), checksum="blake3:" + "2" * 64)},
        )
    )
    assert local_copy(other, cache) is None
