"""A client for NVIDIA ModelExpress's gRPC ``ModelService`` (github.com/ai-dynamo/modelexpress).

``model.proto`` is the server's public proto; ``model_pb2.py`` / ``model_pb2_grpc.py`` are generated
from it (see README.md here) into a private descriptor pool and committed, so the runtime needs only
``grpcio`` and ``protobuf``, and the ``modelexpress`` package's own stubs can be loaded beside them.
:mod:`swarm.modelexpress.client` holds the blocking client (run it in a worker thread under trio).
"""

from swarm.modelexpress.client import (
    ModelExpressClient,
    ModelExpressError,
    ModelExpressNotFound,
    ModelExpressProtocolError,
    ModelExpressUnavailable,
    ModelExpressUnsupported,
    RemoteFile,
    parse_url,
)

__all__ = [
    "ModelExpressClient",
    "ModelExpressError",
    "ModelExpressNotFound",
    "ModelExpressProtocolError",
    "ModelExpressUnavailable",
    "ModelExpressUnsupported",
    "RemoteFile",
    "parse_url",
]
