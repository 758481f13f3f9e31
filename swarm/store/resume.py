"""Resume state: the ``.swarm/partial/<hex>.pieces`` file of each ``.incomplete`` (a magic line, a
JSON header naming the blob, its size, piece size, piece count and the device/inode of the
``.incomplete`` it describes, a bitmap of the pieces on disk, and a trailing blake3 of all of it),
and the reads that take a file's pieces back at reopen: the recorded ones (re-verified when the
``.incomplete`` is not the file the bits were written for) and the verified ones the state does not
record yet (``recover``)."""

from __future__ import annotations

import json
import logging
import os

import blake3

from swarm.manifest import Manifest
from swarm.store.errors import io_errors, wrap_os_error
from swarm.store.fileio import data_extents, pread_into, unlink_quiet
from swarm.store.partfile import PartFile

log = logging.getLogger(__name__)

STATE_MAGIC = b"SWARM-PIECES 1\n"


def encode_state(header: dict, bits: bytearray) -> bytes:
    body = STATE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + bytes(bits)
    return body + blake3.blake3(body).digest()


def decode_state(raw: bytes) -> tuple[dict, bytes] | None:
    if len(raw) < len(STATE_MAGIC) + 32 or not raw.startswith(STATE_MAGIC):
        return None
    body, check = raw[:-32], raw[-32:]
    if blake3.blake3(body).digest() != check:
        return None
    nl = body.find(b"\n", len(STATE_MAGIC))
    if nl < 0:
        return None
    try:
        header = json.loads(body[len(STATE_MAGIC) : nl])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    return header, body[nl + 1 :]


def state_bytes(f: PartFile, held: set[int] | frozenset[int]) -> bytes:
    """The state file of ``f`` recording the pieces of it in ``held`` (global indices)."""
    n = f.entry.num_pieces
    bits = bytearray((n + 7) // 8)
    for k, i in enumerate(f.pieces):
        if i in held:
            bits[k >> 3] |= 1 << (k & 7)
    header = {
        "blob": f.hex,
        "size": f.entry.size,
        "piece_size": f.entry.piece_size,
        "num_pieces": n,
        "dev": f.dev,
        "ino": f.ino,
    }
    return encode_state(header, bits)


def read_state(f: PartFile, st: os.stat_result | None) -> tuple[list[int], bool]:
    """The piece numbers (within the file) ``f``'s state file records, and whether they were
    written for the ``.incomplete`` on disk now (``st``; None if it is missing or of the wrong
    size). A state file that does not match is deleted: ``([], False)``."""
    fe = f.entry
    try:
        raw = f.state_path.read_bytes()
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        raise wrap_os_error(exc, "reading", f.state_path) from exc
    decoded = decode_state(raw)
    n = fe.num_pieces
    if (
        decoded is None
        or st is None
        or decoded[0].get("blob") != f.hex
        or decoded[0].get("size") != fe.size
        or decoded[0].get("piece_size") != fe.piece_size
        or decoded[0].get("num_pieces") != n
        or len(decoded[1]) != (n + 7) // 8
    ):
        log.info("discarding resume state %s (does not match %s)", f.state_path, f.part_path)
        unlink_quiet(f.state_path)
        return [], False
    header, bits = decoded
    local = [k for k in range(n) if bits[k >> 3] & (1 << (k & 7))]
    return local, header.get("dev") == st.st_dev and header.get("ino") == st.st_ino


def reverify(manifest: Manifest, f: PartFile, fd: int, local: list[int]) -> list[int]:
    """The pieces of ``local`` (numbers within ``f``) whose bytes in ``fd`` verify."""
    fe = f.entry
    good = []
    buf = bytearray(fe.piece_size)
    for k in local:
        p = manifest.pieces[f.first + k]
        mv = memoryview(buf)[: p.length]
        with io_errors("reading", f.part_path):
            got = pread_into(fd, mv, p.offset)
        if got == p.length and blake3.blake3(mv).digest() == p.digest:
            good.append(k)
    log.info("%s: re-verified %d/%d restored pieces", f.part_path, len(good), len(local))
    return good


def recover(manifest: Manifest, f: PartFile, fd: int, todo: list[int]) -> tuple[list[int], int]:
    """Re-hash the pieces ``todo`` (numbers within ``f``, in file order) of its ``.incomplete``
    (``fd``, of the right size); returns the global indices of those that match the manifest's
    piece digests, and the bytes read.

    After a crash these are the pieces verified and written since the last resume-state flush,
    or every piece on disk when the state file is missing or unusable: a restart fetches again
    only what was never written whole. Cost: one read and hash of the bytes written but not
    recorded, through one reusable piece buffer; ranges the filesystem reports as holes
    (SEEK_DATA: preallocated, never written) are not read. Whatever else is there (zeros of a
    never-written region where SEEK_DATA cannot tell, a torn or damaged piece) fails to verify
    and stays missing. A plain pread is right for pieces written with O_DIRECT too: the kernel
    keeps the page cache coherent with direct writes, and after a crash it reads what is on disk."""
    fe = f.entry
    extents = data_extents(fd, fe.size)
    buf = memoryview(bytearray(fe.piece_size))
    zero_digests: dict[int, bytes] = {}
    good: list[int] = []
    nread = e = 0
    for k in todo:  # in file order, as the extents
        p = manifest.pieces[f.first + k]
        if extents is not None:
            while e < len(extents) and extents[e][1] <= p.offset:
                e += 1
            if e == len(extents) or extents[e][0] >= p.offset + p.length:  # all hole
                if p.length not in zero_digests:
                    zero_digests[p.length] = blake3.blake3(bytes(p.length)).digest()
                if p.digest != zero_digests[p.length]:
                    continue  # reads as zeros: cannot verify
        mv = buf[: p.length]
        try:
            got = pread_into(fd, mv, p.offset)
        except OSError as exc:  # best effort: what cannot be read is fetched again
            log.warning("%s: recovery stopped at piece %d: %s", f.part_path, k, exc)
            break
        nread += got
        if got == p.length and blake3.blake3(mv).digest() == p.digest:
            good.append(f.first + k)
    return good, nread
