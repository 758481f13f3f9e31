"""Which files of a snapshot a request asks for: the one selection function.

Every place that chooses files uses :func:`select_files`: the manifest (``Manifest.select``), the
local cache check, ModelExpress, the Hub, the origin's Hub pull and the client's copies into
``cache_dir`` / ``local_dir``.  The rule is huggingface_hub's:

* ``allow_patterns`` / ``ignore_patterns``: case-sensitive ``fnmatch`` on the relative POSIX path
  (``*`` crosses ``/``), ``"dir/"`` means ``"dir/*"``, backslashes count as ``/``; a path must match
  an allow pattern (when any are given) and no ignore pattern;
* ``configs_only``: only files of kind ``"config"`` (:func:`swarm.manifest.classify` with the size
  where known, or the kind a manifest recorded), without the files a snapshot never carries
  (:func:`swarm.manifest.should_skip`: README.md, .gitattributes, images, ...).

Pure: no I/O, and it imports only ``swarm.manifest``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

__all__ = ["normalize_patterns", "select_files"]


def normalize_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    """huggingface_hub's form of a pattern list: a string is one pattern, ``\\`` is ``/``, and a
    pattern ending in ``/`` matches everything under it."""
    if patterns is None:
        return None
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    out = []
    for p in items:
        p = str(p).replace("\\", "/")
        out.append(p + "*" if p.endswith("/") else p)
    return out


def select_files(
    paths: Iterable[str],
    *,
    allow_patterns: str | Iterable[str] | None = None,
    ignore_patterns: str | Iterable[str] | None = None,
    configs_only: bool = False,
    sizes: Mapping[str, int] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> list[str]:
    """The paths of ``paths`` (in their order) that the request asks for (see the module doc).

    For ``configs_only`` a path's kind is ``kinds[path]`` when given (a manifest's record), else
    ``classify(path, sizes.get(path))``."""
    from swarm.manifest import classify, should_skip

    allow = normalize_patterns(allow_patterns)
    ignore = normalize_patterns(ignore_patterns)
    sizes = sizes or {}
    out = []
    for path in paths:
        p = path.replace("\\", "/")
        if allow is not None and not any(fnmatch.fnmatchcase(p, pat) for pat in allow):
            continue
        if ignore is not None and any(fnmatch.fnmatchcase(p, pat) for pat in ignore):
            continue
        if configs_only:
            kind = kinds[path] if kinds is not None and path in kinds else classify(path, sizes.get(path))
            if kind != "config" or should_skip(path):
                continue
        out.append(path)
    return out
