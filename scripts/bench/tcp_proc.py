#!/usr/bin/env python3
"""The ceiling: a plain Python TCP transfer with no protocol, no hashing and no encryption, in its
own process, driven by ``run.py`` (JSON lines on stdin/stdout).

Server: ``serve`` (files [path]) listens on 127.0.0.1 and sends every file, in order, with
``os.sendfile`` to each connection (one thread per connection). Client: ``fetch`` (port, sizes,
dest, optional ``at``) receives them with ``recv_into(MSG_WAITALL)`` into one page-aligned 4 MiB
buffer and writes fresh files, whole aligned chunks with O_DIRECT (the cheaper way on this VM, see
docs/benchmarks.md), the tail through the page cache, then fsync.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import socket
import sys
import threading
import time

CHUNK = 4 << 20


def reply(**kw) -> None:
    kw["rss_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def serve(files: list[str]) -> int:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)

    def one(conn: socket.socket) -> None:
        with conn:
            for path in files:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    off = 0
                    while off < size:
                        off += os.sendfile(conn.fileno(), f.fileno(), off, size - off)

    def loop() -> None:
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return lst.getsockname()[1]


def fetch(port: int, sizes: list[int], dest: str) -> int:
    os.makedirs(dest, exist_ok=True)
    buf = mmap.mmap(-1, CHUNK)
    mv = memoryview(buf)
    total = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        for k, size in enumerate(sizes):
            path = os.path.join(dest, f"file-{k}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                off = 0
                while off < size:
                    want = min(CHUNK, size - off)
                    got = 0
                    while got < want:
                        n = s.recv_into(mv[got:want], want - got, socket.MSG_WAITALL)
                        if n == 0:
                            raise ConnectionError("server closed early")
                        got += n
                    direct = want == CHUNK
                    os.pwrite(dfd if direct else fd, mv[:want], off)
                    off += want
                os.fsync(fd)
                total += size
            finally:
                os.close(dfd)
                os.close(fd)
    return total


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        c = cmd["cmd"]
        try:
            if c == "serve":
                reply(ok=True, port=serve(cmd["files"]))
            elif c == "fetch":
                at = cmd.get("at")
                if at:
                    time.sleep(max(0.0, at - time.time()))
                t0 = time.time()
                n = fetch(cmd["port"], cmd["sizes"], cmd["dest"])
                t1 = time.time()
                reply(ok=True, t0=t0, t1=t1, seconds=t1 - t0, bytes_down=n)
            elif c == "status":
                reply(ok=True)
            elif c == "quit":
                reply(ok=True)
                break
            else:
                reply(ok=False, error=f"unknown command {c}")
        except Exception as e:
            reply(ok=False, error=repr(e))


if __name__ == "__main__":
    main()
