"""Fixtures of the adversarial suite (see advkit.py for the hostile peers and docs/reliability.md for
what each scenario measured)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import attrs
import blake3
import pytest
from advkit import LEDGER, MODEL, read_pieces
from modelgen import make_model_dir

from swarm.manifest import build_manifest


@pytest.fixture(scope="session")
def adv_model(tmp_path_factory) -> tuple[Path, object, dict[int, bytes]]:
    """(directory, manifest, pieces): 32 MiB of weights in 2 shards (8 pieces of 4 MiB) plus the
    config set, with the manifest a node serving the directory announces."""
    root = make_model_dir(
        tmp_path_factory.mktemp("adv-src"), weights_bytes=32 << 20, n_weight_files=2, seed=7
    )
    m = build_manifest(root, MODEL, "local")
    # The revision a node serving the directory derives from its content (node._ManifestCache).
    m = attrs.evolve(m, revision=blake3.blake3(m.encode()).hexdigest()[:40])
    return root, m, read_pieces(m, root)


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_log():
    """ERROR records of swarm's own loggers during the test: a handler that failed with an
    unexpected exception logs one (``log.exception``), which a hostile peer must never cause.
    (``transfer ... failed`` from a local store error is expected in the disk-full scenario.)"""
    h = _ErrorLog()
    logger = logging.getLogger("swarm")
    logger.addHandler(h)
    try:
        yield h.records
    finally:
        logger.removeHandler(h)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not LEDGER:
        return
    tr = terminalreporter
    tr.section("adversarial outcomes (docs/reliability.md)")
    for row in LEDGER:
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k != "scenario")
        tr.write_line(f"{row['scenario']}: {rest}")
    out = os.environ.get("SWARM_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps(LEDGER, indent=1, default=str))
