"""Constants shared by the options, ``ConfigError`` and the defaults that depend on the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "control.sock"
"""The control socket's file name inside the home directory."""

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
"""``run`` listens on every interface, on a port the OS picks, unless told otherwise."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

TRUST_POLICIES = ("open", "trusted-publishers")
"""Same as ``swarm.trust.POLICIES`` (not imported: this module stays light for the client path)."""

LANE_MODES = ("encrypted", "plaintext", "off")
"""Same as ``swarm.net.lane.LANE_MODES`` (not imported: that would import libp2p). "plaintext" is
for trusted networks only and is used only when both ends are set to it."""
DEFAULT_LANE = "encrypted"

DEFAULT_DRAIN_TIMEOUT = 10.0
"""Seconds a stopping node waits for promised pieces: a 64 MiB piece takes ~5 s at 100 Mbit/s, and
systemd (TimeoutStopSec=30) and Kubernetes (terminationGracePeriodSeconds: 30) kill later."""

LOG_FORMATS = ("text", "json")
"""Same as ``swarm.logfmt.LOG_FORMATS``."""


class ConfigError(ValueError):
    """An option has an unusable value; the message names the option and where it came from."""


# --- defaults ----------------------------------------------------------------------------------


def default_home() -> Path:
    """The node's state directory when neither ``--home`` nor ``SWARM_HOME`` is given."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("swarm"))


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, found the way ``huggingface_hub`` finds it: ``HF_HUB_CACHE``
    (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def socket_path(home: Path | str) -> Path:
    return Path(home) / SOCKET_NAME
