#!/usr/bin/env python3
"""Writes docs/configuration.md from the option table in swarm/config/options.py (OPTIONS).

Usage: ``.venv/bin/python scripts/gen_config_reference.py`` (tests/test_cli.py fails when the file
and the table differ)."""

from pathlib import Path

from swarm.config import reference_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    out.write_text(reference_markdown())
    print(f"wrote {out}")
