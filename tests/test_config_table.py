"""The option table of swarm/config/ (issue #13 item 5): one declarative table from which the
argparse flags, the SWARM_* variables, the TOML keys and docs/configuration.md all come, and one
resolver that applies cli > env > TOML > default for every option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from swarm.config import (
    KINDS,
    OPTIONS,
    ConfigError,
    Option,
    add_arguments,
    add_run_arguments,
    bootstrap_from_env,
    check_publisher_id,
    option,
    reference_markdown,
    resolve_home,
    resolve_run,
)

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_docs_configuration_md_is_the_generated_reference():
    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run scripts/gen_config_reference.py"
    )


def test_every_option_has_one_flag_variable_and_key():
    assert len({o.key for o in OPTIONS}) == len(OPTIONS)
    assert len({o.cli for o in OPTIONS}) == len(OPTIONS)
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)
    doc = reference_markdown()
    for o in OPTIONS:
        assert option(o.key) is o
        assert o.kind in KINDS
        assert o.env == "SWARM_" + o.key.upper()
        assert f"`{o.key}`" in doc and f"`{o.cli}`" in doc and f"`{o.env}`" in doc
        if o.kind == "switch":
            assert f"`{o.cli_off}`" in doc and f"`{o.env_off}`" in doc


def test_options_are_frozen_and_kinds_checked():
    o = option("lane")
    with pytest.raises(AttributeError):
        o.key = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Option("x", "no-such-kind", "help")


def test_argparse_arguments_come_from_the_table():
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    flags = {s for a in p._actions for s in a.option_strings}
    for o in OPTIONS:
        assert o.cli in flags
        if o.kind == "switch":
            assert o.cli_off in flags
    ns = p.parse_args([])
    assert all(getattr(ns, o.key) is None for o in OPTIONS)  # nothing defaulted by argparse
    a, b = "/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"
    ns = p.parse_args(["--listen", a, "--listen", b, "--no-direct-io"])
    assert ns.listen == [a, b] and ns.direct_io is False


def test_add_arguments_subset_in_a_group():
    p = argparse.ArgumentParser()
    add_arguments(p, ["home", "lane"], group="node")
    assert [g.title for g in p._action_groups][-1] == "node"
    ns = p.parse_args(["--home", "/h", "--lane", "off"])
    assert (ns.home, ns.lane) == ("/h", "off")
    with pytest.raises(SystemExit):
        p.parse_args(["--lane", "bogus"])
    with pytest.raises(KeyError):
        add_arguments(argparse.ArgumentParser(), ["no_such_option"])


def test_one_order_of_precedence_for_home(tmp_path: Path):
    """resolve_home (fetch, status, swarm.fetch) and resolve_run (run) pick ``home`` alike."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('home = "from-file"\n')
    env = {"SWARM_CONFIG": str(cfg)}
    cases = [
        ({"home": str(tmp_path / "cli")}, dict(env, SWARM_HOME=str(tmp_path / "env")), tmp_path / "cli"),
        ({}, dict(env, SWARM_HOME=str(tmp_path / "env")), tmp_path / "env"),
        ({}, env, tmp_path / "from-file"),
        ({}, dict(env, SWARM_HOME=""), tmp_path / "from-file"),  # empty counts as unset
    ]
    for given, e, want in cases:
        assert resolve_home(given.get("home"), env=e) == want
        assert resolve_run(env=e, **given).home == want


def test_home_on_the_command_line_never_reads_the_file(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("this is not toml [")
    assert resolve_home(tmp_path / "h", cli_config=broken, env={}) == tmp_path / "h"
    env = {"SWARM_HOME": str(tmp_path / "e"), "SWARM_CONFIG": str(broken)}
    assert resolve_home(env=env) == tmp_path / "e"
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_home(cli_config=broken, env={})


def test_bootstrap_from_env_goes_through_the_table():
    addr = f"/ip4/10.0.0.5/tcp/4001/p2p/{PUBLISHER}"
    assert bootstrap_from_env({}) == ()
    assert bootstrap_from_env({"SWARM_BOOTSTRAP": f" {addr} ,{addr}"}) == (addr, addr)
    with pytest.raises(ConfigError, match="SWARM_BOOTSTRAP"):
        bootstrap_from_env({"SWARM_BOOTSTRAP": "/ip4/10.0.0.5/tcp/4001"})


def test_publisher_ids_are_decoded_with_the_base58_package():
    assert check_publisher_id(f" {PUBLISHER} ", "x") == PUBLISHER
    for bad in (
        "0OIl",  # not in the base58 alphabet
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # an RSA-style (sha256) peer id
        PUBLISHER[:-1],
    ):
        with pytest.raises(ConfigError, match="not the peer id of an Ed25519"):
            check_publisher_id(bad, "x")
