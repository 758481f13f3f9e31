"""Option resolution for ``swarm-node`` and ``swarm.fetch``: one declarative table, ``OPTIONS``.

Each entry of ``OPTIONS`` is one setting of ``swarm-node run``. From it come the command-line flag
(``--listen``), the environment variable (``SWARM_LISTEN``), the TOML key (``listen``), the
attribute of ``RunSettings``, the ``run --help`` text and the configuration reference in
``docs/configuration.md`` (``reference_markdown``; a test keeps the file in step). A value comes,
in this order of precedence, from

1. the command line,
2. a ``SWARM_*`` environment variable (an empty one counts as unset),
3. a TOML config file (``--config FILE`` or ``SWARM_CONFIG``; relative paths are relative to the
   file's directory; any key not in the table is an error naming it),
4. the default.

A list option (``listen``, ``bootstrap``, ``serve``, ``trusted_publishers``) is taken whole from
the first place that sets it; lists from different places are not merged. In variables, lists are
comma-separated. A switch (``serve_hf_cache``, ``direct_io``) has ``--x`` and ``--no-x`` flags and
``SWARM_X`` / ``SWARM_NO_X`` variables (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/
``off``).

What a node serves: its ``serve`` directories and what it fetched through the swarm, always; the
complete snapshots of the local HF cache, and what it fetches from the Hub or ModelExpress (which
may be gated or private repos pulled with ``HF_TOKEN``), only with ``serve_hf_cache``. That switch
defaults to on with a private swarm key (``psk``: only nodes holding the key can connect) and to
off without one (anyone who reaches the port could fetch any such snapshot by name); turn it on
without a key deliberately with ``--serve-hf-cache`` (``SWARM_SERVE_HF_CACHE=1``,
``serve_hf_cache = true``).

This package is imported by the client path (``swarm.fetch``): it imports only the standard library,
``attrs`` and ``platformdirs`` (``base58`` when a publisher id is checked).

One job per module: ``base`` (constants, ``ConfigError``, defaults), ``parse`` (reading one value),
``options`` (the table), ``resolve`` (the one resolver: ``resolve_run``, ``resolve_home``,
``load_toml``), ``views`` (argparse arguments and the reference, generated from the table).
"""

from swarm.config.base import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_LANE,
    DEFAULT_LISTEN,
    LANE_MODES,
    LOG_FORMATS,
    SOCKET_NAME,
    TRUST_POLICIES,
    ConfigError,
    default_cache_dir,
    default_home,
    socket_path,
)
from swarm.config.options import KINDS, OPTIONS, Option, option
from swarm.config.parse import (
    MIN_RATE,
    RATE_DOC,
    SIZE_UNITS,
    check_hostport,
    check_lane,
    check_publisher_id,
    check_trust,
    format_rate,
    parse_psk_option,
    parse_rate,
    parse_serve,
    parse_size,
)
from swarm.config.resolve import RunSettings, bootstrap_from_env, load_toml, resolve_home, resolve_run
from swarm.config.views import add_arguments, add_run_arguments, reference_markdown

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_LANE",
    "DEFAULT_LISTEN",
    "KINDS",
    "LANE_MODES",
    "LOG_FORMATS",
    "MIN_RATE",
    "OPTIONS",
    "RATE_DOC",
    "SIZE_UNITS",
    "SOCKET_NAME",
    "TRUST_POLICIES",
    "ConfigError",
    "Option",
    "RunSettings",
    "add_arguments",
    "add_run_arguments",
    "bootstrap_from_env",
    "check_hostport",
    "check_lane",
    "check_publisher_id",
    "check_trust",
    "default_cache_dir",
    "default_home",
    "format_rate",
    "load_toml",
    "option",
    "parse_psk_option",
    "parse_rate",
    "parse_serve",
    "parse_size",
    "reference_markdown",
    "resolve_home",
    "resolve_run",
    "socket_path",
]
