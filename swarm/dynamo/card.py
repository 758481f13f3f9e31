"""Dynamo ModelDeploymentCards as swarm sees them: the files a card lists, checked by blake3.

A Dynamo worker registers a model by publishing a ModelDeploymentCard (MDC). Each metadata file it
lists (``config.json``, the tokenizer, the chat template, ``extra_files`` such as ``LICENSE`` or the
weights index) is a Dynamo ``CheckedFile``: ``{"path": <file:// path or http URL>, "checksum":
"blake3:<hex>", "size": <bytes>}``. The checksum is the plain blake3 of the file, the same string a
swarm manifest keeps for that file (``FileEntry.blake3``), so a card names exact bytes and a fetch can
be tied to it.

This module is pure (json, blake3, the standard library): parse a card (:func:`parse_card`), say
which swarm model name it goes by (:func:`swarm_name`), check a directory or a manifest against it
(:func:`dir_mismatches`, :func:`manifest_mismatches`), and put verified files where Dynamo's
frontend looks before it fetches anything (:func:`install_mdc_cache`).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import blake3

from swarm.manifest import ManifestError, validate_model_name, validate_path

MAX_CARD_BYTES = 4 << 20
"""Largest card accepted (JSON text). Real cards are a few KiB: the runtime config and a handful of
file entries; 4 MiB leaves room for big ``user_data`` while bounding what a watcher reads."""
MAX_CARD_FILES = 256
"""Most files one card may list. The five typed slots plus ``extra_files`` (non-weight siblings:
LICENSE, images, index, processor configs) are tens at most."""
MAX_CARD_FILE_BYTES = 1 << 30
"""Largest size a card may give one file: Dynamo itself refuses metadata files over 1 GiB."""
TYPED_SLOTS = ("model_info", "tokenizer", "prompt_formatter", "chat_template_file", "gen_config")
"""Card fields holding one CheckedFile each (inside a one-key variant object)."""
NAME_PREFIX = "dynamo"
"""Organisation of the swarm name of a card whose own name is not an ``org/name``."""
_HASH_RE = re.compile(r"blake3:[0-9a-f]{64}")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_READ_CHUNK = 1 << 20


class CardError(ValueError):
    """A card that cannot be used: malformed JSON, a bad checksum, a file name that is not safe."""


@attrs.frozen
class CardFile:
    """One file a card lists: its name in the model directory, checksum, size and where Dynamo
    would fetch it from (``url``: ``http://...`` with self-hosted metadata, else ``file://...``)."""

    name: str
    checksum: str  # "blake3:<64 hex>", as in swarm manifests
    size: int | None
    url: str
    custom: bool = False  # an operator's chat template from outside the model directory

    @property
    def hex(self) -> str:
        return self.checksum.removeprefix("blake3:")


@attrs.frozen
class Card:
    display_name: str
    slug: str
    source_path: str | None
    files: tuple[CardFile, ...]
    key: str = ""  # where discovery keeps it (namespace/component/endpoint/instance), if known

    @property
    def carried(self) -> tuple[CardFile, ...]:
        """The files the swarm delivers: all but custom templates (not in the model directory)."""
        return tuple(f for f in self.files if not f.custom)

    def expect(self) -> tuple[tuple[str, str, int | None], ...]:
        """``(path, checksum, size)`` of every carried file: what FetchRequest.expect holds."""
        return tuple((f.name, f.checksum, f.size) for f in self.carried)


def _file_name(location: str) -> str:
    """Basename of a CheckedFile's ``path`` (a local path or a file:// / http(s):// URL)."""
    if "://" in location:
        parsed = urllib.parse.urlsplit(location)
        path = urllib.parse.unquote(parsed.path)
    else:
        path = location
    name = path.rstrip("/").rsplit("/", 1)[-1]
    try:
        validate_path(name)
    except ManifestError as e:
        raise CardError(f"file {location!r}: unusable name: {e}") from None
    return name


def _checked_file(obj: Any, where: str, custom: bool = False) -> CardFile:
    if not isinstance(obj, dict):
        raise CardError(f"{where}: expected a CheckedFile object, got {type(obj).__name__}")
    location = obj.get("path", obj.get("url"))
    if not isinstance(location, str) or not location:
        raise CardError(f"{where}: no path")
    checksum = obj.get("checksum")
    if not isinstance(checksum, str) or not _HASH_RE.fullmatch(checksum):
        raise CardError(f"{where}: checksum {checksum!r} is not 'blake3:<64 lowercase hex>'")
    size = obj.get("size")
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_CARD_FILE_BYTES
    ):
        raise CardError(f"{where}: size {size!r} is not a byte count up to {MAX_CARD_FILE_BYTES}")
    return CardFile(_file_name(location), checksum, size, location, custom)


