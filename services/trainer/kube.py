"""The Kubernetes executor: each attempt of a training job is a `batch/v1` Job running the worker.

Same interface as the local executor (start, cancel, close, exits through `on_exit`), and
the same worker command: the pod fetches its assignment from the trainer's worker API,
trains, publishes and reports over gRPC. Kubernetes only runs it; what the trainer learns
from the API server is how it ended (`outcome`): completed, failed with the pod's reason
(OOMKilled, a non-zero exit, the deadline), or deleted by someone else.

Imported only when `--executor kubernetes` is set: the `kubernetes` client stays out of
the trainer's start-up otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.trainer.executor import ONE_PROCESS, RENDEZVOUS_PORT, Launch, OnExit, worker_command

log = logging.getLogger(__name__)

LABEL_JOB_ID = "tunedock.dev/job-id"
LABEL_ATTEMPT = "tunedock.dev/attempt"
LABEL_METHOD = "tunedock.dev/method"
MANAGED_LABELS = {
    "app.kubernetes.io/part-of": "tunedock",
    "app.kubernetes.io/component": "worker",
    "app.kubernetes.io/managed-by": "tunedock-trainer",
}
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_LABELS.items())
CONTAINER = "worker"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TLS_DIR = "/etc/tunedock/tls"
TOKEN_DIR = "/etc/tunedock/job-token"


@dataclass(frozen=True)
class KubeJobSettings:
    """How worker Jobs are shaped; filled from the trainer's `k8s_*` settings."""

    namespace: str
    image: str
    trainer_address: str
    """Address the worker pods dial: the trainer's worker port behind its Service."""
    service_account: str = "tunedock-worker"
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_process: int = 1
    """0 runs workers on CPU nodes."""
    cpu: str = "4"
    memory: str = "32Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[k8s.V1Toleration, ...] = ()
    backoff_limit: int = 0
    """Pod retries inside one Job; the trainer retries attempts itself (resuming from checkpoints)."""
    active_deadline_s: int = 86400
    ttl_after_finished_s: int = 3600
    data_pvc: str = ""
    """PVC holding the trainer's data dir (checkpoints), mounted at `data_dir`; empty: none."""
    data_dir: str = "/data"
    subdomain: str = "tunedock-workers"
    """Headless Service of the worker pods: multi-node rendezvous at <job>-0.<subdomain>."""
    image_pull_policy: str = "IfNotPresent"
    env: dict[str, str] = field(default_factory=dict)
    tls_secret: str = ""
    """Secret (tls.crt, tls.key, ca.crt) mounted into worker pods: their client certificate under mTLS."""


def job_name(job_id: str, attempt: int) -> str:
    """DNS-1123 name of an attempt's Job (job ids are `job-<12 hex>`)."""
    return f"tdw-{job_id}-a{attempt}"[:63]


def parse_tolerations(specs: list[str]) -> tuple[k8s.V1Toleration, ...]:
    """`key=value:Effect`, `key:Effect` (exists) or `key=value` (any effect)."""
    out = []
    for spec in specs:
        body, _, effect = spec.partition(":")
        key, eq, value = body.partition("=")
        out.append(
            k8s.V1Toleration(
                key=key,
                operator="Equal" if eq else "Exists",
                value=value or None,
                effect=effect or None,
            )
        )
    return tuple(out)


