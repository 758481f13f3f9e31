"""A real Dynamo worker for the tests (run as a subprocess, never collected by pytest).

``python dynamo_worker.py MODEL_PATH NAME NAMESPACE.COMPONENT.ENDPOINT`` registers the model with
``dynamo._core.register_model`` (the call every Dynamo backend makes) on the discovery backend the
environment picks (``DYN_DISCOVERY_BACKEND``: ``file`` with ``DYN_FILE_KV``, or ``etcd`` with
``ETCD_ENDPOINTS``), serves the
endpoint, prints ``REGISTERED`` and runs until its stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys

from dynamo._core import DistributedRuntime, ModelInput, ModelType, WorkerType, register_model


async def main(model_path: str, name: str, endpoint: str) -> None:
    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, os.environ.get("DYN_DISCOVERY_BACKEND", "file"), "tcp")
    ep = runtime.endpoint(endpoint)

    async def generate(request, context=None):
        yield {"token_ids": [], "finish_reason": "stop"}

    await register_model(
        ModelInput.Tokens, ModelType.Chat, ep, model_path, name, worker_type=WorkerType.Aggregated
    )
    serving = asyncio.ensure_future(ep.serve_endpoint(generate))
    print("REGISTERED", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    runtime.shutdown()
    serving.cancel()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
