"""Shared pytest fixtures.  Test helpers live in tests/modelgen.py (``import modelgen``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:  # make ``import modelgen`` work under any import mode
    sys.path.insert(0, str(_TESTS))

from modelgen import (  # noqa: E402
    MODEL_NAME,
    MODEL_REVISION,
    make_model_dir,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model directory (~8 MiB of weights in 2 shards, seed 0), built once per session.

    Shared: do not modify it; copy it (shutil.copytree) if a test needs to.
    """
    return make_model_dir(tmp_path_factory.mktemp("model"), weights_bytes=8 << 20, n_weight_files=2, seed=0)


@pytest.fixture(scope="session")
def model_manifest(model_dir: Path):
    """build_manifest(model_dir, MODEL_NAME, MODEL_REVISION), built once per session."""
    from swarm.manifest import build_manifest

    return build_manifest(model_dir, MODEL_NAME, MODEL_REVISION)
