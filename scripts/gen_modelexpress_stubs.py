"""Regenerate swarm/modelexpress/model_pb2.py and model_pb2_grpc.py from model.proto.

Run from anywhere with a Python that has grpcio-tools (see swarm/modelexpress/README.md):

    /tmp/grpcgen/bin/python scripts/gen_modelexpress_stubs.py

protoc parses model.proto; ``model_pb2_grpc.py`` is protoc's own output, and ``model_pb2.py`` is
written here from protoc's serialized descriptor: the messages and enums built in a private
``DescriptorPool`` with ``message_factory.GetMessageClass`` instead of protoc's module, which adds
them to protobuf's default pool (and, under the pure-Python protobuf, registers every class in the
default symbol database).  The ``modelexpress`` package's own ``model_pb2`` declares the same names
(``model_express.model.*``) in the default pool; with ours private, both load in one process.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = "swarm/modelexpress/model.proto"
OUT = ROOT / "swarm" / "modelexpress"

HEADER = '''\
# ruff: noqa
# Generated from model.proto by scripts/gen_modelexpress_stubs.py (protoc of grpcio-tools {tools}).
# DO NOT EDIT.
"""The messages and enums of swarm/modelexpress/model.proto, built in a private descriptor pool.

The ``modelexpress`` package's own ``model_pb2`` declares the same names (``model_express.model.*``)
in protobuf's default pool; a private pool lets both be loaded in one process.  The wire format and
the gRPC method paths (``/model_express.model.ModelService/...``) are the server's.
"""
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import message_factory as _message_factory
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

POOL = _descriptor_pool.DescriptorPool()
DESCRIPTOR = POOL.AddSerializedFile({serialized!r})
'''


def _protoc(*args: str) -> None:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", "-I.", *args, PROTO])
    if code != 0:
        sys.exit(f"protoc failed ({code})")


def main() -> None:
    import grpc_tools

    tools = getattr(grpc_tools, "__version__", None)
    if tools is None:
        from importlib.metadata import version

        tools = version("grpcio-tools")
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        desc = Path(tmp) / "model.pb"
        _protoc(f"--descriptor_set_out={desc}", "--grpc_python_out=.")
        fds = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    (fdp,) = fds.file
    if fdp.dependency or fdp.extension or any(m.nested_type or m.enum_type for m in fdp.message_type):
        sys.exit("model.proto grew imports, extensions or nested types: extend this generator")
    lines = [HEADER.format(tools=tools, serialized=fdp.SerializeToString())]
    for enum in fdp.enum_type:
        lines.append(
            f"{enum.name} = _enum_type_wrapper.EnumTypeWrapper(DESCRIPTOR.enum_types_by_name[{enum.name!r}])"
        )
        lines += [f"{v.name} = {v.number}" for v in enum.value]
    lines.append("")
    for msg in fdp.message_type:
        lines.append(
            f"{msg.name} = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name[{msg.name!r}])"
        )
    (OUT / "model_pb2.py").write_text("\n".join(lines) + "\n")
    grpc_file = OUT / "model_pb2_grpc.py"
    grpc_file.write_text("# ruff: noqa\n" + grpc_file.read_text())
    print(f"wrote {OUT / 'model_pb2.py'} and {grpc_file}")


if __name__ == "__main__":
    main()