def _slot_files(name: str, slot: Any) -> list[CardFile]:
    """The CheckedFile(s) inside one typed slot: ``{"variant": CheckedFile}`` or, for chat
    templates, ``{"variant": {"is_custom": bool, "file": CheckedFile}}``."""
    if slot is None:
        return []
    if not isinstance(slot, dict) or len(slot) != 1:
        raise CardError(f"{name}: expected one variant object")
    ((variant, inner),) = slot.items()
    where = f"{name}.{variant}"
    if isinstance(inner, dict) and "file" in inner:
        return [_checked_file(inner["file"], where, custom=inner.get("is_custom") is True)]
    return [_checked_file(inner, where)]


def parse_card(obj: Any, key: str = "") -> Card:
    """A Card from a card's JSON (a dict, a JSON string or bytes). Accepts the card itself or the
    discovery record that wraps it (``{"type": "Model", ..., "card_json": {...}}``)."""
    if isinstance(obj, bytes | bytearray):
        if len(obj) > MAX_CARD_BYTES:
            raise CardError(f"card is {len(obj)} bytes, over MAX_CARD_BYTES ({MAX_CARD_BYTES})")
        obj = obj.decode("utf-8", errors="strict")
    if isinstance(obj, str):
        if len(obj) > MAX_CARD_BYTES:
            raise CardError(f"card is {len(obj)} characters, over MAX_CARD_BYTES")
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise CardError(f"card is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CardError("a card must be a JSON object")
    if isinstance(obj.get("card_json"), dict):
        if not key and all(isinstance(obj.get(k), str) for k in ("namespace", "component", "endpoint")):
            key = f"{obj['namespace']}/{obj['component']}/{obj['endpoint']}/{obj.get('instance_id', '')}"
        obj = obj["card_json"]
    display_name = obj.get("display_name")
    if not isinstance(display_name, str) or not display_name:
        raise CardError("card has no display_name")
    slug = obj.get("slug")
    if not isinstance(slug, str) or not slug:
        slug = display_name
    source_path = obj.get("source_path")
    if source_path is not None and not isinstance(source_path, str):
        raise CardError("source_path must be a string")
    files: list[CardFile] = []
    for name in TYPED_SLOTS:
        files += _slot_files(name, obj.get(name))
    extra = obj.get("extra_files") or []
    if not isinstance(extra, list):
        raise CardError("extra_files must be a list")
    files += [_checked_file(f, f"extra_files[{i}]") for i, f in enumerate(extra)]
    if len(files) > MAX_CARD_FILES:
        raise CardError(f"card lists {len(files)} files, over MAX_CARD_FILES ({MAX_CARD_FILES})")
    seen: dict[str, CardFile] = {}
    unique: list[CardFile] = []
    for f in files:
        prev = seen.get(f.name)
        if prev is None:
            seen[f.name] = f
            unique.append(f)
        elif (prev.checksum, prev.size) != (f.checksum, f.size) and not (prev.custom or f.custom):
            raise CardError(f"card lists {f.name} twice with different contents")
    return Card(display_name, slug, source_path, tuple(unique), key)


def load_card(source: Any) -> Card:
    """A Card from a Card, a dict, JSON text/bytes, or a path to a JSON file."""
    if isinstance(source, Card):
        return source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        p = Path(source)
        try:
            if p.stat().st_size > MAX_CARD_BYTES:
                raise CardError(f"{p}: over MAX_CARD_BYTES ({MAX_CARD_BYTES})")
            return parse_card(p.read_bytes())
        except OSError as e:
            raise CardError(f"cannot read card {p}: {e}") from None
    return parse_card(source)


def _valid_name(name: str | None) -> bool:
    if not name:
        return False
    try:
        validate_model_name(name)
    except ManifestError:
        return False
    return True


def swarm_name(card: Card) -> str:
    """The swarm model name a card's files go by, the same on the worker that serves them and on
    every host that fetches them: its ``source_path`` when that is a Hub repo id (``org/name``, the
    name the HF cache already serves it under), else its name when that is an ``org/name``, else
    ``dynamo/<slug>``. Different bytes under one name are told apart by the card's checksums, never
    by the name."""
    sp = card.source_path
    if sp and not os.path.isabs(sp) and _valid_name(sp):
        return sp
    # A bare display name ("my-model") stays under dynamo/: as a single-part Hub name it could
    # collide with a real Hub repo (gpt2-style names are valid since single-part names are).
    if "/" in card.display_name and _valid_name(card.display_name):
        return card.display_name
    slug = _SLUG_BAD.sub("-", card.slug).strip(".-")[:96] or "model"
    return f"{NAME_PREFIX}/{slug}"


def fnmatch_exact(name: str) -> str:
    """A glob matching exactly ``name`` (``[``, ``*``, ``?`` quoted)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def file_digest(path: Path) -> tuple[str, int]:
    """``("blake3:<hex>", size)`` of a file, read in 1 MiB chunks."""
    h = blake3.blake3()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return f"blake3:{h.hexdigest()}", n


def dir_mismatches(directory: Path, expect: Iterable[tuple[str, str, int | None]]) -> list[str]:
    """What in ``directory`` differs from the expected ``(path, checksum, size)`` triples: one line
    per missing or different file (empty when all match). Sizes are compared before hashing."""
    out = []
    for name, checksum, size in expect:
        p = Path(directory) / name
        try:
            st = p.stat()
        except OSError:
            out.append(f"{name}: missing")
            continue
        if size is not None and st.st_size != size:
            out.append(f"{name}: {st.st_size} bytes, the card says {size}")
            continue
        got, _ = file_digest(p)
        if got != checksum:
            out.append(f"{name}: blake3 {got[7:23]}..., the card says {checksum[7:23]}...")
    return out


def manifest_mismatches(manifest: Any, expect: Iterable[tuple[str, str, int | None]]) -> list[str]:
    """What in a swarm manifest differs from the expected files (empty when all match)."""
    out = []
    for name, checksum, size in expect:
        try:
            entry = manifest.files[manifest.file_index(name)]
        except KeyError:
            out.append(f"{name}: not in the manifest")
            continue
        if entry.blake3 != checksum or (size is not None and entry.size != size):
            out.append(f"{name}: the manifest has other bytes")
    return out


def mdc_cache_root() -> Path:
    """Dynamo's metadata cache: ``$HOME/.cache/dynamo/mdc`` (blobs named by blake3 hex)."""
    return Path(os.environ.get("HOME") or ".") / ".cache" / "dynamo" / "mdc"


def install_mdc_cache(directory: Path, card: Card, root: Path | None = None) -> list[Path]:
    """Copy the card's files from a verified ``directory`` into Dynamo's blob cache
    (``<root>/blobs/<blake3 hex>``), each checked again and published by an atomic rename, so the
    frontend finds every file locally and requests none from the worker. Returns the blob paths."""
    blobs = (root or mdc_cache_root()) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    out = []
    for f in card.carried:
        dest = blobs / f.hex
        if dest.is_file() and file_digest(dest)[0] == f.checksum:
            out.append(dest)
            continue
        tmp = blobs / f"{f.hex}.swarm-tmp.{os.getpid()}"
        try:
            h = blake3.blake3()
            with open(Path(directory) / f.name, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_READ_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if f"blake3:{h.hexdigest()}" != f.checksum:
                raise CardError(f"{f.name} in {directory} changed while being copied")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        out.append(dest)
    return out