def build_job(job_id: str, attempt: int, launch: Launch, s: KubeJobSettings) -> k8s.V1Job:
    """The batch/v1 Job of one attempt (an indexed Job with one pod per node for several nodes)."""
    name = job_name(job_id, attempt)
    labels = {**MANAGED_LABELS, LABEL_JOB_ID: job_id, LABEL_ATTEMPT: str(attempt), LABEL_METHOD: launch.method}
    rendezvous = f"{name}-0.{s.subdomain}:{RENDEZVOUS_PORT}" if launch.nodes > 1 else ""
    command = worker_command(job_id, attempt, s.trainer_address, launch, python="python", rendezvous=rendezvous)
    gpus = launch.processes_per_node * s.gpus_per_process
    limits = {"memory": s.memory} | ({s.gpu_resource: str(gpus)} if gpus else {})
    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HOME": "/tmp",
        "TUNEDOCK_JOB_ID": job_id,
        "OMP_NUM_THREADS": str(max(1, _cpu_count(s.cpu) // launch.processes_per_node)),
        **s.env,
    }
    if launch.token:
        # Job-scoped and expiring, and in the attempt's own Secret (token_secret), mounted as a file:
        # `get jobs` shows no token, and the Secret goes with the Job.
        env["TUNEDOCK_TOKEN_FILE"] = f"{TOKEN_DIR}/token"
    if s.tls_secret:
        env |= {
            "TUNEDOCK_TLS_CA_FILE": f"{TLS_DIR}/ca.crt",
            "TUNEDOCK_TLS_CERT_FILE": f"{TLS_DIR}/tls.crt",
            "TUNEDOCK_TLS_KEY_FILE": f"{TLS_DIR}/tls.key",
        }
    env_vars = [k8s.V1EnvVar(name=k, value=v) for k, v in env.items()]
    if launch.nodes > 1:
        # torchrun's --node-rank=$(JOB_COMPLETION_INDEX) expands from a declared variable.
        env_vars.append(
            k8s.V1EnvVar(
                name="JOB_COMPLETION_INDEX",
                value_from=k8s.V1EnvVarSource(
                    field_ref=k8s.V1ObjectFieldSelector(
                        field_path="metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    )
                ),
            )
        )
    mounts = [
        k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),  # NCCL and torch share memory through it
    ]
    volumes = [
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")),
    ]
    if launch.token:
        mounts.append(k8s.V1VolumeMount(name="job-token", mount_path=TOKEN_DIR, read_only=True))
        volumes.append(
            k8s.V1Volume(name="job-token", secret=k8s.V1SecretVolumeSource(secret_name=name, default_mode=0o400))
        )
    if s.tls_secret:
        mounts.append(k8s.V1VolumeMount(name="tls", mount_path=TLS_DIR, read_only=True))
        volumes.append(
            k8s.V1Volume(name="tls", secret=k8s.V1SecretVolumeSource(secret_name=s.tls_secret, default_mode=0o400))
        )
    if s.data_pvc:
        mounts.append(k8s.V1VolumeMount(name="data", mount_path=s.data_dir))
        volumes.append(
            k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(s.data_pvc))
        )
    container = k8s.V1Container(
        name=CONTAINER,
        image=s.image,
        image_pull_policy=s.image_pull_policy,
        command=command,
        env=env_vars,
        resources=k8s.V1ResourceRequirements(requests={"cpu": s.cpu, "memory": s.memory}, limits=limits),
        volume_mounts=mounts,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
    )
    pod = k8s.V1PodSpec(
        restart_policy="Never",
        service_account_name=s.service_account,
        automount_service_account_token=False,  # workers talk to the trainer, never to the API server
        containers=[container],
        volumes=volumes,
        node_selector=s.node_selector or None,
        tolerations=list(s.tolerations) or None,
        subdomain=s.subdomain if launch.nodes > 1 else None,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=10001,
            run_as_group=10001,
            fs_group=10001,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    spec = k8s.V1JobSpec(
        backoff_limit=s.backoff_limit,
        active_deadline_seconds=s.active_deadline_s,
        ttl_seconds_after_finished=s.ttl_after_finished_s,
        template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod),
    )
    if launch.nodes > 1:
        spec.completion_mode = "Indexed"
        spec.completions = spec.parallelism = launch.nodes
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, namespace=s.namespace, labels=labels),
        spec=spec,
    )


def token_secret(job_id: str, attempt: int, token: str, s: KubeJobSettings) -> k8s.V1Secret:
    """The attempt's worker token, in a Secret named like its Job (owned by it once the Job exists)."""
    labels = {**MANAGED_LABELS, LABEL_JOB_ID: job_id, LABEL_ATTEMPT: str(attempt)}
    return k8s.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=k8s.V1ObjectMeta(name=job_name(job_id, attempt), namespace=s.namespace, labels=labels),
        type="Opaque",
        string_data={"token": token},
    )


