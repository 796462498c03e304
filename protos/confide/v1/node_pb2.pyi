from confide.v1 import common_pb2 as _common_pb2
from confide.v1 import coordinator_pb2 as _coordinator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("job_id", "which", "round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WHICH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    which: str
    round: int
    def __init__(self, job_id: _Optional[str] = ..., which: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class SplitOpen(_message.Message):
    __slots__ = ("job_id", "spec", "round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: _coordinator_pb2.JobSpec
    round: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[_coordinator_pb2.JobSpec, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class SplitTensors(_message.Message):
    __slots__ = ("step", "chunk", "train")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    step: int
    chunk: _common_pb2.Chunk
    train: bool
    def __init__(self, step: _Optional[int] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., train: _Optional[bool] = ...) -> None: ...

class SplitRequest(_message.Message):
    __slots__ = ("open", "forward", "backward", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SplitOpen
    forward: SplitTensors
    backward: SplitTensors
    close: SplitClose
    def __init__(self, open: _Optional[_Union[SplitOpen, _Mapping]] = ..., forward: _Optional[_Union[SplitTensors, _Mapping]] = ..., backward: _Optional[_Union[SplitTensors, _Mapping]] = ..., close: _Optional[_Union[SplitClose, _Mapping]] = ...) -> None: ...

class SplitReady(_message.Message):
    __slots__ = ("body_layers", "body_parameters")
    BODY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BODY_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    body_layers: int
    body_parameters: int
    def __init__(self, body_layers: _Optional[int] = ..., body_parameters: _Optional[int] = ...) -> None: ...

class SplitClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitReply(_message.Message):
    __slots__ = ("ready", "output", "input_grad")
    READY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    ready: SplitReady
    output: SplitTensors
    input_grad: SplitTensors
    def __init__(self, ready: _Optional[_Union[SplitReady, _Mapping]] = ..., output: _Optional[_Union[SplitTensors, _Mapping]] = ..., input_grad: _Optional[_Union[SplitTensors, _Mapping]] = ...) -> None: ...

class PrivateInferenceRequest(_message.Message):
    __slots__ = ("model", "seq_len", "provider", "timeout_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    seq_len: int
    provider: str
    timeout_s: float
    def __init__(self, model: _Optional[str] = ..., seq_len: _Optional[int] = ..., provider: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PrivateInferenceSession(_message.Message):
    __slots__ = ("session_id", "rendezvous", "world_size", "data_owner_rank", "model_owner_rank", "config_json", "seq_len", "provider", "timeout_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_OWNER_RANK_FIELD_NUMBER: _ClassVar[int]
    MODEL_OWNER_RANK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    rendezvous: str
    world_size: int
    data_owner_rank: int
    model_owner_rank: int
    config_json: str
    seq_len: int
    provider: str
    timeout_s: float
    def __init__(self, session_id: _Optional[str] = ..., rendezvous: _Optional[str] = ..., world_size: _Optional[int] = ..., data_owner_rank: _Optional[int] = ..., model_owner_rank: _Optional[int] = ..., config_json: _Optional[str] = ..., seq_len: _Optional[int] = ..., provider: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ListPrivateModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrivateModel(_message.Message):
    __slots__ = ("name", "config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class ListPrivateModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[PrivateModel]
    def __init__(self, models: _Optional[_Iterable[_Union[PrivateModel, _Mapping]]] = ...) -> None: ...

class AgentEnvelope(_message.Message):
    __slots__ = ("sender", "task_kind", "protocol_hash", "body", "text", "handled_by", "prompt_tokens", "completion_tokens", "error", "anonymous", "ring_epoch", "nonce", "ring_signature")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_HASH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HANDLED_BY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    RING_EPOCH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RING_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    task_kind: str
    protocol_hash: str
    body: str
    text: str
    handled_by: str
    prompt_tokens: int
    completion_tokens: int
    error: str
    anonymous: bool
    ring_epoch: str
    nonce: bytes
    ring_signature: bytes
    def __init__(self, sender: _Optional[str] = ..., task_kind: _Optional[str] = ..., protocol_hash: _Optional[str] = ..., body: _Optional[str] = ..., text: _Optional[str] = ..., handled_by: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., error: _Optional[str] = ..., anonymous: _Optional[bool] = ..., ring_epoch: _Optional[str] = ..., nonce: _Optional[bytes] = ..., ring_signature: _Optional[bytes] = ...) -> None: ...
