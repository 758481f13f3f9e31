"""Deterministic, realistic model directories (the demo's model; the tests' ``modelgen``).

``make_model_dir(root)`` writes what a small Llama-style Hub repo holds: configs, a ~1 MB tokenizer,
an index and ``model-0000k-of-0000n.safetensors`` shards (valid safetensors framing around
pseudo-random tensor bytes), plus ``README.md`` and ``.gitattributes``, which swarm does not carry.
``make_hf_snapshot(cache_dir, repo_id)`` lays the same files out as the Hugging Face hub cache does.
Everything is a pure function of the arguments (same seed, same bytes), and weights are streamed to
disk, so multi-GB directories cost no memory.

A copy of ``tests/modelgen.py`` inside the installed package (``tests/`` is not installed), so that
``swarm-node demo`` can generate its model. Only the standard library and blake3 are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import blake3

from swarm.store.layout import RepoLayout, repo_folder_name

__all__ = [
    "CARRIED_CONFIGS",
    "DEFAULT_REVISION",
    "SKIPPED_FILES",
    "carried_files",
    "make_hf_snapshot",
    "make_model_dir",
    "repo_folder_name",
    "weight_file_names",
    "write_pseudorandom",
]

DEFAULT_REVISION = "0123456789abcdef0123456789abcdef01234567"
CARRIED_CONFIGS = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
"""Config files make_model_dir writes (sorted)."""
SKIPPED_FILES = (".gitattributes", "README.md")
"""Files make_model_dir writes that swarm does not carry."""

_BLOCK = 16 << 20


def weight_file_names(n_weight_files: int) -> list[str]:
    if n_weight_files < 1:
        raise ValueError("n_weight_files must be >= 1")
    if n_weight_files == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n_weight_files:05d}.safetensors" for k in range(1, n_weight_files + 1)]


def carried_files(n_weight_files: int = 2, extra_files: dict[str, bytes] | None = None) -> list[str]:
    """Paths a manifest of make_model_dir(...) holds, sorted by their UTF-8 bytes."""
    names = {*CARRIED_CONFIGS, *weight_file_names(n_weight_files)}
    if n_weight_files == 1:
        names.discard("model.safetensors.index.json")
    names.update(extra_files or ())
    return sorted(names, key=lambda p: p.encode())


def write_pseudorandom(path: Path, n: int, key: bytes, *, header: bytes = b"") -> None:
    """Write ``header`` then ``n`` deterministic pseudo-random bytes (blake3 XOF of ``key``)."""
    xof = blake3.blake3(key)
    with open(path, "wb") as fh:
        fh.write(header)
        for off in range(0, n, _BLOCK):
            fh.write(xof.digest(length=min(_BLOCK, n - off), seek=off))


def _seed_key(seed: int, what: str) -> bytes:
    return f"swarm-modelgen/{seed}/{what}".encode()


def _llama_config(rng: random.Random) -> dict:
    hidden = rng.choice([2048, 3072, 4096])
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": hidden * 4,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": hidden // 128,
        "num_hidden_layers": rng.choice([16, 28, 32]),
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    }


_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def _tokenizer(rng: random.Random, vocab_size: int = 40_000) -> dict:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(len(letters))]
    vocab: dict[str, int] = {}
    for ch in (chr(c) for c in range(33, 127)):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
        if rng.random() < 0.4:
            word = "\u0120" + word  # GPT-2 byte-level marker for a leading space
        vocab.setdefault(word, len(vocab))
    tokens = list(vocab)
    merges = []
    for tok in tokens[94:]:
        cut = rng.randint(1, len(tok) - 1)
        merges.append(f"{tok[:cut]} {tok[cut:]}")
    added = [
        {
            "id": vocab_size + i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, s in enumerate(_SPECIAL)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}{1,3}"},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False},
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


_CHAT_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

_GITATTRIBUTES = """*.bin filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
tokenizer.json filter=lfs diff=lfs merge=lfs -text
"""


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def _safetensors_header(tensors: list[tuple[str, int]]) -> bytes:
    """Header of a safetensors file holding ``tensors`` (name, nbytes) back to back."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, nbytes in tensors:
        if nbytes % 2 == 0 and nbytes:
            entry = {"dtype": "BF16", "shape": [nbytes // 2], "data_offsets": [off, off + nbytes]}
        else:
            entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [off, off + nbytes]}
        meta[name] = entry
        off += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def make_model_dir(
    root: Path | str,
    *,
    weights_bytes: int = 8 << 20,
    n_weight_files: int = 2,
    seed: int = 0,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a Llama-style model repository into ``root`` (created if needed) and return it.

    ``weights_bytes`` of tensor data are spread over ``n_weight_files`` safetensors shards (one file
    is named ``model.safetensors`` and has no index).  ``extra_files`` maps relative paths to bytes
    to add (subdirectories are created).  Output depends only on the arguments.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    config = _llama_config(rng)

    def write_json(name: str, obj: object, indent: int | None = 2) -> None:
        (root / name).write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")

    write_json("config.json", config)
    write_json(
        "generation_config.json",
        {
            "bos_token_id": 128000,
            "do_sample": True,
            "eos_token_id": [128001, 128008, 128009],
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.45.0.dev0",
        },
    )
    write_json("tokenizer.json", _tokenizer(rng), indent=None)
    write_json(
        "tokenizer_config.json",
        {
            "add_bos_token": True,
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    write_json(
        "special_tokens_map.json",
        {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": {"content": "<|eot_id|>"}},
    )
    (root / "chat_template.jinja").write_text(_CHAT_TEMPLATE, encoding="utf-8")

    names = weight_file_names(n_weight_files)
    weight_map: dict[str, str] = {}
    layer = 0
    for k, (name, nbytes) in enumerate(zip(names, _split(weights_bytes, n_weight_files), strict=True)):
        tensors = []
        for part in _split(nbytes, 4 if nbytes >= 4 else 1):
            proj = ("q_proj", "k_proj", "v_proj", "o_proj")[len(tensors) % 4]
            tensors.append((f"model.layers.{layer}.self_attn.{proj}.weight", part))
            if len(tensors) % 4 == 0:
                layer += 1
        layer += 1
        for tname, _ in tensors:
            weight_map[tname] = name
        write_pseudorandom(
            root / name,
            nbytes,
            _seed_key(seed, f"weights/{k}"),
            header=_safetensors_header(tensors),
        )
    if n_weight_files > 1:
        write_json(
            "model.safetensors.index.json",
            {
                "metadata": {"total_size": weights_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )

    (root / "README.md").write_text(
        f"---\nlicense: llama3.2\nlibrary_name: transformers\n---\n\n# test model (seed {seed})\n",
        encoding="utf-8",
    )
    (root / ".gitattributes").write_text(_GITATTRIBUTES, encoding="utf-8")
    for rel, data in (extra_files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _blob_name(path: Path) -> str:
    """sha256 for LFS-style files (weights, anything over 10 MB), git blob sha1 otherwise."""
    size = path.stat().st_size
    if path.suffix == ".safetensors" or size > 10_000_000:
        h = hashlib.sha256()
    else:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def make_hf_snapshot(
    cache_dir: Path | str,
    repo_id: str,
    revision: str = DEFAULT_REVISION,
    *,
    ref: str | None = "main",
    **kw,
) -> Path:
    """Write make_model_dir(**kw)'s files in the hub cache layout and return the snapshot dir.

    ``<cache_dir>/models--org--name/blobs/<sha>`` hold the bytes; ``snapshots/<revision>/<path>``
    are relative symlinks into ``../../blobs`` (deeper for nested paths); ``refs/<ref>`` holds the
    revision.
    """
    repo = RepoLayout.of(cache_dir, repo_id)
    blobs = repo.blobs
    snapshot = repo.snapshot(revision)
    staging = repo.root / f".staging-{revision}"
    if staging.exists():
        shutil.rmtree(staging)
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    try:
        make_model_dir(staging, **kw)
        for dirpath, _dirs, files in os.walk(staging):
            for fname in files:
                src = Path(dirpath) / fname
                rel = src.relative_to(staging)
                blob = _blob_name(src)
                os.replace(src, blobs / blob)
                repo.link(snapshot, rel.as_posix(), blob)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if ref is not None:
        repo.write_ref(ref, revision)
    return snapshot