def owned_by(job: k8s.V1Job) -> dict:
    """A patch that makes an object the Job's: Kubernetes deletes it with the Job."""
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name, "uid": job.metadata.uid}
    return {"metadata": {"ownerReferences": [owner | {"blockOwnerDeletion": False}]}}


# --------------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, in the local executor's terms: an exit code (negative: a signal) and a message."""

    code: int
    message: str


DELETED = Outcome(-15, "the Kubernetes Job was deleted outside the trainer")


def outcome(job: k8s.V1Job | None, pods: list[k8s.V1Pod]) -> Outcome | None:
    """None while the Job runs; else how it ended, with the failed pod's reason when there is one."""
    if job is None or (job.metadata and job.metadata.deletion_timestamp):
        return DELETED
    conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return Outcome(0, "")
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is None:
        return None
    for pod in pods:
        status = pod.status
        if status is None:
            continue
        if status.reason == "Evicted":
            return Outcome(-9, f"pod {pod.metadata.name} was evicted: {status.message or 'node pressure'}")
        for cs in status.container_statuses or []:
            term = cs.state.terminated if cs.state else None
            term = term or (cs.last_state.terminated if cs.last_state else None)
            if term is None or term.exit_code == 0:
                continue
            if term.reason == "OOMKilled":
                return Outcome(
                    -9, f"pod {pod.metadata.name}: container {cs.name!r} was OOMKilled (over its memory limit)"
                )
            detail = f": {term.message.strip()[-500:]}" if term.message else ""
            return Outcome(
                term.exit_code,
                f"pod {pod.metadata.name}: container {cs.name!r} exited {term.exit_code} ({term.reason}){detail}",
            )
    return Outcome(1, f"Job failed: {failed.reason or 'Failed'}: {failed.message or ''}".rstrip(": "))


# -------------------------------------------------------------------------------- executor


