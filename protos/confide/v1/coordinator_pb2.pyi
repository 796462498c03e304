from google.protobuf import struct_pb2 as _struct_pb2
from confide.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    PENDING: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    COMPLETED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    INIT: _ClassVar[TaskKind]
    TRAIN: _ClassVar[TaskKind]
    MERGE: _ClassVar[TaskKind]
    MINION: _ClassVar[TaskKind]
JOB_STATE_UNSPECIFIED: JobState
PENDING: JobState
RUNNING: JobState
COMPLETED: JobState
FAILED: JobState
CANCELLED: JobState
TASK_KIND_UNSPECIFIED: TaskKind
INIT: TaskKind
TRAIN: TaskKind
MERGE: TaskKind
MINION: TaskKind

class NodeInfo(_message.Message):
    __slots__ = ("name", "roles", "peer_address", "device", "datasets", "version", "ring_public_key", "cost", "features", "dataset_disclosure", "privacy")
    class DatasetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DATASET_DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    peer_address: str
    device: str
    datasets: _containers.ScalarMap[str, int]
    version: str
    ring_public_key: bytes
    cost: float
    features: _containers.RepeatedScalarFieldContainer[str]
    dataset_disclosure: str
    privacy: _containers.RepeatedCompositeFieldContainer[DatasetPrivacy]
    def __init__(self, name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., peer_address: _Optional[str] = ..., device: _Optional[str] = ..., datasets: _Optional[_Mapping[str, int]] = ..., version: _Optional[str] = ..., ring_public_key: _Optional[bytes] = ..., cost: _Optional[float] = ..., features: _Optional[_Iterable[str]] = ..., dataset_disclosure: _Optional[str] = ..., privacy: _Optional[_Iterable[_Union[DatasetPrivacy, _Mapping]]] = ...) -> None: ...

