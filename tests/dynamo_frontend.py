"""A real Dynamo HTTP frontend for the tests (run as a subprocess, never collected by pytest).

``python dynamo_frontend.py PORT`` runs the frontend Dynamo's ``python -m dynamo.frontend`` runs
(``make_engine`` with ``EngineType.Dynamic`` + ``run_input(..., "http", ...)``) on
127.0.0.1:PORT: it watches discovery (``DYN_FILE_KV``), loads each registered card's files into
its metadata cache (``$HOME/.cache/dynamo/mdc``) and lists the model on ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import sys

from dynamo._core import DistributedRuntime, EngineType, EntrypointArgs, make_engine, run_input


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "file", "tcp")
    args = EntrypointArgs(EngineType.Dynamic, http_host="127.0.0.1", http_port=port)
    engine = await make_engine(runtime, args)
    await run_input(runtime, "http", engine)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
