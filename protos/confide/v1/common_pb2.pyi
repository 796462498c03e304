from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class IndexEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_POSITIONS: _ClassVar[IndexEncoding]
    INDEX_GAPS: _ClassVar[IndexEncoding]
    INDEX_BITMAP: _ClassVar[IndexEncoding]

class TensorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DENSE: _ClassVar[TensorEncoding]
    TENSOR_SPARSE: _ClassVar[TensorEncoding]
    TENSOR_SEED_PROJECTED: _ClassVar[TensorEncoding]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
INDEX_POSITIONS: IndexEncoding
INDEX_GAPS: IndexEncoding
INDEX_BITMAP: IndexEncoding
TENSOR_DENSE: TensorEncoding
TENSOR_SPARSE: TensorEncoding
TENSOR_SEED_PROJECTED: TensorEncoding

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SparseTensor(_message.Message):
    __slots__ = ("dtype", "shape", "indices", "values", "index_encoding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    indices: Tensor
    values: Tensor
    index_encoding: IndexEncoding
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ...) -> None: ...

class SeedProjectedTensor(_message.Message):
    __slots__ = ("dtype", "shape", "seeds", "coefficients", "generator")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    generator: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., seeds: _Optional[_Iterable[int]] = ..., coefficients: _Optional[_Iterable[float]] = ..., generator: _Optional[str] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "dense", "sparse", "projected")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dense: Tensor
    sparse: SparseTensor
    projected: SeedProjectedTensor
    def __init__(self, name: _Optional[str] = ..., dense: _Optional[_Union[Tensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., projected: _Optional[_Union[SeedProjectedTensor, _Mapping]] = ...) -> None: ...

class TensorMap(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "byte_length", "index_encoding", "index_dtype", "index_count", "value_count", "seeds", "coefficients", "generator")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_COUNT_FIELD_NUMBER: _ClassVar[int]
    VALUE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: TensorEncoding
    byte_length: int
    index_encoding: IndexEncoding
    index_dtype: DType
    index_count: int
    value_count: int
    seeds: _containers.RepeatedScalarFieldContainer[int]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    generator: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[TensorEncoding, str]] = ..., byte_length: _Optional[int] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ..., index_dtype: _Optional[_Union[DType, str]] = ..., index_count: _Optional[int] = ..., value_count: _Optional[int] = ..., seeds: _Optional[_Iterable[int]] = ..., coefficients: _Optional[_Iterable[float]] = ..., generator: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("transfer_id", "index", "data", "header", "last", "total_bytes", "sha256")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    index: int
    data: bytes
    header: TensorHeader
    last: bool
    total_bytes: int
    sha256: bytes
    def __init__(self, transfer_id: _Optional[str] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., last: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class ByteCount(_message.Message):
    __slots__ = ("up", "down")
    UP_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    up: int
    down: int
    def __init__(self, up: _Optional[int] = ..., down: _Optional[int] = ...) -> None: ...
