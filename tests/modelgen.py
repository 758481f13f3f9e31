"""The tests' name for ``swarm.testmodel``: deterministic, realistic model directories and HF cache
snapshots. The generator lives in the package because ``swarm-node demo`` needs it too."""

from swarm.testmodel import *  # noqa: F403
from swarm.testmodel import __all__  # noqa: F401

MODEL_NAME = "test-org/tiny-llama"
MODEL_REVISION = "0123456789abcdef0123456789abcdef01234567"