class KubernetesExecutor:
    """Starts, watches (by polling the API server) and deletes worker Jobs in one namespace."""

    kind = "kubernetes"
    multi_node = True

    def __init__(
        self,
        settings: KubeJobSettings,
        on_exit: OnExit,
        batch_api: k8s.BatchV1Api | None = None,
        core_api: k8s.CoreV1Api | None = None,
        poll_s: float = 5.0,
    ) -> None:
        if batch_api is None or core_api is None:
            _load_config()
        self.settings = settings
        self.on_exit = on_exit
        self.batch = batch_api or k8s.BatchV1Api()
        self.core = core_api or k8s.CoreV1Api()
        self.poll_s = poll_s
        self.tracked: dict[str, tuple[str, int]] = {}  # job id -> (Job name, attempt)
        self._poller: asyncio.Task | None = None

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    @property
    def device(self) -> str:
        """What worker pods train on: GPUs when each process requests some."""
        return "cuda" if self.settings.gpus_per_process > 0 else "cpu"

    def can_start(self, launch: Launch) -> bool:
        return True  # the Kubernetes scheduler queues pods until GPUs are free

    async def start(self, job_id: str, attempt: int, launch: Launch = ONE_PROCESS) -> None:
        await self._delete_attempts(job_id)  # a previous attempt's Job (e.g. before a trainer restart)
        body = build_job(job_id, attempt, launch, self.settings)
        secret = token_secret(job_id, attempt, launch.token, self.settings) if launch.token else None
        if secret is not None:
            await asyncio.to_thread(self.core.create_namespaced_secret, self.namespace, secret)
        try:
            created = await asyncio.to_thread(self.batch.create_namespaced_job, self.namespace, body)
        except BaseException:
            if secret is not None:
                with contextlib.suppress(ApiException):
                    await asyncio.to_thread(self.core.delete_namespaced_secret, secret.metadata.name, self.namespace)
            raise
        if secret is not None:
            await asyncio.to_thread(
                self.core.patch_namespaced_secret, secret.metadata.name, self.namespace, owned_by(created)
            )
        self.tracked[job_id] = (body.metadata.name, attempt)
        log.info("created Job %s for %s (attempt %d)", body.metadata.name, job_id, attempt)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_forever())

    async def cancel(self, job_id: str) -> None:
        self.tracked.pop(job_id, None)  # a deletion we asked for is not a failure
        await self._delete_attempts(job_id)

    async def close(self) -> None:
        """Stop watching. Running Jobs are left alone: after a restart their jobs get a new attempt."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def poll(self) -> None:
        """One look at every tracked Job; ended ones are reported through `on_exit`."""
        if not self.tracked:
            return
        listed = await asyncio.to_thread(
            self.batch.list_namespaced_job, self.namespace, label_selector=MANAGED_SELECTOR
        )
        by_name = {j.metadata.name: j for j in listed.items}
        for job_id, (name, attempt) in list(self.tracked.items()):
            job = by_name.get(name)
            pods: list[k8s.V1Pod] = []
            if job is not None and _has_failed(job):
                pods = (
                    await asyncio.to_thread(
                        self.core.list_namespaced_pod, self.namespace, label_selector=f"job-name={name}"
                    )
                ).items
            ended = outcome(job, pods)
            if ended is None or self.tracked.get(job_id) != (name, attempt):
                continue
            del self.tracked[job_id]
            log.info("Job %s ended: code %d %s", name, ended.code, ended.message)
            await self.on_exit(job_id, attempt, ended.code, ended.message)

    async def _poll_forever(self) -> None:
        while self.tracked:
            try:
                await self.poll()
            except ApiException as exc:
                log.warning("listing Jobs failed (%s %s); retrying", exc.status, exc.reason)
            await asyncio.sleep(self.poll_s)

    async def _delete_attempts(self, job_id: str) -> None:
        listed = await asyncio.to_thread(
            self.batch.list_namespaced_job, self.namespace, label_selector=f"{MANAGED_SELECTOR},{LABEL_JOB_ID}={job_id}"
        )
        for job in listed.items:
            with contextlib.suppress(ApiException):
                await asyncio.to_thread(
                    self.batch.delete_namespaced_job,
                    job.metadata.name,
                    self.namespace,
                    propagation_policy="Background",  # its pods go too
                )
                log.info("deleted Job %s", job.metadata.name)


def _has_failed(job: k8s.V1Job) -> bool:
    return any(c.type in ("Failed", "FailureTarget") and c.status == "True" for c in (job.status.conditions or []))


def _cpu_count(cpu: str) -> int:
    try:
        return max(1, int(float(cpu[:-1]) / 1000) if cpu.endswith("m") else int(float(cpu)))
    except ValueError:
        return 1


def _load_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # outside a cluster: the user's kubeconfig


def default_namespace() -> str:
    """The pod's own namespace in a cluster, else `default`."""
    with contextlib.suppress(OSError):
        return NAMESPACE_FILE.read_text().strip()
    return "default"


def settings_from(trainer_settings) -> KubeJobSettings:
    """The trainer's `k8s_*` settings as Job settings."""
    t = trainer_settings
    return KubeJobSettings(
        namespace=t.k8s_namespace or default_namespace(),
        image=t.k8s_image,
        trainer_address=t.k8s_worker_trainer_address,
        service_account=t.k8s_service_account,
        gpu_resource=t.k8s_gpu_resource,
        gpus_per_process=t.k8s_gpus_per_process,
        cpu=t.k8s_cpu,
        memory=t.k8s_memory,
        node_selector=dict(item.split("=", 1) for item in t.k8s_node_selector),
        tolerations=parse_tolerations(t.k8s_tolerations),
        backoff_limit=t.k8s_backoff_limit,
        active_deadline_s=t.k8s_active_deadline_s,
        ttl_after_finished_s=t.k8s_ttl_after_finished_s,
        data_pvc=t.k8s_data_pvc,
        data_dir=str(t.data_dir),
        subdomain=t.k8s_worker_subdomain,
        tls_secret=t.k8s_tls_secret,
    )
