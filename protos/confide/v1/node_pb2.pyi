from protos.confide.v1 import common_pb2 as _common_pb2
from protos.confide.v1 import coordinator_pb2 as _coordinator_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("job_id", "which")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WHICH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    which: str
    def __init__(self, job_id: _Optional[str] = ..., which: _Optional[str] = ...) -> None: ...