class DatasetPrivacy(_message.Message):
    __slots__ = ("dataset", "epsilon_budget", "delta", "epsilon_spent", "private", "charges")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_FIELD_NUMBER: _ClassVar[int]
    CHARGES_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    epsilon_budget: float
    delta: float
    epsilon_spent: float
    private: bool
    charges: int
    def __init__(self, dataset: _Optional[str] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., private: _Optional[bool] = ..., charges: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("public_key", "info", "timestamp_ms", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    info: NodeInfo
    timestamp_ms: int
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., info: _Optional[_Union[NodeInfo, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "mqtt_url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MQTT_URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    mqtt_url: str
    def __init__(self, node_id: _Optional[str] = ..., mqtt_url: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "info", "online", "busy", "registered_ms", "last_seen_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    info: NodeInfo
    online: bool
    busy: bool
    registered_ms: int
    last_seen_ms: int
    def __init__(self, node_id: _Optional[str] = ..., info: _Optional[_Union[NodeInfo, _Mapping]] = ..., online: _Optional[bool] = ..., busy: _Optional[bool] = ..., registered_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("task", "base", "num_labels", "max_length", "lora", "seed")
    TASK_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    task: str
    base: str
    num_labels: int
    max_length: int
    lora: LoraSpec
    seed: int
    def __init__(self, task: _Optional[str] = ..., base: _Optional[str] = ..., num_labels: _Optional[int] = ..., max_length: _Optional[int] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("local_epochs", "max_steps", "batch_size", "learning_rate", "dataset", "optimizer", "head_learning_rate")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    HEAD_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    max_steps: int
    batch_size: int
    learning_rate: float
    dataset: str
    optimizer: str
    head_learning_rate: float
    def __init__(self, local_epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., dataset: _Optional[str] = ..., optimizer: _Optional[str] = ..., head_learning_rate: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "method", "model", "train", "rounds", "min_nodes", "nodes_per_round", "round_timeout_s", "wait_for_nodes_s", "method_params", "seed", "anonymous", "budget", "secure_aggregation", "anonymity_set")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_NODES_S_FIELD_NUMBER: _ClassVar[int]
    METHOD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ANONYMITY_SET_FIELD_NUMBER: _ClassVar[int]
    name: str
    method: str
    model: ModelSpec
    train: TrainSpec
    rounds: int
    min_nodes: int
    nodes_per_round: int
    round_timeout_s: float
    wait_for_nodes_s: float
    method_params: _struct_pb2.Struct
    seed: int
    anonymous: bool
    budget: float
    secure_aggregation: bool
    anonymity_set: int
    def __init__(self, name: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., rounds: _Optional[int] = ..., min_nodes: _Optional[int] = ..., nodes_per_round: _Optional[int] = ..., round_timeout_s: _Optional[float] = ..., wait_for_nodes_s: _Optional[float] = ..., method_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., seed: _Optional[int] = ..., anonymous: _Optional[bool] = ..., budget: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., anonymity_set: _Optional[int] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "state", "selected", "participants", "dropped", "bytes", "seconds", "metrics", "secure_aggregation", "secagg_survivors", "secagg_threshold")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SECAGG_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    selected: _containers.RepeatedScalarFieldContainer[str]
    participants: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.ScalarMap[str, str]
    bytes: _common_pb2.ByteCount
    seconds: float
    metrics: _containers.ScalarMap[str, float]
    secure_aggregation: bool
    secagg_survivors: int
    secagg_threshold: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., selected: _Optional[_Iterable[str]] = ..., participants: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Mapping[str, str]] = ..., bytes: _Optional[_Union[_common_pb2.ByteCount, _Mapping]] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., secure_aggregation: _Optional[bool] = ..., secagg_survivors: _Optional[int] = ..., secagg_threshold: _Optional[int] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "spec", "state", "rounds_completed", "reason", "created_ms", "updated_ms", "rounds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    rounds_completed: int
    reason: str
    created_ms: int
    updated_ms: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., rounds_completed: _Optional[int] = ..., reason: _Optional[str] = ..., created_ms: _Optional[int] = ..., updated_ms: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class GetRingRequest(_message.Message):
    __slots__ = ("job_id", "round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("job_id", "epoch_id", "public_keys", "round", "anonymity_set", "sets")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ANONYMITY_SET_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch_id: str
    public_keys: _containers.RepeatedScalarFieldContainer[bytes]
    round: int
    anonymity_set: int
    sets: _containers.RepeatedCompositeFieldContainer[AnonymitySet]
    def __init__(self, job_id: _Optional[str] = ..., epoch_id: _Optional[str] = ..., public_keys: _Optional[_Iterable[bytes]] = ..., round: _Optional[int] = ..., anonymity_set: _Optional[int] = ..., sets: _Optional[_Iterable[_Union[AnonymitySet, _Mapping]]] = ...) -> None: ...

class AnonymitySet(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, members: _Optional[_Iterable[int]] = ...) -> None: ...

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("nonce", "expires_ms")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_ms: int
    def __init__(self, nonce: _Optional[bytes] = ..., expires_ms: _Optional[int] = ...) -> None: ...

class AnonymousUpdateHeader(_message.Message):
    __slots__ = ("job_id", "round", "epoch_id", "nonce", "num_examples", "payload_sha256", "signature", "set_index")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SET_INDEX_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    epoch_id: str
    nonce: bytes
    num_examples: int
    payload_sha256: bytes
    signature: bytes
    set_index: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., epoch_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., num_examples: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., set_index: _Optional[int] = ...) -> None: ...

class AnonymousUpdateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AnonymousUpdateHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[AnonymousUpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class AnonymousAck(_message.Message):
    __slots__ = ("key_image",)
    KEY_IMAGE_FIELD_NUMBER: _ClassVar[int]
    key_image: bytes
    def __init__(self, key_image: _Optional[bytes] = ...) -> None: ...

class GetLedgerRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Payment(_message.Message):
    __slots__ = ("job_id", "round", "node_id", "reported_cost", "value", "payment")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTED_COST_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    node_id: str
    reported_cost: float
    value: float
    payment: float
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., node_id: _Optional[str] = ..., reported_cost: _Optional[float] = ..., value: _Optional[float] = ..., payment: _Optional[float] = ...) -> None: ...

class Ledger(_message.Message):
    __slots__ = ("payments", "totals")
    class TotalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    payments: _containers.RepeatedCompositeFieldContainer[Payment]
    totals: _containers.ScalarMap[str, float]
    def __init__(self, payments: _Optional[_Iterable[_Union[Payment, _Mapping]]] = ..., totals: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FetchGlobalModelRequest(_message.Message):
    __slots__ = ("job_id", "round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("job_id", "round", "metrics", "dataset")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    metrics: _containers.ScalarMap[str, float]
    dataset: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., dataset: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("job_id", "seq", "timestamp_ms", "kind", "round", "node_id", "message", "metrics", "bytes", "state")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    timestamp_ms: int
    kind: str
    round: int
    node_id: str
    message: str
    metrics: _containers.ScalarMap[str, float]
    bytes: _common_pb2.ByteCount
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., node_id: _Optional[str] = ..., message: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., bytes: _Optional[_Union[_common_pb2.ByteCount, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class SessionChallenge(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class SessionProof(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class SessionWelcome(_message.Message):
    __slots__ = ("heartbeat_interval_s", "mqtt_url")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MQTT_URL_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    mqtt_url: str
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., mqtt_url: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "busy")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    busy: bool
    def __init__(self, seq: _Optional[int] = ..., busy: _Optional[bool] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("node_id", "address", "role", "weight", "name")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    role: str
    weight: float
    name: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., weight: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "kind", "spec", "has_global", "deadline_s", "anonymous", "peers", "self_weight", "instructions", "global_base_digest", "global_digest", "global_from_seed")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HAS_GLOBAL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SELF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_FROM_SEED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    spec: JobSpec
    has_global: bool
    deadline_s: float
    anonymous: bool
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    self_weight: float
    instructions: bytes
    global_base_digest: bytes
    global_digest: bytes
    global_from_seed: bool
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., has_global: _Optional[bool] = ..., deadline_s: _Optional[float] = ..., anonymous: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., self_weight: _Optional[float] = ..., instructions: _Optional[bytes] = ..., global_base_digest: _Optional[bytes] = ..., global_digest: _Optional[bytes] = ..., global_from_seed: _Optional[bool] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("task_id", "chunk")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    chunk: _common_pb2.Chunk
    def __init__(self, task_id: _Optional[str] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class TaskProgress(_message.Message):
    __slots__ = ("task_id", "step", "total_steps", "loss")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    step: int
    total_steps: int
    loss: float
    def __init__(self, task_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, task_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TaskFailure(_message.Message):
    __slots__ = ("task_id", "reason", "needs_full_state", "refused")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FULL_STATE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    needs_full_state: bool
    refused: bool
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ..., needs_full_state: _Optional[bool] = ..., refused: _Optional[bool] = ...) -> None: ...

class CostQuery(_message.Message):
    __slots__ = ("query_id", "job_id", "round")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    job_id: str
    round: int
    def __init__(self, query_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class CostReport(_message.Message):
    __slots__ = ("query_id", "cost")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    cost: float
    def __init__(self, query_id: _Optional[str] = ..., cost: _Optional[float] = ...) -> None: ...

class CancelTask(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class JobEnded(_message.Message):
    __slots__ = ("job_id", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class SecAggMessage(_message.Message):
    __slots__ = ("job_id", "round", "payload", "node_keys")
    class NodeKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NODE_KEYS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    payload: bytes
    node_keys: _containers.ScalarMap[str, bytes]
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., payload: _Optional[bytes] = ..., node_keys: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("hello", "proof", "heartbeat", "update_chunk", "result", "failure", "progress", "cost_report", "secagg")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COST_REPORT_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    hello: SessionHello
    proof: SessionProof
    heartbeat: Heartbeat
    update_chunk: TaskChunk
    result: TaskResult
    failure: TaskFailure
    progress: TaskProgress
    cost_report: CostReport
    secagg: SecAggMessage
    def __init__(self, hello: _Optional[_Union[SessionHello, _Mapping]] = ..., proof: _Optional[_Union[SessionProof, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., update_chunk: _Optional[_Union[TaskChunk, _Mapping]] = ..., result: _Optional[_Union[TaskResult, _Mapping]] = ..., failure: _Optional[_Union[TaskFailure, _Mapping]] = ..., progress: _Optional[_Union[TaskProgress, _Mapping]] = ..., cost_report: _Optional[_Union[CostReport, _Mapping]] = ..., secagg: _Optional[_Union[SecAggMessage, _Mapping]] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("challenge", "welcome", "heartbeat_ack", "task", "global_chunk", "cancel", "cost_query", "secagg", "job_ended")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    COST_QUERY_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    JOB_ENDED_FIELD_NUMBER: _ClassVar[int]
    challenge: SessionChallenge
    welcome: SessionWelcome
    heartbeat_ack: HeartbeatAck
    task: Task
    global_chunk: TaskChunk
    cancel: CancelTask
    cost_query: CostQuery
    secagg: SecAggMessage
    job_ended: JobEnded
    def __init__(self, challenge: _Optional[_Union[SessionChallenge, _Mapping]] = ..., welcome: _Optional[_Union[SessionWelcome, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., global_chunk: _Optional[_Union[TaskChunk, _Mapping]] = ..., cancel: _Optional[_Union[CancelTask, _Mapping]] = ..., cost_query: _Optional[_Union[CostQuery, _Mapping]] = ..., secagg: _Optional[_Union[SecAggMessage, _Mapping]] = ..., job_ended: _Optional[_Union[JobEnded, _Mapping]] = ...) -> None: ...

class ProtocolDocument(_message.Message):
    __slots__ = ("hash", "name", "description", "task_kind", "multiround", "rules", "request_schema", "response_schema", "uses")
    HASH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    MULTIROUND_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    hash: str
    name: str
    description: str
    task_kind: str
    multiround: bool
    rules: str
    request_schema: str
    response_schema: str
    uses: int
    def __init__(self, hash: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., task_kind: _Optional[str] = ..., multiround: _Optional[bool] = ..., rules: _Optional[str] = ..., request_schema: _Optional[str] = ..., response_schema: _Optional[str] = ..., uses: _Optional[int] = ...) -> None: ...

class GetProtocolRequest(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: str
    def __init__(self, hash: _Optional[str] = ...) -> None: ...

class ListProtocolsRequest(_message.Message):
    __slots__ = ("task_kind",)
    TASK_KIND_FIELD_NUMBER: _ClassVar[int]
    task_kind: str
    def __init__(self, task_kind: _Optional[str] = ...) -> None: ...

class ListProtocolsResponse(_message.Message):
    __slots__ = ("protocols",)
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    protocols: _containers.RepeatedCompositeFieldContainer[ProtocolDocument]
    def __init__(self, protocols: _Optional[_Iterable[_Union[ProtocolDocument, _Mapping]]] = ...) -> None: ...

class RecordProtocolUseRequest(_message.Message):
    __slots__ = ("hash", "count")
    HASH_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    hash: str
    count: int
    def __init__(self, hash: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("question", "mode", "node_ids", "max_rounds", "citations", "anonymous")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    question: str
    mode: str
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    max_rounds: int
    citations: str
    anonymous: bool
    def __init__(self, question: _Optional[str] = ..., mode: _Optional[str] = ..., node_ids: _Optional[_Iterable[str]] = ..., max_rounds: _Optional[int] = ..., citations: _Optional[str] = ..., anonymous: _Optional[bool] = ...) -> None: ...

class AskEvent(_message.Message):
    __slots__ = ("kind", "message", "node_id", "answer", "detail_json", "remote_prompt_tokens", "remote_completion_tokens", "local_prompt_tokens", "local_completion_tokens")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    message: str
    node_id: str
    answer: str
    detail_json: str
    remote_prompt_tokens: int
    remote_completion_tokens: int
    local_prompt_tokens: int
    local_completion_tokens: int
    def __init__(self, kind: _Optional[str] = ..., message: _Optional[str] = ..., node_id: _Optional[str] = ..., answer: _Optional[str] = ..., detail_json: _Optional[str] = ..., remote_prompt_tokens: _Optional[int] = ..., remote_completion_tokens: _Optional[int] = ..., local_prompt_tokens: _Optional[int] = ..., local_completion_tokens: _Optional[int] = ...) -> None: ...
