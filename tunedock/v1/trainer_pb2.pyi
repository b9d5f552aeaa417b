import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tunedock.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_ALPACA: _ClassVar[DatasetFormat]
    DATASET_FORMAT_CHAT: _ClassVar[DatasetFormat]
    DATASET_FORMAT_TEXT: _ClassVar[DatasetFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_VALIDATING: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_ALPACA: DatasetFormat
DATASET_FORMAT_CHAT: DatasetFormat
DATASET_FORMAT_TEXT: DatasetFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_VALIDATING: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class DatasetHeader(_message.Message):
    __slots__ = ("name", "format", "project", "dataset", "split")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: DatasetFormat
    project: str
    dataset: str
    split: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., project: _Optional[str] = ..., dataset: _Optional[str] = ..., split: _Optional[str] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DatasetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "name", "format", "num_records", "size", "sha256", "create_time", "project", "ignored_columns", "stats")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    format: DatasetFormat
    num_records: int
    size: int
    sha256: str
    create_time: _timestamp_pb2.Timestamp
    project: str
    ignored_columns: _containers.RepeatedScalarFieldContainer[str]
    stats: DatasetStats
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., num_records: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., project: _Optional[str] = ..., ignored_columns: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[DatasetStats, _Mapping]] = ...) -> None: ...

class DatasetStats(_message.Message):
    __slots__ = ("source", "chars_p50", "chars_p95", "chars_max", "records_with_tools", "records_with_system", "mean_messages")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHARS_P50_FIELD_NUMBER: _ClassVar[int]
    CHARS_P95_FIELD_NUMBER: _ClassVar[int]
    CHARS_MAX_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WITH_TOOLS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_WITH_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    MEAN_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    source: str
    chars_p50: int
    chars_p95: int
    chars_max: int
    records_with_tools: int
    records_with_system: int
    mean_messages: float
    def __init__(self, source: _Optional[str] = ..., chars_p50: _Optional[int] = ..., chars_p95: _Optional[int] = ..., chars_max: _Optional[int] = ..., records_with_tools: _Optional[int] = ..., records_with_system: _Optional[int] = ..., mean_messages: _Optional[float] = ...) -> None: ...

class UploadDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "project")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    project: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., project: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("epochs", "max_steps", "learning_rate", "lr_schedule", "warmup_steps", "batch_size", "gradient_accumulation_steps", "max_seq_length", "seed", "gradient_checkpointing", "packing", "eval_every_steps", "checkpoint_every_steps", "log_every_steps", "weight_decay", "max_grad_norm", "processes_per_node", "nodes")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOG_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    epochs: float
    max_steps: int
    learning_rate: float
    lr_schedule: _common_pb2.LrSchedule
    warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    seed: int
    gradient_checkpointing: bool
    packing: bool
    eval_every_steps: int
    checkpoint_every_steps: int
    log_every_steps: int
    weight_decay: float
    max_grad_norm: float
    processes_per_node: int
    nodes: int
    def __init__(self, epochs: _Optional[float] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_schedule: _Optional[_Union[_common_pb2.LrSchedule, str]] = ..., warmup_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_seq_length: _Optional[int] = ..., seed: _Optional[int] = ..., gradient_checkpointing: _Optional[bool] = ..., packing: _Optional[bool] = ..., eval_every_steps: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., log_every_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., processes_per_node: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("base_model", "method", "hyperparameters", "train_dataset_ids", "eval_dataset_ids", "validation_split", "output_name", "labels", "merge_adapter", "project", "extract", "then_extract")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DATASET_IDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_IDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SPLIT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MERGE_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    EXTRACT_FIELD_NUMBER: _ClassVar[int]
    THEN_EXTRACT_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    method: _common_pb2.MethodConfig
    hyperparameters: Hyperparameters
    train_dataset_ids: _containers.RepeatedScalarFieldContainer[str]
    eval_dataset_ids: _containers.RepeatedScalarFieldContainer[str]
    validation_split: float
    output_name: str
    labels: _containers.RepeatedCompositeFieldContainer[_common_pb2.Label]
    merge_adapter: str
    project: str
    extract: ExtractSpec
    then_extract: ExtractSpec
    def __init__(self, base_model: _Optional[str] = ..., method: _Optional[_Union[_common_pb2.MethodConfig, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., train_dataset_ids: _Optional[_Iterable[str]] = ..., eval_dataset_ids: _Optional[_Iterable[str]] = ..., validation_split: _Optional[float] = ..., output_name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[_common_pb2.Label, _Mapping]]] = ..., merge_adapter: _Optional[str] = ..., project: _Optional[str] = ..., extract: _Optional[_Union[ExtractSpec, _Mapping]] = ..., then_extract: _Optional[_Union[ExtractSpec, _Mapping]] = ...) -> None: ...

class ExtractSpec(_message.Message):
    __slots__ = ("source", "rank", "energy", "max_rank", "allow_dropped", "max_dropped_share")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    ALLOW_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MAX_DROPPED_SHARE_FIELD_NUMBER: _ClassVar[int]
    source: str
    rank: int
    energy: float
    max_rank: int
    allow_dropped: bool
    max_dropped_share: float
    def __init__(self, source: _Optional[str] = ..., rank: _Optional[int] = ..., energy: _Optional[float] = ..., max_rank: _Optional[int] = ..., allow_dropped: _Optional[bool] = ..., max_dropped_share: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "error", "step", "total_steps", "attempt", "output_ref", "metrics", "create_time", "start_time", "end_time", "failures")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REF_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    error: str
    step: int
    total_steps: int
    attempt: int
    output_ref: str
    metrics: _containers.RepeatedCompositeFieldContainer[_common_pb2.Metric]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    failures: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., error: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., attempt: _Optional[int] = ..., output_ref: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_common_pb2.Metric, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failures: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token", "project")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    page_size: int
    page_token: str
    project: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., project: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_sequence: int
    def __init__(self, id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_bytes", "eta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_second: float
    peak_memory_bytes: int
    eta: _duration_pb2.Duration
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EvalEvent(_message.Message):
    __slots__ = ("step", "eval_loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    eval_loss: float
    def __init__(self, step: _Optional[int] = ..., eval_loss: _Optional[float] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PublishedEvent(_message.Message):
    __slots__ = ("ref", "content_sha256", "metrics")
    REF_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    content_sha256: str
    metrics: _containers.RepeatedCompositeFieldContainer[_common_pb2.Metric]
    def __init__(self, ref: _Optional[str] = ..., content_sha256: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_common_pb2.Metric, _Mapping]]] = ...) -> None: ...

class StateEvent(_message.Message):
    __slots__ = ("state", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    message: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class LogEvent(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "state", "progress", "eval", "checkpoint", "published", "log")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state: StateEvent
    progress: ProgressEvent
    eval: EvalEvent
    checkpoint: CheckpointEvent
    published: PublishedEvent
    log: LogEvent
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[StateEvent, _Mapping]] = ..., progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., eval: _Optional[_Union[EvalEvent, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointEvent, _Mapping]] = ..., published: _Optional[_Union[PublishedEvent, _Mapping]] = ..., log: _Optional[_Union[LogEvent, _Mapping]] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetAssignmentResponse(_message.Message):
    __slots__ = ("job", "checkpoint_dir", "registry_address")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    checkpoint_dir: str
    registry_address: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., checkpoint_dir: _Optional[str] = ..., registry_address: _Optional[str] = ...) -> None: ...

class ReportEventRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "event")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    event: JobEvent
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class ReportEventResponse(_message.Message):
    __slots__ = ("cancel_requested",)
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    cancel_requested: bool
    def __init__(self, cancel_requested: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("cancel_requested",)
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    cancel_requested: bool
    def __init__(self, cancel_requested: _Optional[bool] = ...) -> None: ...

class DownloadDatasetRequest(_message.Message):
    __slots__ = ("job_id", "dataset_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    dataset_id: str
    def __init__(self, job_id: _Optional[str] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class DownloadDatasetResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class GetTrainerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrainerInfoResponse(_message.Message):
    __slots__ = ("version", "default_base_model", "base_model_sources", "methods", "dataset_formats", "executor", "device", "gpu_count", "max_concurrent_jobs", "max_attempts", "max_dataset_bytes", "max_lora_rank", "multi_node")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SOURCES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FORMATS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_DATASET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MULTI_NODE_FIELD_NUMBER: _ClassVar[int]
    version: str
    default_base_model: str
    base_model_sources: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    dataset_formats: _containers.RepeatedScalarFieldContainer[str]
    executor: str
    device: str
    gpu_count: int
    max_concurrent_jobs: int
    max_attempts: int
    max_dataset_bytes: int
    max_lora_rank: int
    multi_node: bool
    def __init__(self, version: _Optional[str] = ..., default_base_model: _Optional[str] = ..., base_model_sources: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., dataset_formats: _Optional[_Iterable[str]] = ..., executor: _Optional[str] = ..., device: _Optional[str] = ..., gpu_count: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ..., max_attempts: _Optional[int] = ..., max_dataset_bytes: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., multi_node: _Optional[bool] = ...) -> None: ...
