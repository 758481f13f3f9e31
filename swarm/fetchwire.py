"""The light half of the fetch API (:mod:`swarm.fetchapi`): what ``swarm.fetch`` and
``swarm-node fetch`` need before the request is on its way to the node, and nothing more. The
``POST /v1/fetch`` body from the call's arguments (:func:`request_body`), the caller's environment as
that body carries it (:func:`environ_json`), and the cache roots the client looks in first
(:func:`default_cache_dir`, :func:`repo_folder`); and the node's ``result`` event as
``swarm-node fetch --json`` prints it (:func:`result_answer`).

Standard library only (no attrs, no ``swarm.manifest``): the client sends the request first and
builds and checks its own ``FetchRequest`` while the node works on it (issue #12 item 5). The
checks are :mod:`swarm.fetchapi`'s (which re-exports all of this); the node makes the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["default_cache_dir", "environ_json", "repo_folder", "request_body", "result_answer"]

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


def _set(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to a non-empty value (empty counts as unset, as in huggingface_hub)."""
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def _abspath(value: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def environ_json(environ: Mapping[str, str] | None = None) -> dict:
    """The variables that steer the sources, as this process has them, unchecked: the fields of
    ``swarm.fetchapi.SourceEnv`` that are set (``SourceEnv.from_environ(environ).to_json()``, which
    is built from this and checks it)."""
    env = os.environ if environ is None else environ
    offline = [env.get(n) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if env.get(n)]
    cache = _set(env, "MODEL_EXPRESS_CACHE_PATH", "MODEL_EXPRESS_CACHE_DIRECTORY")
    values = {
        "hub_offline": any(v.upper() in _TRUE for v in offline) if offline else None,
        "hf_token": _set(env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
        "hf_endpoint": _set(env, "HF_ENDPOINT"),
        "modelexpress_url": _set(env, "MODEL_EXPRESS_URL"),
        "modelexpress_cache": None if cache is None else str(_abspath(cache)),
    }
    return {k: v for k, v in values.items() if v is not None}


def default_cache_dir() -> Path:
    """The HF hub cache dir from the environment *now* (``HF_HUB_CACHE``, ``HF_HOME``, XDG, ~)."""
    env = os.environ
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not raw:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        raw = os.path.join(home, "hub")
    return _abspath(os.path.expandvars(raw))


def repo_folder(repo_id: str) -> str:
    """The directory of a model in a hub cache, ``models--org--name``, unchecked: for the client's
    quick "is there anything local?" test before a request is even built. Everything else goes
    through :mod:`swarm.store.layout` (the owner of the layout, which validates the name)."""
    return "models--" + repo_id.replace("/", "--")


def request_body(
    repo_id: str,
    revision: str | None,
    allow_patterns: str | Iterable[str] | None,
    ignore_patterns: str | Iterable[str] | None,
    configs_only: bool,
    timeout: float | None,
    env: Any,
    expect: Iterable | None = None,
) -> dict:
    """``swarm.fetchapi.request_json`` from the arguments themselves, unchecked (the node checks
    them with ``request_from_json``): what the client sends before it builds its own FetchRequest.
    ``env``: :func:`environ_json`'s dict, or a ``SourceEnv``."""

    def pats(p: str | Iterable[str] | None) -> list[str] | None:
        return None if p is None else [p] if isinstance(p, str) else list(p)

    return {
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": pats(allow_patterns),
        "ignore_patterns": pats(ignore_patterns),
        "configs_only": bool(configs_only),
        "timeout": timeout,
        "env": dict(env) if isinstance(env, dict) else env.to_json(),
        **({"expect": [list(e) for e in expect]} if expect else {}),
    }


def result_answer(event: dict) -> dict:
    """A ``result`` event as ``{"path", "source", "revision", "attempts"}``, normalized as
    ``swarm.fetchapi.result_json(swarm.fetchapi.decode_event(event))`` (which is built on this):
    what ``swarm-node fetch --json`` prints, without building a FetchResult."""
    path = Path(event["path"])
    return {
        "path": str(path),
        "source": str(event.get("source") or "?"),
        "revision": str(event.get("revision") or path.name),
        "attempts": [
            {
                "source": str(a.get("source", "?")),
                "outcome": str(a.get("outcome", "?")),
                "reason": str(a.get("reason", "")),
            }
            for a in event.get("attempts") or ()
            if isinstance(a, dict)
        ],
    }
