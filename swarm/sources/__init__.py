"""The fallback chain behind ``swarm.fetch``: local HF cache -> ModelExpress -> swarm -> Hugging Face Hub.

A package: ``local.py`` (step 1), ``modelexpress.py`` (step 2), ``hub.py`` (step 4), ``chain.py``
(:func:`fetch_chain`); the values and errors are :mod:`swarm.fetchapi`'s, the file selection
:mod:`swarm.selection`'s.  Names are imported on first use (``from swarm.sources import
fetch_chain`` loads ``chain.py`` then), so ``swarm.sources.local`` alone stays light: the client's
no-network path imports it without trio.

:func:`fetch_chain` tries each source in turn and returns the first verified snapshot directory (HF
cache layout: ``<cache>/models--org--name/snapshots/<revision>/``; ``models--name`` for a
single-part name such as ``gpt2``).  Every source leaves an :class:`Attempt` -- taken or skipped,
and why -- and when all fail the error is typed:

* :class:`VerificationFailed` if any source produced data that failed verification;
* :class:`ModelNotFound` if every source was skipped or reported that it does not have the model;
* :class:`FetchTimeout` if ``FetchRequest.timeout`` expired (the source in progress is cancelled);
* :class:`FetchError` otherwise (a source failed for another reason, e.g. a server was down).

The message of each lists every source with its outcome and reason.

The environment that steers the sources -- ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_ENDPOINT``,
``MODEL_EXPRESS_URL``, ``MODEL_EXPRESS_CACHE_PATH`` -- is the caller's: ``FetchRequest.env``
(:class:`SourceEnv`) carries what the calling process has set, ``swarm.fetch`` sends it to the node
with the request, and only what the caller left unset falls back to the node's own environment.

Every source selects files the same way: the request's allow/ignore patterns (huggingface_hub's
semantics), then for ``configs_only`` :func:`swarm.manifest.classify` over a listing with sizes
(the manifest, ModelExpress's ``ListModelFiles``, the Hub's tree, the Hub's cached tree).

1. **local-cache** (:func:`local_snapshot`): in ``FetchRequest.cache_dir``, then in the
   ModelExpress cache root (``MODEL_EXPRESS_CACHE_PATH``, or ModelExpress's current name
   ``MODEL_EXPRESS_CACHE_DIRECTORY``; a cache shared with a ModelExpress server, read only), resolve
   the revision the way ``huggingface_hub`` does offline (``refs/<name>`` for a branch or tag,
   ``snapshots/<sha>`` for a commit) and check that the snapshot holds every requested file.  The
   list of files a commit should have comes from ``huggingface_hub``'s tree cache
   (``trees/<commit>.json``, written by its ``snapshot_download``) or else from a swarm manifest
   stored beside the snapshot (swarm/store/); sizes are checked against it, and blake3 digests too
   when ``FetchRequest.verify`` is set (which needs a stored manifest).  A dangling symlink or a link
   to an ``*.incomplete`` blob means incomplete.  Without a file list, a snapshot counts as a configs
   set only with ``config.json`` and a tokenizer file (:data:`swarm.manifest.TOKENIZER_PATTERNS`:
   ``AutoConfig`` alone leaves just ``config.json`` behind), a request for the whole model also
   needs at least one weight file and every shard named by an ``*.index.json``, and a leftover
   ``blobs/*.incomplete`` (an interrupted download) means incomplete.
2. **modelexpress** (:func:`from_modelexpress`), only when ``MODEL_EXPRESS_URL`` is set: see
   :mod:`swarm.modelexpress.client`.  The revision is sent to the server (a branch, tag or commit;
   none for the default branch) and the server's resolved commit is checked; ``configs_only`` asks
   it for ``ignore_weights``.
3. **swarm**: the callable the node passes in.  It should raise :class:`ModelNotFound` when no peer
   has the model (e.g. no providers in the DHT), :class:`VerificationFailed` when peers only sent bad
   data, or :class:`SourceSkipped` to record a skip; any other exception is recorded as a failure.
4. **hub** (:func:`from_hub`): ``huggingface_hub.snapshot_download`` in a worker thread; skipped when
   ``HF_HUB_OFFLINE`` is set.  ``configs_only`` lists the repo's tree first and downloads exactly the
   files ``classify()`` calls configs.

Steps 2 and 4 leave their result in the HF cache layout under ``FetchRequest.cache_dir``; building a
manifest and seeding it is the caller's job.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SOURCES",
    "Attempt",
    "FetchError",
    "FetchRequest",
    "FetchResult",
    "FetchTimeout",
    "HubEntry",
    "ModelNotFound",
    "SourceEnv",
    "SourceSkipped",
    "VerificationFailed",
    "default_cache_dir",
    "fetch_chain",
    "from_hub",
    "from_modelexpress",
    "hub_error",
    "hub_mismatch",
    "local_snapshot",
    "verify_hub_snapshot",
]

_WHERE = {
    **dict.fromkeys(
        (
            "SOURCES",
            "DEFAULT_HUB_ENDPOINT",
            "MAX_EXPECT",
            "Attempt",
            "FetchError",
            "FetchRequest",
            "FetchResult",
            "FetchTimeout",
            "ModelNotFound",
            "SourceEnv",
            "SourceSkipped",
            "VerificationFailed",
            "default_cache_dir",
        ),
        "swarm.fetchapi",
    ),
    **dict.fromkeys(("local_snapshot", "_selected", "_inspect_local", "_evict"), "swarm.sources.local"),
    "from_modelexpress": "swarm.sources.modelexpress",
    **dict.fromkeys(
        ("HubEntry", "from_hub", "hub_error", "hub_mismatch", "verify_hub_snapshot"), "swarm.sources.hub"
    ),
    "fetch_chain": "swarm.sources.chain",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'swarm.sources' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
