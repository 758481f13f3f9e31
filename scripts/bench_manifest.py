#!/usr/bin/env python3
"""Manifest-build throughput against plain blake3 of the same bytes.

Writes one pseudo-random file (default 1 GiB) into a temporary directory, reads it once so the page
cache is warm, then reports the best of ``--repeat`` runs of:

* plain blake3, single thread: read in 16 MiB chunks + ``blake3.update``;
* plain blake3, ``max_threads=AUTO``: the same, with blake3 spreading each update over all cores;
* ``build_manifest`` on the directory (whole-file digest and per-piece digests in one pass).

The goal is a manifest build at >= 0.8x plain single-threaded blake3.  The directory is deleted
afterwards.  Usage: ``.venv/bin/python scripts/bench_manifest.py [--size 1G] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import blake3

try:
    from swarm.manifest import build_manifest, piece_size_for
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from swarm.manifest import build_manifest, piece_size_for

CHUNK = 16 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M, 1048576)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value * _UNITS[unit])


def write_file(path: Path, size: int) -> None:
    xof = blake3.blake3(b"swarm bench_manifest")
    with open(path, "wb") as fh:
        for off in range(0, size, CHUNK):
            fh.write(xof.digest(length=min(CHUNK, size - off), seek=off))


def plain_blake3(path: Path, max_threads: int) -> tuple[float, str]:
    h = blake3.blake3(max_threads=max_threads)
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(mv[:n])
    return time.perf_counter() - t0, "blake3:" + h.hexdigest()


def manifest_build(root: Path, threads: int | None) -> tuple[float, str]:
    t0 = time.perf_counter()
    m = build_manifest(root, "bench/model", "bench", threads=threads)
    return time.perf_counter() - t0, m.files[0].blake3


def best(fn, repeat: int) -> tuple[float, str]:
    runs = [fn() for _ in range(repeat)]
    return min(r[0] for r in runs), runs[0][1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="file size, e.g. 1G, 256M (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is shown")
    ap.add_argument("--threads", type=int, default=None, help="build_manifest threads (default: its own)")
    ap.add_argument("--dir", type=Path, default=None, help="where to create the temporary directory")
    args = ap.parse_args(argv)

    size = args.size
    tmp = Path(tempfile.mkdtemp(prefix="swarm-bench-manifest-", dir=args.dir))
    try:
        path = tmp / "model.safetensors"
        t0 = time.perf_counter()
        write_file(path, size)
        gen = time.perf_counter() - t0
        plain_blake3(path, 1)  # warm the page cache
        mb = size / 1e6
        ps = piece_size_for(size)
        print(
            f"file: {size} bytes ({size / (1 << 30):.3g} GiB), piece size {ps >> 10} KiB, "
            f"written in {gen:.2f} s; cpus: {os.cpu_count()}; best of {args.repeat}"
        )
        single, d1 = best(lambda: plain_blake3(path, 1), args.repeat)
        auto, d2 = best(lambda: plain_blake3(path, blake3.blake3.AUTO), args.repeat)
        build, d3 = best(lambda: manifest_build(tmp, args.threads), args.repeat)
        if not d1 == d2 == d3:
            print(f"DIGEST MISMATCH: {d1} {d2} {d3}", file=sys.stderr)
            return 1
        rows = [
            ("plain blake3, 1 thread", single),
            ("plain blake3, max_threads=AUTO", auto),
            ("build_manifest", build),
        ]
        for label, secs in rows:
            print(f"  {label:<32} {mb / secs:8.0f} MB/s  ({secs:.3f} s)")
        print(f"  ratio build / plain 1 thread     {single / build:8.2f}x  (goal >= 0.8x)")
        print(f"  ratio build / plain AUTO         {auto / build:8.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
