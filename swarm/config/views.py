"""Views generated from the option table: argparse arguments and the configuration reference."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from swarm.config.options import _KIND_DOC, OPTIONS, option
from swarm.config.parse import RATE_DOC

# --- generated views of the table --------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    keys: Iterable[str] | None = None,
    *,
    group: str | None = None,
) -> None:
    """The options ``keys`` (every one of ``OPTIONS`` if None) as flags of ``parser``, inside a new
    argument group titled ``group`` if given. ``dest`` is the option's key and nothing is
    defaulted here, so ``resolve_run`` / ``resolve_home`` can tell what the command line set."""
    target = parser.add_argument_group(group) if group else parser
    for opt in OPTIONS if keys is None else [option(k) for k in keys]:
        doc = f"{opt.help} (env {opt.env}; config key {opt.key}; default {opt.default_doc})"
        doc = doc.replace("%", "%%")
        kw: dict[str, Any] = {"dest": opt.key, "help": doc, "default": None}
        if opt.kind == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = opt.metavar or opt.key.upper()
            if opt.is_list:
                kw["action"] = "append"
            if opt.choices:
                kw["choices"] = opt.choices
                kw["metavar"] = "{" + ",".join(opt.choices) + "}"
        target.add_argument(opt.cli, **kw)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``OPTIONS`` as a flag of ``parser`` (``swarm-node run``)."""
    add_arguments(parser)


def reference_markdown() -> str:
    """``docs/configuration.md``, generated from ``OPTIONS`` (scripts/gen_config_reference.py)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `swarm/config/options.py` (`OPTIONS`) by `scripts/gen_config_reference.py`; a",
        "test fails when this file and the table differ. Every setting of `swarm-node run` comes from,",
        "in this order: the command line, a `SWARM_*` variable (an empty one counts as unset), the TOML",
        "file named by `--config` or `SWARM_CONFIG` (relative paths are relative to the file), the",
        "default. Lists are taken whole from the first place that sets them; in variables they are",
        "comma-separated. Switches have `--x` / `--no-x` flags and `SWARM_X` / `SWARM_NO_X`",
        "variables (`1/true/yes/on` or `0/false/no/off`).",
        "",
        "| TOML key | flag | variable | TOML type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        flag = f"`{o.cli}` / `{o.cli_off}`" if o.kind == "switch" else f"`{o.cli}`"
        var = f"`{o.env}` / `{o.env_off}`" if o.kind == "switch" else f"`{o.env}`"
        kind = _KIND_DOC[o.kind] + (f": {', '.join(o.choices)}" if o.choices else "")
        meaning = o.help.replace("|", "\\|")
        lines.append(f"| `{o.key}` | {flag} | {var} | {kind} | {o.default_doc} | {meaning} |")
    lines += [
        "",
        f"Rates: {RATE_DOC}.",
        "",
        "Other variables the node and `swarm.fetch` read: `SWARM_CONFIG` (the TOML file),",
        "`SWARM_HOME` (also where `fetch` and `status` find the node), `MODEL_EXPRESS_URL`,",
        "`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE` / `HF_HOME` (the default cache",
        "dir).",
        "",
        "An example file:",
        "",
        "```toml",
        'home = "/var/lib/swarm"',
        'listen = ["/ip4/0.0.0.0/tcp/4001"]',
        'bootstrap = ["/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."]',
        'cache_dir = "/data/hf/hub"',
        'psk = "swarm.key"',
        'trust = "trusted-publishers"',
        'trusted_publishers = ["12D3KooW..."]',
        'lane = "encrypted"',
        'log_format = "json"',
        'metrics_listen = "127.0.0.1:9400"',
        'max_cache_size = "500G"',
        'max_upload_rate = "100MB/s"',
        "[serve]",
        '"acme/private-model" = "/models/private-model"',
        "```",
        "",
    ]
    return "\n".join(lines)
