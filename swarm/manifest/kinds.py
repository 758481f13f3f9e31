"""Classification of a snapshot's files (config or weight) and the files a manifest skips by default."""

from __future__ import annotations

import fnmatch

from swarm.manifest.rules import CONFIG_MAX_BYTES

# --- classification and skipping ---------------------------------------------------------------

# The one list of config files, used by every source (the swarm, the local cache, ModelExpress and
# the Hub all select with classify() over a file listing): basename globs (fnmatch, matched against
# the lower-cased basename) of files that are configs at any size -- model, generation and processor
# configs, tokenizers of every common kind, chat templates and shard indexes.
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer.model.v*",  # Mistral's versioned sentencepiece models
    "tekken.json",
    "tiktoken.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "vocab.bpe",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.spm",
)
"""Files that hold a tokenizer's vocabulary: a configs set needs one (with ``config.json``)."""
CONFIG_PATTERNS: tuple[str, ...] = (
    "config.json",
    "*_config.json",  # tokenizer_, generation_, preprocessor_, processor_, adapter_config.json, ...
    "params.json",
    "model_index.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.index.json",
    *TOKENIZER_PATTERNS,
)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".gguf",
    ".pt",
    ".pth",
    ".onnx",
    ".onnx_data",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".ckpt.index",  # with .iop and .gas: what ModelExpress's ignore_weights leaves out
    ".iop",
    ".gas",
    ".pkl",
    ".npz",
    ".npy",
    ".tflite",
    ".ot",
    ".nemo",
    ".llamafile",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
_LEFTOVER_SUFFIXES = (".lock", ".incomplete")


def _matches(patterns: tuple[str, ...], path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_tokenizer_file(path: str) -> bool:
    """True if ``path``'s basename matches :data:`TOKENIZER_PATTERNS` (case-insensitively)."""
    return _matches(TOKENIZER_PATTERNS, path)


def classify(path: str, size: int | None = None) -> str:
    """``"config"`` or ``"weight"``, by basename (compared case-insensitively).

    A file matching :data:`CONFIG_PATTERNS` (``config.json``, tokenizer files, ``*.index.json``,
    ...) is a config at any size; weight extensions (:data:`WEIGHT_SUFFIXES`: ``*.safetensors``,
    ``*.bin``, ``*.gguf``, ...) are weights; any other file is a config unless ``size`` is given and
    exceeds ``CONFIG_MAX_BYTES``.
    """
    if _matches(CONFIG_PATTERNS, path):
        return "config"
    if path.lower().endswith(WEIGHT_SUFFIXES):
        return "weight"
    if size is not None and size > CONFIG_MAX_BYTES:
        return "weight"
    return "config"


def should_skip(path: str) -> bool:
    """True for files a snapshot does not carry.

    Anything under a hidden directory (``.git/``, ``.cache/``, ...) or itself hidden
    (``.gitattributes``), ``README.md`` (any case, any depth), ``LICENSE*``/``LICENCE*``, images and
    ``*.lock`` / ``*.incomplete`` download leftovers.
    """
    parts = path.split("/")
    if any(p.startswith(".") for p in parts):
        return True
    lower = parts[-1].lower()
    return (
        lower == "readme.md"
        or lower.startswith(("license", "licence"))
        or lower.endswith(_IMAGE_SUFFIXES)
        or lower.endswith(_LEFTOVER_SUFFIXES)
    )
