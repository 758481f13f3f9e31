# ruff: noqa
# Generated from model.proto by scripts/gen_modelexpress_stubs.py (protoc of grpcio-tools 1.62.3).
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
DESCRIPTOR = POOL.AddSerializedFile(b'\n\x1eswarm/modelexpress/model.proto\x12\x13model_express.model"s\n\x12DeleteModelRequest\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x12>\n\x08provider\x18\x02 \x01(\x0e2".model_express.model.ModelProviderR\x08provider"Z\n\x13DeleteModelResponse\x12\x18\n\x07success\x18\x01 \x01(\x08R\x07success\x12\x1d\n\x07message\x18\x02 \x01(\tH\x00R\x07message\x88\x01\x01B\n\n\x08_message"\xca\x01\n\x14ModelDownloadRequest\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x12>\n\x08provider\x18\x02 \x01(\x0e2".model_express.model.ModelProviderR\x08provider\x12%\n\x0eignore_weights\x18\x03 \x01(\x08R\rignoreWeights\x12\x1f\n\x08revision\x18\x04 \x01(\tH\x00R\x08revision\x88\x01\x01B\x0b\n\t_revision"\x9f\x02\n\x11ModelStatusUpdate\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x128\n\x06status\x18\x02 \x01(\x0e2 .model_express.model.ModelStatusR\x06status\x12\x1d\n\x07message\x18\x03 \x01(\tH\x00R\x07message\x88\x01\x01\x12>\n\x08provider\x18\x04 \x01(\x0e2".model_express.model.ModelProviderR\x08provider\x120\n\x11resolved_revision\x18\x05 \x01(\tH\x01R\x10resolvedRevision\x88\x01\x01B\n\n\x08_messageB\x14\n\x12_resolved_revision"\xb3\x02\n\x11ModelFilesRequest\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x12>\n\x08provider\x18\x02 \x01(\x0e2".model_express.model.ModelProviderR\x08provider\x12\x1d\n\nchunk_size\x18\x03 \x01(\rR\tchunkSize\x12K\n\rfile_selector\x18\x04 \x01(\x0b2&.model_express.model.ModelFileSelectorR\x0cfileSelector\x12%\n\x0eignore_weights\x18\x05 \x01(\x08R\rignoreWeights\x12\x1f\n\x08revision\x18\x06 \x01(\tH\x00R\x08revision\x88\x01\x01B\x0b\n\t_revision")\n\x11ModelFileSelector\x12\x14\n\x05paths\x18\x01 \x03(\tR\x05paths"\xf7\x01\n\tFileChunk\x12#\n\rrelative_path\x18\x01 \x01(\tR\x0crelativePath\x12\x12\n\x04data\x18\x02 \x01(\x0cR\x04data\x12\x16\n\x06offset\x18\x03 \x01(\x04R\x06offset\x12\x1d\n\ntotal_size\x18\x04 \x01(\x04R\ttotalSize\x12"\n\ris_last_chunk\x18\x05 \x01(\x08R\x0bisLastChunk\x12 \n\x0cis_last_file\x18\x06 \x01(\x08R\nisLastFile\x12$\n\x0bcommit_hash\x18\x07 \x01(\tH\x00R\ncommitHash\x88\x01\x01B\x0e\n\x0c_commit_hash"\x87\x01\n\rModelFileList\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x128\n\x05files\x18\x02 \x03(\x0b2".model_express.model.ModelFileInfoR\x05files\x12\x1d\n\ntotal_size\x18\x03 \x01(\x04R\ttotalSize"H\n\rModelFileInfo\x12#\n\rrelative_path\x18\x01 \x01(\tR\x0crelativePath\x12\x12\n\x04size\x18\x02 \x01(\x04R\x04size*9\n\x0bModelStatus\x12\x0f\n\x0bDOWNLOADING\x10\x00\x12\x0e\n\nDOWNLOADED\x10\x01\x12\t\n\x05ERROR\x10\x02*;\n\rModelProvider\x12\x10\n\x0cHUGGING_FACE\x10\x00\x12\x07\n\x03NGC\x10\x01\x12\x07\n\x03GCS\x10\x02\x12\x06\n\x02S3\x10\x032\x9a\x03\n\x0cModelService\x12l\n\x15EnsureModelDownloaded\x12).model_express.model.ModelDownloadRequest\x1a&.model_express.model.ModelStatusUpdate0\x01\x12\\\n\x10StreamModelFiles\x12&.model_express.model.ModelFilesRequest\x1a\x1e.model_express.model.FileChunk0\x01\x12\\\n\x0eListModelFiles\x12&.model_express.model.ModelFilesRequest\x1a".model_express.model.ModelFileList\x12`\n\x0bDeleteModel\x12\'.model_express.model.DeleteModelRequest\x1a(.model_express.model.DeleteModelResponseb\x06proto3')

ModelStatus = _enum_type_wrapper.EnumTypeWrapper(DESCRIPTOR.enum_types_by_name['ModelStatus'])
DOWNLOADING = 0
DOWNLOADED = 1
ERROR = 2
ModelProvider = _enum_type_wrapper.EnumTypeWrapper(DESCRIPTOR.enum_types_by_name['ModelProvider'])
HUGGING_FACE = 0
NGC = 1
GCS = 2
S3 = 3

DeleteModelRequest = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['DeleteModelRequest'])
DeleteModelResponse = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['DeleteModelResponse'])
ModelDownloadRequest = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelDownloadRequest'])
ModelStatusUpdate = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelStatusUpdate'])
ModelFilesRequest = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelFilesRequest'])
ModelFileSelector = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelFileSelector'])
FileChunk = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['FileChunk'])
ModelFileList = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelFileList'])
ModelFileInfo = _message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name['ModelFileInfo'])
