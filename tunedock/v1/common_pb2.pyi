from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_FULL: _ClassVar[Method]
    METHOD_FREEZE: _ClassVar[Method]
    METHOD_LORA: _ClassVar[Method]
    METHOD_QLORA: _ClassVar[Method]

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW_8BIT: _ClassVar[Optimizer]
    OPTIMIZER_PAGED_ADAMW_8BIT: _ClassVar[Optimizer]
    OPTIMIZER_PAGED_ADAMW_32BIT: _ClassVar[Optimizer]
    OPTIMIZER_SGD: _ClassVar[Optimizer]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]

class QuantType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANT_TYPE_UNSPECIFIED: _ClassVar[QuantType]
    QUANT_TYPE_NF4: _ClassVar[QuantType]
    QUANT_TYPE_FP4: _ClassVar[QuantType]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
METHOD_UNSPECIFIED: Method
METHOD_FULL: Method
METHOD_FREEZE: Method
METHOD_LORA: Method
METHOD_QLORA: Method
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_ADAMW: Optimizer
OPTIMIZER_ADAMW_8BIT: Optimizer
OPTIMIZER_PAGED_ADAMW_8BIT: Optimizer
OPTIMIZER_PAGED_ADAMW_32BIT: Optimizer
OPTIMIZER_SGD: Optimizer
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
QUANT_TYPE_UNSPECIFIED: QuantType
QUANT_TYPE_NF4: QuantType
QUANT_TYPE_FP4: QuantType
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_FLOAT16: Dtype

class FullConfig(_message.Message):
    __slots__ = ("optimizer",)
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    optimizer: Optimizer
    def __init__(self, optimizer: _Optional[_Union[Optimizer, str]] = ...) -> None: ...

class FreezeConfig(_message.Message):
    __slots__ = ("trainable_layers", "trainable_layer_indices", "trainable_modules", "extra_modules", "optimizer", "publish_expanded")
    TRAINABLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_LAYER_INDICES_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_MODULES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_MODULES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_EXPANDED_FIELD_NUMBER: _ClassVar[int]
    trainable_layers: int
    trainable_layer_indices: _containers.RepeatedScalarFieldContainer[int]
    trainable_modules: _containers.RepeatedScalarFieldContainer[str]
    extra_modules: _containers.RepeatedScalarFieldContainer[str]
    optimizer: Optimizer
    publish_expanded: bool
    def __init__(self, trainable_layers: _Optional[int] = ..., trainable_layer_indices: _Optional[_Iterable[int]] = ..., trainable_modules: _Optional[_Iterable[str]] = ..., extra_modules: _Optional[_Iterable[str]] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., publish_expanded: _Optional[bool] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules", "use_rslora", "optimizer")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    use_rslora: bool
    optimizer: Optimizer
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., use_rslora: _Optional[bool] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ...) -> None: ...

class QLoraConfig(_message.Message):
    __slots__ = ("lora", "quant_type", "double_quant", "compute_dtype", "paged_optimizer")
    LORA_FIELD_NUMBER: _ClassVar[int]
    QUANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_QUANT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGED_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    lora: LoraConfig
    quant_type: QuantType
    double_quant: bool
    compute_dtype: Dtype
    paged_optimizer: bool
    def __init__(self, lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., quant_type: _Optional[_Union[QuantType, str]] = ..., double_quant: _Optional[bool] = ..., compute_dtype: _Optional[_Union[Dtype, str]] = ..., paged_optimizer: _Optional[bool] = ...) -> None: ...

class MethodConfig(_message.Message):
    __slots__ = ("full", "freeze", "lora", "qlora")
    FULL_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    QLORA_FIELD_NUMBER: _ClassVar[int]
    full: FullConfig
    freeze: FreezeConfig
    lora: LoraConfig
    qlora: QLoraConfig
    def __init__(self, full: _Optional[_Union[FullConfig, _Mapping]] = ..., freeze: _Optional[_Union[FreezeConfig, _Mapping]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., qlora: _Optional[_Union[QLoraConfig, _Mapping]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
