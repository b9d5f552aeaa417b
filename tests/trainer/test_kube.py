"""The Kubernetes executor against the official client's API objects.

No cluster runs here: Jobs are built and validated against the Kubernetes schema, outcomes
are computed from Job and pod objects as the API server would return them, and the
executor and trainer drive an in-memory stand-in for the two API endpoints they call.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import kubernetes_validate
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from services.trainer.executor import Launch
from services.trainer.kube import (
    DELETED,
    LABEL_JOB_ID,
    KubeJobSettings,
    KubernetesExecutor,
    Outcome,
    build_job,
    outcome,
    parse_tolerations,
    token_secret,
)
from services.trainer.server import build_server as build_trainer
from services.trainer.settings import TrainerSettings
from tests.trainer.conftest import memorization_jsonl
from tunedock.client import TrainerClient
from tunedock.errors import InvalidArgument
from tunedock.v1 import common_pb2
from tunedock.v1 import trainer_pb2 as pb

K8S_VERSION = kubernetes_validate.latest_version()
SETTINGS = KubeJobSettings(
    namespace="ml",
    image="registry.example/tunedock:0.1.0-cuda",
    trainer_address="tunedock-trainer-worker:50054",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=parse_tolerations(["nvidia.com/gpu:NoSchedule"]),
    memory="96Gi",
    cpu="16",
    data_pvc="tunedock-trainer-data",
    data_dir="/data",
)


def as_dict(obj) -> dict:
    return k8s.ApiClient().sanitize_for_serialization(obj)


def test_qlora_job_on_gpus_has_command_resources_labels_and_env():
    job = build_job("job-0123456789ab", 2, Launch(method="qlora", processes_per_node=2), SETTINGS)
    kubernetes_validate.validate(as_dict(job), K8S_VERSION, strict=True)
    assert job.metadata.name == "tdw-job-0123456789ab-a2" and job.metadata.namespace == "ml"
    labels = job.metadata.labels
    assert labels[LABEL_JOB_ID] == "job-0123456789ab" and labels["tunedock.dev/attempt"] == "2"
    assert labels["tunedock.dev/method"] == "qlora" and job.spec.template.metadata.labels == labels
    spec = job.spec
    assert (spec.backoff_limit, spec.active_deadline_seconds, spec.ttl_seconds_after_finished) == (0, 86400, 3600)
    pod = spec.template.spec
    assert pod.restart_policy == "Never" and pod.service_account_name == "tunedock-worker"
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    (container,) = pod.containers
    assert container.command == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        "--max-restarts=0",
        "-m",
        "services.trainer.worker",
        "--job-id",
        "job-0123456789ab",
        "--attempt",
        "2",
        "--trainer",
        "tunedock-trainer-worker:50054",
    ]
    assert container.resources.limits == {"memory": "96Gi", "nvidia.com/gpu": "2"}
    assert container.resources.requests == {"cpu": "16", "memory": "96Gi"}
    env = {e.name: e.value for e in container.env}
    assert env["TUNEDOCK_JOB_ID"] == "job-0123456789ab" and env["OMP_NUM_THREADS"] == "8"
    assert {m.mount_path for m in container.volume_mounts} == {"/tmp", "/dev/shm", "/data"}
    assert pod.security_context.run_as_non_root and container.security_context.allow_privilege_escalation is False
    assert pod.automount_service_account_token is False


def test_the_worker_token_is_a_mounted_secret_of_the_attempt_not_an_environment_variable():
    launch = Launch(method="lora", token="tdk_worker_secret_value")
    job = build_job("job-0123456789ab", 1, launch, SETTINGS)
    kubernetes_validate.validate(as_dict(job), K8S_VERSION, strict=True)
    assert "tdk_worker_secret_value" not in str(as_dict(job))  # `kubectl get jobs -o yaml` shows no token
    (container,) = job.spec.template.spec.containers
    env = {e.name: e.value for e in container.env}
    assert "TUNEDOCK_TOKEN" not in env and env["TUNEDOCK_TOKEN_FILE"] == "/etc/tunedock/job-token/token"
    (volume,) = [v for v in job.spec.template.spec.volumes if v.name == "job-token"]
    assert volume.secret.secret_name == job.metadata.name and volume.secret.default_mode == 0o400
    secret = token_secret("job-0123456789ab", 1, launch.token, SETTINGS)
    kubernetes_validate.validate(as_dict(secret), K8S_VERSION, strict=True)
    assert secret.metadata.name == job.metadata.name and secret.string_data == {"token": "tdk_worker_secret_value"}


def test_the_token_secret_is_owned_by_its_job_and_goes_with_it():
    async def scenario():
        cluster = FakeCluster()

        async def on_exit(*args):
            pass

        ex = KubernetesExecutor(SETTINGS, on_exit, batch_api=cluster, core_api=cluster, poll_s=3600)
        await ex.start("job-aaaaaaaaaaaa", 1, Launch(method="lora", token="tdk_one"))
        (secret,) = cluster.secrets.values()
        (owner,) = secret.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid) == ("Job", "tdw-job-aaaaaaaaaaaa-a1", "uid-tdw-job-aaaaaaaaaaaa-a1")
        await ex.start("job-aaaaaaaaaaaa", 2, Launch(method="lora", token="tdk_two"))  # the next attempt
        assert [s.string_data["token"] for s in cluster.secrets.values()] == ["tdk_two"]
        await ex.cancel("job-aaaaaaaaaaaa")
        assert cluster.secrets == {}
        await ex.close()

    asyncio.run(scenario())


def test_single_process_job_runs_the_worker_directly_and_several_nodes_make_an_indexed_job():
    one = build_job("job-aaaaaaaaaaaa", 1, Launch(method="lora"), SETTINGS)
    assert one.spec.template.spec.containers[0].command[:3] == ["python", "-m", "services.trainer.worker"]
    assert one.spec.completion_mode is None
    multi = build_job("job-aaaaaaaaaaaa", 1, Launch(method="full", processes_per_node=8, nodes=4), SETTINGS)
    kubernetes_validate.validate(as_dict(multi), K8S_VERSION, strict=True)
    assert (multi.spec.completion_mode, multi.spec.completions, multi.spec.parallelism) == ("Indexed", 4, 4)
    pod = multi.spec.template.spec
    assert pod.subdomain == "tunedock-workers"
    command = pod.containers[0].command
    assert "--nnodes=4" in command and "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert "--master-addr=tdw-job-aaaaaaaaaaaa-a1-0.tunedock-workers" in command
    assert any(e.name == "JOB_COMPLETION_INDEX" and e.value_from for e in pod.containers[0].env)
    assert pod.containers[0].resources.limits["nvidia.com/gpu"] == "8"


# ----------------------------------------------------------------------------------- outcome


def job_with(*conditions: tuple[str, str, str]) -> k8s.V1Job:
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name="tdw-job-x-a1"),
        status=k8s.V1JobStatus(
            conditions=[k8s.V1JobCondition(type=t, status="True", reason=r, message=m) for t, r, m in conditions]
        ),
    )


def pod_with(reason: str, exit_code: int, message: str = "", pod_reason: str | None = None) -> k8s.V1Pod:
    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, reason=reason, message=message or None)
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="tdw-job-x-a1-abcde"),
        status=k8s.V1PodStatus(
            phase="Failed",
            reason=pod_reason,
            container_statuses=[
                k8s.V1ContainerStatus(
                    name="worker",
                    image="i",
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=k8s.V1ContainerState(terminated=terminated),
                )
            ],
        ),
    )


FAILED = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


@pytest.mark.parametrize(
    ("job", "pods", "expected"),
    [
        (job_with(), [], None),
        (job_with(("Suspended", "", "")), [], None),
        (job_with(("SuccessCriteriaMet", "", ""), ("Complete", "", "")), [], Outcome(0, "")),
        (
            job_with(FAILED),
            [pod_with("OOMKilled", 137)],
            Outcome(-9, "pod tdw-job-x-a1-abcde: container 'worker' was OOMKilled (over its memory limit)"),
        ),
        (
            job_with(FAILED),
            [pod_with("Error", 1, "ValueError: no training example\n")],
            Outcome(1, "pod tdw-job-x-a1-abcde: container 'worker' exited 1 (Error): ValueError: no training example"),
        ),
        (
            job_with(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")),
            [],
            Outcome(1, "Job failed: DeadlineExceeded: Job was active longer than specified deadline"),
        ),
        (None, [], DELETED),
    ],
    ids=["running", "suspended", "complete", "oom-killed", "error-exit", "deadline", "deleted"],
)
def test_outcome_from_job_and_pod_conditions(job, pods, expected):
    assert outcome(job, pods) == expected


def test_a_job_being_deleted_counts_as_deleted():
    job = job_with()
    job.metadata.deletion_timestamp = datetime.now(UTC)
    assert outcome(job, []) == DELETED


# ---------------------------------------------------------------------------------- executor


class FakeCluster:
    """The four calls the executor makes, over in-memory Job and pod objects (no scheduling)."""

    def __init__(self) -> None:
        self.jobs: dict[str, k8s.V1Job] = {}
        self.pods: dict[str, list[k8s.V1Pod]] = {}
        self.secrets: dict[str, k8s.V1Secret] = {}
        self.deleted: list[str] = []

    @staticmethod
    def _matches(labels: dict, selector: str) -> bool:
        return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",") if part))

    def create_namespaced_job(self, namespace, body):
        if body.metadata.name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        body.status = k8s.V1JobStatus(active=1)
        body.metadata.uid = f"uid-{body.metadata.name}"
        self.jobs[body.metadata.name] = body
        return body

    def create_namespaced_secret(self, namespace, body):
        self.secrets[body.metadata.name] = body
        return body

    def patch_namespaced_secret(self, name, namespace, body):
        self.secrets[name].metadata.owner_references = [
            k8s.V1OwnerReference(
                api_version=o["apiVersion"], kind=o["kind"], name=o["name"], uid=o["uid"], block_owner_deletion=False
            )
            for o in body["metadata"]["ownerReferences"]
        ]

    def delete_namespaced_secret(self, name, namespace):
        self.secrets.pop(name, None)

    def list_namespaced_job(self, namespace, label_selector=""):
        items = [j for j in self.jobs.values() if j.metadata.namespace == namespace]
        return k8s.V1JobList(items=[j for j in items if self._matches(j.metadata.labels, label_selector)])

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        if name not in self.jobs:
            raise ApiException(status=404, reason="NotFound")
        uid = self.jobs.pop(name).metadata.uid
        self.pods.pop(name, None)
        self.deleted.append(name)
        # The garbage collector: what the Job owned goes with it.
        for secret_name, secret in list(self.secrets.items()):
            if any(o.uid == uid for o in secret.metadata.owner_references or []):
                del self.secrets[secret_name]

    def list_namespaced_pod(self, namespace, label_selector=""):
        name = label_selector.removeprefix("job-name=")
        return k8s.V1PodList(items=self.pods.get(name, []))

    # what the cluster would do
    def finish(self, name: str, *conditions, pods=()) -> None:
        self.jobs[name].status = k8s.V1JobStatus(
            conditions=[k8s.V1JobCondition(type=t, status="True", reason=r, message=m) for t, r, m in conditions]
        )
        self.pods[name] = list(pods)


def test_executor_reports_ends_and_deletes_on_cancel():
    async def scenario():
        cluster = FakeCluster()
        exits = []

        async def on_exit(job_id, attempt, code, message):
            exits.append((job_id, attempt, code, message))

        ex = KubernetesExecutor(SETTINGS, on_exit, batch_api=cluster, core_api=cluster, poll_s=3600)
        await ex.start("job-aaaaaaaaaaaa", 1, Launch(method="lora"))
        await ex.start("job-bbbbbbbbbbbb", 1, Launch(method="lora"))
        await ex.start("job-cccccccccccc", 1, Launch(method="lora"))
        assert set(cluster.jobs) == {"tdw-job-aaaaaaaaaaaa-a1", "tdw-job-bbbbbbbbbbbb-a1", "tdw-job-cccccccccccc-a1"}
        await ex.poll()
        assert exits == []  # all still running
        cluster.finish("tdw-job-aaaaaaaaaaaa-a1", ("Complete", "", ""))
        cluster.finish("tdw-job-bbbbbbbbbbbb-a1", FAILED, pods=[pod_with("OOMKilled", 137)])
        await ex.poll()
        assert sorted(exits) == [
            ("job-aaaaaaaaaaaa", 1, 0, ""),
            (
                "job-bbbbbbbbbbbb",
                1,
                -9,
                "pod tdw-job-x-a1-abcde: container 'worker' was OOMKilled (over its memory limit)",
            ),
        ]
        # A new attempt replaces the failed attempt's Job.
        await ex.start("job-bbbbbbbbbbbb", 2, Launch(method="lora"))
        assert "tdw-job-bbbbbbbbbbbb-a1" in cluster.deleted and "tdw-job-bbbbbbbbbbbb-a2" in cluster.jobs
        # Cancel deletes the Job and is not reported as an exit; a deletion by someone else is.
        await ex.cancel("job-cccccccccccc")
        assert "tdw-job-cccccccccccc-a1" not in cluster.jobs
        cluster.delete_namespaced_job("tdw-job-bbbbbbbbbbbb-a2", "ml")
        exits.clear()
        await ex.poll()
        assert exits == [("job-bbbbbbbbbbbb", 2, DELETED.code, DELETED.message)]
        await ex.close()

    asyncio.run(scenario())


def test_trainer_with_kubernetes_executor_maps_failed_jobs_into_job_state(tmp_path, tiny_model_dir):
    """Through the real trainer: an OOMKilled pod is retried as a new Job, then fails the job with the reason."""
    cluster = FakeCluster()
    registry = ServerThread(lambda: build_registry(RegistrySettings(port=0, metrics_port=-1, data_dir=tmp_path)))
    settings = TrainerSettings(
        port=0,
        worker_port=0,
        metrics_port=-1,
        data_dir=tmp_path,
        max_attempts=2,
        registry_address=registry.address,
    )

    async def build():
        server = await build_trainer(settings)
        core = server.bindings[0].servicer.core
        core.executor = KubernetesExecutor(SETTINGS, core.worker_exited, cluster, cluster, poll_s=0.05)
        server.on_stop.insert(0, core.executor.close)
        return server

    trainer = ServerThread(build)
    client = TrainerClient(trainer.address, timeout=30)
    try:
        data = tmp_path / "d.jsonl"
        data.write_bytes(memorization_jsonl())
        dataset = client.upload_dataset(data)
        spec = pb.JobSpec(
            base_model=str(tiny_model_dir),
            method=common_pb2.MethodConfig(qlora=common_pb2.QLoraConfig(lora=common_pb2.LoraConfig(r=4))),
            train_dataset_ids=[dataset.id],
            output_name="k8s-qlora",
            hyperparameters=pb.Hyperparameters(processes_per_node=2, nodes=2),
        )
        info = client.info()  # what a client learns before submitting
        assert (info.executor, info.multi_node, info.device, info.gpu_count) == ("kubernetes", True, "cuda", 0)
        job = client.submit(spec)  # nodes=2 is fine: this executor runs several nodes
        first = f"tdw-{job.id}-a1"
        assert first in cluster.jobs and cluster.jobs[first].spec.completions == 2
        cluster.finish(first, FAILED, pods=[pod_with("OOMKilled", 137)])
        _until(lambda: f"tdw-{job.id}-a2" in cluster.jobs)
        assert first in cluster.deleted and client.get(job.id).attempt == 2
        cluster.finish(f"tdw-{job.id}-a2", FAILED, pods=[pod_with("OOMKilled", 137)])
        _until(lambda: client.get(job.id).state == pb.JOB_STATE_FAILED)
        error = client.get(job.id).error
        assert "after 2 attempt(s)" in error and "container 'worker' was OOMKilled" in error

        cancelled = client.submit(spec)
        client.cancel(cancelled.id)
        assert f"tdw-{cancelled.id}-a1" in cluster.deleted
        assert client.get(cancelled.id).state == pb.JOB_STATE_CANCELLED
    finally:
        client.close()
        trainer.stop()
        registry.stop()


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kubernetes_executor_needs_the_address_pods_dial():
    with pytest.raises(InvalidArgument, match="executor kubernetes needs k8s_worker_trainer_address"):
        TrainerSettings(executor="kubernetes")
