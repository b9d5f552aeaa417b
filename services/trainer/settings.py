"""Trainer settings."""

from __future__ import annotations

from typing import Any, ClassVar

from services.common.lora_shapes import DEFAULT_MAX_LORA_RANK
from services.common.settings import CommaList, ServerSettings, setting
from tunedock.errors import InvalidArgument


class TrainerSettings(ServerSettings):
    """Settings of `python -m services.trainer`."""

    ENV_PREFIX: ClassVar[str] = "TUNEDOCK_TRAINER_"
    SERVICE_NAME: ClassVar[str] = "trainer"
    DEFAULT_PORT: ClassVar[int] = 50051

    database_url: str = setting("", "SQLAlchemy URL of the job store; empty means sqlite:///<data-dir>/trainer/jobs.db")
    registry_address: str = setting("127.0.0.1:50052", "address of the adapter registry that outputs are published to")
    default_base_model: str = setting(
        "",
        "base model of jobs that name none: the base the inference replicas serve (keep the two settings equal); "
        "empty means the embedded tiny model, as for inference",
    )
    max_concurrent_jobs: int = setting(1, "jobs that train at the same time; the rest queue")
    max_attempts: int = setting(3, "worker starts per job (resumes from the last checkpoint after a crash)")
    checkpoints_kept: int = setting(
        0,
        "step checkpoints a job keeps once it succeeded (its output is in the registry); until then all are "
        "kept for resuming. Failed and cancelled jobs keep theirs for inspection",
    )
    max_dataset_mb: int = setting(1024, "largest dataset upload accepted, in MiB")
    max_lora_rank: int = setting(
        DEFAULT_MAX_LORA_RANK,
        "the inference replicas' max_lora_rank: extracted adapters are capped at it (keep the two settings equal)",
    )
    registry_token_file: str = setting("", "file with this service's token for the registry (registry.read)")
    worker_key_file: str = setting(
        "", "key that signs workers' job-scoped tokens (shared with the registry); needed with --token-file"
    )
    worker_token_ttl_s: float = setting(86400.0, "lifetime of a worker token (one attempt of one job)")
    worker_port: int = setting(
        50054, "port of the worker API (TrainerWorkerService), apart so a NetworkPolicy can admit workers only"
    )
    http_port: int = setting(
        -1,
        "port of the OpenAI-compatible fine-tuning API (/v1/files, /v1/fine_tuning/jobs); 0 picks a free one, -1 "
        "serves none",
    )
    executor: str = setting("local", "where workers run: local (subprocesses) or kubernetes (a batch/v1 Job each)")
    gpus: str = setting(
        "auto",
        "GPUs local workers may use, each attempt its own: auto (CUDA_VISIBLE_DEVICES, else nvidia-smi), none, "
        "or ids like 0,1,2 (leave the inference engine's GPUs out)",
    )
    gpus_per_process: int = setting(1, "GPUs each local training process gets")
    k8s_namespace: str = setting("", "namespace of worker Jobs; empty: the trainer pod's own namespace")
    k8s_image: str = setting("tunedock/tunedock:0.1.0-cuda", "container image of worker Jobs")
    k8s_worker_trainer_address: str = setting(
        "", "address worker pods dial for the trainer's worker API, e.g. tunedock-trainer-worker:50054"
    )
    k8s_service_account: str = setting("tunedock-worker", "service account of worker pods")
    k8s_gpu_resource: str = setting("nvidia.com/gpu", "extended resource name of a GPU")
    k8s_gpus_per_process: int = setting(1, "GPUs per training process (0: workers run on CPU nodes)")
    k8s_cpu: str = setting("4", "CPU request of a worker pod")
    k8s_memory: str = setting("32Gi", "memory request and limit of a worker pod")
    k8s_node_selector: CommaList = setting(lambda: [], "node selector of worker pods, key=value[,key=value]")
    k8s_tolerations: CommaList = setting(
        lambda: [], "tolerations of worker pods: key=value:Effect or key:Effect, comma-separated"
    )
    k8s_backoff_limit: int = setting(0, "pod retries inside one Job (the trainer retries attempts from checkpoints)")
    k8s_active_deadline_s: int = setting(86400, "a worker Job is stopped after this many seconds")
    k8s_ttl_after_finished_s: int = setting(3600, "finished worker Jobs are garbage-collected after this many seconds")
    k8s_data_pvc: str = setting("", "PVC with the trainer's data dir, mounted in worker pods for shared checkpoints")
    k8s_worker_subdomain: str = setting("tunedock-workers", "headless Service of worker pods (multi-node rendezvous)")
    k8s_poll_s: float = setting(5.0, "seconds between looks at the worker Jobs")
    k8s_tls_secret: str = setting("", "Secret with tls.crt/tls.key/ca.crt for worker pods (services with mTLS)")

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.max_concurrent_jobs < 1:
            raise InvalidArgument(f"max_concurrent_jobs must be >= 1, got {self.max_concurrent_jobs}")
        if self.executor not in ("local", "kubernetes"):
            raise InvalidArgument(f"executor must be local or kubernetes, got {self.executor!r}")
        if not 0 <= self.worker_port <= 65535:
            raise InvalidArgument(f"worker_port must be 0..65535, got {self.worker_port}")
        if not -1 <= self.http_port <= 65535:
            raise InvalidArgument(f"http_port must be -1..65535, got {self.http_port}")
        if self.token_file and not self.worker_key_file:
            raise InvalidArgument(
                "with --token-file the trainer needs --worker-key-file: the key that signs workers' job-scoped "
                "tokens (give the registry the same file)"
            )
        if self.executor == "kubernetes" and not self.k8s_worker_trainer_address:
            raise InvalidArgument(
                "executor kubernetes needs k8s_worker_trainer_address: the trainer's worker API as pods reach it "
                "(e.g. tunedock-trainer-worker:50054)"
            )
        bad = [item for item in self.k8s_node_selector if "=" not in item]
        if bad:
            raise InvalidArgument(f"k8s_node_selector entries must be key=value, got {bad}")
        if self.gpus not in ("auto", "none") and not all(g.strip().isdigit() for g in self.gpus.split(",")):
            raise InvalidArgument(f"gpus must be auto, none or comma-separated GPU ids, got {self.gpus!r}")
        if self.gpus_per_process < 1:
            raise InvalidArgument(f"gpus_per_process must be >= 1, got {self.gpus_per_process}")
        if self.max_lora_rank < 1:
            raise InvalidArgument(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'trainer' / 'jobs.db'}"
